"""docs/science.md §1 / §12 checks for the Chinchilla law, the Huber objective and the Approach-3 fitter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.errors import UserError
from lmlab.science.chinchilla import (
    PRESETS,
    bootstrap_chinchilla,
    chinchilla_loss,
    compute_optimal,
    default_grid,
    fit_chinchilla,
    huber_objective,
    raw_from_params,
    small_grid,
)
from lmlab.science.huber import huber, huber_sum

POINTS = [(70e9, 1.4e12), (1e9, 20e9), (125e6, 2.5e9), (10e6, 200e6)]
TABLE_L = {
    "hoffmann-rounded": [1.9366, 2.5800, 3.3674, 5.3306],
    "hoffmann-tex": [1.9208, 2.5307, 3.2853, 5.1825],
    "epoch": [1.9739, 2.5301, 3.3144, 5.5064],
}
TABLE_ALLOC = {
    "hoffmann-rounded": (3.25e10, 3.02e12, 92.8),
    "hoffmann-tex": (4.07e10, 2.41e12, 59.0),
    "epoch": (7.30e10, 1.34e12, 18.4),
}
C_CHINCHILLA = 6 * 70e9 * 1.4e12


def design(seed: int, n: int = 200):
    """§12 design: N log-uniform in [5e7, 1.6e10], D log-uniform in [8e8, 3.2e11]."""
    rng = np.random.default_rng(seed)
    big_n = np.exp(rng.uniform(math.log(5e7), math.log(1.6e10), n))
    big_d = np.exp(rng.uniform(math.log(8e8), math.log(3.2e11), n))
    return rng, big_n, big_d


@pytest.mark.parametrize("name", list(TABLE_L))
def test_loss_table(name):
    got = [float(chinchilla_loss(n, d, PRESETS[name])) for n, d in POINTS]
    np.testing.assert_allclose(got, TABLE_L[name], atol=1e-4)


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


@pytest.mark.parametrize("name", list(TABLE_ALLOC))
def test_allocation_table(name):
    n_opt, d_opt = compute_optimal(C_CHINCHILLA, PRESETS[name])
    want_n, want_d, want_ratio = TABLE_ALLOC[name]
    assert _sig3(float(n_opt)) == want_n
    assert _sig3(float(d_opt)) == want_d
    assert _sig3(float(d_opt / n_opt)) == want_ratio
    assert 6 * n_opt * d_opt == pytest.approx(C_CHINCHILLA, rel=1e-9)


@pytest.mark.parametrize("name", list(PRESETS))
def test_allocation_matches_dense_argmin(name):
    p = PRESETS[name]
    grid_n = np.geomspace(1e9, 1e12, 400001)
    losses = chinchilla_loss(grid_n, C_CHINCHILLA / (6 * grid_n), p)
    n_opt, _ = compute_optimal(C_CHINCHILLA, p)
    assert grid_n[np.argmin(losses)] == pytest.approx(float(n_opt), rel=1e-3)


def test_published_exponents():
    assert PRESETS["hoffmann-rounded"].a_opt == pytest.approx(0.4516, abs=1e-4)
    assert PRESETS["hoffmann-tex"].a_opt == pytest.approx(0.4565, abs=1e-4)
    assert PRESETS["epoch"].a_opt == pytest.approx(0.513, abs=1e-3)


def test_huber_values_and_sum():
    assert float(huber(5e-4)) == pytest.approx(1.25e-7, rel=1e-12)
    assert float(huber(-2e-3)) == pytest.approx(1.5e-6, rel=1e-12)
    r = np.array([5e-4, -2e-3, 1e-5])
    assert huber_sum(np.concatenate([r, r])) == pytest.approx(2 * huber_sum(r), rel=1e-15)


def test_objective_is_a_sum_and_gradient_is_right():
    _, n, d = design(3, 30)
    loss = PRESETS["epoch"].loss(n, d) * np.exp(0.02 * np.random.default_rng(4).standard_normal(30))
    args = (np.log(n), np.log(d), np.log(loss))
    x = raw_from_params(PRESETS["hoffmann-tex"])
    f1, g = huber_objective(x, *args)
    f2, _ = huber_objective(x, *(np.concatenate([a, a]) for a in args))
    assert f2 == pytest.approx(2 * f1, rel=1e-12)
    eps = 1e-6
    numeric = [
        (huber_objective(x + eps * e, *args)[0] - huber_objective(x - eps * e, *args)[0]) / (2 * eps) for e in np.eye(5)
    ]
    np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-9)


def test_default_grid_has_4500_starts():
    grid = default_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 0])) == [0, 5, 10, 15, 20, 25]
    assert sorted(set(grid[:, 2])) == [-1, -0.5, 0, 0.5, 1]
    assert sorted(set(grid[:, 3])) == [0, 0.5, 1, 1.5, 2]


def test_noise_free_recovery_full_grid():
    """The one test that runs the default 4500-start grid (§12: 1e-3 relative, objective < 1e-10)."""
    _, n, d = design(0)
    p = PRESETS["epoch"]
    fit = fit_chinchilla(n, d, p.loss(n, d))
    assert fit.n_starts == 4500
    assert fit.objective < 1e-10
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.params, k) == pytest.approx(getattr(p, k), rel=1e-3), k


@pytest.mark.parametrize(("sigma", "tol_exp", "tol_e"), [(0.005, 0.03, 0.05), (0.01, 0.06, 0.08)])
def test_noisy_recovery(sigma, tol_exp, tol_e):
    rng, n, d = design(1)
    p = PRESETS["epoch"]
    loss = p.loss(n, d) * np.exp(sigma * rng.standard_normal(len(n)))
    fit = fit_chinchilla(n, d, loss, grid=default_grid()[::9])  # reduced grid: 500 starts keeps this test fast
    assert abs(fit.params.alpha - p.alpha) < tol_exp
    assert abs(fit.params.beta - p.beta) < tol_exp
    assert abs(fit.params.E - p.E) < tol_e


def test_batched_method_matches_per_start_scipy():
    rng, n, d = design(2, 60)
    loss = PRESETS["epoch"].loss(n, d) * np.exp(0.01 * rng.standard_normal(60))
    grid = small_grid()[::3]
    a = fit_chinchilla(n, d, loss, grid=grid)
    b = fit_chinchilla(n, d, loss, grid=grid, method="scipy")
    assert a.objective == pytest.approx(b.objective, rel=1e-8)
    np.testing.assert_allclose(a.raw, b.raw, rtol=1e-4, atol=1e-6)


def test_bootstrap_intervals_cover_the_truth():
    rng, n, d = design(5, 80)
    p = PRESETS["epoch"]
    loss = p.loss(n, d) * np.exp(0.005 * rng.standard_normal(80))
    fit = fit_chinchilla(n, d, loss, grid=small_grid())
    ci = bootstrap_chinchilla(n, d, loss, fit, n_resamples=40, seed=42)
    assert set(ci) == {"E", "A", "B", "alpha", "beta", "a_opt"}
    for k in ("E", "alpha", "beta"):
        lo, hi = ci[k]
        assert lo < getattr(fit.params, k) < hi
        assert hi - lo < 0.5
    assert ci == bootstrap_chinchilla(n, d, loss, fit, n_resamples=40, seed=42)  # seeded


def test_bad_designs_are_user_errors():
    _, n, d = design(0, 20)
    loss = PRESETS["epoch"].loss(n, d)
    with pytest.raises(UserError, match="at least 6"):
        fit_chinchilla(n[:4], d[:4], loss[:4])
    with pytest.raises(UserError, match="same model size"):
        fit_chinchilla(np.full(20, 1e8), d, loss)
    with pytest.raises(UserError, match="same token count"):
        fit_chinchilla(n, np.full(20, 1e10), loss)
    with pytest.raises(UserError, match="finite"):
        fit_chinchilla(n, d, np.where(np.arange(20) == 3, np.nan, loss))


def test_batched_objective_matches_single_and_chunks(monkeypatch):
    from lmlab.science import chinchilla

    rng, n, d = design(6, 25)
    loss = PRESETS["epoch"].loss(n, d) * np.exp(0.01 * rng.standard_normal(25))
    args = (np.log(n), np.log(d), np.log(loss))
    x = default_grid()[::450]
    weights = rng.integers(0, 3, size=(len(x), 25)).astype(float)
    f_all, g_all = chinchilla.huber_objective_batched(x, *args, 1e-3, weights)
    monkeypatch.setattr(chinchilla, "BATCH_ELEMENTS", 60)  # 2 rows per chunk
    f_chunk, g_chunk = chinchilla.huber_objective_batched(x, *args, 1e-3, weights)
    np.testing.assert_allclose(f_all, f_chunk, rtol=1e-13)
    np.testing.assert_allclose(g_all, g_chunk, rtol=1e-13, atol=1e-16)
    for i, xi in enumerate(x):
        keep = np.repeat(np.arange(25), weights[i].astype(int))
        f, g = huber_objective(xi, *(a[keep] for a in args))
        assert f_all[i] == pytest.approx(f, rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(g_all[i], g, rtol=1e-10, atol=1e-14)
