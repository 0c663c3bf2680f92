"""Recurrent depth: does exact-answer accuracy rise with test-time iterations? (issue 14, study d), CPU-sized.

Claim checked (Geiping et al. 2025, arXiv 2502.05171; PAPERS.md B03): a recurrent-depth model's accuracy on a
multi-step reasoning task rises with the number of test-time iterations r, saturating. The task is
multi-digit addition with carries in the reversed-digit format (``321+6504=9714``), operands of 1..L digits
(default L = 4), one problem per document, corpus written by lmlab's ``ArithmeticWorld``.

Two arms on ``arith_study.yaml`` (d = 64, 4 layers, 8 × 128 tokens per step), same data, schedule and seeds:

- ``recurrent``: 1 prelude + 2 core + 1 coda blocks; in training r ~ Poisson-lognormal with r̄ = 4
  (``model.recurrence.mean_iterations``; the implementation adds 1, so E[r] = 5), gradients through the last
  ``backprop_depth`` = 4 iterations; evaluated at r ∈ {1, 2, 4, 8, 16} (``recurrence_iterations``);
- ``baseline``: the same 4 blocks without recurrence (the same block parameters, less the 2d × d adapter).

Measure: greedy exact-answer accuracy on held-out problems (``eval_items``: both operands of one length,
an equal share of lengths 1..L, lmlab's held-out seed), overall and per operand length; mean ± 95% CI
(Student t over seeds) and paired differences between iteration counts (same model). Finished runs in
``--out`` are reused. Results go to ``--results`` (JSON and Markdown).

    OMP_NUM_THREADS=1 python examples/architectures/recurrent_study.py --out runs/recurrent_study   # ~35 min, 1 core
    OMP_NUM_THREADS=1 python examples/architectures/recurrent_study.py --out /tmp/rec --steps 30 --seeds 0  # smoke

Trailing ``key=value`` arguments are passed to every run (a GPU-sized variant: see README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from arith_common import (
    BASE_CONFIG,
    HERE,
    RECURRENCE,
    contrast_lines,
    exact_accuracy,
    load,
    mean_ci,
    paired,
    pct,
    run_facts,
    runs_lines,
    setup_threads,
    train,
    write_corpus,
)

from lmlab.data.synthetic.arithmetic import HELDOUT_ARITHMETIC_SEED, eval_items

ARMS = {"recurrent": RECURRENCE, "baseline": []}
TRAIN_R = 4  # the default test-time iterations (round(mean_iterations)), the reference of the contrasts


def overrides(arm: str, seed: int, steps: int, corpus: Path, extra: list[str]) -> list[str]:
    return [
        f"name=recurrent-study-{arm}",
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"schedule.warmup_steps={min(50, steps)}",
        f"train.eval_every={max(1, steps // 3)}",
        f"data.files=[{corpus}]",
        *ARMS[arm],
        *extra,
    ]


def measure(run_dir: Path, items, iterations: list[int] | None, device: str) -> dict:
    """Accuracy of one run, at each r in ``iterations`` (None: the plain model)."""
    model, cfg, tok = load(run_dir, device)
    row = run_facts(run_dir)
    if iterations is None:
        row["eval"] = {"plain": exact_accuracy(model, tok, items)}
    else:
        row["eval"] = {str(r): exact_accuracy(model, tok, items, r) for r in iterations}
    return row


def summarize(per_seed: dict, seeds: list[int], iterations: list[int], digits: int) -> tuple[dict, dict]:
    lengths = [str(d) for d in range(1, digits + 1)]
    table: dict[str, dict] = {}
    for arm, runs in per_seed.items():
        for key in runs[str(seeds[0])]["eval"]:
            label = f"{arm} r={key}" if key != "plain" else arm
            cells = [runs[str(s)]["eval"][key] for s in seeds]
            table[label] = {
                "accuracy": mean_ci([c["accuracy"] for c in cells]),
                "by_digits": {d: mean_ci([c["by_digits"][d] for c in cells]) for d in lengths},
                "per_seed": [c["accuracy"] for c in cells],
            }
    contrasts: dict[str, dict] = {}
    if "recurrent" in per_seed:
        rec = per_seed["recurrent"]

        def acc(r: int, length: str | None = None) -> list[float]:
            cells = [rec[str(s)]["eval"][str(r)] for s in seeds]
            return [c["accuracy"] if length is None else c["by_digits"][length] for c in cells]

        for lo, hi in zip(iterations, iterations[1:]):
            contrasts[f"r={hi} − r={lo}: accuracy"] = paired(acc(hi), acc(lo))
        for lo, hi in zip(iterations, iterations[1:]):
            contrasts[f"r={hi} − r={lo}: accuracy at {digits} digits"] = paired(
                acc(hi, lengths[-1]), acc(lo, lengths[-1])
            )
        if TRAIN_R in iterations:
            for r in iterations:
                if r > TRAIN_R:
                    contrasts[f"r={r} − r={TRAIN_R}: accuracy"] = paired(acc(r), acc(TRAIN_R))
            if "baseline" in per_seed:
                base = [per_seed["baseline"][str(s)]["eval"]["plain"]["accuracy"] for s in seeds]
                contrasts[f"recurrent r={TRAIN_R} − baseline: accuracy"] = paired(acc(TRAIN_R), base)
    return table, contrasts


def markdown(res: dict) -> str:
    lengths = [str(d) for d in range(1, res["digits"] + 1)]
    lines = [
        f"| arm | exact accuracy % (1–{res['digits']} digits) | " + " | ".join(f"{d} digits %" for d in lengths) + " |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for label, e in res["table"].items():
        lines.append(
            f"| {label} | {pct(e['accuracy'])} | " + " | ".join(pct(e["by_digits"][d]) for d in lengths) + " |"
        )
    lines += contrast_lines(res["contrasts"], "paired contrast (same model and seed)")
    lines += runs_lines(res["per_seed"], res["seeds"])
    n = len(res["seeds"])
    lines += [
        "",
        f"Seeds {res['seeds']}; {res['steps']} steps × {res['tokens_per_step']:,} tokens per run; "
        f"{res['n_eval']} held-out problems (an equal share of operand lengths 1–{res['digits']}, both operands "
        f"of that length); mean ± 95% CI (Student t, {n - 1} degrees of freedom). Wall time "
        f"{res['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (finished runs are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--digits", type=int, default=4, help="training operands have 1..L digits; tested at 1..L")
    p.add_argument("--n-docs", type=int, default=300_000, help="training problems in the corpus")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="test-time r")
    p.add_argument(
        "--format",
        default="reversed",
        choices=["reversed", "forward"],
        help="digit order of every number (forward: the carries must be resolved before the answer's "
        "first digit; results then go to recurrent_study_forward.*)",
    )
    p.add_argument("--n-eval", type=int, default=1000, help="held-out problems (an equal share per length)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--device", default="cpu", help="evaluation device (training: train.device)")
    p.add_argument("--results", default=str(HERE / "results"), help="where recurrent_study[_forward].json and .md go")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (e.g. train.device=cuda)")
    args = p.parse_args(argv)
    setup_threads()
    out, seeds = Path(args.out), args.seeds
    start = time.perf_counter()
    reverse = args.format == "reversed"
    stem = "recurrent_study" if reverse else "recurrent_study_forward"
    corpus = write_corpus(out / "data", args.digits, args.n_docs, reverse).resolve()
    items = eval_items(n=args.n_eval, min_digits=1, max_digits=args.digits, op="+", reverse=reverse)
    per_seed: dict[str, dict[str, dict]] = {arm: {} for arm in args.arms}
    for seed in seeds:  # seed-major: an interrupted study has whole seeds of every arm
        print(f"seed {seed} ...", flush=True)
        for arm in args.arms:
            run_dir = train(out / f"{arm}_s{seed}", overrides(arm, seed, args.steps, corpus, args.overrides))
            row = measure(run_dir, items, args.iterations if arm == "recurrent" else None, args.device)
            per_seed[arm][str(seed)] = row
            print("    " + ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in row["eval"].items()), flush=True)
    table, contrasts = summarize(per_seed, seeds, args.iterations, args.digits)
    from lmlab.config import load_config

    cfg = load_config(BASE_CONFIG, overrides(args.arms[0], seeds[0], args.steps, corpus, args.overrides))
    res = {
        "study": f"recurrent depth: accuracy vs test-time iterations on {args.format} addition (issue 14, study d)",
        "command": "OMP_NUM_THREADS=1 python examples/architectures/recurrent_study.py "
        + " ".join(argv or sys.argv[1:]),
        "base_config": str(BASE_CONFIG.relative_to(HERE.parent.parent)),
        "arm_overrides": {a: ARMS[a] for a in args.arms},
        "extra_overrides": args.overrides,
        "corpus": {
            "path": str(corpus),
            "operations": "+",
            "min_digits": 1,
            "max_digits": args.digits,
            "reverse": reverse,
            "n_docs": args.n_docs,
            "seed": 0,
        },
        "eval": {"seed": HELDOUT_ARITHMETIC_SEED, "n": args.n_eval, "lengths": [1, args.digits], "greedy": True},
        "digits": args.digits,
        "iterations": args.iterations,
        "n_eval": args.n_eval,
        "seeds": seeds,
        "steps": args.steps,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len,
        "table": table,
        "contrasts": contrasts,
        "per_seed": per_seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    text = markdown(res)
    for folder in (out, Path(args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (folder / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
