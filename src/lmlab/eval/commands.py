"""CLI entry points: ``lmlab generate`` and ``lmlab eval``.

``lmlab eval perplexity`` and ``lmlab eval memorization`` live here; every other ``lmlab eval KIND`` is a
``module:function`` in ``EVAL_COMMANDS`` taking the remaining argv, imported only when it runs (so an optional
dependency such as lm-eval is needed only by the command that uses it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import torch

from lmlab.data.chat import end_of_turn_id, has_chat_template, render_prompt
from lmlab.data.shards import check_tokenizer, load_manifest
from lmlab.errors import UserError
from lmlab.eval.inference_options import add_inference_options, inference_options
from lmlab.eval.memorization import EMBEDDING_THRESHOLD, FUZZY_THRESHOLD, memorization_eval, read_documents, write_jsonl
from lmlab.eval.perplexity import perplexity
from lmlab.eval.refusal_steering import (
    add_steering_options,
    choose_control_token,
    first_position_logits,
    steering_from_args,
    steering_tokens,
)
from lmlab.models.generation import generate
from lmlab.train.pretrained import load_model
from lmlab.train.runtime import resolve_device


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab generate", description="Sample text from a run's latest checkpoint.")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chat", action="store_true", help="read --prompt as a user turn of the run's chat template")
    add_inference_options(p)
    add_steering_options(p)
    args = p.parse_args(argv)
    steering = steering_from_args(args)  # refusal-token steering answers a chat turn
    require(
        math.isfinite(args.temperature) and args.temperature >= 0, "--temperature", args.temperature, "finite and >= 0"
    )
    require(0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    require(args.top_k >= 0, "--top-k", args.top_k, ">= 0 (0 = off)")
    require(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, ">= 1")
    require(args.num_samples >= 1, "--num-samples", args.num_samples, ">= 1")
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded
    model, _, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    chat = args.chat or steering is not None
    if chat and not has_chat_template(tokenizer):
        raise UserError(
            f"{args.run_dir}: its tokenizer has no chat template and no lmlab chat tokens, so --chat and the "
            "--refusal-* flags (which steer the first token of a chat reply) cannot be used; use a chat model"
        )
    if chat:
        ids = render_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
        stops = [end_of_turn_id(tokenizer), *tokenizer.stop_ids]
    else:
        ids, stops = tokenizer.encode_document(args.prompt), tokenizer.stop_ids
    if not ids:
        raise UserError("--prompt is empty and this tokenizer starts a text with no token of its own; give a prompt")
    forced: list[int] = []
    if steering is not None:
        tokens = steering_tokens(tokenizer, steering, args.run_dir)
        forced = choose_control_token(first_position_logits(model, [ids]), tokens, steering).token.tolist()
    for i in range(args.num_samples):
        with inference_options(args, model, topk=False):
            new = generate(
                model,
                ids + forced,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                eos_id=stops,
                generator=gen,
                attention_topk=args.attention_topk,
            )
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        reply = tokenizer.decode(new, skip_special_tokens=True)
        control = "".join(f"{tokenizer.id_to_token(t)} " for t in forced)
        print(f"user: {args.prompt}\nassistant: {control}{reply}" if chat else args.prompt + reply)
    return 0


EVAL_COMMANDS: dict[str, tuple[str, str]] = {
    "harness": ("lmlab.eval.harness_command:harness_main", "lm-evaluation-harness tasks on a run (no export)"),
    "passk": ("lmlab.eval.pass_at_k_command:passk_main", "pass@k of sampled answers checked by a program"),
    "compare": ("lmlab.eval.pairwise_command:compare_main", "pairwise judging of runs: win rates, Bradley-Terry"),
    "ood": ("lmlab.eval.ood_command:ood_main", "likelihood-ratio OOD detection (fine-tuned vs base): AUROC"),
    "mia": ("lmlab.eval.mia_command:mia_main", "membership inference attacks: ROC AUC and TPR at low FPR"),
    "provenance": (
        "lmlab.eval.provenance_command:provenance_main",
        "palimpsestic membership inference: does a model's loss fall with a run's training order?",
    ),
    "unlearning": (
        "lmlab.eval.unlearning_command:unlearning_main",
        "TOFU / MUSE metrics on the unlearning benchmark: forget quality, model utility, PrivLeak",
    ),
    "safety": (
        "lmlab.eval.safety_command:safety_main",
        "refusals on harmful prompts, over-refusal and correctness on benign ones, POROver F1; threshold sweeps",
    ),
    "arithmetic": (
        "lmlab.eval.arithmetic:arithmetic_main",
        "exact-answer accuracy per operand length (arithmetic world)",
    ),
}


def eval_main(argv: list[str]) -> int:
    if argv and argv[0] in EVAL_COMMANDS:
        module_name, func_name = EVAL_COMMANDS[argv[0]][0].split(":")
        return int(getattr(importlib.import_module(module_name), func_name)(argv[1:]) or 0)
    p = argparse.ArgumentParser(prog="lmlab eval", description="Evaluate a run.")
    sub = p.add_subparsers(dest="kind", required=True)
    for name, (_, help_) in EVAL_COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    ppl = sub.add_parser("perplexity", help="validation loss and perplexity")
    ppl.add_argument("run_dir")
    ppl.add_argument("--data", help="prepared data directory (default: the run's own data)")
    ppl.add_argument("--split", default="val", choices=["train", "val"])
    ppl.add_argument("--tokens", type=int, default=None, help="token budget (default: train.eval_tokens)")
    ppl.add_argument("--device", default="cpu")
    add_inference_options(ppl)
    mem = sub.add_parser("memorization", help="greedy extraction of training documents (exact match, RougeL)")
    mem.add_argument("run_dir")
    mem.add_argument(
        "--data", required=True, help="documents: .jsonl ('text' field or 'messages') or .txt (one per line)"
    )
    mem.add_argument(
        "--prefix-tokens",
        type=int,
        default=32,
        help="prompt length p (tokens of the document); 0: all but the last n (the goldfish reference protocol)",
    )
    mem.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length n")
    mem.add_argument("--batch-size", type=int, default=32)
    mem.add_argument(
        "--fuzzy-threshold",
        type=float,
        default=FUZZY_THRESHOLD,
        help="edit similarity at which a document counts as approximately extracted (default %(default)s)",
    )
    mem.add_argument(
        "--embedding-threshold",
        type=float,
        default=EMBEDDING_THRESHOLD,
        help="cosine of the model's own embeddings at which it does (default %(default)s)",
    )
    mem.add_argument("--out", help="per-document results JSONL (default: RUN_DIR/memorization.jsonl)")
    mem.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded
    if args.kind == "memorization":
        return _memorization(args, device)
    if args.tokens is not None:
        require(args.tokens >= 0, "--tokens", args.tokens, ">= 0 (0: the run's train.eval_tokens)")
    model, cfg, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    data_dir = Path(args.data) if args.data else _run_data_dir(Path(args.run_dir))
    check_tokenizer(load_manifest(data_dir), tokenizer, data_dir)  # the error names the directory
    with inference_options(args, model):
        out = perplexity(
            model,
            tokenizer,
            data_dir,
            seq_len=cfg.train.seq_len,
            batch_size=cfg.train.micro_batch_size,
            budget_tokens=args.tokens or cfg.train.eval_tokens,
            split=args.split,
        )
    print(json.dumps(out))
    return 0


def _memorization(args, device: torch.device) -> int:
    """``lmlab eval memorization``: prints the summary as JSON, writes per-document rows as JSONL."""
    require(args.prefix_tokens >= 0, "--prefix-tokens", args.prefix_tokens, ">= 0 (0: all but the last n)")
    require(args.new_tokens >= 1, "--new-tokens", args.new_tokens, ">= 1")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    require(0 <= args.fuzzy_threshold <= 1, "--fuzzy-threshold", args.fuzzy_threshold, "in [0, 1]")
    require(0 <= args.embedding_threshold <= 1, "--embedding-threshold", args.embedding_threshold, "in [0, 1]")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; give a .jsonl file path")
    model, _, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    summary, per_doc = memorization_eval(
        model,
        tokenizer,
        read_documents(args.data),
        prefix_tokens=args.prefix_tokens,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        fuzzy_threshold=args.fuzzy_threshold,
        embedding_threshold=args.embedding_threshold,
    )
    out = write_jsonl(per_doc, args.out or Path(args.run_dir) / "memorization.jsonl")
    print(json.dumps({**summary, "per_document": str(out)}))
    return 0


def require(ok: bool, flag: str, value, rule: str) -> None:
    """A command-line value outside its range is a one-line user error naming the flag."""
    if not ok:
        raise UserError(f"{flag} must be {rule}, got {value}")


def _run_data_dir(run_dir: Path) -> Path:
    summary = run_dir / "summary.json"
    if summary.is_file():
        data_dir = json.loads(summary.read_text()).get("data_dir")
        if data_dir and Path(data_dir).is_dir():
            return Path(data_dir)
    raise UserError(f"{run_dir}: its data directory is not available; pass --data DIR")
