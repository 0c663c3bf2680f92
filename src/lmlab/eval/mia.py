"""Membership-inference attacks: scores of how likely a text was in a model's training data (docs/science.md §15).

Six attacks, each a function of tensors returning one *loss-like* score per row (higher ⇒ non-member), as in
open-unlearning (OU) ``src/evals/metrics/mia``; negate one for "higher ⇒ member":

- ``loss``: the mean NLL of the text (LOSS; Yeom et al. 2018, *Privacy Risk in Machine Learning*).
- ``zlib``: the mean NLL over the text's zlib-compressed length in bytes (Carlini et al. 2021, *Extracting Training
  Data from Large Language Models*).
- ``min_k``: minus the mean of the K% lowest token log-probs (Min-K%; Shi et al. 2023, arXiv 2310.16789).
- ``min_k_plus_plus``: the same on log-probs standardised by the model's next-token distribution (Min-K%++; Zhang et
  al. 2024, arXiv 2404.02936).
- ``reference``: the target's mean NLL minus a reference model's (Carlini et al. 2021; OU ``reference.py``).
- ``gradient_norm``: the mean over parameter tensors of the p-norm of the gradient of the text's mean NLL (OU
  ``gradnorm.py``, citing arXiv 2402.17012).

Texts are scored as lmlab's documents are read in training: the document prefix (lmlab's EOS, or a foreign
tokenizer's BOS) and then every token of the text, cut to the model's context (``lmlab.eval.ood.encode_documents``);
this is muse_bench's and the Min-K% repositories' "full text after BOS", where OU scores answer tokens only.

An attack is judged by its ROC with members as positives, a text predicted a member when its score is at or below
the threshold: the AUC ``P(s_nonmember > s_member) + ½·P(tie)`` (OU's ``mia_auc`` orientation, → 1 when members are
memorised) and the TPR at FPR ≤ 0.1%, 1% and 5%, the low-FPR regime Carlini et al. 2022 (arXiv 2112.03570) argue
matters for privacy.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import DataError
from lmlab.eval.ood import auroc, encode_documents
from lmlab.safe_io import write_bytes_atomic

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradient_norm")
FPR_LEVELS = (0.001, 0.01, 0.05)
#: OU's floor on σ² in Min-K%++: a flat next-token distribution gives z = 0 instead of 0/0.
MIN_VARIANCE = 1e-6

# --------------------------------------------------------------------------- scores on tensors


def loss_score(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LOSS (Yeom et al. 2018): the mean NLL −(1/T)·Σ_t log p(x_t | x_<t) over the ``mask``ed positions of each row.

    ``token_logps`` and ``mask`` are [B, T]; returns [B] (NaN for a row with no scored position)."""
    mask = mask.bool()
    return -(token_logps.float() * mask).sum(-1) / mask.sum(-1)


def zlib_entropy(text: str) -> int:
    """The length in bytes of ``text`` (UTF-8) compressed by zlib at its default level."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(loss: torch.Tensor | float, text: str | Sequence[str]) -> torch.Tensor:
    """zlib ratio (Carlini et al. 2021, §6.1): NLL_mean / zlib bytes, for one text or a row [B] of them.

    Carlini et al. divide log-perplexities by the zlib entropy; OU divides the mean NLL, which is the same number."""
    texts = [text] if isinstance(text, str) else list(text)
    loss = torch.as_tensor(loss, dtype=torch.float32)
    sizes = torch.tensor([zlib_entropy(t) for t in texts], dtype=torch.float32, device=loss.device)
    return loss / (sizes[0] if isinstance(text, str) else sizes)


def lowest_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """The mean of the max(1, ⌊k·T⌋) smallest ``mask``ed values of each row of [B, T], T the row's count.

    OU takes at least one value; the Min-K% reference code and muse_bench take ⌊k·T⌋, which is empty (a NaN mean)
    for texts shorter than 1/k tokens. ⌊k·T⌋ is the double-precision product, as ``int(k * T)`` in those repos."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    mask = mask.bool()
    counts = mask.sum(-1)  # [B]
    n = torch.floor(counts.double() * k).clamp(min=1).to(counts.device)  # [B]
    ranked = values.float().masked_fill(~mask, math.inf).sort(dim=-1).values  # [B, T], scored values first
    take = torch.arange(values.shape[-1], device=values.device) < n.unsqueeze(-1)  # [B, T]
    out = ranked.masked_fill(~take, 0.0).sum(-1) / n.float()
    return out.masked_fill(counts == 0, math.nan)


