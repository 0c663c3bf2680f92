"""Token-level evaluation: mean cross-entropy and perplexity over fixed windows of a prepared split,
for one source or for every source of a data mixture."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.data.sampler import eval_batches
from lmlab.data.shards import TokenShards, check_tokenizer, load_manifest
from lmlab.objectives.lm import IGNORE_INDEX, causal_lm_loss


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    eos_id: int | None = None,
) -> dict[str, float]:
    """Mean token cross-entropy and perplexity over a fixed set of windows; with ``eos_id`` also
    ``val_loss_docs``, the mean over the tokens of documents that lie whole in their window
    (:func:`complete_document_mask`)."""
    loss_sum, count, docs_sum, docs_count = 0.0, 0, 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        out = causal_lm_loss(logits, y)
        loss_sum += float(out.loss_sum)
        count += int(out.count)
        if eos_id is not None:
            whole = causal_lm_loss(logits, y.masked_fill(~complete_document_mask(x, y, eos_id), IGNORE_INDEX))
            docs_sum += float(whole.loss_sum)
            docs_count += int(whole.count)
    loss = loss_sum / max(count, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if eos_id is not None:
        result["val_loss_docs"] = docs_sum / max(docs_count, 1)
    return result


def complete_document_mask(inputs: torch.Tensor, labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Labels that belong to documents seen whole in their window: from the token after the window's first
    input EOS to the last label EOS. A window cuts its first document (its start is missing) and its last (its
    end is missing); only the documents between are scored, so the loss can be compared with the generator's
    exact entropy floor (:func:`document_floor`)."""
    after_first = torch.cumsum(inputs == eos_id, dim=-1) > 0
    before_last = torch.flip(torch.cumsum(torch.flip(labels == eos_id, [-1]), dim=-1), [-1]) > 0
    return after_first & before_last


def document_floor(tokens: TokenShards, doc_nll: np.ndarray, *, seq_len: int, budget_tokens: int, eos_id: int) -> float:
    """The Bayes-optimal ``val_loss_docs`` on the windows ``eval_batches`` reads: Σ −log p / Σ tokens over the
    documents seen whole (document j spans the tokens after EOS j−1 up to EOS j; ``doc_nll[j]`` its −log p)."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, budget_tokens // seq_len))
    stream = tokens.read(0, n_windows * seq_len + 1)
    ends = np.flatnonzero(stream == eos_id)  # EOS j closes validation document j
    nll_sum, count = 0.0, 0
    for w in range(n_windows):
        g = w * seq_len
        first = np.searchsorted(ends, g)  # the first EOS among the window's inputs
        last = np.searchsorted(ends, g + seq_len, side="right") - 1  # the last EOS among its labels
        for j in range(first + 1, last + 1):
            nll_sum += float(doc_nll[j])
            count += int(ends[j] - ends[j - 1])
    return nll_sum / max(count, 1)


def evaluate_sources(
    model: nn.Module,
    splits: Mapping[str, TokenShards],
    ratios: Mapping[str, float],
    *,
    seq_len: int,
    batch_size: int,
    budget_tokens: int,
    device: torch.device,
) -> dict[str, float]:
    """``val_loss/<source>`` on every source's own split (the same token budget each) and ``val_loss``, their
    ratio-weighted mean: the loss of the mixture the model is trained on."""
    out: dict[str, float] = {}
    for name, tokens in splits.items():
        res = evaluate_lm(model, eval_batches(tokens, seq_len, batch_size, budget_tokens), device)
        out[f"val_loss/{name}"] = res["val_loss"]
    out["val_loss"] = float(sum(ratios[n] * out[f"val_loss/{n}"] for n in splits))
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out


@torch.no_grad()
def perplexity(model, tokenizer, data_dir: Path, *, seq_len: int, batch_size: int, budget_tokens: int, split="val"):
    """Mean token cross-entropy (nats) and perplexity over the first ``budget_tokens`` of ``split``."""
    check_tokenizer(load_manifest(data_dir), tokenizer)
    tokens = TokenShards.open(data_dir, split)
    device = next(model.parameters()).device
    out = evaluate_lm(model, eval_batches(tokens, seq_len, batch_size, budget_tokens), device)
    out["tokens"] = min(len(tokens), budget_tokens)
    return out
