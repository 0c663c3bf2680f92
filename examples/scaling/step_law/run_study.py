"""A Step Law study on the ``zipf_facts`` world: LR × batch grids at four (N, D), a fit, and a held-out grid.

    python examples/scaling/step_law/run_study.py --out runs/step-law [--jobs 2] [--device cpu] [--record]

Step Law (Li et al. 2025, docs/science.md §27) says the optimal learning rate and batch size are power laws of
the non-embedding parameters N and the training tokens D. The study measures that on our own runs:

- **fitted grids**: d_model 24 and 48 (2 blocks) × D = 2^18 and 2^20 tokens, each an LR × batch grid
  (5 learning rates 2× apart, batches of 256–2,048 tokens, and 128 at D = 2^18; cosine with a 5% warmup; seed 0);
  ``lmlab fit step-law`` takes each grid's optimum (the vertex of a quadratic in log LR and log batch) and
  fits η* = a·N^α·D^β and B* = b·D^γ;
- **held-out grid**: d_model 32 at D = 2^19, inside the fitted ranges. Its measured optimum is compared with
  the fit's prediction, with the paper's constants, and with the trivial baseline (the fitted grids' mean
  optimum, a constant).

Each run evaluates once, at its end, on 131,072 validation tokens (the same tokens for every run).
Results: ``OUT/RESULTS.md`` (``--record`` copies it and the recorded runs into this folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lmlab.config import load_config
from lmlab.data.pipeline import prepare_run_data
from lmlab.science.results import collect_results, write_results_csv
from lmlab.science.step_law import STEP_LAW, StepLaw, grid_optimum

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
BASE = ROOT / "configs" / "scaling" / "zipf_base.yaml"
SEQ_LEN = 128
LRS = [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2]
MICRO_BATCHES = [4, 8, 16]  # × 128 tokens: 512, 1,024 and 2,048 tokens per update
ADDED_MICRO_BATCHES = [2]  # 256 tokens, added after the first grids put most optima at 512; run last, so the
# earlier runs keep their names (and a rerun skips them)
SMALLEST_BATCH = (1, 2**18)  # 128 tokens, for the 2^18-token grids only, whose optimum was still at 256
FITTED = [(24, 2**18), (24, 2**20), (48, 2**18), (48, 2**20)]  # (d_model, tokens)
HELD = [(32, 2**19)]
EVAL_TOKENS = 131072


def grid_runs(grids: list[tuple[int, int]]) -> list[dict]:
    """One override set per (size, tokens, batch); the sweep's ``grid`` multiplies them by the LRs."""
    order = [(g, mb) for g in grids for mb in MICRO_BATCHES] + [(g, mb) for mb in ADDED_MICRO_BATCHES for g in grids]
    order += [(g, SMALLEST_BATCH[0]) for g in grids if g[1] == SMALLEST_BATCH[1]]
    runs = []
    for (d_model, tokens), mb in order:
        steps = tokens // (mb * SEQ_LEN)
        runs.append(
            {
                "model.d_model": d_model,
                "model.n_heads": 2,
                "train.micro_batch_size": mb,
                "train.steps": steps,
                "train.eval_every": steps,
                "schedule.warmup_steps": max(2, round(0.05 * steps)),
            }
        )
    return runs


