"""Perplexity of a run on its validation split or on a prepared data directory."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.data.shards import TokenShards, check_tokenizer, load_manifest
from lmlab.train.loop import evaluate_lm
from lmlab.train.sampler import eval_batches


@torch.no_grad()
def perplexity(model, tokenizer, data_dir: Path, *, seq_len: int, batch_size: int, budget_tokens: int, split="val"):
    """Mean token cross-entropy (nats) and perplexity over the first ``budget_tokens`` of ``split``."""
    check_tokenizer(load_manifest(data_dir), tokenizer)
    tokens = TokenShards.open(data_dir, split)
    device = next(model.parameters()).device
    out = evaluate_lm(model, eval_batches(tokens, seq_len, batch_size, budget_tokens), device)
    out["tokens"] = min(len(tokens), budget_tokens)
    return out
