"""Learning-rate schedules as arrays ``lrs[s]`` for steps ``s = 0 … steps`` (inclusive), for the annealing law.

The conventions follow docs/science.md §2.4 (Tissue et al. 2024, arXiv 2408.11029): after ``warmup`` steps the cosine
is ``min + ½(1 + cos(π (s − warmup)/(steps − warmup)))·(max − min)``, reaching ``min`` at ``s = steps``; a WSD
schedule holds ``max`` until ``s0 = steps − round(decay_fraction·steps)`` and decays to ``min`` at ``s = steps``.
Warmup here is linear, ``max·(s+1)/warmup`` for ``s < warmup``, as in training; the annealing law replaces those
steps by ``max`` itself (§2.2, see :func:`lmlab.science.annealing.law_lrs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmlab.errors import UserError
from lmlab.train.schedule import power_lr

SCHEDULES = ("constant", "cosine", "wsd", "multistep", "rewarm", "power")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _check(steps: int, lr: float, warmup: int) -> None:
    if steps < 1:
        raise UserError(f"a schedule needs steps >= 1, got {steps}")
    if lr <= 0:
        raise UserError(f"the peak learning rate must be positive, got {lr}")
    if not 0 <= warmup < steps:
        raise UserError(f"warmup must be in [0, steps), got warmup={warmup} for steps={steps}")


def _warm(lrs: np.ndarray, lr: float, warmup: int) -> np.ndarray:
    if warmup > 0:
        lrs[:warmup] = lr * (np.arange(warmup) + 1.0) / warmup
    return lrs


def constant_schedule(steps: int, lr: float, *, warmup: int = 0) -> np.ndarray:
    """``lr`` at every step (after a linear warmup)."""
    _check(steps, lr, warmup)
    return _warm(np.full(steps + 1, float(lr)), lr, warmup)


def cosine_schedule(steps: int, lr: float, *, min_lr: float = 0.0, warmup: int = 0) -> np.ndarray:
    """Cosine from ``lr`` at ``warmup`` to ``min_lr`` at ``steps`` (docs/science.md §2.4)."""
    _check(steps, lr, warmup)
    s = np.arange(steps + 1, dtype=float)
    frac = np.clip((s - warmup) / (steps - warmup), 0.0, 1.0)
    lrs = min_lr + 0.5 * (1.0 + np.cos(np.pi * frac)) * (lr - min_lr)
    return _warm(lrs, lr, warmup)


def decay_curve(x: np.ndarray, shape: str) -> np.ndarray:
    """Fraction of the peak left after a fraction ``x ∈ [0, 1]`` of the decay phase, for a WSD decay ``shape``.

    ``linear``: 1 − x; ``cosine``: ½(1 + cos πx); ``sqrt``: 1 − √x (the "1−sqrt" cooldown of Hägele et al. 2024).
    """
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + np.cos(np.pi * x))
    if shape == "sqrt":
        return 1.0 - np.sqrt(x)
    raise UserError(f"unknown decay shape {shape!r}; choose one of {', '.join(DECAY_SHAPES)}")


def wsd_schedule(
    steps: int,
    lr: float,
    *,
    decay_fraction: float = 0.2,
    min_lr: float = 0.0,
    warmup: int = 0,
    shape: str = "linear",
) -> np.ndarray:
    """Warmup–stable–decay: ``lr`` until ``s0 = steps − round(decay_fraction·steps)``, then ``shape`` to ``min_lr``.

    With ``steps=20000, decay_fraction=0.2`` this is the §2.4 WSD row (2e-4 until step 16000, linear to 0 at 20000).
    """
    _check(steps, lr, warmup)
    if not 0.0 < decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    s0 = steps - int(round(decay_fraction * steps))
    s0 = max(s0, warmup)
    s = np.arange(steps + 1, dtype=float)
    x = np.clip((s - s0) / max(steps - s0, 1), 0.0, 1.0)
    lrs = min_lr + (lr - min_lr) * decay_curve(x, shape)
    return _warm(lrs, lr, warmup)


def multistep_schedule(
    steps: int, lr: float, *, milestones: Sequence[int], factor: float = 0.1, warmup: int = 0
) -> np.ndarray:
    """``lr · factor^k`` where ``k`` is the number of milestones ``≤ s`` (a step drop at each milestone)."""
    _check(steps, lr, warmup)
    s = np.arange(steps + 1)
    k = np.searchsorted(np.sort(np.asarray(milestones)), s, side="right")
    return _warm(lr * float(factor) ** k.astype(float), lr, warmup)


def rewarm_schedule(
    steps: int,
    lr: float,
    *,
    restart: int,
    rewarm_steps: int = 0,
    restart_lr: float | None = None,
    min_lr: float = 0.0,
    warmup: int = 0,
) -> np.ndarray:
    """A cosine to ``min_lr`` at step ``restart``, then a re-warmup over ``rewarm_steps`` (linear, from ``min_lr``)
    to ``restart_lr`` (default ``lr``) and a second cosine to ``min_lr`` at ``steps`` (continual pre-training)."""
    _check(steps, lr, warmup)
    if not warmup < restart < steps:
        raise UserError(f"restart must lie between warmup and steps, got {restart}")
    peak2 = lr if restart_lr is None else float(restart_lr)
    first = cosine_schedule(restart, lr, min_lr=min_lr, warmup=warmup)
    n2 = steps - restart
    if rewarm_steps >= n2:
        raise UserError(f"rewarm_steps={rewarm_steps} leaves no steps after the restart at {restart}")
    second = cosine_schedule(n2, peak2, min_lr=min_lr, warmup=0)[1:]
    if rewarm_steps > 0:
        second[:rewarm_steps] = min_lr + (peak2 - min_lr) * (np.arange(rewarm_steps) + 1.0) / rewarm_steps
        tail = cosine_schedule(n2 - rewarm_steps, peak2, min_lr=min_lr)[1:]
        second[rewarm_steps:] = tail
    return np.concatenate([first, second])


def power_schedule(
    steps: int,
    lr: float,
    *,
    a: float,
    b: float,
    batch_sequences: int,
    seq_len: int,
    decay_fraction: float = 0.2,
    min_lr_ratio: float = 0.0,
    warmup: int = 0,
    shape: str = "linear",
) -> np.ndarray:
    """The Power scheduler (Shen et al. 2024; docs/science.md §2.6) as the trainer runs it: ``min(lr, β·a·n^b)``
    with n the tokens trained before step ``s`` (β = ``batch_sequences`` rows of ``seq_len`` tokens per step)
    until ``s0 = steps − round(decay_fraction·steps)``, then ``shape`` from its value P at ``s0`` to
    ``min_lr_ratio·P`` at ``steps``; the warmup scales the first steps by ``(s+1)/warmup``."""
    _check(steps, lr, warmup)
    if batch_sequences < 1 or seq_len < 1:
        raise UserError(f"a power schedule needs the batch: got {batch_sequences} sequences of {seq_len} tokens")
    if not a > 0 or not b < 0:
        raise UserError(f"a power schedule needs a > 0 and b < 0, got a={a}, b={b}")
    if not 0.0 < decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    s0 = max(warmup, steps - int(round(decay_fraction * steps)))
    s = np.arange(steps + 1)
    tokens = np.minimum(s, s0) * float(batch_sequences * seq_len)
    lrs = np.array([power_lr(t, batch_sequences, lr, a, b) for t in tokens])
    x = np.clip((s - s0) / max(steps - s0, 1), 0.0, 1.0)
    lrs = lrs * (min_lr_ratio + (1.0 - min_lr_ratio) * decay_curve(x, shape))
    if warmup > 0:
        lrs[:warmup] *= (np.arange(warmup) + 1.0) / warmup
    return lrs


def make_schedule(
    name: str,
    steps: int,
    lr: float,
    *,
    warmup: int = 0,
    min_lr: float = 0.0,
    decay_fraction: float = 0.2,
    shape: str = "linear",
    milestones: Sequence[int] = (),
    factor: float = 0.1,
    restart: int | None = None,
    rewarm_steps: int = 0,
    power: dict | None = None,
) -> np.ndarray:
    """Build a schedule by name (one of :data:`SCHEDULES`); used by ``lmlab predict curve``."""
    if name == "constant":
        return constant_schedule(steps, lr, warmup=warmup)
    if name == "cosine":
        return cosine_schedule(steps, lr, min_lr=min_lr, warmup=warmup)
    if name == "wsd":
        return wsd_schedule(steps, lr, decay_fraction=decay_fraction, min_lr=min_lr, warmup=warmup, shape=shape)
    if name == "multistep":
        if not milestones:
            raise UserError("a multistep schedule needs --milestones (steps at which the LR drops)")
        return multistep_schedule(steps, lr, milestones=milestones, factor=factor, warmup=warmup)
    if name == "rewarm":
        if restart is None:
            raise UserError("a rewarm schedule needs --restart (the step of the restart)")
        return rewarm_schedule(steps, lr, restart=restart, rewarm_steps=rewarm_steps, min_lr=min_lr, warmup=warmup)
    if name == "power":  # power: a, b, batch_sequences, seq_len and optionally min_lr_ratio
        return power_schedule(steps, lr, decay_fraction=decay_fraction, warmup=warmup, shape=shape, **(power or {}))
    raise UserError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
