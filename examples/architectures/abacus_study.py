"""Abacus digit-place embeddings vs RoPE only: train short, test long additions (issue 14, study e), CPU-sized.

Claim checked (McLeish et al. 2024, arXiv 2405.17399; PAPERS.md B08): giving every digit an embedding of its
place within its number (with a random offset of all places in training, so high places are trained too)
lets a transformer trained on short additions add much longer numbers (paper: 20-digit training, 99% at 100
digits). Here: reversed-digit addition (``321+6504=9714``) with operands of 1..L digits (default L = 4), one
problem per document, corpus written by lmlab's ``ArithmeticWorld``; tested on held-out problems with both
operands of each length 1..3L.

Arms on ``arith_study.yaml`` (d = 64, 4 layers, 8 × 128 tokens per step), same data, schedule, seeds, and the
same digit-split tokenizer, so they differ only in how positions reach the model:

- ``rope``: RoPE only (abacus off; lmlab's default);
- ``nope``: no position embedding at all (``model.position=none``);
- ``abacus``: RoPE + Abacus, ``max_offset`` = 2L + 2 (trained places reach L + 1 + max_offset ≥ 3L + 1, the
  longest answer tested) and ``max_digits`` = 3L + 1;
- ``abacus_nope``: Abacus without RoPE, the paper's pairing;
- ``abacus_looped`` (not in the default arms: ~2.6× the training time): ``abacus_nope`` + recurrence, 1 prelude
  + 2 core + 1 coda blocks, r̄ = 4, the paper's looped, input-injected setup (at its default r = 4 at test time).

Measure: greedy exact-answer accuracy per operand length (``lmlab.eval.arithmetic``), mean ± 95% CI (Student
t over seeds) at L, 2L, 3L and over the bands 1..L, L+1..2L, 2L+1..3L, and paired differences between arms (``CONTRASTS``);
per band also where answers go wrong (``answer_profile``: the answer's first digit, i.e. the units digit in the
reversed format, vs the rest of it).
Finished runs in ``--out`` are reused. Results go to ``--results`` (JSON and Markdown).

    OMP_NUM_THREADS=1 python examples/architectures/abacus_study.py --out runs/abacus_study   # ~35 min, 1 core
    OMP_NUM_THREADS=1 python examples/architectures/abacus_study.py --out /tmp/aba --steps 30 --seeds 0  # smoke

Trailing ``key=value`` arguments are passed to every run (a GPU-sized variant: see README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from arith_common import (
    BASE_CONFIG,
    HERE,
    RECURRENCE,
    answer_profile,
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

NOPE = ["model.position=none"]
ALL_ARMS = ("rope", "nope", "abacus", "abacus_nope", "abacus_looped")
DEFAULT_ARMS = ("rope", "nope", "abacus", "abacus_nope")
# (arm, reference) pairs compared on the same seeds: Abacus with either position embedding against its plain
# model, the paper's pairing against the RoPE default, and looping on top of it
CONTRASTS = (
    ("abacus", "rope"),
    ("abacus_nope", "nope"),
    ("abacus_nope", "rope"),
    ("abacus_looped", "abacus_nope"),
)


def abacus(digits: int) -> list[str]:
    return [
        "model.abacus.enabled=true",
        f"model.abacus.max_offset={2 * digits + 2}",
        f"model.abacus.max_digits={3 * digits + 1}",
    ]


def arm_overrides(arm: str, digits: int) -> list[str]:
    return {
        "rope": [],
        "nope": NOPE,
        "abacus": abacus(digits),
        "abacus_nope": [*abacus(digits), *NOPE],
        "abacus_looped": [*abacus(digits), *NOPE, *RECURRENCE],
    }[arm]


def overrides(arm: str, seed: int, steps: int, digits: int, corpus: Path, extra: list[str]) -> list[str]:
    longest = 9 * digits + 5  # EOS, two 3L-digit operands, "+", "=", a (3L+1)-digit answer, EOS
    seq = [f"model.max_seq_len={-(-longest // 64) * 64}"] if longest > 256 else []
    return [
        f"name=abacus-study-{arm}",
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"schedule.warmup_steps={min(50, steps)}",
        f"train.eval_every={max(1, steps // 3)}",
        f"data.files=[{corpus}]",
        *seq,
        *arm_overrides(arm, digits),
        *extra,
    ]


def bands(digits: int) -> dict[str, list[str]]:
    """Named groups of operand lengths: in distribution, up to 2L, up to 3L, and the three single lengths."""
    L = digits
    return {
        f"1–{L} (train)": [str(d) for d in range(1, L + 1)],
        f"{L + 1}–{2 * L}": [str(d) for d in range(L + 1, 2 * L + 1)],
        f"{2 * L + 1}–{3 * L}": [str(d) for d in range(2 * L + 1, 3 * L + 1)],
        f"{L}": [str(L)],
        f"{2 * L}": [str(2 * L)],
        f"{3 * L}": [str(3 * L)],
    }


def band_accuracy(row: dict, lengths: list[str]) -> float:
    """Mean accuracy over the lengths (each length has the same number of problems)."""
    return statistics.fmean(row["eval"]["by_digits"][d] for d in lengths)


def summarize(per_seed: dict, seeds: list[int], digits: int) -> tuple[dict, dict, dict, dict]:
    groups = bands(digits)
    table = {
        arm: {name: mean_ci([band_accuracy(runs[str(s)], ls) for s in seeds]) for name, ls in groups.items()}
        for arm, runs in per_seed.items()
    }
    curve = {
        arm: {
            str(d): mean_ci([runs[str(s)]["eval"]["by_digits"][str(d)] for s in seeds])
            for d in range(1, 3 * digits + 1)
        }
        for arm, runs in per_seed.items()
    }
    contrasts = {}
    for a, b in CONTRASTS:
        if a in per_seed and b in per_seed:
            for name, ls in list(groups.items())[:3]:  # the bands
                contrasts[f"{a} − {b}: {name} digits"] = paired(
                    [band_accuracy(per_seed[a][str(s)], ls) for s in seeds],
                    [band_accuracy(per_seed[b][str(s)], ls) for s in seeds],
                )
            for name in list(groups)[1:3]:  # the units digit (first in the reversed answer) beyond the training lengths
                contrasts[f"{a} − {b}: units digit right, {name} digits"] = paired(
                    [per_seed[a][str(s)]["profile"][name]["first_digit"] for s in seeds],
                    [per_seed[b][str(s)]["profile"][name]["first_digit"] for s in seeds],
                )
    profile = {
        arm: {
            band: {
                k: mean_ci([runs[str(s)]["profile"][band][k] for s in seeds]) for k in ("first_digit", "rest", "exact")
            }
            for band in runs[str(seeds[0])]["profile"]
        }
        for arm, runs in per_seed.items()
    }
    return table, curve, contrasts, profile


def markdown(res: dict) -> str:
    names = list(bands(res["digits"]))
    lines = ["| arm | " + " | ".join(f"{n} digits %" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for arm, e in res["table"].items():
        lines.append(f"| {arm} | " + " | ".join(pct(e[n]) for n in names) + " |")
    lines += contrast_lines(res["contrasts"], "paired contrast (same seed)")
    arms = list(res["curve"])
    lines += ["", "| operand digits | " + " | ".join(f"{a} %" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for d in range(1, 3 * res["digits"] + 1):
        mark = " (train)" if d <= res["digits"] else ""
        lines.append(f"| {d}{mark} | " + " | ".join(pct(res["curve"][a][str(d)]) for a in arms) + " |")
    bands_ = list(next(iter(res["answer_profile"].values())))
    lines += [
        "",
        "| arm | " + " | ".join(f"{b}: first digit % / rest % / exact %" for b in bands_) + " |",
        "|---" * (len(bands_) + 1) + "|",
    ]
    for arm, e in res["answer_profile"].items():
        lines.append(
            f"| {arm} | "
            + " | ".join(
                " / ".join(f"{100 * e[b][k]['mean']:.1f}" for k in ("first_digit", "rest", "exact")) for b in bands_
            )
            + " |"
        )
    lines += runs_lines(res["per_seed"], res["seeds"])
    n = len(res["seeds"])
    lines += [
        "",
        f"Seeds {res['seeds']}; {res['steps']} steps × {res['tokens_per_step']:,} tokens per run on operands "
        f"of 1–{res['digits']} digits; {res['n_per_length']} held-out problems per operand length (both operands "
        f"of that length); mean ± 95% CI (Student t, {n - 1} degrees of freedom). Wall time "
        f"{res['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (finished runs are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--digits", type=int, default=4, help="L: training operands have 1..L digits; tested to 3L")
    p.add_argument("--n-docs", type=int, default=400_000, help="training problems in the corpus")
    p.add_argument("--n-per-length", type=int, default=100, help="held-out problems per operand length")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ALL_ARMS))
    p.add_argument("--device", default="cpu", help="evaluation device (training: train.device)")
    p.add_argument("--results", default=str(HERE / "results"), help="where abacus_study.json and .md go")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (e.g. train.device=cuda)")
    args = p.parse_args(argv)
    setup_threads()
    out, seeds, L = Path(args.out), args.seeds, args.digits
    start = time.perf_counter()
    corpus = write_corpus(out / "data", L, args.n_docs).resolve()
    items = eval_items(n=args.n_per_length * 3 * L, min_digits=1, max_digits=3 * L, op="+", reverse=True)
    per_seed: dict[str, dict[str, dict]] = {arm: {} for arm in args.arms}
    for seed in seeds:  # seed-major: an interrupted study has whole seeds of every arm
        print(f"seed {seed} ...", flush=True)
        for arm in args.arms:
            run_dir = train(out / f"{arm}_s{seed}", overrides(arm, seed, args.steps, L, corpus, args.overrides))
            model, _, tok = load(run_dir, args.device)
            row = {**run_facts(run_dir), "eval": exact_accuracy(model, tok, items)}
            row["profile"] = {
                name: answer_profile(model, tok, [it for it in items if str(it.digits) in ls])
                for name, ls in list(bands(L).items())[:3]
            }
            per_seed[arm][str(seed)] = row
            print("    " + ", ".join(f"{n}: {band_accuracy(row, ls):.3f}" for n, ls in bands(L).items()), flush=True)
    table, curve, contrasts, profile = summarize(per_seed, seeds, L)
    from lmlab.config import load_config

    cfg = load_config(BASE_CONFIG, overrides(args.arms[0], seeds[0], args.steps, L, corpus, args.overrides))
    res = {
        "study": "Abacus vs RoPE-only length generalisation on reversed addition (issue 14, study e)",
        "command": "OMP_NUM_THREADS=1 python examples/architectures/abacus_study.py " + " ".join(argv or sys.argv[1:]),
        "base_config": str(BASE_CONFIG.relative_to(HERE.parent.parent)),
        "arm_overrides": {a: arm_overrides(a, L) for a in args.arms},
        "extra_overrides": args.overrides,
        "corpus": {
            "path": str(corpus),
            "operations": "+",
            "min_digits": 1,
            "max_digits": L,
            "reverse": True,
            "n_docs": args.n_docs,
            "seed": 0,
        },
        "eval": {"seed": HELDOUT_ARITHMETIC_SEED, "lengths": [1, 3 * L], "greedy": True},
        "digits": L,
        "n_per_length": args.n_per_length,
        "seeds": seeds,
        "steps": args.steps,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len,
        "table": table,
        "contrasts": contrasts,
        "curve": curve,
        "answer_profile": profile,
        "per_seed": per_seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    text = markdown(res)
    for folder in (out, Path(args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "abacus_study.json").write_text(json.dumps(res, indent=1) + "\n")
        (folder / "abacus_study.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
