"""Goldfish vs standard cross-entropy: how much of its training data does a tiny model reproduce verbatim?

The study of issue 3 (Hans et al. 2024, *Be like a Goldfish, Don't Memorize!*; docs/science.md §5) at
laptop scale: the same tiny decoder is trained for many epochs on a small set of synthetic
biographies (the ``facts`` world), once with the standard loss and once with the goldfish loss
(k = 4, hashed mask over a 13-token context), for several seeds each. Then each model is prompted
with the first ``p`` tokens of every training biography and decodes ``n`` tokens greedily
(``lmlab.eval.memorization``); we report the exact-match extraction rate, RougeL and the loss on
held-out biographies, as mean ± 95% confidence interval (Student t over seeds).

Run from the repository root (about 10 minutes on 2 CPU cores with the defaults):

    python examples/goldfish_memorization/run_study.py --out runs/goldfish_study

``--quick`` runs a seconds-long smoke version (2 epochs, 1 seed, 20 documents).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.eval.memorization import memorization_eval, write_jsonl
from lmlab.recipes.sft import run_sft
from lmlab.train.pretrained import load_model

METHODS = {
    "standard": [],
    "goldfish": ["objective.goldfish.enabled=true", "objective.goldfish.k=4", "objective.goldfish.strategy=hash"],
}


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (0 for a single value)."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, half


def write_corpus(out: Path, n_train: int, n_val: int, seed: int) -> tuple[Path, Path, list[str]]:
    world = FactsWorld()
    docs = list(world.documents(seed, n_train + n_val))
    train, val = docs[:n_train], docs[n_train:]
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    train_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in train))
    val_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in val))
    return train_path, val_path, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/goldfish_study"))
    p.add_argument("--docs", type=int, default=200, help="training biographies")
    p.add_argument("--epochs", type=float, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--prefix-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--d-model", type=int, default=96, help="with 3 layers and 1024 tokens: ~0.43M parameters")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256, help="packed row length")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 20 docs, 2 epochs, 1 seed")
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.epochs, args.seeds = 20, 2, 1
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path, train_docs = write_corpus(out, args.docs, args.docs, seed=0)
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        TextTokenizer.train_bpe(train_docs, 1024).save(tok_path)

    results = []
    start = time.perf_counter()
    for method in args.methods:
        extra = METHODS[method]
        for seed in range(args.seeds):
            run_dir = out / f"{method}_seed{seed}"
            overrides = [
                f"model.d_model={args.d_model}",
                f"model.n_layers={args.layers}",
                "model.n_heads=4",
                f"model.max_seq_len={args.seq_len}",
                f"tokenizer.path={tok_path}",
                f"sft.train_file={train_path}",
                f"sft.val_file={val_path}",
                f"sft.epochs={args.epochs}",
                f"train.seq_len={args.seq_len}",
                f"train.micro_batch_size={max(1, 2048 // args.seq_len)}",
                "train.eval_every=1000000",
                "train.ckpt_every=1000000",
                "train.keep_last=1",
                "train.progress=false",
                "train.device=cpu",
                f"train.seed={seed}",
                f"data.seed={seed}",
                f"optim.lr={args.lr}",
                "optim.weight_decay=0.0",
                "schedule.warmup_steps=10" if not args.quick else "schedule.warmup_steps=0",
                "sample.prompts=[]",
                *extra,
            ]
            cfg = load_config(None, overrides)
            if (run_dir / "summary.json").is_file():
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                summary = run_sft(cfg, run_dir, quiet=True)
            model, _, tokenizer = load_model(run_dir)
            mem, per_doc = memorization_eval(
                model, tokenizer, train_docs, prefix_tokens=args.prefix_tokens, new_tokens=args.new_tokens
            )
            write_jsonl(per_doc, run_dir / "memorization.jsonl")
            row = {
                "method": method,
                "seed": seed,
                "val_loss": summary["final_val_loss"],
                "train_loss": summary["final_train_loss"],
                "steps": summary["steps"],
                **{
                    k: mem[k]
                    for k in (
                        "exact_match_rate",
                        "exact_matches",
                        "token_match",
                        "rouge_l",
                        "rouge_l_words",
                        "evaluated",
                    )
                },
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    elapsed = time.perf_counter() - start
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    table = summarize(results, args, elapsed)
    (out / "results.md").write_text(table)
    print(table)
    return 0


def summarize(results: list[dict], args, elapsed: float) -> str:
    """The README table: mean ± 95% CI per method, and the ratios the study is about."""
    lines = [
        f"{args.docs} biographies, {args.epochs:g} epochs, {args.seeds} seeds, prefix {args.prefix_tokens} / "
        f"{args.new_tokens} greedy tokens; {elapsed / 60:.1f} min",
        "",
        "| method | exact-match rate | token match | RougeL | validation loss |",
        "|---|---|---|---|---|",
    ]
    means = {}
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        cells = []
        for key in ("exact_match_rate", "token_match", "rouge_l", "val_loss"):
            m, h = mean_ci([float(r[key]) for r in rows])
            means[(method, key)] = m
            cells.append(f"{m:.3f} ± {h:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if set(args.methods) != set(METHODS):
        return "\n".join(lines) + "\n"
    std_em, gf_em = means[("standard", "exact_match_rate")], means[("goldfish", "exact_match_rate")]
    ratio = "inf" if gf_em == 0 and std_em > 0 else (f"{std_em / gf_em:.1f}" if gf_em > 0 else "n/a")
    val_change = 100 * (means[("goldfish", "val_loss")] / means[("standard", "val_loss")] - 1)
    lines += ["", f"exact matches standard / goldfish: {ratio}x; goldfish validation loss {val_change:+.1f}%"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
