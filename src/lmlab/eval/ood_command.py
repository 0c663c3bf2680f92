"""``lmlab eval ood RUN --base BASE --in A --out B``: is a document in the fine-tuned run's domain?

Scores every document of A (in-domain) and B (out-of-domain) under the fine-tuned run and under its base, and
prints as JSON the AUROC of the likelihood ratio log p_RUN(x) − log p_BASE(x) (per token unless ``--sum``) with
its interval, beside the AUROCs of each model's own log-likelihood (``lmlab.eval.ood``; Zhang et al. 2024,
arXiv 2404.08679). ``--scores FILE.jsonl`` keeps one row per document. The two runs must share a tokenizer:
the ratio compares the same tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.errors import UserError
from lmlab.eval.commands import require
from lmlab.eval.memorization import read_documents, write_jsonl
from lmlab.eval.ood import DocumentLogprob, document_logprobs, encode_documents, likelihood_ratio_scores, ood_report
from lmlab.train.pretrained import load_frozen, load_model
from lmlab.train.runtime import resolve_device


def ood_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval ood",
        description="Likelihood-ratio OOD detection: AUROC of log p_RUN(x) - log p_BASE(x), in-domain vs not.",
    )
    p.add_argument("run_dir", help="the fine-tuned run directory (or one of its checkpoints)")
    p.add_argument("--base", required=True, help="the base run it was fine-tuned from")
    docs_help = "documents: .jsonl ('text' field or 'messages') or .txt (one per line)"
    p.add_argument("--in", dest="in_file", required=True, help=f"in-domain {docs_help}")
    p.add_argument("--out", dest="out_file", required=True, help=f"out-of-domain {docs_help}")
    p.add_argument("--max-docs", type=int, default=0, help="use the first N documents of each file (0: all)")
    p.add_argument(
        "--max-tokens", type=int, default=0, help="tokens scored per document, the rest cut (0: the context - 1)"
    )
    p.add_argument("--sum", action="store_true", help="score whole documents (summed log-probs), not per token")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scores", help="write per-document scores to this .jsonl file")
    args = p.parse_args(argv)
    require(args.max_docs >= 0, "--max-docs", args.max_docs, ">= 0 (0: all)")
    require(args.max_tokens >= 0, "--max-tokens", args.max_tokens, ">= 0 (0: the models' context - 1)")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    if args.scores and Path(args.scores).is_dir():
        raise UserError(f"--scores {args.scores} is a directory; give a .jsonl file path")
    documents = {
        "in": read_set("--in", args.in_file, args.max_docs),
        "out": read_set("--out", args.out_file, args.max_docs),
    }
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded

    model, cfg, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    base = load_frozen(
        args.base, device, role="base", tokenizer=tokenizer, against=f"fine-tuned run {args.run_dir}", key="--base"
    )
    context = min(cfg.model.max_seq_len, base.cfg.model.max_seq_len)
    max_tokens = args.max_tokens or context - 1
    require(max_tokens < context, "--max-tokens", args.max_tokens, f"< {context} (the models' context, with the BOS)")

    scored: dict[str, dict[str, list[DocumentLogprob]]] = {}
    truncated: dict[str, list[bool]] = {}
    for name, docs in documents.items():
        sequences, truncated[name] = encode_documents(tokenizer, docs, max_tokens)
        empty = [i for i, ids in enumerate(sequences) if len(ids) < 2]
        if empty:
            path = args.in_file if name == "in" else args.out_file
            raise UserError(f"--{name} {path}: document {empty[0] + 1} has no token to score; remove it")
        scored[name] = {
            "finetuned": document_logprobs(model, sequences, args.batch_size),
            "base": document_logprobs(base.model, sequences, args.batch_size),
        }

    per_token = not args.sum
    report = ood_report(
        scored["in"]["finetuned"], scored["in"]["base"], scored["out"]["finetuned"], scored["out"]["base"], per_token
    )
    report.update(
        run=str(args.run_dir),
        base=str(args.base),
        max_tokens=max_tokens,
        truncated={name: sum(flags) for name, flags in truncated.items()},
    )
    if args.scores:
        report["scores"] = str(write_jsonl(score_rows(scored, truncated, per_token), args.scores))
    print(json.dumps(report))
    return 0


def read_set(flag: str, path: str, max_docs: int) -> list[str]:
    """The documents of one side (the first ``max_docs`` when > 0); a missing file names its flag."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: file not found")
    docs = read_documents(path)
    return docs[:max_docs] if max_docs else docs


def score_rows(
    scored: dict[str, dict[str, list[DocumentLogprob]]], truncated: dict[str, list[bool]], per_token: bool
) -> list[dict]:
    """One row per document: its side, index, scored tokens, both models' summed log-probs and its score."""
    rows = []
    for name, by_model in scored.items():
        scores = likelihood_ratio_scores(by_model["finetuned"], by_model["base"], per_token)
        for i, (ft, base, score) in enumerate(zip(by_model["finetuned"], by_model["base"], scores)):
            rows.append(
                {
                    "set": name,
                    "doc": i,
                    "tokens": ft.tokens,
                    "truncated": truncated[name][i],
                    "logp_finetuned": ft.total,
                    "logp_base": base.total,
                    "score": score,
                }
            )
    return rows
