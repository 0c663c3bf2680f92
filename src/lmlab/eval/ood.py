"""Out-of-distribution detection by the likelihood ratio of a fine-tuned model to its base (paper E13).

Zhang, Xiao, Liu, Bamler, Wischik, *Your Finetuned Large Language Model is Already a Powerful
Out-of-distribution Detector*, arXiv 2404.08679 (AISTATS 2025; reference code andiac/LLMOODratio). A base
model θ is trained on broad data, a copy θ' is fine-tuned on the in-distribution domain; the paper's criterion is
the likelihood ratio S(x) = p_θ(x) / p_θ'(x), large for OOD text. lmlab scores the log of its inverse, so that a
higher score means *more in-domain*:

    score(x) = log p_θ'(x) − log p_θ(x)                             (sum over the document's tokens)
    score(x) = [log p_θ'(x) − log p_θ(x)] / |x|                     (per token: the default)

The per-token form is the reference code's "NLR" (length-normalised ratio), the sum its "LR"; per token is the
default because documents of one domain can be systematically longer than the other's, and a sum would then
detect length rather than domain. Fine-tuning raises the likelihood of in-domain text more than that of other
text, while the base's likelihood cancels what makes a text intrinsically easy (short words, a small
vocabulary): the single-model likelihood log p_θ'(x) can rank a simple OOD text above an in-domain one
(Nalisnick et al. 2019, *Do Deep Generative Models Know What They Don't Know?*), the ratio corrects for it.

Tokenization follows lmlab's data: a document is ``tokenizer.encode_document(text)`` (its document prefix: the
EOS that separates documents in training, or a foreign tokenizer's BOS, as in ``lmlab.eval.memorization``) and
every token after it is scored, cut to the first ``max_tokens``; with an empty prefix the first token is context only. Per-token log-probabilities
are the negated cross-entropy of ``lmlab.objectives.lm.causal_lm_loss``, kept per document.

Detection quality is the AUROC with the in-domain documents as positives: the Mann–Whitney U statistic
divided by n_in·n_out, ties counted one half, i.e. P(score(in) > score(out)) + ½·P(score(in) = score(out)),
which Hanley & McNeil 1982 (*The Meaning and Use of the Area under a Receiver Operating Characteristic (ROC)
Curve*, Radiology 143:29–36) show is the area under the empirical ROC curve. Its confidence interval is the
normal approximation A ± z·SE with that paper's closed-form standard error (an exponential approximation for
the two pair probabilities Q1, Q2): deterministic and cheap, but of zero width at AUROC = 0 or 1 and rough for
small samples, so studies report the spread over seeds as well.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.objectives.lm import IGNORE_INDEX


@dataclass(frozen=True)
class DocumentLogprob:
    """A document's summed log-likelihood (nats) over its ``tokens`` scored tokens."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens


@dataclass(frozen=True)
class Auroc:
    """An AUROC with its ``level`` confidence interval (Hanley & McNeil 1982)."""

    value: float
    low: float
    high: float
    n_pos: int
    n_neg: int
    level: float = 0.95

    def as_dict(self) -> dict:
        return {"auroc": self.value, "interval": [self.low, self.high]}


