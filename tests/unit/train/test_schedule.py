import math

import pytest

from lmlab.config import ScheduleConfig
from lmlab.train.schedule import lr_at, lr_schedule


def cfg(**kw):
    return ScheduleConfig(**kw)


def test_warmup_is_linear_to_peak():
    c = cfg(name="constant", warmup_steps=4)
    assert [lr_at(s, 10, 1.0, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_hand_values():
    c = cfg(name="cosine", warmup_steps=0, min_lr_ratio=0.1)
    lrs = lr_schedule(11, 1.0, c)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert lrs[-1] == pytest.approx(0.1)


def test_linear_hand_values():
    c = cfg(name="linear", warmup_steps=2, min_lr_ratio=0.0)
    lrs = lr_schedule(7, 2.0, c)
    assert lrs[:2] == [1.0, 2.0]
    # after warmup: steps 2..6 go 2.0 -> 0.0 in 4 equal steps
    assert lrs[2:] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_wsd_stable_then_decay(shape, mid):
    c = cfg(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.3, decay_shape=shape)
    total = 21  # decay over the last round(0.3*21)=6 steps: 15..20
    lrs = lr_schedule(total, 1.0, c)
    assert lrs[:15] == [1.0] * 15
    assert lrs[-1] == pytest.approx(0.0)
    # halfway through the decay window (step 15 + 2.5): check shape at frac 0.5 via interpolation of neighbours
    frac_vals = [(s - 15) / 5 for s in range(15, 21)]
    expected = {
        "linear": [1 - f for f in frac_vals],
        "cosine": [1 - 0.5 * (1 - math.cos(math.pi * f)) for f in frac_vals],
        "sqrt": [1 - math.sqrt(f) for f in frac_vals],
    }[shape]
    assert lrs[15:] == pytest.approx(expected)
    assert 0 < mid < 1


def test_min_lr_is_reached_and_never_crossed():
    for name in ("linear", "cosine", "wsd"):
        lrs = lr_schedule(50, 3e-3, cfg(name=name, warmup_steps=5, min_lr_ratio=0.2))
        assert min(lrs[5:]) == pytest.approx(6e-4)
        assert lrs[-1] == pytest.approx(6e-4)
        assert max(lrs) == pytest.approx(3e-3)


# ----------------------------------------------------------------------------- power and rewarm


def test_power_lr_matches_the_science_vectors():
    # SCIENCE §18 (Shen et al. 2024): a = 4.6, b = −0.51, η_max = 0.02, β = 1024 sequences.
    from lmlab.train.schedule import power_lr

    raw = [4.6 * n**-0.51 for n in (1e9, 1e10, 1e11, 1e12)]
    assert raw == pytest.approx([1.18238e-4, 3.65391e-5, 1.12917e-5, 3.48946e-6], rel=1e-5)
    lrs = [power_lr(n, 1024, 0.02, 4.6, -0.51) for n in (1e9, 1e10, 1e11, 1e12)]
    assert lrs == pytest.approx([0.02, 0.02, 0.0115627, 0.0035732], rel=1e-5)


def test_power_schedule_in_the_trainer():
    # 1024 sequences of 1024 tokens per update: n = step · 2^20 tokens before update `step`
    c = cfg(name="power", warmup_steps=2, decay_fraction=0.1, min_lr_ratio=0.0)
    kw = {"batch_sequences": 1024, "seq_len": 1024}
    total = 200_000
    assert lr_at(0, total, 0.02, c, **kw) == pytest.approx(0.01)  # warmup: half of the capped 0.02
    n = 100_000 * 2**20
    assert lr_at(100_000, total, 0.02, c, **kw) == pytest.approx(1024 * 4.6 * n**-0.51)
    decay_start = total - 20_000
    at_start = 1024 * 4.6 * (decay_start * 2**20) ** -0.51
    assert lr_at(decay_start, total, 0.02, c, **kw) == pytest.approx(at_start)
    assert lr_at(total - 1, total, 0.02, c, **kw) == pytest.approx(0.0)  # linear decay to min_lr_ratio·P
    mid = decay_start + (total - 1 - decay_start) // 2
    assert lr_at(mid, total, 0.02, c, **kw) == pytest.approx(at_start * (1 - (mid - decay_start) / 19_999))
    # β scales the power law: twice the sequences per update at the same tokens seen gives twice the LR
    n2 = 90_000 * 2**21
    assert lr_at(90_000, total, 0.02, c, batch_sequences=2048, seq_len=1024) == pytest.approx(2048 * 4.6 * n2**-0.51)


def test_power_schedule_needs_the_batch():
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the global batch"):
        lr_at(5, 10, 0.02, cfg(name="power"))


def test_rewarm_cosine_restart_rewarm_redecay():
    c = cfg(name="rewarm", warmup_steps=0, min_lr_ratio=0.1, restart_fraction=0.5, rewarm_steps=2, restart_lr_ratio=0.5)
    lrs = lr_schedule(21, 1.0, c)  # restart at step 10; re-warm over 11, 12 to 0.5; cosine to 0.1 at step 20
    assert lrs[0] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.55)
    assert lrs[11:13] == pytest.approx([0.3, 0.5])
    assert lrs[16] == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[20] == pytest.approx(0.1)


def test_rewarm_config_checks():
    from lmlab.config import load_config
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="the restart"):
        load_config(
            None, ["train.steps=10", "schedule.name=rewarm", "schedule.restart_fraction=0.9", "schedule.rewarm_steps=3"]
        )
    with pytest.raises(ConfigError, match="power_b"):
        load_config(None, ["schedule.name=power", "schedule.power_b=0.5"])
