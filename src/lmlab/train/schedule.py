"""Learning-rate schedules: linear warmup, then constant, linear, cosine, WSD, power or re-warmed cosine.

``lr_at(step)`` gives the LR used for the optimizer update of step ``step`` (0-based).
Warmup rises linearly to the peak: ``lr·(step+1)/warmup``. After warmup the schedule
reaches ``min_lr_ratio·lr`` exactly at the last step. WSD (warmup–stable–decay; Hu et
al. 2024, MiniCPM) holds the peak and decays over the last ``decay_fraction`` of the
steps with a linear, cosine or 1−sqrt shape.

``power`` is the Power scheduler (Shen et al. 2024, arXiv 2408.13359): after warmup the LR is
``min(lr, β·a·n^b)`` with n the tokens trained before the step and β the sequences per step, so the
same (a, b) serve any batch size and token budget; the last ``decay_fraction`` of the steps decays it
(WSD-style, any ``decay_shape``) from its value at the decay start P to ``min_lr_ratio·P``.

``rewarm`` is continual pre-training's re-warm and re-decay (Ibrahim et al. 2024, arXiv 2403.08763):
a cosine to the minimum at the restart step ``round(restart_fraction·steps)``, a linear re-warmup over
``rewarm_steps`` to ``restart_lr_ratio·lr``, and a second cosine to the minimum at the last step.
"""

from __future__ import annotations

import math

from lmlab.config import ScheduleConfig
from lmlab.errors import ConfigError


def power_lr(tokens: float, batch_sequences: int, max_lr: float, a: float, b: float) -> float:
    """The Power scheduler's LR after ``tokens`` tokens: ``min(max_lr, batch_sequences·a·tokens^b)``."""
    if tokens <= 0:
        return max_lr
    return min(max_lr, batch_sequences * a * tokens**b)


def _decay_shape(frac: float, shape: str) -> float:
    """How far a decay has gone (0 → 1) after a fraction ``frac`` of it."""
    if shape == "linear":
        return frac
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * frac))
    return math.sqrt(frac)  # "sqrt": 1 − sqrt decay (Hägele et al. 2024)


def _cosine(step: int, start: int, end: int, high: float, low: float) -> float:
    """A cosine from ``high`` at ``start`` to ``low`` at ``end``."""
    progress = min(1.0, (step - start) / max(1, end - start))
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    cfg: ScheduleConfig,
    *,
    batch_sequences: int = 0,
    seq_len: int = 0,
) -> float:
    """LR for update ``step`` of ``total_steps`` under schedule ``cfg``. ``power`` also needs the global batch:
    ``batch_sequences`` rows of ``seq_len`` tokens per update."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    min_lr = cfg.min_lr_ratio * peak_lr
    warmup = cfg.warmup_steps
    last = total_steps - 1
    if cfg.name == "power":
        return _power(step, total_steps, peak_lr, cfg, batch_sequences, seq_len)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return peak_lr
    if cfg.name in ("linear", "cosine"):
        span = max(1, last - warmup)
        progress = min(1.0, (step - warmup) / span)
        if cfg.name == "linear":
            return peak_lr + (min_lr - peak_lr) * progress
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        span = max(1, last - decay_start)
        frac = min(1.0, (step - decay_start) / span)
        return peak_lr + (min_lr - peak_lr) * _decay_shape(frac, cfg.decay_shape)
    if cfg.name == "rewarm":
        restart = round(cfg.restart_fraction * total_steps)
        if step <= restart:
            return _cosine(step, warmup, restart, peak_lr, min_lr)
        peak2 = cfg.restart_lr_ratio * peak_lr
        rewarmed = restart + cfg.rewarm_steps
        if step <= rewarmed:
            return min_lr + (peak2 - min_lr) * (step - restart) / cfg.rewarm_steps
        return _cosine(step, rewarmed, last, peak2, min_lr)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def _power(step: int, total_steps: int, max_lr: float, cfg: ScheduleConfig, sequences: int, seq_len: int) -> float:
    if sequences <= 0 or seq_len <= 0:
        raise ConfigError("schedule.name=power needs the global batch (sequences per update and seq_len)")
    tokens_per_step = sequences * seq_len
    warmup = cfg.warmup_steps
    decay_start = max(warmup, total_steps - max(1, round(cfg.decay_fraction * total_steps)))
    at = min(step, decay_start)
    lr = power_lr(at * tokens_per_step, sequences, max_lr, cfg.power_a, cfg.power_b)
    if step < warmup:
        return lr * (step + 1) / warmup
    if step <= decay_start:
        return lr
    frac = min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
    return lr + (cfg.min_lr_ratio * lr - lr) * _decay_shape(frac, cfg.decay_shape)


def lr_schedule(
    total_steps: int, peak_lr: float, cfg: ScheduleConfig, *, batch_sequences: int = 0, seq_len: int = 0
) -> list[float]:
    """The whole schedule as a list (for plots and the annealing law)."""
    return [
        lr_at(s, total_steps, peak_lr, cfg, batch_sequences=batch_sequences, seq_len=seq_len)
        for s in range(total_steps)
    ]