def encode_documents(tokenizer, documents: Sequence[str], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids to score per document — the document prefix (lmlab's EOS, or a BOS) and the document's first
    ``max_tokens`` tokens — and whether each document was cut."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    start = tokenizer.document_prefix
    encoded = tokenizer.encode_batch(list(documents))
    return [start + ids[:max_tokens] for ids in encoded], [len(ids) > max_tokens for ids in encoded]


@torch.no_grad()
def document_logprobs(
    model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 32
) -> list[DocumentLogprob]:
    """Σ_t log p(x_t | x_<t) over positions t ≥ 1 of each sequence, in the order given.

    Sequences are batched by length (fewest pad tokens) and right-padded; the causal mask keeps padding from
    reaching the real positions, and padded targets are ``IGNORE_INDEX``, so each document's value is the one it
    gets alone."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out: list[DocumentLogprob | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]; 0 pads, never a target
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        for r, i in enumerate(rows):
            seq = torch.as_tensor(sequences[i], dtype=torch.long)
            ids[r, : len(seq)] = seq
            labels[r, : len(seq) - 1] = seq[1:]
        logits = model(ids.to(device)).float()  # [B, L, V]
        nll = F.cross_entropy(logits.transpose(1, 2), labels.to(device), ignore_index=IGNORE_INDEX, reduction="none")
        totals = (-nll.sum(dim=1)).tolist()  # [B]; ignored targets contribute 0
        counts = (labels != IGNORE_INDEX).sum(dim=1).tolist()  # [B]
        for r, i in enumerate(rows):
            out[i] = DocumentLogprob(totals[r], counts[r])
    return out  # type: ignore[return-value]


def loglik_scores(docs: Sequence[DocumentLogprob], per_token: bool = True) -> list[float]:
    """One model's log-likelihood per document: per token (mean) or summed."""
    return [d.mean if per_token else d.total for d in docs]


def likelihood_ratio_scores(
    finetuned: Sequence[DocumentLogprob], base: Sequence[DocumentLogprob], per_token: bool = True
) -> list[float]:
    """log p_finetuned(x) − log p_base(x) per document (per token by default); higher = more in-domain."""
    if len(finetuned) != len(base):
        raise ValueError(f"{len(finetuned)} fine-tuned scores but {len(base)} base scores")
    for f, b in zip(finetuned, base):
        if f.tokens != b.tokens:
            raise ValueError(f"the two models scored different token counts ({f.tokens} vs {b.tokens})")
    return [f - b for f, b in zip(loglik_scores(finetuned, per_token), loglik_scores(base, per_token))]


def midranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve of scores where ``positive`` should rank high: U / (n_pos·n_neg).

    U = R_pos − n_pos(n_pos + 1)/2 with R_pos the sum of the positives' midranks in the pooled sample (the
    Mann–Whitney U), which counts the pairs a positive wins plus one half per tie."""
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative scores")
    values = [float(v) for v in positive] + [float(v) for v in negative]
    if any(math.isnan(v) for v in values):
        raise ValueError("AUROC scores contain nan")
    rank_sum = sum(midranks(values)[:n_pos])
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def hanley_mcneil_se(area: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC A (Hanley & McNeil 1982), with Q1 = A/(2−A) and Q2 = 2A²/(1+A):

        SE² = [A(1−A) + (n_pos−1)(Q1−A²) + (n_neg−1)(Q2−A²)] / (n_pos·n_neg)

    Q1 is the probability that two random positives both outrank one negative, Q2 that one positive outranks
    two random negatives, both under the paper's exponential approximation."""
    q1 = area / (2 - area)
    q2 = 2 * area * area / (1 + area)
    var = (area * (1 - area) + (n_pos - 1) * (q1 - area * area) + (n_neg - 1) * (q2 - area * area)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def auroc_interval(positive: Sequence[float], negative: Sequence[float], level: float = 0.95) -> Auroc:
    """AUROC with the normal-approximation interval A ± z·SE (Hanley & McNeil SE), clipped to [0, 1]."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    area = auroc(positive, negative)
    half = statistics.NormalDist().inv_cdf((1 + level) / 2) * hanley_mcneil_se(area, len(positive), len(negative))
    return Auroc(area, max(0.0, area - half), min(1.0, area + half), len(positive), len(negative), level)


def ood_report(
    finetuned_in: Sequence[DocumentLogprob],
    base_in: Sequence[DocumentLogprob],
    finetuned_out: Sequence[DocumentLogprob],
    base_out: Sequence[DocumentLogprob],
    per_token: bool = True,
    level: float = 0.95,
) -> dict:
    """The likelihood ratio's AUROC (in-domain = positive) beside the single-model baselines: the fine-tuned
    model's own log-likelihood and the base model's, each with its interval."""
    ratio = auroc_interval(
        likelihood_ratio_scores(finetuned_in, base_in, per_token),
        likelihood_ratio_scores(finetuned_out, base_out, per_token),
        level,
    )
    baselines = {
        name: auroc_interval(loglik_scores(docs_in, per_token), loglik_scores(docs_out, per_token), level).as_dict()
        for name, docs_in, docs_out in (
            ("finetuned_loglik", finetuned_in, finetuned_out),
            ("base_loglik", base_in, base_out),
        )
    }
    return {
        "score": "likelihood_ratio",
        "reduction": "per_token" if per_token else "sum",
        **ratio.as_dict(),
        "interval_method": f"Hanley-McNeil 1982 normal approximation, {level:.0%}",
        "n_in": ratio.n_pos,
        "n_out": ratio.n_neg,
        "baselines": baselines,
    }
