"""Token-level evaluation: mean cross-entropy and perplexity over fixed windows of a prepared split,
for one source or for every source of a data mixture."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lmlab.data.sampler import eval_batches
from lmlab.data.shards import TokenShards, check_tokenizer, load_manifest
from lmlab.objectives.lm import causal_lm_loss


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Mean token cross-entropy and perplexity over a fixed set of windows."""
    loss_sum, count = 0.0, 0
    for x, y in batches:
        out = causal_lm_loss(model(x.to(device)), y.to(device))
        loss_sum += float(out.loss_sum)
        count += int(out.count)
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


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