def min_k_score(token_logps: torch.Tensor, mask: torch.Tensor, k: float = 0.4) -> torch.Tensor:
    """Min-K% (Shi et al. 2023, arXiv 2310.16789, Eq. 1): −(mean of the ⌊k·T⌋ smallest log-probs), at least one.

    K = 40% is OU's and MUSE's default; Shi et al. sweep 5–60% and report 20%. [B, T] in, [B] out."""
    return -lowest_mean(token_logps, mask, k)


def min_k_plus_plus_score(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, k: float = 0.4
) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024, arXiv 2404.02936, Eq. 4): Min-K% on z_t = (log p(x_t) − μ_t)/σ_t, where μ_t and
    σ_t² are the mean and variance of log p(v) under the model's next-token distribution p(·) at step t.

    σ² is floored at 1e-6 as in OU, so a flat distribution scores z = 0. Both moments are computed in centred form,
    Σ_v p_v·(log p(x_t) − log p_v) and Σ_v p_v·(log p_v − μ_t)², equal to the paper's E[·] − μ² but exact where
    the distribution is flat. ``logits`` [B, T, V] (predicting ``targets`` [B, T]), ``mask`` [B, T]; returns [B]."""
    mask = mask.bool()
    z = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)  # [B, T]
    for row in range(logits.shape[0]):  # one row at a time: the [T, V] temporaries dominate memory
        logp = torch.log_softmax(logits[row].float(), dim=-1)  # [T, V]
        p = logp.exp()
        target = logp.gather(-1, targets[row].clamp(min=0).unsqueeze(-1))  # [T, 1]; unscored targets may be -100
        centred = (p * (target - logp)).sum(-1)  # [T]: log p(x_t) − μ_t
        mu = (p * logp).sum(-1, keepdim=True)  # [T, 1]
        var = (p * (logp - mu).square()).sum(-1).clamp(min=MIN_VARIANCE)  # [T]
        z[row] = centred / var.sqrt()
    return -lowest_mean(z, mask, k)


def reference_score(target_loss: torch.Tensor, ref_loss: torch.Tensor) -> torch.Tensor:
    """Reference-model calibration (Carlini et al. 2021; OU ``reference.py``): NLL_mean(target) − NLL_mean(ref).

    Carlini et al. compare log-perplexities by a ratio; the difference is OU's and detect-pretrain-code's."""
    return target_loss - ref_loss


def gradient_norm_score(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Gradient norm (OU ``gradnorm.py``, citing arXiv 2402.17012): per row, alone, the mean over the model's
    parameter tensors W of ‖∇_W NLL_mean‖_p, where NLL_mean averages the scored targets; p ∈ {1, 2, ∞}.

    This is a mean of per-tensor norms, not the global norm. OU runs the model in train mode (dropout on); lmlab
    uses eval mode, so the score is deterministic. Tensors without a gradient (unused, frozen) are left out, as
    in OU. Gradients come from ``torch.autograd.grad``: ``.grad`` buffers are not touched.

    ``ids`` [B, L] right-padded token ids; ``mask`` [B, L−1], true where the target ``ids[:, t + 1]`` is scored.
    Returns [B] (NaN for a row with no scored target)."""
    if p not in (1, 2, math.inf):
        raise ValueError(f"p must be 1, 2 or inf, got {p}")
    params = [w for w in model.parameters() if w.requires_grad]
    if not params:
        raise ValueError("gradient_norm needs parameters that require gradients; the model has none")
    device = params[0].device
    ids, mask = ids.to(device), mask.to(device).bool()
    scores = []
    with eval_mode(model), torch.enable_grad():
        for row in range(ids.shape[0]):
            scored = mask[row].nonzero()
            if len(scored) == 0:
                scores.append(torch.tensor(math.nan, device=device))
                continue
            end = int(scored[-1]) + 2  # the last scored target is ids[row, end - 1]
            x = ids[row : row + 1, :end]  # [1, end]
            logits = model(x[:, :-1]).float()  # [1, end - 1, V]
            nll = F.cross_entropy(logits[0], x[0, 1:], reduction="none")  # [end - 1]
            grads = torch.autograd.grad(nll[mask[row, : end - 1]].mean(), params, allow_unused=True)
            norms = [torch.linalg.vector_norm(g.float(), ord=p) for g in grads if g is not None]
            scores.append(torch.stack(norms).mean())
    return torch.stack(scores)


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None):
    """Run with ``models`` in eval mode, each put back in its own mode afterwards."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(present, modes):
            m.train(training)


# --------------------------------------------------------------------------- ROC


@dataclass(frozen=True)
class RocCurve:
    """The empirical ROC of loss-like scores, members positive: point i predicts "member" for scores ≤
    ``thresholds[i]``; the first point (−∞) predicts no member."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @property
    def auc(self) -> float:
        """The trapezoidal area; tied scores make a diagonal step, so it equals ``roc_auc`` (Hanley & McNeil 1982)."""
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1]) / 2))


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of loss-like scores: P(s_nonmember > s_member) + ½·P(tie), the Mann–Whitney U of the non-members'
    midranks over n_members·n_nonmembers (``lmlab.eval.ood.auroc`` with non-members ranking high)."""
    return auroc(nonmember_scores, member_scores)


def roc_curve(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> RocCurve:
    """The ROC at every distinct score, from (0, 0) to (1, 1), for loss-like scores (a member is predicted when its
    score is at or below the threshold)."""
    members, nonmembers = np.sort(np.asarray(member_scores, float)), np.sort(np.asarray(nonmember_scores, float))
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError(f"a ROC needs both classes, got {len(members)} members and {len(nonmembers)} non-members")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("ROC scores contain nan")
    thresholds = np.unique(np.concatenate([members, nonmembers]))  # ascending
    tpr = np.searchsorted(members, thresholds, side="right") / len(members)
    fpr = np.searchsorted(nonmembers, thresholds, side="right") / len(nonmembers)
    return RocCurve(np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[-np.inf, thresholds])


def tpr_at_fpr(curve: RocCurve, x: float) -> float:
    """The largest TPR among ROC points with FPR ≤ ``x`` (mink++ ``get_metrics``: ``tpr[np.where(fpr <= x)[0][-1]]``)."""
    return float(curve.tpr[curve.fpr <= x].max())


def mia_report(
    member_scores: Mapping[str, Sequence[float]], nonmember_scores: Mapping[str, Sequence[float]]
) -> dict[str, dict]:
    """Per attack: the AUC, the TPR at FPR ≤ 0.1%, 1% and 5%, and the two set sizes."""
    report = {}
    for attack, members in member_scores.items():
        nonmembers = nonmember_scores[attack]
        curve = roc_curve(members, nonmembers)
        report[attack] = {
            "auc": roc_auc(members, nonmembers),
            **{f"tpr@{x:.1%}".replace(".0%", "%"): tpr_at_fpr(curve, x) for x in FPR_LEVELS},
            "n_members": len(members),
            "n_nonmembers": len(nonmembers),
        }
    return report


def plot_roc(curves: Mapping[str, RocCurve], path: str | Path, title: str = "membership inference") -> Path:
    """A PNG of each attack's ROC: linear axes, and log–log axes for the low-FPR regime (Carlini et al. 2022)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    smallest = min((float(c.fpr[c.fpr > 0].min()) for c in curves.values()), default=1e-3)  # 1 / n_nonmembers
    for ax, log in zip(axes, (False, True)):
        for name, curve in curves.items():
            ax.plot(curve.fpr, curve.tpr, lw=1.4, label=f"{name} (AUC {curve.auc:.3f})")
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="chance")
        if log:
            low = min(1e-3, smallest / 2)
            ax.set(xscale="log", yscale="log", xlim=(low, 1), ylim=(low, 1), title="log scale (low FPR)")
        else:
            ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
        ax.set(xlabel="false positive rate (non-members called members)", ylabel="true positive rate")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- scoring texts with a model


