"""docs/science.md §3 (optimal LR across horizons), §4 (sampling ratios) and Approach-2 IsoFLOP checks (§12)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.errors import UserError
from lmlab.science.chinchilla import PRESETS, ChinchillaParams
from lmlab.science.isoflop import fit_isoflop
from lmlab.science.lr_horizon import fit_lr_horizon, fit_lr_joint, local_lr_vertex, lr_vertex, transfer_lr
from lmlab.science.mixture import (
    family_brackets,
    fit_family_law,
    fit_gamma,
    optimal_ratios,
    weighted_mixture_loss,
)

# ---------------------------------------------------------------- §3


def test_horizon_fit_recovers_beta():
    d = np.geomspace(1e8, 1e10, 7)
    fit = fit_lr_horizon(d, 0.05 * d ** (-0.32))
    assert fit.beta == pytest.approx(0.32, abs=1e-6)
    assert fit.B == pytest.approx(0.05, rel=1e-6)


def test_vertex_finder_recovers_lr_star():
    lr_star = 2.7e-3
    lrs = np.geomspace(1e-4, 3e-2, 9)
    losses = 0.4 * (np.log(lrs) - math.log(lr_star)) ** 2 + 3.1
    v = lr_vertex(lrs, losses)
    assert v.lr_opt == pytest.approx(lr_star, rel=1e-6)
    assert v.loss_opt == pytest.approx(3.1, abs=1e-9)
    assert v.inside


def test_vertex_ignores_diverged_runs_and_refuses_bad_sweeps():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    losses = [3.5, 3.2, 3.1, 3.3, float("nan")]
    assert lr_vertex(lrs, losses).lr_opt == pytest.approx(lr_vertex(lrs[:4], losses[:4]).lr_opt)
    with pytest.raises(UserError, match="at least 3"):
        lr_vertex(lrs[:2], losses[:2])
    with pytest.raises(UserError, match="no minimum"):
        lr_vertex(lrs[:3], [3.0, 3.5, 3.0])


def test_rule_of_thumb():
    assert transfer_lr(3e-3, 1e9, 1e10) == pytest.approx(1.43589e-3, rel=1e-5)


def test_joint_fit():
    n = np.repeat([1e7, 1e8, 1e9], 3)
    d = np.tile([1e8, 1e9, 1e10], 3)
    fit = fit_lr_joint(n, d, 0.3 * n ** (-0.23) * d ** (-0.32))
    assert (fit.alpha, fit.beta) == pytest.approx((0.23, 0.32), abs=1e-9)
    with pytest.raises(UserError, match="two model sizes"):
        fit_lr_joint([1e7, 1e7], [1e8, 1e9], [1e-3, 5e-4])


# ---------------------------------------------------------------- §4


def test_equal_gamma_ratios():
    p = optimal_ratios([0.2, 0.2], [1.0, 4.0])
    np.testing.assert_allclose(p, [0.239532, 0.760468], atol=1e-6)
    closed = np.array([1.0, 4.0]) ** (1 / 1.2)
    np.testing.assert_allclose(p, closed / closed.sum(), rtol=1e-10)


def test_unequal_gamma_ratios_satisfy_stationarity():
    gamma = np.array([0.1, 0.3])
    p = optimal_ratios(gamma, [1.0, 1.0])
    np.testing.assert_allclose(p, [0.258621, 0.741379], atol=1e-6)
    marginal = gamma * p ** (-gamma - 1)
    np.testing.assert_allclose(marginal, [0.442659, 0.442659], atol=1e-6)
    # It is the minimum on the simplex: nearby feasible points are worse.
    best = weighted_mixture_loss(p, gamma, [1, 1])
    for eps in (-1e-3, 1e-3):
        q = p + np.array([eps, -eps])
        assert weighted_mixture_loss(q, gamma, [1, 1]) > best


def test_normalised_ratios_do_not_depend_on_scale_unnormalised_do():
    laws = [ChinchillaParams(1.5, 300, 800, 0.3, 0.3), ChinchillaParams(2.5, 900, 2000, 0.4, 0.25)]
    gamma, w = [0.15, 0.3], [1.0, 1.0]
    normalised = optimal_ratios(gamma, w)
    small = optimal_ratios(gamma, w, family_brackets(laws, 85e6, 2e9))
    large = optimal_ratios(gamma, w, family_brackets(laws, 1.2e9, 2e10))
    assert not np.allclose(small, large, atol=1e-4)
    np.testing.assert_allclose(optimal_ratios(gamma, w, None), normalised)


def test_fit_gamma_and_family_law():
    law = PRESETS["epoch"]
    rows = []
    for n in (5e7, 2e8, 8e8, 3e9):
        for d in (1e9, 4e9, 1.6e10, 6.4e10):
            for p in (0.1, 0.3, 0.6, 1.0):
                rows.append((n, d, p, float(law.loss(n, d)) * p**-0.2))
    n, d, p, loss = map(np.array, zip(*rows))
    assert fit_gamma(n, d, p, loss).gamma == pytest.approx(0.2, abs=1e-10)
    from lmlab.science.chinchilla import small_grid

    fam = fit_family_law(n, d, p, loss, grid=small_grid())
    assert fam.gamma == pytest.approx(0.2, abs=1e-10)
    assert fam.bracket.params.alpha == pytest.approx(law.alpha, rel=1e-3)
    with pytest.raises(UserError, match="two or more sampling ratios"):
        fit_gamma(n[p == 1.0], d[p == 1.0], p[p == 1.0], loss[p == 1.0])


def test_bad_ratio_inputs():
    with pytest.raises(UserError, match="positive"):
        optimal_ratios([0.0, 0.2], [1, 1])


# ---------------------------------------------------------------- Approach 2


def test_isoflop_recovers_allocation_exponent():
    law = PRESETS["epoch"]
    n_all, c_all, l_all = [], [], []
    for c in np.geomspace(1e19, 1e22, 4):
        n_opt = float(np.sqrt(c / 6 / 20))
        for n in n_opt * np.geomspace(0.25, 4, 9):
            n_all.append(n)
            c_all.append(c)
            l_all.append(float(law.loss(n, c / (6 * n))))
    fit = fit_isoflop(n_all, c_all, l_all)
    assert len(fit.profiles) == 4
    assert fit.a == pytest.approx(law.a_opt, abs=0.02)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(UserError, match="two compute budgets"):
        fit_isoflop(n_all[:9], c_all[:9], l_all[:9])


def test_local_vertex_ignores_the_far_flanks_that_bias_the_global_one():
    lr_star = 3e-3
    lrs = lr_star * 2.0 ** (np.arange(-6, 7) / 2)  # √2 spacing, 13 LRs
    x = np.log(lrs / lr_star)
    losses = 3 + 0.1 * x**2 + np.where(x > 1.2, 2.0 * (x - 1.2) ** 2, 0.0)  # steep on the right (near divergence)
    local = local_lr_vertex(lrs, losses)
    assert local.lr_opt == pytest.approx(lr_star, rel=1e-9) and local.inside
    assert local.window == pytest.approx((lr_star / 2, lr_star * 2))
    assert abs(math.log(lr_vertex(lrs, losses).lr_opt / lr_star)) > 0.2  # the whole-sweep parabola is pulled left
    lo, hi = local.interval
    assert lo == pytest.approx(lr_star, rel=1e-6) and hi == pytest.approx(lr_star, rel=1e-6)  # exact: zero width


def test_local_vertex_interval_covers_the_optimum_under_noise():
    rng = np.random.default_rng(0)
    lr_star, covered, widths = 1e-2, 0, []
    lrs = np.repeat(lr_star * 2.0 ** (np.arange(-4, 5) / 2), 2)  # 2 seeds per LR
    for _ in range(200):
        losses = 2 + 0.05 * np.log(lrs / lr_star) ** 2 + 0.002 * rng.standard_normal(len(lrs))
        v = local_lr_vertex(lrs, losses)
        covered += v.interval[0] <= lr_star <= v.interval[1]
        widths.append(v.interval[1] / v.interval[0])
    assert covered / 200 == pytest.approx(0.95, abs=0.04)
    assert np.median(widths) < 1.5
    with pytest.raises(UserError, match="at least 3 distinct"):
        local_lr_vertex([1e-3, 2e-3], [1.0, 1.1])
