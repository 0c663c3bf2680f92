"""The Huber loss used by every scaling-law fitter (docs/science.md §1.2, §2.3).

``Huber_δ(r) = ½ r²`` if ``|r| ≤ δ`` and ``δ(|r| − ½δ)`` otherwise, with δ = 1e-3 by default. The fitters
apply it to residuals in log-loss space and **sum** it over points (Hoffmann et al. 2022, App. D.2; the Epoch
replication, arXiv 2404.10102), so duplicating every point doubles the objective.
"""

from __future__ import annotations

import numpy as np

HUBER_DELTA = 1e-3


def huber(r: np.ndarray | float, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss of residuals ``r`` (docs/science.md §1.2)."""
    r = np.asarray(r, dtype=float)
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray | float, delta: float = HUBER_DELTA) -> np.ndarray:
    """Derivative of :func:`huber` with respect to ``r``: ``r`` inside ``[−δ, δ]``, ``δ·sign(r)`` outside."""
    r = np.asarray(r, dtype=float)
    return np.clip(r, -delta, delta)


def huber_sum(r: np.ndarray, delta: float = HUBER_DELTA) -> float:
    """The summed Huber objective of a residual vector (docs/science.md §1.2: summed, not averaged)."""
    return float(np.sum(huber(r, delta)))
