"""Multilingual scaling by language family and optimal sampling ratios (He et al. 2024, arXiv 2410.12883;
docs/science.md §4).

Family i's loss depends only on its own sampling ratio: ``L_i(N, D, p_i) = (E_i + A_i/N^α_i + B_i/D^β_i)·p_i^-γ_i``.

- :func:`fit_gamma`: log-linearise at fixed (N, D), ``ln L_i = ln L_i(N, D, 1) − γ_i ln p_i``, and fit γ_i by least
  squares with one intercept per (N, D) group (derived in §4; the paper's own procedure is *unverified*).
- :func:`fit_family_law`: γ_i as above, then the bracket by the §1 Chinchilla fit of ``L·p^γ``.
- :func:`optimal_ratios`: minimise ``Σ w_i c_i p_i^-γ_i`` subject to ``Σ p_i = 1``; stationarity gives
  ``p_i(λ) = (w_i c_i γ_i / λ)^(1/(1+γ_i))`` and λ is found by bisection in ``log λ`` (the sum is decreasing in λ).
  Unnormalised objective: ``c_i`` = bracket at (N, D); normalised: ``c_i = 1`` (p* independent of N and D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmlab.errors import UserError
from lmlab.science.chinchilla import ChinchillaFit, ChinchillaParams, fit_chinchilla


def ratios_for_lambda(log_lam: float, wc: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``p_i(λ) = (w_i c_i γ_i / λ)^(1/(1+γ_i))`` at ``λ = exp(log_lam)``."""
    return np.exp((np.log(wc * gamma) - log_lam) / (1.0 + gamma))


def optimal_ratios(
    gamma: Sequence[float], weights: Sequence[float], c: Sequence[float] | None = None, *, tol: float = 1e-14
) -> np.ndarray:
    """Sampling ratios minimising ``Σ w_i c_i p_i^-γ_i`` on the simplex (§4), by bisection in ``log λ``.

    ``c=None`` is the normalised objective (``c_i = 1``). All ``w_i c_i`` and ``γ_i`` must be positive.
    """
    g = np.asarray(gamma, dtype=float)
    wc = np.asarray(weights, dtype=float) * (np.ones_like(g) if c is None else np.asarray(c, dtype=float))
    if g.shape != wc.shape or g.ndim != 1 or len(g) == 0:
        raise UserError("gamma, weights and c must be 1-d sequences of the same length")
    if np.any(g <= 0) or np.any(wc <= 0):
        raise UserError("optimal sampling ratios need positive gamma_i and positive weights·c_i")
    lo, hi = -1.0, 1.0
    while ratios_for_lambda(lo, wc, g).sum() < 1.0:
        lo *= 2.0
    while ratios_for_lambda(hi, wc, g).sum() > 1.0:
        hi *= 2.0
    while hi - lo > tol * max(1.0, abs(lo), abs(hi)):
        mid = 0.5 * (lo + hi)
        if ratios_for_lambda(mid, wc, g).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    p = ratios_for_lambda(0.5 * (lo + hi), wc, g)
    return p / p.sum()


def family_brackets(params: Sequence[ChinchillaParams], n: float, d: float) -> np.ndarray:
    """``c_i = E_i + A_i/N^α_i + B_i/D^β_i`` for each family at (N, D): the unnormalised objective's weights."""
    return np.array([float(p.loss(n, d)) for p in params])


@dataclass
class GammaFit:
    gamma: float
    intercepts: dict[tuple[float, float], float]  # ln L_i(N, D, 1) per (N, D)
    rmse_log: float


def fit_gamma(n: Sequence[float], d: Sequence[float], p: Sequence[float], loss: Sequence[float]) -> GammaFit:
    """Fit γ of one family from runs at several sampling ratios: ``ln L = ln L(N, D, 1) − γ ln p`` (§4)."""
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    p = np.asarray(p, dtype=float)
    y = np.log(np.asarray(loss, dtype=float))
    if np.any((p <= 0) | (p > 1)):
        raise UserError("sampling ratios must lie in (0, 1]")
    keys = list(dict.fromkeys(zip(n.tolist(), d.tolist())))
    group = np.array([keys.index(k) for k in zip(n.tolist(), d.tolist())])
    if not any(len(np.unique(p[group == g])) >= 2 for g in range(len(keys))):
        raise UserError("fitting gamma needs runs at two or more sampling ratios for the same (N, D)")
    design = np.zeros((len(y), len(keys) + 1))
    design[np.arange(len(y)), group] = 1.0
    design[:, -1] = -np.log(p)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rmse = float(np.sqrt(np.mean((design @ coef - y) ** 2)))
    return GammaFit(gamma=float(coef[-1]), intercepts={k: float(coef[i]) for i, k in enumerate(keys)}, rmse_log=rmse)


@dataclass
class FamilyLaw:
    gamma: float
    bracket: ChinchillaFit

    def loss(self, n: np.ndarray | float, d: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
        return self.bracket.params.loss(n, d) * np.asarray(p, dtype=float) ** (-self.gamma)

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "bracket": self.bracket.to_dict()}


def fit_family_law(
    n: Sequence[float],
    d: Sequence[float],
    p: Sequence[float],
    loss: Sequence[float],
    *,
    grid: np.ndarray | None = None,
) -> FamilyLaw:
    """Fit one family's full law: γ by :func:`fit_gamma`, then the bracket by the §1.2 fit of ``L·p^γ``."""
    gfit = fit_gamma(n, d, p, loss)
    bracket_loss = np.asarray(loss, dtype=float) * np.asarray(p, dtype=float) ** gfit.gamma
    return FamilyLaw(gfit.gamma, fit_chinchilla(n, d, bracket_loss, grid=grid))


def weighted_mixture_loss(
    p: Sequence[float], gamma: Sequence[float], weights: Sequence[float], c: Sequence[float] | None = None
) -> float:
    """``Σ w_i c_i p_i^-γ_i``, the objective :func:`optimal_ratios` minimises."""
    g = np.asarray(gamma, dtype=float)
    cc = np.ones_like(g) if c is None else np.asarray(c, dtype=float)
    return float(np.sum(np.asarray(weights, dtype=float) * cc * np.asarray(p, dtype=float) ** (-g)))


__all__ = [
    "FamilyLaw",
    "GammaFit",
    "family_brackets",
    "fit_family_law",
    "fit_gamma",
    "optimal_ratios",
    "ratios_for_lambda",
    "weighted_mixture_loss",
]
