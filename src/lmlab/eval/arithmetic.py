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

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.data.synthetic.arithmetic import SUBSETS, Problem, answer_is_correct, eval_items
from lmlab.data.tokenizer import DIGITS, TextTokenizer
from lmlab.errors import ConfigError, DataError, UserError
from lmlab.eval.inference_options import add_inference_options, inference_options
from lmlab.models.generation import generate
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_model
from lmlab.train.runtime import resolve_device


@torch.no_grad()
def evaluate_arithmetic(
    model: nn.Module,
    tokenizer: TextTokenizer,
    items: Sequence[Problem],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    attention_topk: int | None = None,
) -> dict[str, Any]:
    """``{"accuracy", "by_digits": {operand length: accuracy}, "n"}`` of greedy answers to ``items``.

    ``max_new_tokens``: the generation budget; by default each batch's longest true answer plus one token
    (for EOS), so a wrong answer cannot run on. ``device``: the model is moved there first, when given.
    ``attention_topk``: answers are generated with top-k attention (``generate``'s option).
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
    prompts = [tokenizer.encode_document(p.text) for p in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding

    def stop(new_ids: list[int]) -> bool:
        return any(ch not in DIGITS for ch in tokenizer.decode(new_ids[-1:]))

    correct = [False] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        budget = max_new_tokens or max(len(tokenizer.encode(items[i].answer)) for i in chunk) + 1
        outputs = generate(
            model, [prompts[i] for i in chunk], max_new_tokens=budget, temperature=0.0, eos_id=eos, stop=stop,
            attention_topk=attention_topk,
        )  # fmt: skip
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


def arithmetic_main(argv: list[str]) -> int:
    """``lmlab eval arithmetic RUN``: exact-answer accuracy per operand length on held-out problems."""
    parser = argparse.ArgumentParser(prog="lmlab eval arithmetic", description=arithmetic_main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=20, help="beyond the training length: length generalisation")
    parser.add_argument("--n", type=int, default=1000, help="problems (an equal share per operand length)")
    parser.add_argument("--op", default="+", choices=["+", "*"])
    parser.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=None,
                        help="reversed digits (default: as the run's data.synthetic.subset)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the result JSON here too")
    add_inference_options(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device", UserError)
    model, cfg, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    reverse = args.reverse
    if reverse is None:
        reverse = bool(SUBSETS.get(cfg.data.synthetic.subset or "", {}).get("reverse", False))
    items = eval_items(n=args.n, min_digits=args.min_digits, max_digits=args.max_digits, op=args.op, reverse=reverse)
    with inference_options(args, model, topk=False):
        result = evaluate_arithmetic(
            model, tokenizer, items, batch_size=args.batch_size, attention_topk=args.attention_topk
        )
    result = {"run": str(args.run_dir), "op": args.op, "reverse": reverse, "iterations": args.iterations,
              "attention_topk": args.attention_topk, **result}  # fmt: skip
    text = json.dumps(result)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    print(text)
    return 0
