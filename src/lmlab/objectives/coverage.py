"""Direct Coverage Optimization (DCO): the confidence-limited sequence loss for pass@N (docs/science.md §20).

Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute:
Limiting Confidence Improves Mathematical Reasoning", arXiv 2502.07154. If the correct answer y of a prompt x
has probability p = p_θ(y|x) (the product over the answer's tokens), N independent samples cover it with
probability 1 − (1 − p)^N, and the loss is the negative log of that coverage:

    ℓ_DCO(p; N) = −log(1 − (1 − p)^N),       ∇ℓ = F(N, p)·∇(−log p),
    F(N, p) = N·p·(1 − p)^(N−1) / (1 − (1 − p)^N) ∈ (0, 1].

N = 1 is the sequence cross-entropy −log p. F → 1 as p → 0 (hard examples are trained as with CE) and F → 0
as p → 1: once an example is covered by N samples the loss stops pushing its confidence, which is what keeps
the sampling diversity that pass@N needs. The equation is reconstructed from the paper's coverage form
(docs/science.md §20); peers: none in TRL or torchtune.

Numerics: everything is computed from log p in float64, ℓ = −log1mexp(N·log1mexp(log p)) with
log1mexp(x) = log(1 − eˣ) evaluated by the branch of Mächler (2012, "Accurately computing log(1 − exp(−|a|))").
log p is capped a hair below 0 so p = 1 gives ℓ ≈ 0 with gradient 0 (not 0·∞), and for log p < −50, where
e^(log p) would underflow, ℓ = −log p − log N, whose relative error N·p/2 is below 1e-20 there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmlab.objectives.base import LossOutput
from lmlab.objectives.lm import IGNORE_INDEX

_LOG_HALF = -math.log(2.0)
_MAX_LOGP = -1e-30  # log p is capped here: p = 1 would make log(1 − p) = −∞ and its gradient ∞
_TAIL_LOGP = -50.0  # below this, −log(1 − (1 − p)^N) = −log(N·p) to double precision


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 and for very negative x; both branches see only safe inputs,
    so ``torch.where`` never routes a 0·∞ into the gradient."""
    near = x > _LOG_HALF
    from_expm1 = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, _LOG_HALF))))
    from_log1p = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, 2 * _LOG_HALF), x)))
    return torch.where(near, from_expm1, from_log1p)


def coverage_nll(logp: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sequence ℓ_DCO = −log(1 − (1 − p)^N) from ``logp`` = log p [S] (any float dtype; computed in float64).

    ``n = 1`` returns ``−logp`` itself (the sequence cross-entropy, bitwise).
    """
    if n < 1:
        raise ValueError(f"coverage N must be >= 1, got {n}")
    if n == 1:
        return -logp
    x = logp.double()
    tail = x < _TAIL_LOGP
    safe = torch.where(tail, torch.full_like(x, -1.0), x).clamp(max=_MAX_LOGP)
    covered = -log1mexp(n * log1mexp(safe))  # −log(1 − (1 − p)^N)
    return torch.where(tail, -(x + math.log(n)), covered).to(logp.dtype)


@torch.no_grad()
def coverage_weight(logp: torch.Tensor, n: int) -> torch.Tensor:
    """F(N, p) = N·p·(1 − p)^(N−1)/(1 − (1 − p)^N) per sequence [S], the factor on CE's gradient (in log space)."""
    x = logp.double()
    if n == 1:
        return torch.ones_like(logp)
    tail = x < _TAIL_LOGP
    safe = torch.where(tail, torch.full_like(x, -1.0), x).clamp(max=_MAX_LOGP)
    log_q = log1mexp(safe)  # log(1 − p)
    log_f = math.log(n) + safe + (n - 1) * log_q - log1mexp(n * log_q)
    return torch.where(tail, torch.ones_like(x), log_f.exp()).to(logp.dtype)


def coverage_loss(logp: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> LossOutput:
    """DCO summed over sequences: ``loss_sum`` = Σ ℓ_DCO, ``count`` = number of sequences.

    ``mask`` [S] (bool) leaves out slots that hold no sequence (they count nothing; no host sync is needed to
    drop them). Metrics (sums, like ``loss_sum``): ``coverage_weight`` Σ F (its mean tells how much of CE's
    push is left) and ``seq_nll`` Σ −log p (the sequence cross-entropy, equal to the loss at N = 1).
    """
    keep = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    losses = torch.where(keep, coverage_nll(logp, n), zero)
    metrics = {
        "coverage_weight": torch.where(keep, coverage_weight(logp, n), zero).sum(),
        "seq_nll": torch.where(keep, -logp.detach(), zero).sum(),
    }
    return LossOutput(losses.sum(), keep.sum(), metrics)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target log-probs of the sequences in a batch and their target-token counts, both [B·T].

    ``labels`` [B, T] are already shifted (``labels[b, t]`` is scored by ``logits[b, t]``); ``IGNORE_INDEX``
    positions contribute nothing. A sequence is a row, or with ``doc_ids`` [B, T] (packed rows,
    ``lmlab.data.packing``: ids in [0, T)) one document of a row, kept in slot ``b·T + doc``. Slots that hold
    no target token (unused ids, padding) have count 0 and log-prob 0: pass ``counts > 0`` as the mask of
    ``coverage_loss``. Fixed shapes keep the training step free of host syncs.
    """
    b, t, vocab = logits.shape
    token_logp = -F.cross_entropy(
        logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B*T], 0 where ignored
    docs = doc_ids if doc_ids is not None else torch.zeros_like(labels)
    slot = (torch.arange(b, device=labels.device)[:, None] * t + docs).reshape(-1)  # [B*T]
    valid = (labels != IGNORE_INDEX).reshape(-1).long()
    sums = token_logp.new_zeros(b * t).index_add(0, slot, token_logp)
    counts = torch.zeros(b * t, dtype=torch.long, device=labels.device).index_add(0, slot, valid)
    return sums, counts
