"""Optimal learning rate across token horizons (Bjorck et al. 2024, arXiv 2409.19913; docs/science.md §3).

- :func:`lr_vertex`: per (N, D), the final loss over a peak-LR sweep is fitted by a quadratic in ``log LR``; its
  vertex is LR* (the paper's Fig. 1 dashed lines; the procedure is marked *unverified* in §3).
- :func:`local_lr_vertex`: the same on the five swept LRs around the best one only, with a 95% interval (the
  default of ``lmlab fit lr-horizon``: the whole-sweep parabola is biased by the sweep's far ends).
- :func:`fit_lr_horizon`: ``LR*(D) = B·D^-beta`` by least squares in log space (paper joint fit: beta ≈ 0.32).
- :func:`fit_lr_joint`: ``LR*(N, D) = C·N^-alpha·D^-beta`` (*secondary* form; the published C is unverified
  and deliberately not provided here).
- :func:`transfer_lr`: the rule of thumb ``LR(D_target) = LR*(D_tune)·(D_target/D_tune)^-0.32``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lmlab.errors import UserError

#: The paper's joint-fit horizon exponent (sizes ≥ 760M; §3).
BETA_PAPER = 0.32


@dataclass
class LrVertex:
    """The vertex of ``loss = c2·x² + c1·x + c0`` with ``x = ln LR``; a local vertex adds its 95% interval and the
    LRs it was fitted on."""

    lr_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]
    inside: bool  # the vertex lies within the swept LR range
    interval: tuple[float, float] | None = None
    window: tuple[float, float] | None = None


def lr_vertex(lrs: Sequence[float], losses: Sequence[float]) -> LrVertex:
    """Fit final loss as a quadratic in ``ln LR`` and return its vertex (§3, "Finding LR*").

    Non-finite losses (diverged runs) are dropped first. Fewer than 3 distinct LRs, or a parabola that opens
    downwards (no minimum), are ``UserError``.
    """
    x = np.log(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    ok = np.isfinite(y) & np.isfinite(x)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 3:
        raise UserError(f"finding LR* needs at least 3 distinct learning rates with finite losses, got {len(x)}")
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        raise UserError("the loss-vs-log(LR) parabola has no minimum (it opens downwards); widen the LR sweep")
    xv = -c1 / (2.0 * c2)
    return LrVertex(
        lr_opt=float(math.exp(xv)),
        loss_opt=float(c0 - c1 * c1 / (4.0 * c2)),
        coeffs=(float(c2), float(c1), float(c0)),
        inside=bool(x.min() <= xv <= x.max()),
    )


def local_lr_vertex(lrs: Sequence[float], losses: Sequence[float], *, half_width: int = 2) -> LrVertex:
    """LR* from the points near the best LR only: the quadratic in ``ln LR`` through every run (seeds included) at
    the ``2·half_width + 1`` swept LRs centred on the one with the lowest mean loss (shifted inwards at an edge).

    A parabola through the whole sweep is pulled by the far, asymmetric flanks (divergence on the right, slow
    training on the left), so its vertex is biased; near the optimum the loss is close to quadratic. The 95%
    interval of ln LR* is the delta-method standard error of ``−c1/(2·c2)`` from the least-squares covariance,
    times Student's t at the residual degrees of freedom (the flat-bottom case gives a wide interval, as it
    should). Non-finite losses are dropped; fewer than 3 LRs, or no minimum, are ``UserError``.
    """
    x_all = np.log(np.asarray(lrs, dtype=float))
    y_all = np.asarray(losses, dtype=float)
    ok = np.isfinite(x_all) & np.isfinite(y_all)
    x_all, y_all = x_all[ok], y_all[ok]
    grid = np.unique(x_all)
    if len(grid) < 3:
        raise UserError(f"finding LR* needs at least 3 distinct learning rates with finite losses, got {len(grid)}")
    means = np.array([y_all[x_all == g].mean() for g in grid])
    best = int(np.argmin(means))
    lo = min(max(0, best - half_width), max(0, len(grid) - (2 * half_width + 1)))
    window = grid[lo : lo + 2 * half_width + 1]
    take = np.isin(x_all, window)
    x, y = x_all[take], y_all[take]
    design = np.stack([x * x, x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    c2, c1, c0 = (float(c) for c in coef)
    if c2 <= 0:
        raise UserError("the loss-vs-log(LR) parabola near the best LR has no minimum; sweep finer around it")
    xv = -c1 / (2.0 * c2)
    dof = len(x) - 3
    interval = None
    if dof > 0:
        sigma2 = float(np.sum((design @ coef - y) ** 2)) / dof
        cov = sigma2 * np.linalg.pinv(design.T @ design)  # of (c2, c1, c0)
        grad = np.array([c1 / (2.0 * c2 * c2), -1.0 / (2.0 * c2), 0.0])  # of xv = −c1/(2 c2)
        se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
        t = float(stats.t.ppf(0.975, dof))
        interval = (math.exp(xv - t * se), math.exp(xv + t * se))
    return LrVertex(
        lr_opt=float(math.exp(xv)),
        loss_opt=float(c0 - c1 * c1 / (4.0 * c2)),
        coeffs=(c2, c1, c0),
        inside=bool(window.min() <= xv <= window.max()),
        interval=interval,
        window=(float(math.exp(window.min())), float(math.exp(window.max()))),
    )


@dataclass
class LrHorizonFit:
    """``LR*(D) = B·D^-beta``."""

    B: float
    beta: float
    rmse_log: float  # RMSE of the fit in ln LR

    def lr(self, d: np.ndarray | float) -> np.ndarray:
        return self.B * np.asarray(d, dtype=float) ** (-self.beta)

    def to_dict(self) -> dict:
        return {"B": self.B, "beta": self.beta, "rmse_log": self.rmse_log}


def fit_lr_horizon(tokens: Sequence[float], lr_opt: Sequence[float]) -> LrHorizonFit:
    """Least squares of ``ln LR* = ln B − beta·ln D`` (§3)."""
    x = np.log(np.asarray(tokens, dtype=float))
    y = np.log(np.asarray(lr_opt, dtype=float))
    if len(np.unique(x)) < 2:
        raise UserError("fitting LR*(D) needs optimal LRs at two or more token horizons")
    slope, intercept = np.polyfit(x, y, 1)
    rmse = float(np.sqrt(np.mean((intercept + slope * x - y) ** 2)))
    return LrHorizonFit(B=float(math.exp(intercept)), beta=float(-slope), rmse_log=rmse)


@dataclass
class LrJointFit:
    """``LR*(N, D) = C·N^-alpha·D^-beta``."""

    C: float
    alpha: float
    beta: float
    rmse_log: float

    def lr(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        return self.C * np.asarray(n, dtype=float) ** (-self.alpha) * np.asarray(d, dtype=float) ** (-self.beta)

    def to_dict(self) -> dict:
        return {"C": self.C, "alpha": self.alpha, "beta": self.beta, "rmse_log": self.rmse_log}


def fit_lr_joint(params: Sequence[float], tokens: Sequence[float], lr_opt: Sequence[float]) -> LrJointFit:
    """Least squares of ``ln LR* = ln C − alpha·ln N − beta·ln D``; needs two sizes and two horizons."""
    ln_n = np.log(np.asarray(params, dtype=float))
    ln_d = np.log(np.asarray(tokens, dtype=float))
    y = np.log(np.asarray(lr_opt, dtype=float))
    if len(np.unique(ln_n)) < 2 or len(np.unique(ln_d)) < 2:
        raise UserError("a joint LR*(N, D) fit needs at least two model sizes and two token horizons")
    design = np.stack([np.ones_like(y), -ln_n, -ln_d], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rmse = float(np.sqrt(np.mean((design @ coef - y) ** 2)))
    return LrJointFit(C=float(math.exp(coef[0])), alpha=float(coef[1]), beta=float(coef[2]), rmse_log=rmse)


def transfer_lr(lr_tune: float, d_tune: float, d_target: float, beta: float = BETA_PAPER) -> float:
    """Rule of thumb (§3): ``LR(D_target) = LR*(D_tune)·(D_target/D_tune)^-beta`` with beta = 0.32 by default."""
    if lr_tune <= 0 or d_tune <= 0 or d_target <= 0:
        raise UserError("transfer_lr needs a positive LR and positive token horizons")
    return float(lr_tune * (d_target / d_tune) ** (-beta))
