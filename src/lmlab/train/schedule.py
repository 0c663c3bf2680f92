"""Learning-rate schedules: linear warmup, then constant, linear, cosine or WSD.

``lr_at(step)`` gives the LR used for the optimizer update of step ``step`` (0-based).
Warmup rises linearly to the peak: ``lr·(step+1)/warmup``. After warmup the schedule
reaches ``min_lr_ratio·lr`` exactly at the last step. WSD (warmup–stable–decay; Hu et
al. 2024, MiniCPM) holds the peak and decays over the last ``decay_fraction`` of the
steps with a linear, cosine or 1−sqrt shape.
"""

from __future__ import annotations

import math

from lmlab.config import ScheduleConfig


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """LR for update ``step`` of ``total_steps`` under schedule ``cfg``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    min_lr = cfg.min_lr_ratio * peak_lr
    warmup = cfg.warmup_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return peak_lr
    last = total_steps - 1
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
        if cfg.decay_shape == "linear":
            shape = frac
        elif cfg.decay_shape == "cosine":
            shape = 0.5 * (1.0 - math.cos(math.pi * frac))
        else:  # "sqrt": 1 - sqrt decay (Hägele et al. 2024)
            shape = math.sqrt(frac)
        return peak_lr + (min_lr - peak_lr) * shape
    raise ValueError(f"unknown schedule {cfg.name!r}")


def lr_schedule(total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> list[float]:
    """The whole schedule as a list (for plots and the annealing law)."""
    return [lr_at(s, total_steps, peak_lr, cfg) for s in range(total_steps)]
