"""μP learning-rate transfer at CPU scale: does the loss-optimal LR stay put as the model widens?

Tensor Programs V (Yang et al. 2022, arXiv 2203.03466) claims that under μP the optimal Adam learning rate found at
a small width is also optimal at larger widths, while under the standard parametrization (one LR, constant init
std) it drifts down as width grows. This script trains the same decoder at several widths (d_head fixed, more heads;
2 blocks), over an LR grid with factor-2 spacing, in both parametrizations, on the bytes of the built-in synthetic
``stories`` world, and reports the held-out loss of every run, the loss-optimal LR per width and parametrization,
and the drift: the optimal LR at the smallest width divided by the one at the largest (1 = perfect transfer).

The models, their init, multipliers and per-layer learning rates come from lmlab's own builders
(``lmlab.science.coord_check.train_width``, which uses ``build_model`` and ``build_optimizer``), so the study
tests the same code a ``model.parametrization: mup`` run uses.

    OMP_NUM_THREADS=1 nice -n 10 python examples/mup/run_study.py --out examples/mup/results   # ~15 min, 2 CPUs
    python examples/mup/run_study.py --out /tmp/mup --quick                                      # smoke test

Finished runs are kept in ``OUT/runs.csv`` and skipped when the script is run again; ``--mean-of DIR DIR`` averages
the held-out losses of studies run with different ``--seed`` and summarises the mean. Results: ``OUT/results.json``,
``OUT/runs.csv``, ``OUT/results.md`` (the tables), ``OUT/lr_transfer.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lmlab.config import ScheduleConfig
from lmlab.science.coord_check import PARAMETRIZATIONS, TrainSetup, WidthSetup, byte_tokens, train_width, windows
from lmlab.science.plots import pyplot

WIDTHS = (64, 128, 256, 512)
LR_EXPONENTS = tuple(range(-12, -3))  # LR = 2^e: 2.4e-4 ... 6.25e-2, factor 2 apart
SETUP = WidthSetup(head_dim=32, n_layers=2, seq_len=64, base_width=64)
STEPS, BATCH, WARMUP = 80, 8, 8
TRAIN_DOCS, EVAL_WINDOWS = 4000, 64
FIELDS = ("parametrization", "width", "lr", "eval_loss", "final_train_loss", "seconds")


@functools.cache
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Training bytes and held-out windows (documents of another seed), made once per process."""
    held_out = windows(byte_tokens(n_docs=200, seed=1), EVAL_WINDOWS, SETUP.seq_len, torch.Generator().manual_seed(0))
    return byte_tokens(n_docs=TRAIN_DOCS, seed=0), held_out


def run_one(parametrization: str, width: int, lr: float, steps: int, init_std: float, seed: int) -> dict:
    """Train one model and score it on the held-out windows."""
    torch.set_num_threads(1)
    start = time.time()
    tokens, held_out = data()
    schedule = ScheduleConfig(name="cosine", warmup_steps=min(WARMUP, steps), min_lr_ratio=0.1)
    train = TrainSetup(steps=steps, lr=lr, batch_size=BATCH, schedule=schedule)
    setup = dataclasses.replace(SETUP, init_std=init_std)
    out = train_width(setup.model_config(width, parametrization), tokens, train, seed=seed, eval_tokens=held_out)
    final = float(np.mean(out["losses"][-5:]))
    return {
        "parametrization": parametrization,
        "width": width,
        "lr": lr,
        "eval_loss": out["eval_loss"] if math.isfinite(out["eval_loss"]) else float("inf"),
        "final_train_loss": final,
        "seconds": round(time.time() - start, 1),
    }


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {**row, "width": int(row["width"]), **{k: float(row[k]) for k in FIELDS[2:]}} for row in csv.DictReader(f)
        ]


