"""Hoffmann Approach 2: IsoFLOP profiles (Hoffmann et al. 2022, arXiv 2203.15556, §3.2; docs/science.md §1.4).

For each compute budget, the final losses of runs of different sizes trained with that budget are fitted by a
parabola in ``log N``; its vertex is the budget's compute-optimal size ``N_opt``. A least-squares line through
``(log C, log N_opt)`` gives ``N_opt ∝ C^a`` (Hoffmann: a = 0.49), and ``D_opt = C / (6 N_opt)`` gives ``b = 1 − a``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmlab.errors import UserError


@dataclass
class IsoFlopProfile:
    """One budget's parabola ``loss = c2·x² + c1·x + c0`` with ``x = ln N``."""

    compute: float
    coeffs: tuple[float, float, float]  # (c2, c1, c0)
    n_opt: float
    loss_opt: float
    params: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class IsoFlopFit:
    """The per-budget profiles and the power laws ``N_opt = kN·C^a`` and ``D_opt = kD·C^b``."""

    profiles: list[IsoFlopProfile]
    a: float
    b: float
    log_kn: float
    log_kd: float

    def n_opt(self, c: np.ndarray | float) -> np.ndarray:
        return np.exp(self.log_kn) * np.asarray(c, dtype=float) ** self.a

    def d_opt(self, c: np.ndarray | float) -> np.ndarray:
        return np.exp(self.log_kd) * np.asarray(c, dtype=float) ** self.b

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "log_kn": self.log_kn,
            "log_kd": self.log_kd,
            "profiles": [
                {"compute": p.compute, "n_opt": p.n_opt, "loss_opt": p.loss_opt, "coeffs": list(p.coeffs)}
                for p in self.profiles
            ],
        }


def group_by_compute(flops: Sequence[float], rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices of runs grouped into budgets: sorted FLOPs within ``rel_tol`` of a group's first member share it."""
    flops = np.asarray(flops, dtype=float)
    order = np.argsort(flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and flops[i] <= flops[groups[-1][0]] * (1.0 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def fit_isoflop(
    params: Sequence[float], flops: Sequence[float], loss: Sequence[float], *, rel_tol: float = 0.05
) -> IsoFlopFit:
    """Fit Approach 2. Budgets with fewer than 3 distinct sizes, or whose parabola opens downwards, are skipped;
    at least two usable budgets are required (else ``UserError``)."""
    n = np.asarray(params, dtype=float)
    c = np.asarray(flops, dtype=float)
    y = np.asarray(loss, dtype=float)
    profiles: list[IsoFlopProfile] = []
    for idx in group_by_compute(c, rel_tol):
        if len(np.unique(n[idx])) < 3:
            continue
        x = np.log(n[idx])
        c2, c1, c0 = np.polyfit(x, y[idx], 2)
        if c2 <= 0:
            continue
        xv = -c1 / (2.0 * c2)
        profiles.append(
            IsoFlopProfile(
                compute=float(np.exp(np.mean(np.log(c[idx])))),
                coeffs=(float(c2), float(c1), float(c0)),
                n_opt=float(np.exp(xv)),
                loss_opt=float(c0 - c1 * c1 / (4.0 * c2)),
                params=n[idx].tolist(),
                losses=y[idx].tolist(),
            )
        )
    if len(profiles) < 2:
        raise UserError(
            "an IsoFLOP fit needs at least two compute budgets, each with three or more model sizes and a loss "
            f"minimum inside the sizes tried; found {len(profiles)} usable budget(s)"
        )
    log_c = np.log([p.compute for p in profiles])
    log_n = np.log([p.n_opt for p in profiles])
    a, log_kn = np.polyfit(log_c, log_n, 1)
    log_d = log_c - np.log(6.0) - log_n
    b, log_kd = np.polyfit(log_c, log_d, 1)
    return IsoFlopFit(profiles, float(a), float(b), float(log_kn), float(log_kd))
