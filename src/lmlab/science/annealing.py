"""The scaling law with learning-rate annealing, ``L(s) = L0 + A·S1(s)^-alpha − C·S2(s)`` (docs/science.md §2).

Source: Tissue, Wang, Wang 2024, *Scaling Law with Learning Rate Annealing*, arXiv 2408.11029; definitions and the
fitting recipe follow the authors' reference script exactly as docs/science.md §2.2–2.3 states them:

- forward area ``S1 = cumsum(lrs)`` (steps indexed from 0, so ``S1(s) = Σ_{i=0..s} η_i``);
- annealing area with momentum ``m_i = λ m_{i−1} + (η_{i−1} − η_i)``, ``m_0 = 0``, ``S2 = cumsum(m)``, λ = 0.999;
- warmup steps use the peak LR η_max in both areas (:func:`law_lrs`), and warmup losses are not fitted;
- fit: Huber (δ = 1e-3) of ``log L_true − log L_pred`` summed over all points of all curves, L-BFGS-B with bounds
  ``[0, ∞)`` from a 2·3·3·3 grid, lowest objective kept.

One or two fitted curves then predict the loss at any step of any schedule (:meth:`AnnealingParams.predict`).
Known limitations (§2.5): appending zero-LR steps still lowers the prediction, and scaling a schedule up always
lowers it, so the law cannot pick the peak LR.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.signal import lfilter

from lmlab.errors import UserError
from lmlab.science.huber import HUBER_DELTA, huber, huber_grad

MOMENTUM = 0.999


def law_lrs(lrs: Sequence[float] | np.ndarray, warmup_steps: int = 0) -> np.ndarray:
    """The schedule the law sees: the first ``warmup_steps`` entries replaced by the peak LR (§2.2)."""
    out = np.array(lrs, dtype=float)
    if warmup_steps > 0:
        out[:warmup_steps] = out.max()
    return out


def detect_warmup(lrs: Sequence[float] | np.ndarray) -> int:
    """Number of warmup steps of a measured schedule: the index where the LR first reaches its maximum."""
    lrs = np.asarray(lrs, dtype=float)
    return int(np.argmax(lrs >= lrs.max() * (1.0 - 1e-9)))


def forward_area(lrs: Sequence[float] | np.ndarray) -> np.ndarray:
    """``S1(s) = Σ_{i=0..s} η_i`` (§2.2)."""
    return np.cumsum(np.asarray(lrs, dtype=float))


def annealing_area(lrs: Sequence[float] | np.ndarray, lam: float = MOMENTUM) -> np.ndarray:
    """``S2(s) = Σ_{i=1..s} m_i`` with ``m_i = λ m_{i−1} + (η_{i−1} − η_i)`` and ``m_0 = 0`` (§2.2).

    λ = 1 gives ``Σ(η_0 − η_i)``; λ = 0 gives ``η_0 − η_s``. The recursion is a first-order IIR filter.
    """
    lrs = np.asarray(lrs, dtype=float)
    drops = np.concatenate([[0.0], lrs[:-1] - lrs[1:]])
    momentum = lfilter([1.0], [1.0, -lam], drops)
    return np.cumsum(momentum)


@dataclass(frozen=True)
class AnnealingParams:
    """Constants of ``L(s) = L0 + A·S1^-alpha − C·S2``."""

    L0: float
    A: float
    C: float
    alpha: float

    def loss_from_areas(self, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        return self.L0 + self.A * np.asarray(s1, dtype=float) ** (-self.alpha) - self.C * np.asarray(s2, dtype=float)

    def predict(self, lrs: Sequence[float] | np.ndarray, warmup_steps: int = 0, lam: float = MOMENTUM) -> np.ndarray:
        """Predicted loss at every step ``0 … len(lrs) − 1`` of the schedule ``lrs`` (warmup at peak, §2.2)."""
        eff = law_lrs(lrs, warmup_steps)
        return self.loss_from_areas(forward_area(eff), annealing_area(eff, lam))

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AnnealingParams:
        try:
            return cls(**{k: float(data[k]) for k in ("L0", "A", "C", "alpha")})
        except KeyError as err:
            raise UserError(f"annealing-law parameters are missing key {err.args[0]!r}") from None


#: The authors' example fit (docs/science.md §2.4, computed).
REFERENCE_FIT = AnnealingParams(L0=2.6278, A=0.42967, C=0.41077, alpha=0.54984)


@dataclass
class Curve:
    """One training curve: its schedule (every step from 0), warmup length and the measured (step, loss) points."""

    name: str
    lrs: np.ndarray
    steps: np.ndarray
    losses: np.ndarray
    warmup_steps: int = 0
    model: str = ""  # the model the curve was trained with ("" unknown): one law's constants belong to one model


def _curve_areas(curve: Curve, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(curve.steps) and (curve.steps.max() >= len(curve.lrs) or curve.steps.min() < 0):
        raise UserError(f"curve {curve.name!r}: loss steps go beyond its schedule of {len(curve.lrs)} steps")
    eff = law_lrs(curve.lrs, curve.warmup_steps)
    s1 = forward_area(eff)[curve.steps]
    s2 = annealing_area(eff, lam)[curve.steps]
    keep = curve.steps >= curve.warmup_steps  # warmup losses are not fitted (§2.2)
    return s1[keep], s2[keep], curve.losses[keep]


def annealing_objective(
    x: np.ndarray, s1: np.ndarray, s2: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA
) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(log L − log L_pred) and its gradient in ``(L0, A, C, alpha)`` (§2.3).

    A non-positive prediction (possible for large ``C`` during the search) is clipped at 1e-10, which keeps the
    objective finite and large there.
    """
    l0, a, c, alpha = x
    with np.errstate(over="ignore", invalid="ignore"):
        p = s1 ** (-alpha)
        pred = l0 + a * p - c * s2
        clipped = pred < 1e-10
        pred = np.where(clipped, 1e-10, pred)
        r = log_l - np.log(pred)
        g = np.where(clipped, 0.0, -huber_grad(r, delta) / pred)
        grad = np.array([g.sum(), g @ p, -(g @ s2), -(a * (g * p) @ np.log(s1))])
        f = float(huber(r, delta).sum())
    if not (np.isfinite(f) and np.all(np.isfinite(grad))):
        # Overflow far from the data (huge alpha with S1 < 1): a large finite value makes the line search back off.
        return 1e300, np.zeros(4)
    return f, grad