def optimum(rows: list[dict]) -> dict:
    """The grid's loss-optimal LR, refined by a parabola through it and its two neighbours in log2(LR) (the grid
    point itself when it lies on the edge of the grid: then the true optimum may be outside the grid)."""
    rows = sorted(rows, key=lambda r: r["lr"])
    losses = [r["eval_loss"] for r in rows]
    best = int(np.argmin(losses))
    lr_grid = rows[best]["lr"]
    on_edge = best in (0, len(rows) - 1)
    lr_fit = lr_grid
    if not on_edge and all(math.isfinite(v) for v in losses[best - 1 : best + 2]):
        x = np.log2([r["lr"] for r in rows[best - 1 : best + 2]])
        c2, c1, _ = np.polyfit(x, losses[best - 1 : best + 2], 2)
        if c2 > 0:
            lr_fit = float(2 ** (-c1 / (2 * c2)))
    return {"lr_grid": lr_grid, "lr_fit": lr_fit, "loss": losses[best], "on_edge": on_edge}


def summarize(runs: list[dict], widths: list[int]) -> dict:
    out = {}
    for parametrization in PARAMETRIZATIONS:
        per_width = {}
        for w in widths:
            rows = [r for r in runs if r["parametrization"] == parametrization and r["width"] == w]
            if rows:
                per_width[w] = optimum(rows)
        if len(per_width) >= 2:
            small, large = per_width[min(per_width)], per_width[max(per_width)]
            out[parametrization] = {
                "optimum": per_width,
                "drift_grid": small["lr_grid"] / large["lr_grid"],
                "drift_fit": small["lr_fit"] / large["lr_fit"],
            }
    return out


