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
