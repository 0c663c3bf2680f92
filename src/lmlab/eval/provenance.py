"""Palimpsestic membership inference: the query test of whether a model descends from a run's training order.

Kuditipudi et al. 2025, *Blackbox Model Provenance via Palimpsestic Membership Inference*, arXiv 2510.19796
(docs/science.md §16; reference code RohithKuditipudi/blackbox-model-tracing). Alice trains on examples x_i in a
uniformly random order, x_i at place t_i. Models remember what they saw last best (palimpsestic memorisation), so a
model derived from Alice's gives her later examples lower loss. The query statistic (paper Eq. 2) is

    ρ = Spearman(t_i, m_suspect(x_i) − m_ref(x_i)),

m the mean token NLL (log-perplexity) of the example; the reference model, independent of Alice's order, removes
each example's own difficulty. H0: the suspect is independent of the order; the evidence against it is ρ < 0.

Two p-values: ``scipy.stats.spearmanr``'s two-sided one (t = ρ·√((n−2)/(1−ρ²)) on n−2 degrees of freedom), which
the reference script reports; and the exact one-sided permutation p-value, valid because the order is random:
p = (1 + #{k: ρ̃_k ≤ ρ})/(K + 1), ρ̃_k computed on K re-drawn orders (every order when there are at most K of
them: then #{ρ̃ ≤ ρ}/(number of orders)). Examples that share a place (packed into one row) move together.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from lmlab.data.packing import Example, collate, single_rows
from lmlab.objectives.lm import IGNORE_INDEX

#: ρ̃ within this of ρ counts as ≤ ρ: the re-drawn order equal to the observed one must count, whatever rounding.
RHO_TOLERANCE = 1e-9
#: Re-drawn orders ranked at once: at most about this many values in memory.
CHUNK_VALUES = 1 << 22


def _check(positions: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(positions, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 1 or t.shape != s.shape:
        raise ValueError(f"positions and scores must be 1-D of one length, got {t.shape} and {s.shape}")
    if len(t) < 3:
        raise ValueError(f"the query test needs at least 3 examples, got {len(t)}")
    if not (np.isfinite(t).all() and np.isfinite(s).all()):
        raise ValueError("positions and scores must be finite")
    if np.ptp(t) == 0 or np.ptp(s) == 0:
        raise ValueError("positions and scores must not be constant (Spearman's ρ is undefined)")
    return t, s


def query_statistic(
    positions: Sequence[float], suspect_nll: Sequence[float], reference_nll: Sequence[float] | None = None
) -> tuple[float, float]:
    """``(ρ, two-sided p)``: Spearman's ρ between the training positions t_i and m_suspect(x_i) − m_ref(x_i)
    (m_suspect alone without a reference), and ``scipy.stats.spearmanr``'s two-sided p-value."""
    scores = np.asarray(suspect_nll, dtype=np.float64)
    if reference_nll is not None:
        scores = scores - np.asarray(reference_nll, dtype=np.float64)
    t, s = _check(positions, scores)
    result = stats.spearmanr(t, s)
    return float(result.statistic), float(result.pvalue)


def spearman_pvalue(rho: float, n: int) -> float:
    """The two-sided p-value of Spearman's ``rho`` over ``n`` pairs by ``spearmanr``'s t approximation:
    t = ρ·√((n−2)/(1−ρ²)) on n−2 degrees of freedom."""
    if n < 3 or not -1 <= rho <= 1:
        raise ValueError(f"need n >= 3 and rho in [-1, 1], got n={n}, rho={rho}")
    if abs(rho) == 1:
        return 0.0
    t = rho * math.sqrt((n - 2) / (1 - rho * rho))
    return float(2 * stats.t.sf(abs(t), n - 2))


def _standardized(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` centred and divided by its (population) standard deviation."""
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=-1, keepdims=True))


def _rhos(positions: np.ndarray, z_scores: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of ``positions`` [K, n] with the scores whose standardised ranks are ``z_scores``
    [n]: the Pearson correlation of the (average-tie) ranks."""
    return (_standardized(stats.rankdata(positions, axis=-1)) * z_scores).mean(axis=-1)


def permutation_pvalue(
    positions: Sequence[float], scores: Sequence[float], n_permutations: int, seed: int = 0
) -> float:
    """The exact one-sided p-value of ρ = Spearman(positions, scores) < 0 under a uniformly random order:
    (1 + #{k: ρ̃_k ≤ ρ})/(K + 1) over ``n_permutations`` = K re-drawn orders (numpy ``default_rng(seed)``),
    or #{ρ̃ ≤ ρ}/(number of orders) over all of them when there are at most K.

    An order assigns the distinct positions to the groups of examples that share one (a packed row), so
    examples trained together stay together, as in the training order itself."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    t, s = _check(positions, scores)
    values, group = np.unique(t, return_inverse=True)  # group[i]: which distinct position example i has
    z_scores = _standardized(stats.rankdata(s))
    rho = float(_rhos(t[None, :], z_scores)[0])
    n_groups = len(values)
    if n_groups <= 12 and math.factorial(n_groups) <= n_permutations:
        orders = np.array(list(itertools.permutations(range(n_groups))))  # [n_groups!, n_groups]
        return float(np.mean(_rhos(values[orders][:, group], z_scores) <= rho + RHO_TOLERANCE))
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_VALUES // len(t))
    at_most = 0
    for start in range(0, n_permutations, chunk):
        k = min(chunk, n_permutations - start)
        orders = rng.permuted(np.tile(np.arange(n_groups), (k, 1)), axis=1)  # [k, n_groups]
        at_most += int(np.sum(_rhos(values[orders][:, group], z_scores) <= rho + RHO_TOLERANCE))
    return (1 + at_most) / (n_permutations + 1)


@torch.no_grad()
def example_nll(model: nn.Module, examples: Sequence[Example], batch_size: int = 16) -> list[float]:
    """The mean NLL of each ``(ids, target_mask)`` example over its target tokens (those training learned: label
    ``ids[t+1]`` where ``target_mask[t+1]``), each scored alone, in the order given.

    Examples are batched by length and right-padded; the causal mask keeps padding from the real positions."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    rows = single_rows(examples)
    if any(all(y == IGNORE_INDEX for y in row.labels) for row in rows):
        raise ValueError("every example needs a target token")
    out = [math.nan] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for b in range(0, len(order), batch_size):
        picked = order[b : b + batch_size]
        batch = collate([rows[i] for i in picked], pad_id=0, with_docs=False)
        logits = model(batch["input_ids"].to(device)).float()  # [B, L, V]
        labels = batch["labels"].to(device)  # [B, L]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # [B, L]
        means = nll.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1)  # [B]
        for i, value in zip(picked, means.tolist()):
            out[i] = value
    return out