def plot(path: Path, runs: list[dict], summary: dict, widths: list[int]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for ax, parametrization in zip(axes, PARAMETRIZATIONS):
        for color, w in zip(colors, widths):
            rows = sorted((r for r in runs if r["parametrization"] == parametrization and r["width"] == w),
                          key=lambda r: r["lr"])  # fmt: skip
            if not rows:
                continue
            ax.plot([r["lr"] for r in rows], [r["eval_loss"] for r in rows], "-o", ms=3, color=color, label=f"d={w}")
            best = summary.get(parametrization, {}).get("optimum", {}).get(w)
            if best:
                ax.plot([best["lr_grid"]], [best["loss"]], "*", ms=11, color=color, mec="k")
        drift = summary.get(parametrization, {}).get("drift_fit")
        title = {"standard": "standard parametrization", "mup": "μP"}[parametrization]
        ax.set_title(f"{title}: drift {drift:.2f}x" if drift else title)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(runs: list[dict], summary: dict, widths: list[int], lrs: list[float]) -> str:
    """The held-out loss of every run (one table per parametrization, ** on each width's best) and the optima."""
    lines = []
    for parametrization in PARAMETRIZATIONS:
        loss = {(r["width"], r["lr"]): r["eval_loss"] for r in runs if r["parametrization"] == parametrization}
        best = summary.get(parametrization, {}).get("optimum", {})
        lines += [f"**{parametrization}**: held-out loss (nats/byte) after {STEPS} steps", ""]
        lines += ["| LR | " + " | ".join(f"d={w}" for w in widths) + " |", "|---" * (len(widths) + 1) + "|"]
        for lr in lrs:
            cells = []
            for w in widths:
                value = loss.get((w, lr))
                text = "—" if value is None else f"{value:.4f}"
                cells.append(f"**{text}**" if w in best and best[w]["lr_grid"] == lr else text)
            lines.append(f"| {lr:.2e} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| parametrization | " + " | ".join(f"η* d={w}" for w in widths) + " | drift (fit) | drift (grid) |"]
    lines.append("|---" * (len(widths) + 3) + "|")
    for parametrization, s in summary.items():
        cells = [f"{s['optimum'][w]['lr_fit']:.2e}" if w in s["optimum"] else "—" for w in widths]
        lines.append(
            f"| {parametrization} | " + " | ".join(cells) + f" | {s['drift_fit']:.2f}x | {s['drift_grid']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def mean_runs(seed_runs: list[list[dict]]) -> list[dict]:
    """One row per (parametrization, width, LR) present in every list: the mean of their held-out losses."""
    keyed = [{(r["parametrization"], r["width"], r["lr"]): r for r in runs} for runs in seed_runs]
    common = set.intersection(*(set(k) for k in keyed))
    rows = []
    for key in sorted(common):
        rows_k = [k[key] for k in keyed]
        mean = {f: float(np.mean([r[f] for r in rows_k])) for f in ("eval_loss", "final_train_loss", "seconds")}
        rows.append({"parametrization": key[0], "width": key[1], "lr": key[2], **mean})
    return rows


def train_grid(out: Path, widths: list[int], exponents: list[int], steps: int, args: argparse.Namespace) -> list[dict]:
    """Every run of the grid not yet in ``OUT/runs.csv``, appended to it as it finishes; all runs."""
    csv_path = out / "runs.csv"
    runs = read_runs(csv_path)
    done = {(r["parametrization"], r["width"], r["lr"]) for r in runs}
    todo = [
        (pz, w, 2.0**e)
        for w in sorted(widths, reverse=True)  # the slowest first, so parallel jobs finish together
        for pz in args.parametrizations
        for e in exponents
        if (pz, w, 2.0**e) not in done
    ]
    start = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool, csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if not done:
            writer.writeheader()
        futures = [pool.submit(run_one, pz, w, lr, steps, args.init_std, args.seed) for pz, w, lr in todo]
        for future in futures:
            row = future.result()
            writer.writerow(row)
            f.flush()
            runs.append(row)
            print(f"{row['parametrization']:8s} d={row['width']:4d} lr={row['lr']:.2e}: eval {row['eval_loss']:.4f} "
                  f"({row['seconds']:.0f} s; {time.time() - start:.0f} s so far)", flush=True)  # fmt: skip
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for runs.csv, results.json and lr_transfer.png")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--quick", action="store_true", help="2 widths, 3 LRs, 5 steps: a smoke test")
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--lr-exponents", type=int, nargs="+", default=list(LR_EXPONENTS), help="LR = 2^e")
    p.add_argument("--parametrizations", nargs="+", choices=PARAMETRIZATIONS, default=list(PARAMETRIZATIONS))
    p.add_argument("--init-std", type=float, default=SETUP.init_std, help="σ (μP: at the base width)")
    p.add_argument("--seed", type=int, default=0, help="init and batch order (the held-out windows are fixed)")
    p.add_argument("--mean-of", nargs="+", metavar="DIR", help="train nothing: summarise the mean of these studies")
    args = p.parse_args()
    widths = [64, 128] if args.quick else args.widths
    exponents = [-8, -7, -6] if args.quick else args.lr_exponents
    steps = 5 if args.quick else STEPS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mean_of:
        runs = mean_runs([read_runs(Path(d) / "runs.csv") for d in args.mean_of])
    else:
        runs = train_grid(out, widths, exponents, steps, args)
    summary = summarize(runs, widths)
    setup = {**vars(SETUP), "init_std": args.init_std, "steps": steps, "batch_size": BATCH, "warmup_steps": WARMUP,
             "schedule": "cosine to 0.1", "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
             "seed": args.mean_of or args.seed, "data": "stories bytes"}  # fmt: skip
    report = {"widths": widths, "lrs": [2.0**e for e in exponents], "setup": setup, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    plot(out / "lr_transfer.png", runs, summary, widths)
    (out / "results.md").write_text(markdown(runs, summary, widths, report["lrs"]))
    for parametrization, s in summary.items():
        optima = ", ".join(f"d={w}: {o['lr_fit']:.2e}" for w, o in s["optimum"].items())
        print(f"{parametrization}: optimal LR {optima}; drift {s['drift_fit']:.2f}x (grid {s['drift_grid']:.2f}x)")


if __name__ == "__main__":
    main()