def model_context(model: nn.Module) -> int | None:
    """The longest sequence an lmlab model reads (``cfg.max_seq_len``), or None when it does not say."""
    return getattr(getattr(model, "cfg", None), "max_seq_len", None)


def resolve_attacks(attacks: Sequence[str] | None, has_reference: bool) -> list[str]:
    """The attacks to run, in ``ATTACKS`` order: all available by default (``reference`` only with a reference)."""
    if attacks is None:
        return [a for a in ATTACKS if a != "reference" or has_reference]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    if "reference" in attacks and not has_reference:
        raise ValueError("the reference attack needs a reference model")
    return [a for a in ATTACKS if a in attacks]


def mia_scores(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    reference: nn.Module | None = None,
    attacks: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    k: float = 0.4,
    p: float = 2,
) -> dict[str, list[float]]:
    """Attack name → one loss-like score per text, in the order given (module docstring for the attacks).

    Each text is the document prefix and its tokens, cut to the shorter context of ``model`` and ``reference``.
    Texts are batched by length and right-padded (the causal mask keeps padding from the real positions); logits
    are read once per batch in fp32. A text whose tokens are cut is scored by zlib on the part that was kept.
    ``k`` is Min-K%'s and Min-K%++'s fraction, ``p`` the gradient norm's order. A text with nothing to score is a
    ``DataError`` naming it (1-based)."""
    attacks = resolve_attacks(attacks, reference is not None)
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = tokenizer.document_prefix
    contexts = [c for c in (model_context(model), None if reference is None else model_context(reference)) if c]
    max_tokens = min(contexts) - len(prefix) if contexts else sys.maxsize
    sequences, truncated = encode_documents(tokenizer, texts, max_tokens)
    for i, ids in enumerate(sequences):
        if len(ids) < 2:
            raise DataError(f"text {i + 1} has no token to score (it is empty after tokenization); remove it")
    kept = [tokenizer.decode(ids[len(prefix) :]) if cut else t for ids, cut, t in zip(sequences, truncated, texts)]

    out: dict[str, list[float]] = {a: [math.nan] * len(texts) for a in attacks}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with eval_mode(model, reference):
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            ids, targets, mask = pad_batch([sequences[i] for i in rows], device)
            scores = batch_scores(model, reference, ids, targets, mask, [kept[i] for i in rows], attacks, k)
            if "gradient_norm" in attacks:
                scores["gradient_norm"] = gradient_norm_score(model, ids, mask, p)
            for attack, values in scores.items():
                for r, value in zip(rows, values.tolist()):
                    out[attack][r] = value
    return out


