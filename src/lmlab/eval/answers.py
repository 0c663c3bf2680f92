"""Scoring answers to questions: the chat-rendered (question, answer) rows and their answer-token log-probs.

Unlearning losses and metrics are functions of how likely a model finds an answer given its question (TOFU's
probabilities and truth ratios, NPO's log-ratios, FLAT's token probabilities, RMU's hidden states). This module
renders the pairs with the run's chat template, pads them into batches and scores them in one forward pass,
with or without gradients (the caller decides).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmlab.data.chat import render_conversation
from lmlab.errors import DataError
from lmlab.objectives.unlearning_methods import Scored

Encoded = tuple[list[int], list[bool]]  # ids and the answer-token mask


def encode_qa(tokenizer, question: str, answer: str, *, template=None, max_len: int, where: str = "") -> Encoded:
    """``(ids, answer_mask)`` of one exchange rendered with the chat template, the answer's tokens (and the end of
    its turn) marked; cut to ``max_len`` tokens. A question that leaves no answer token within ``max_len`` is an
    error naming ``where``."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, mask = render_conversation(tokenizer, messages, template, loss_on="assistant", where=where or question)
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        raise DataError(f"{where or question!r}: no answer token within unlearn.max_len={max_len} tokens")
    return ids, mask


def collate(rows: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [N, T] and ``answer_mask`` [N, T] (False on padding)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    return ids, mask


def score_answers(
    model: nn.Module,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    *,
    keep_logits: bool = False,
    hidden_block: int | None = None,
) -> Scored:
    """The answer tokens' log-probs under ``model`` (token t scored by the logits at t−1, log-softmax in fp32):
    summed and counted per row, per token with the shifted mask, and optionally the logits and the output of
    decoder block ``hidden_block`` (``model.layers[i]``, read with a forward hook), both aligned with the
    shifted mask (the hidden state at t−1 is the one that predicts token t)."""
    captured: list[torch.Tensor] = []
    handle = None
    if hidden_block is not None:
        blocks = model.layers
        if not 0 <= hidden_block < len(blocks):
            raise ValueError(f"hidden block {hidden_block} out of range for a {len(blocks)}-block model")
        handle = blocks[hidden_block].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(input_ids)[:, :-1].float()
    finally:
        if handle is not None:
            handle.remove()
    targets = input_ids[:, 1:]
    mask = answer_mask[:, 1:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * mask.to(token_logps.dtype)
    return Scored(
        logps=token_logps.sum(-1),
        lengths=mask.sum(-1).to(token_logps.dtype),
        token_logps=token_logps,
        mask=mask,
        logits=logits if keep_logits else None,
        hidden=captured[0][:, :-1] if captured else None,
    )


@torch.no_grad()
def answer_nlls(model: nn.Module, rows: Sequence[Encoded], pad_id: int, batch_size: int, device) -> list[float]:
    """Mean-token NLL of each row's answer (no gradients), in row order."""
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = collate(rows[start : start + batch_size], pad_id)
        scored = score_answers(model, ids.to(device), mask.to(device))
        out += scored.nll.tolist()
    return out