def default_annealing_grid() -> np.ndarray:
    """§2.3 initialisations ``(L0, A, C, alpha)``: L0 ∈ linspace(0.1, 2.1, 2), A, C ∈ linspace(1, 22, 3),
    alpha ∈ linspace(0, 0.8, 3) — 54 starts."""
    return np.array(
        list(
            itertools.product(
                np.linspace(0.1, 2.1, 2), np.linspace(1, 22, 3), np.linspace(1, 22, 3), np.linspace(0, 0.8, 3)
            )
        )
    )


#: §2.3 optimiser options (``eps`` is irrelevant here because the gradient is analytic).
ANNEALING_OPTIONS = {"maxiter": 100000, "ftol": 1e-9, "gtol": 1e-6}


@dataclass
class AnnealingFit:
    params: AnnealingParams
    objective: float
    n_points: int
    max_abs_error: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "params": self.params.to_dict(),
            "huber_objective": self.objective,
            "n_points": self.n_points,
            "max_abs_error": self.max_abs_error,
        }


def fit_annealing(
    curves: Sequence[Curve],
    *,
    lam: float = MOMENTUM,
    delta: float = HUBER_DELTA,
    grid: np.ndarray | None = None,
    options: dict | None = None,
) -> AnnealingFit:
    """Fit ``(L0, A, C, alpha)`` jointly to all ``curves`` by the §2.3 recipe; lowest objective over the grid."""
    if not curves:
        raise UserError("an annealing fit needs at least one curve")
    parts = [_curve_areas(c, lam) for c in curves]
    s1 = np.concatenate([p[0] for p in parts])
    s2 = np.concatenate([p[1] for p in parts])
    loss = np.concatenate([p[2] for p in parts])
    if len(loss) < 5:
        raise UserError(f"an annealing fit needs at least 5 loss points after warmup, got {len(loss)}")
    if np.any(~np.isfinite(loss)) or np.any(loss <= 0):
        raise UserError("annealing fit: losses must be positive finite numbers")
    log_l = np.log(loss)
    opts = {**ANNEALING_OPTIONS, **(options or {})}
    starts = default_annealing_grid() if grid is None else np.atleast_2d(grid)
    best_x, best_f = None, math.inf
    for x0 in starts:
        res = minimize(
            annealing_objective,
            x0,
            args=(s1, s2, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, None)] * 4,
            options=opts,
        )
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise UserError("the annealing fit failed from every start")
    params = AnnealingParams(*(float(v) for v in best_x))
    errors = {}
    for curve, (c1, c2, cl) in zip(curves, parts):
        errors[curve.name] = float(np.max(np.abs(params.loss_from_areas(c1, c2) - cl))) if len(cl) else 0.0
    return AnnealingFit(params, best_f, len(loss), errors)
