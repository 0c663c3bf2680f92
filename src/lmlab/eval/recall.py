"""Needle retrieval accuracy on the ``recall`` world: greedy answers to held-out associative-recall questions.

A question is correct when the greedy continuation of ``"… ; key="`` is exactly the value written beside
that key earlier in the context (then a space or the end). Accuracy is reported overall and by the needle's
depth in the list (fifths), so a sparse attention pattern that loses some positions shows where.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmlab.data.synthetic.recall import RecallItem
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError
from lmlab.models.generation import generate

DEPTH_BINS = 5


@torch.no_grad()
def evaluate_recall(
    model: nn.Module,
    tokenizer: TextTokenizer,
    items: Sequence[RecallItem],
    batch_size: int = 32,
    attention_topk: int | None = None,
) -> dict[str, Any]:
    """``{"accuracy", "by_depth": {"0.0-0.2": acc, …}, "n"}``; ``attention_topk`` as in ``generate``."""
    if not items:
        raise DataError("evaluate_recall got no questions; make them with lmlab.data.synthetic.recall.recall_items")
    prefix = tokenizer.document_prefix
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [prefix + tokenizer.encode(item.prompt) for item in chunk]
        budget = max(len(tokenizer.encode(item.answer)) for item in chunk) + 1
        outputs = generate(model, prompts, max_new_tokens=budget, temperature=0.0, attention_topk=attention_topk)
        for item, new_ids in zip(chunk, outputs):
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            rest = text[len(item.answer) :]
            correct.append(text.startswith(item.answer) and (not rest or not rest[0].isalnum()))
    bins: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        low = min(int(item.depth * DEPTH_BINS), DEPTH_BINS - 1) / DEPTH_BINS
        bins.setdefault(f"{low:.1f}-{low + 1 / DEPTH_BINS:.1f}", []).append(ok)
    return {
        "accuracy": sum(correct) / len(correct),
        "by_depth": {k: sum(v) / len(v) for k, v in sorted(bins.items())},
        "n": len(correct),
    }