def sweep(out: Path, grids: list[tuple[int, int]], *, jobs: int, device: str) -> Path:
    """Run the grids as one resumable ``lmlab sweep`` and write its ``results.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    prepare_run_data(load_config(BASE, [f"train.device={device}"]))  # once, before parallel runs would race
    spec = {
        "base": str(BASE),
        "overrides": [f"train.device={device}", f"train.eval_tokens={EVAL_TOKENS}", "train.log_every=64"],
        "runs": grid_runs(grids),
        "grid": {"optim.lr": LRS},
    }
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    lmlab = [sys.executable, "-m", "lmlab"]
    subprocess.run([*lmlab, "sweep", str(out / "sweep.yaml"), "--out", str(out / "runs"), "--jobs", str(jobs)])
    return write_results_csv(collect_results(out / "runs"), out / "results.csv")


def fit(results: Path, out: Path) -> dict:
    lmlab = [sys.executable, "-m", "lmlab"]
    subprocess.run([*lmlab, "fit", "step-law", str(results), "--out", str(out), "--bootstrap", "200"], check=True)
    return json.loads((out / "fit.json").read_text())


def held_optima(results: Path) -> list:
    rows = [r for r in csv.DictReader(results.open()) if r["status"] == "finished"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((float(r["non_embedding_params"]), float(r["tokens"])), []).append(r)
    return [
        grid_optimum(n, d, *([float(r[c]) for r in items] for c in ("lr", "batch_tokens", "loss")))
        for (n, d), items in sorted(groups.items())
    ]


def factor(predicted: float, measured: float) -> float:
    """How far apart two positive values are, as a factor ≥ 1."""
    return math.exp(abs(math.log(predicted / measured)))


def report(fitted: dict, held: list, command: str) -> str:
    law = StepLaw(**fitted["params"])
    mean_lr = math.exp(sum(math.log(o["lr_opt"]) for o in fitted["optima"]) / len(fitted["optima"]))
    mean_bs = math.exp(sum(math.log(o["batch_opt"]) for o in fitted["optima"]) / len(fitted["optima"]))
    lines = [
        "# Step Law on the zipf_facts world: measured",
        "",
        f"Command: `{command}`",
        "",
        "## Grid optima (fitted grids)",
        "",
        "| N (non-embedding) | D (tokens) | LR* | batch* (tokens) | loss at the optimum | inside the grid |",
        "|---|---|---|---|---|---|",
    ]
    for o in fitted["optima"]:
        lines.append(
            f"| {o['params']:.4g} | {o['tokens']:.4g} | {o['lr_opt']:.4g} | {o['batch_opt']:.4g} | "
            f"{o['loss_opt']:.4f} | {'yes' if o['inside'] else 'no (best run)'} |"
        )
    iv = fitted.get("intervals", {})

    def with_interval(key: str) -> str:
        lo_hi = iv.get(key)
        return f"{fitted['params'][key]:.3f}" + (f" (95% {lo_hi[0]:.3f} to {lo_hi[1]:.3f})" if lo_hi else "")

    lines += [
        "",
        "## Fit",
        "",
        f"η* = {law.lr_coef:.4g}·N^{with_interval('lr_n')}·D^{with_interval('lr_d')}; "
        f"B* = {law.batch_coef:.4g}·D^{with_interval('batch_d')} tokens. "
        f"Paper: η* = 1.79·N^−0.713·D^0.307, B* = 0.58·D^0.571.",
        "",
        f"Leave-one-grid-out: {json.dumps(fitted.get('leave_one_out', {}))}",
        "",
        f"Warnings: {'; '.join(fitted.get('warnings', [])) or 'none'}",
        "",
        "## Held-out grid",
        "",
        "| N | D | | LR* | factor | batch* (tokens) | factor |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in held:
        n, d = o.params, o.tokens
        lines.append(f"| {n:.4g} | {d:.4g} | measured | {o.lr_opt:.4g} | | {o.batch_opt:.4g} | |")
        for name, lr, bs in (
            ("our fit", law.lr(n, d), law.batch_tokens(n, d)),
            ("paper's constants", STEP_LAW.lr(n, d), STEP_LAW.batch_tokens(n, d)),
            ("baseline (mean fitted optimum)", mean_lr, mean_bs),
        ):
            lines.append(
                f"| | | {name} | {lr:.4g} | {factor(lr, o.lr_opt):.2f}× | {bs:.4g} | {factor(bs, o.batch_opt):.2f}× |"
            )
        where = "a vertex inside the grid" if o.inside else "the best run (no vertex inside the grid)"
        lines.append(f"\nMeasured optimum: {where}; loss {o.loss_opt:.4f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true", help="copy RESULTS.md and the recorded runs into this folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    fitted_csv = sweep(out / "fitted", FITTED, jobs=args.jobs, device=args.device)
    held_csv = sweep(out / "held", HELD, jobs=args.jobs, device=args.device)
    fitted = fit(fitted_csv, out / "fit")
    command = "python examples/scaling/step_law/run_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(fitted, held_optima(held_csv), command)
    (out / "RESULTS.md").write_text(text + "\n")
    print(text)
    if args.record:
        shutil.copy(out / "RESULTS.md", HERE / "RESULTS.md")
        for part in ("fitted", "held"):
            shutil.copy(out / part / "results.csv", HERE / f"{part}_results.csv")
        shutil.copy(out / "fit" / "fit.json", HERE / "fit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
