"""Exact-answer accuracy on the arithmetic world's problems, by greedy generation, without lm-eval.

The measure of McLeish et al. 2024 (*Transformers Can Do Arithmetic with the Right Embeddings*, arXiv
2405.17399): a problem counts only when the whole answer is right, and accuracy is reported per operand
length, so length generalisation (operands longer than any in training) shows as accuracy against digits.
Each prompt (``"123+4056="``) follows the EOS token, the separator that starts every document in lmlab's
data; decoding is greedy and stops at EOS or at the first token that is not all digits. The answer is
checked by the world's own ``answer_is_correct``. The same items run under lm-eval as ``lmlab_arithmetic``
(``lmlab.eval.world_tasks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmlab.data.synthetic.arithmetic import Problem, answer_is_correct
from lmlab.data.tokenizer import DIGITS, TextTokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.models.generation import generate


@torch.no_grad()
def evaluate_arithmetic(
    model: nn.Module,
    tokenizer: TextTokenizer,
    items: Sequence[Problem],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``{"accuracy", "by_digits": {operand length: accuracy}, "n"}`` of greedy answers to ``items``.

    ``max_new_tokens``: the generation budget; by default each batch's longest true answer plus one token
    (for EOS), so a wrong answer cannot run on. ``device``: the model is moved there first, when given.
    """
    if not items:
        raise DataError(
            "evaluate_arithmetic got no problems; make them with lmlab.data.synthetic.arithmetic.eval_items"
        )
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ConfigError(
            f"evaluate_arithmetic needs batch_size >= 1 and max_new_tokens >= 1 or None, "
            f"got {batch_size} and {max_new_tokens}"
        )
    if device is not None:
        model.to(device)
    eos = tokenizer.eos_id
    prompts = [[eos, *tokenizer.encode(p.text)] for p in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding

    def stop(new_ids: list[int]) -> bool:
        return any(ch not in DIGITS for ch in tokenizer.decode(new_ids[-1:]))

    correct = [False] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        budget = max_new_tokens or max(len(tokenizer.encode(items[i].answer)) for i in chunk) + 1
        outputs = generate(
            model, [prompts[i] for i in chunk], max_new_tokens=budget, temperature=0.0, eos_id=eos, stop=stop
        )
        for i, new_ids in zip(chunk, outputs):
            answer_ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
            correct[i] = answer_is_correct(tokenizer.decode(answer_ids), items[i])
    by_digits: dict[int, list[bool]] = {}
    for problem, ok in zip(items, correct):
        by_digits.setdefault(problem.digits, []).append(ok)
    return {
        "accuracy": sum(correct) / len(items),
        "by_digits": {d: sum(oks) / len(oks) for d, oks in sorted(by_digits.items())},
        "n": len(items),
    }
