"""docs/science.md §2 / §12 checks: S1 and S2 definitions, the schedule table, and the joint fit."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.errors import UserError
from lmlab.science.annealing import (
    REFERENCE_FIT,
    AnnealingParams,
    Curve,
    annealing_area,
    annealing_objective,
    default_annealing_grid,
    detect_warmup,
    fit_annealing,
    forward_area,
    law_lrs,
)
from lmlab.science.schedules import (
    constant_schedule,
    cosine_schedule,
    make_schedule,
    multistep_schedule,
    power_schedule,
    rewarm_schedule,
    wsd_schedule,
)

MAX_LR, WARMUP, STEPS = 2e-4, 500, 20000
EVAL_STEPS = np.arange(1000, 20001, 1000)


def schedules():
    return {
        "cosine": cosine_schedule(STEPS, MAX_LR, warmup=WARMUP),
        "constant": constant_schedule(STEPS, MAX_LR, warmup=WARMUP),
        "wsd": wsd_schedule(STEPS, MAX_LR, decay_fraction=0.2, warmup=WARMUP),
    }


def test_constant_lr_areas():
    lrs = np.full(100, 3e-4)
    np.testing.assert_allclose(forward_area(lrs), (np.arange(100) + 1) * 3e-4)
    np.testing.assert_array_equal(annealing_area(lrs), np.zeros(100))


@pytest.mark.parametrize("lam", [0.999, 0.9, 0.5])
def test_single_drop_closed_form(lam):
    k, e0, e1 = 40, 1.0, 0.25
    lrs = np.where(np.arange(100) < k, e0, e1)
    s = np.arange(k, 100)
    want = (e0 - e1) * (1 - lam ** (s - k + 1)) / (1 - lam)
    np.testing.assert_allclose(annealing_area(lrs, lam)[k:], want, rtol=1e-12)
    np.testing.assert_array_equal(annealing_area(lrs, lam)[:k], 0.0)


def test_momentum_limits():
    lrs = cosine_schedule(200, 1.0)
    np.testing.assert_allclose(annealing_area(lrs, 1.0), np.cumsum(lrs[0] - lrs), atol=1e-12)
    np.testing.assert_allclose(annealing_area(lrs, 0.0), lrs[0] - lrs, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "s1_10k", "s2_10k", "s1_20k", "s2_20k", "l_20k"),
    [
        ("cosine", 1.67035, 0.080400, 2.05010, 0.197474, 2.8362),
        ("constant", 2.00020, 0.0, 4.00020, 0.0, 2.8283),
        ("wsd", 2.00020, 0.0, 3.60010, 0.150963, 2.7782),
    ],
)
def test_schedule_table(name, s1_10k, s2_10k, s1_20k, s2_20k, l_20k):
    lrs = law_lrs(schedules()[name], WARMUP)
    s1, s2 = forward_area(lrs), annealing_area(lrs)
    assert s1[10000] == pytest.approx(s1_10k, abs=1e-4)
    assert s2[10000] == pytest.approx(s2_10k, abs=1e-4)
    assert s1[20000] == pytest.approx(s1_20k, abs=1e-4)
    assert s2[20000] == pytest.approx(s2_20k, abs=1e-4)
    assert REFERENCE_FIT.predict(schedules()[name], WARMUP)[20000] == pytest.approx(l_20k, abs=1e-4)


def test_warmup_uses_peak_lr():
    lrs = cosine_schedule(1000, 1e-3, warmup=100)
    assert lrs[0] == pytest.approx(1e-5)  # training warms up linearly ...
    eff = law_lrs(lrs, 100)
    np.testing.assert_array_equal(eff[:100], 1e-3)  # ... the law sees the peak
    assert detect_warmup(lrs) == 99


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    s1 = rng.uniform(0.2, 4.0, 30)
    s2 = rng.uniform(0.0, 0.2, 30)
    log_l = np.log(rng.uniform(2.7, 3.2, 30))
    x = np.array([2.5, 0.5, 0.3, 0.5])
    _, g = annealing_objective(x, s1, s2, log_l)
    eps = 1e-7
    num = [
        (annealing_objective(x + eps * e, s1, s2, log_l)[0] - annealing_objective(x - eps * e, s1, s2, log_l)[0])
        / (2 * eps)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-10)


def _curves(noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for name in ("cosine", "constant"):
        lrs = schedules()[name]
        loss = REFERENCE_FIT.predict(lrs, WARMUP)[EVAL_STEPS]
        loss = loss * np.exp(noise * rng.standard_normal(len(loss)))
        out.append(Curve(name, lrs, EVAL_STEPS, loss, WARMUP))
    return out


def test_default_grid_is_54_starts():
    grid = default_annealing_grid()
    assert grid.shape == (54, 4)
    assert sorted(set(grid[:, 0])) == [0.1, 2.1]
    assert sorted(set(grid[:, 1])) == [1.0, 11.5, 22.0]


def test_noise_free_joint_fit_recovers_constants_and_predicts_wsd():
    fit = fit_annealing(_curves())
    want = REFERENCE_FIT
    for k in ("L0", "A", "C", "alpha"):
        assert getattr(fit.params, k) == pytest.approx(getattr(want, k), abs=1e-4), k
    wsd = schedules()["wsd"]
    pred, true = fit.params.predict(wsd, WARMUP), want.predict(wsd, WARMUP)
    np.testing.assert_allclose(pred[1000:], true[1000:], atol=1e-5)
    assert fit.objective < 1e-10


def test_noisy_fit_predicts_wsd_within_002():
    fit = fit_annealing(_curves(noise=0.002, seed=1))
    wsd = schedules()["wsd"]
    pred, true = fit.params.predict(wsd, WARMUP), REFERENCE_FIT.predict(wsd, WARMUP)
    assert np.max(np.abs(pred[1000:] - true[1000:])) < 0.02


def test_fit_rejects_too_few_points():
    c = _curves()[0]
    with pytest.raises(UserError, match="at least 5"):
        fit_annealing([Curve("c", c.lrs, c.steps[:3], c.losses[:3], WARMUP)])


def test_schedule_shapes():
    wsd = wsd_schedule(100, 1.0, decay_fraction=0.2, shape="sqrt")
    assert wsd[80] == 1.0 and wsd[100] == 0.0 and wsd[90] == pytest.approx(1 - np.sqrt(0.5))
    ms = multistep_schedule(10, 1.0, milestones=[3, 6], factor=0.5)
    np.testing.assert_allclose(ms, [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25])
    rw = rewarm_schedule(100, 1.0, restart=50, rewarm_steps=10, min_lr=0.1)
    assert (
        len(rw) == 101
        and rw[50] == pytest.approx(0.1)
        and rw[60] == pytest.approx(1.0)
        and rw[100] == pytest.approx(0.1)
    )
    with pytest.raises(UserError, match="milestones"):
        make_schedule("multistep", 10, 1.0)
    with pytest.raises(UserError, match="unknown schedule"):
        make_schedule("triangle", 10, 1.0)


def test_power_schedule_is_the_trainers_power_schedule():
    """The science array (decay ends at s = steps) equals the trainer's LRs (decay ends at the last update) where
    they share a convention: before the decay, step by step; and the decay from the same start value P."""
    from lmlab.config import ScheduleConfig
    from lmlab.train.schedule import lr_at

    kw = {"a": 0.5, "b": -0.51, "batch_sequences": 64, "seq_len": 128}
    lrs = power_schedule(1000, 0.02, warmup=10, decay_fraction=0.2, min_lr_ratio=0.1, **kw)
    trainer = ScheduleConfig(name="power", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1, power_a=0.5)
    ref = [lr_at(s, 1000, 0.02, trainer, batch_sequences=64, seq_len=128) for s in range(801)]
    np.testing.assert_allclose(lrs[:801], ref, rtol=1e-12)
    # by hand: β·a·n^b at n = 400 updates × 8,192 tokens, under the 0.02 cap; then a linear decay to 0.1·P
    p = 64 * 0.5 * (400 * 64 * 128) ** -0.51
    assert lrs[400] == pytest.approx(p) and p < 0.02
    p800 = 64 * 0.5 * (800 * 64 * 128) ** -0.51
    assert lrs[900] == pytest.approx(p800 * (0.1 + 0.9 * 0.5)) and lrs[1000] == pytest.approx(0.1 * p800)
    assert lrs[0] == pytest.approx(0.02 / 10)  # tokens seen 0: the cap, scaled by the warmup
    np.testing.assert_allclose(make_schedule("power", 1000, 0.02, warmup=10, power={**kw, "min_lr_ratio": 0.1}), lrs)
    with pytest.raises(UserError, match="batch"):
        power_schedule(100, 0.02, a=4.6, b=-0.51, batch_sequences=0, seq_len=128)
    with pytest.raises(UserError, match="b < 0"):
        power_schedule(100, 0.02, a=4.6, b=0.5, batch_sequences=8, seq_len=128)


def test_params_round_trip():
    p = AnnealingParams(1.0, 2.0, 3.0, 0.5)
    assert AnnealingParams.from_dict(p.to_dict()) == p
    with pytest.raises(UserError, match="alpha"):
        AnnealingParams.from_dict({"L0": 1, "A": 1, "C": 1})
