"""pass@N under longer training: cross-entropy vs the confidence-limited DCO loss (PAPERS.md D15; docs/science.md §20).

Chen et al. 2025 (arXiv 2502.07154) report that longer cross-entropy fine-tuning raises pass@1 but lowers pass@N at
large N, because the model grows confident in one answer on problems it cannot solve, and that Direct Coverage
Optimization (DCO), −log(1 − (1 − p)^N), avoids the collapse. This script reproduces the set-up at toy scale:

- **Task** (written here, seed ``TASK_SEED``): the prompt is three letters ``a b c`` from ``LETTERS``; the answer
  repeats them reversed and adds a colour, ``c b a red``. On *easy* problems (first letter in ``EASY``) the colour
  follows a rule (the second letter's position mod 4). On *hard* problems it comes from a fixed random table, so a
  held-out hard problem can only be answered by guessing among the 4 colours: a calibrated model gets pass@1 ≈ 1/4
  and pass@N → 1 on it. A confident model gets pass@N ≈ pass@1.
- **Training**: ``lmlab.recipes.sft.run_sft`` on the training problems, as prompt/completion records, for many
  epochs at a constant learning rate. There is one run per (loss, seed), with checkpoints along the way: CE
  (``objective.coverage_n=1``) and DCO (``objective.coverage_n=16``, ``LOSSES``).
- **Evaluation**: ``lmlab eval passk CKPT --problems test.jsonl --checker exact --n 64 --k 1,4,16,64`` at the
  checkpoints of steps 50, 100, 250 (the short horizons), 750 and 1500 (the long one). Sampling is at temperature 1, on
  held-out problems (half easy, half hard). Each cell is the mean over
  seeds ± the half-width of the 95% Student-t interval.

    python examples/pass_at_n/run_study.py --out runs/pass_at_n            # the study (about 10 CPU-minutes)
    python examples/pass_at_n/run_study.py --out /tmp/pn --quick           # smoke test (seconds)

Finished runs and evaluations are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config
from lmlab.eval.pass_at_k import mean_pass_at_k
from lmlab.recipes.sft import run_sft
from lmlab.train.checkpoint import step_dir_name

LETTERS = "abcdefghijkl"
EASY = set("abcdef")
COLOURS = ("red", "blue", "green", "gold")
TASK_SEED = 0
LOSSES = {"ce": 1, "dco": 16}  # name -> objective.coverage_n
KS = (1, 4, 16, 64)


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(train=96, test=16, steps=20, every=10, evals=(10, 20), n=8, ks=(1, 8))
    return dict(train=480, test=200, steps=1500, every=50, evals=(50, 100, 250, 750, 1500), n=64, ks=KS)


# --------------------------------------------------------------------------- the task


def make_task(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Training records and test problems: every triple of letters appears at most once, the test set is half
    easy, half hard."""
    rng = random.Random(TASK_SEED)
    triples = [(a, b, c) for a in LETTERS for b in LETTERS for c in LETTERS]
    table = {t: rng.choice(COLOURS) for t in triples}  # the hard problems' colours: unpredictable from the letters
    rng.shuffle(triples)

    def problem(t: tuple[str, str, str]) -> dict:
        easy = t[0] in EASY
        colour = COLOURS[LETTERS.index(t[1]) % len(COLOURS)] if easy else table[t]
        return {
            "prompt": " ".join(t),
            "answer": f"{' '.join(reversed(t))} {colour}",
            "kind": "easy" if easy else "hard",
        }

    easy = [t for t in triples if t[0] in EASY]
    hard = [t for t in triples if t[0] not in EASY]
    test = [problem(t) for t in easy[: n_test // 2] + hard[: n_test // 2]]
    rest = easy[n_test // 2 :] + hard[n_test // 2 :]
    random.Random(TASK_SEED + 1).shuffle(rest)
    train = [problem(t) for t in rest[:n_train]]
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- runs and evaluations


def train(out: Path, files: dict[str, Path], loss: str, seed: int, n: dict) -> Path:
    run_dir = out / f"{loss}_s{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["status"] == "finished":
        return run_dir
    cfg = load_config(
        None,
        [
            f"name=pass-at-n-{loss}-s{seed}",
            "tokenizer.vocab_size=300",
            "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
            "train.seq_len=64", "train.micro_batch_size=16", f"train.steps={n['steps']}", f"train.seed={seed}",
            f"train.ckpt_every={n['every']}", f"train.keep_last={n['steps'] // n['every'] + 1}",
            f"train.eval_every={n['every']}", "train.log_every=50", "train.progress=false", "train.device=cpu",
            "train.threads=1", "optim.lr=3e-3", "optim.weight_decay=0.0", "schedule.name=constant",
            "schedule.warmup_steps=10", "data.num_workers=1", "sample.prompts=['a b c']", "sample.max_new_tokens=8",
            f"sft.train_file={files['train']}", f"sft.val_file={files['val']}",
            f"objective.coverage_n={LOSSES[loss]}",
        ],
    )  # fmt: skip
    run_sft(cfg, run_dir, quiet=True, overwrite=run_dir.exists())
    return run_dir


def passk(run_dir: Path, step: int, problems: Path, n: dict, seed: int) -> list[dict]:
    """``lmlab eval passk`` on the run's checkpoint at ``step`` (in-process, the command line's code path); cached
    next to the checkpoints (a checkpoint directory holds only the files its manifest lists)."""
    checkpoint = run_dir / "checkpoints" / step_dir_name(step)
    per_problem = run_dir / f"passk_step{step}.jsonl"
    if not per_problem.is_file():
        argv = [
            "eval", "passk", str(checkpoint), "--problems", str(problems), "--checker", "exact",
            "--n", str(n["n"]), "--k", ",".join(map(str, n["ks"])), "--temperature", "1.0", "--max-new-tokens", "12",
            "--seed", str(seed), "--out", str(per_problem),
        ]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            if lmlab_main(argv) != 0:
                raise SystemExit(f"lmlab {' '.join(argv)} failed")
    return [json.loads(x) for x in per_problem.read_text().splitlines()]


def scores(per_problem: list[dict], test: list[dict], ks) -> dict[str, float]:
    """pass@k over all problems and over the easy and the hard half."""
    out = {}
    for part in ("all", "easy", "hard"):
        counts = [(r["n"], r["c"]) for r in per_problem if part == "all" or test[r["index"]]["kind"] == part]
        out.update({f"{part}/pass@{k}": mean_pass_at_k(counts, k) for k in ks})
    return out


def val_loss(run_dir: Path, step: int) -> float | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval" and r.get("step") == step:
            return r["val_loss"]
    return None


# --------------------------------------------------------------------------- statistics and the table


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def fmt(values: list[float]) -> str:
    m, h = mean_ci(values)
    return f"{m:.3f} ± {h:.3f}"


def markdown(res: dict) -> str:
    ks, cells = res["sizes"]["ks"], res["cells"]
    head = "| loss | step | part | " + " | ".join(f"pass@{k}" for k in ks) + " | held-out loss (nats/token) |"
    lines = [head, "|" + "---|" * (len(ks) + 4)]
    for cell in cells:
        for part in ("all", "easy", "hard"):
            vals = [fmt([r[f"{part}/pass@{k}"] for r in cell["runs"]]) for k in ks]
            vl = fmt([r["val_loss"] for r in cell["runs"]]) if part == "all" else ""
            lines.append(f"| {cell['loss']} | {cell['step']} | {part} | " + " | ".join(vals) + f" | {vl} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (finished runs and evaluations are reused)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, n = Path(args.out), sizes(args.quick)
    start = time.perf_counter()
    train_rows, test = make_task(n["train"], n["test"])
    files = {
        "train": write_jsonl(out / "data" / "train.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]}
                                                            for r in train_rows]),
        "val": write_jsonl(out / "data" / "val.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]} for r in test]),
        "test": write_jsonl(out / "data" / "test.jsonl", test),
    }  # fmt: skip
    cells = []
    for loss in LOSSES:
        runs = {step: [] for step in n["evals"]}
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            run_dir = train(out, files, loss, seed, n)
            for step in runs:
                row = scores(passk(run_dir, step, files["test"], n, seed), test, n["ks"])
                runs[step].append({"seed": seed, "val_loss": val_loss(run_dir, step), **row})
            print(f"{loss} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
        cells += [{"loss": loss, "coverage_n": LOSSES[loss], "step": s, "runs": r} for s, r in runs.items()]
    res = {"sizes": n, "seeds": args.seeds, "cells": cells, "wall_time_s": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out / "results.md").write_text(table)
    print(table)
    print(f"wall time {res['wall_time_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