def pad_batch(sequences: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(ids [B, L], targets [B, L−1], mask [B, L−1])`` of right-padded sequences; every position after the first
    of a sequence is a scored target."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)  # [B, L]; 0 pads, never scored
    for r, seq in enumerate(sequences):
        ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences])
    mask = torch.arange(width - 1) < (lengths - 1).unsqueeze(-1)  # [B, L−1]
    return ids.to(device), ids[:, 1:].to(device), mask.to(device)


@torch.no_grad()
def batch_scores(
    model: nn.Module,
    reference: nn.Module | None,
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    texts: Sequence[str],
    attacks: Sequence[str],
    k: float,
) -> dict[str, torch.Tensor]:
    """The forward-pass attacks (all but the gradient norm) on one padded batch."""
    logits = model(ids).float()[:, :-1]  # [B, L−1, V]: position t predicts targets[:, t]
    logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L−1]
    loss = loss_score(logps, mask)
    scores = {"loss": loss}
    if "zlib" in attacks:
        scores["zlib"] = zlib_score(loss, texts)
    if "min_k" in attacks:
        scores["min_k"] = min_k_score(logps, mask, k)
    if "min_k_plus_plus" in attacks:
        scores["min_k_plus_plus"] = min_k_plus_plus_score(logits, targets, mask, k)
    if "reference" in attacks:
        ref_logits = reference(ids).float()[:, :-1]  # [B, L−1, V]
        ref_logps = -F.cross_entropy(ref_logits.transpose(1, 2), targets, reduction="none")  # [B, L−1]
        scores["reference"] = reference_score(loss, loss_score(ref_logps, mask))
    return {a: s for a, s in scores.items() if a in attacks}
