"""Shared pieces of ``recurrent_study.py`` and ``abacus_study.py`` (issue 14, studies d and e).

- ``write_corpus``: a JSONL corpus of (by default reversed-digit) addition problems with operands of 1..L digits, from
  lmlab's own ``ArithmeticWorld`` (the built-in subsets only have 1..20 digits, too long for a CPU run);
- ``train``: one pretraining run of ``arith_study.yaml`` with overrides, reused when it finished with the
  same overrides;
- ``exact_accuracy``: greedy exact-answer accuracy per operand length (``lmlab.eval.arithmetic``), at a given
  number of recurrent iterations;
- ``answer_profile``: which part of the answer is wrong (its first digit or the rest);
- ``mean_ci``: mean and the half-width of the 95% Student-t interval over seeds;
- ``contrast_lines`` / ``runs_lines``: the Markdown tables of paired contrasts and of the runs themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.data.synthetic.arithmetic import ArithmeticWorld, Problem
from lmlab.eval.arithmetic import evaluate_arithmetic
from lmlab.models.generation import generate
from lmlab.models.recurrent import recurrence_iterations
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.pretrained import load_model

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "arith_study.yaml"
_DIGITS = re.compile(r"[0-9]*")
# recurrent depth as both studies use it: 1 prelude + 2 core + 1 coda blocks, r̄ = 4, gradients through 4 iterations
RECURRENCE = [
    "model.recurrence.enabled=true",
    "model.recurrence.prelude_layers=1",
    "model.recurrence.coda_layers=1",
    "model.recurrence.mean_iterations=4",
    "model.recurrence.backprop_depth=4",
]
CORPUS_SEED = 0  # the problems' stream; held-out problems come from eval_items' own seed (HELDOUT_ARITHMETIC_SEED)


def write_corpus(folder: Path, max_digits: int, n_docs: int, reverse: bool = True) -> Path:
    """``folder/add_rev_1-L_nN.jsonl`` (``add_fwd_...`` when not ``reverse``): problems 0..n_docs-1 of
    ``ArithmeticWorld(("+",), 1, L, reverse)``, one ``{"text": ...}`` per line (so each problem is its own
    document, followed by EOS in the shards)."""
    path = folder / f"add_{'rev' if reverse else 'fwd'}_1-{max_digits}_n{n_docs}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    world = ArithmeticWorld(operations=("+",), min_digits=1, max_digits=max_digits, reverse=reverse)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for text in world.documents(CORPUS_SEED, n_docs):
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)
    return path


def train(run_dir: Path, overrides: list[str]) -> Path:
    """One run of ``arith_study.yaml`` + ``overrides`` into ``run_dir``; kept when it already finished with the
    same base config and overrides (``study_overrides.json``)."""
    summary, marker = run_dir / "summary.json", run_dir / "study_overrides.json"
    settings = {"base_config_sha256": hashlib.sha256(BASE_CONFIG.read_bytes()).hexdigest(), "overrides": overrides}
    if summary.is_file() and marker.is_file():
        if json.loads(summary.read_text())["status"] == "finished" and json.loads(marker.read_text()) == settings:
            return run_dir
    cfg = load_config(BASE_CONFIG, overrides)
    t0 = time.perf_counter()
    s = run_pretraining(cfg, run_dir, quiet=True, overwrite=run_dir.exists())
    if s["status"] != "finished":
        raise SystemExit(f"{run_dir}: run ended with status {s['status']} ({s.get('error')})")
    marker.write_text(json.dumps(settings) + "\n")
    print(f"  {run_dir.name}: val loss {s['final_val_loss']:.4f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return run_dir


def run_facts(run_dir: Path) -> dict:
    """Summary numbers of one finished run."""
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s[k] for k in ("final_val_loss", "final_train_loss", "params", "tokens", "wall_time_s")}


def load(run_dir: Path, device: str = "cpu"):
    model, cfg, tokenizer = load_model(run_dir, device=device)
    model.eval()
    return model, cfg, tokenizer


def exact_accuracy(
    model, tokenizer, items: list[Problem], iterations: int | None = None, batch_size: int = 100
) -> dict:
    """``{"accuracy", "by_digits": {str(length): accuracy}, "n"}``; ``iterations``: the recurrent depth's r."""
    with recurrence_iterations(model, iterations):
        res = evaluate_arithmetic(model, tokenizer, items, batch_size=batch_size)
    return {"accuracy": res["accuracy"], "by_digits": {str(d): a for d, a in res["by_digits"].items()}, "n": res["n"]}


@torch.no_grad()
def answer_profile(
    model, tokenizer, items: list[Problem], iterations: int | None = None, batch_size: int = 100
) -> dict:
    """Where greedy answers go wrong: ``first_digit`` (the answer's first digit, i.e. its least significant one
    in the reversed format, is right), ``rest`` (everything after it, length included, is right) and ``exact``
    (both), each a fraction of ``items``. Decoding as ``evaluate_arithmetic`` (EOS + prompt, greedy)."""
    eos = tokenizer.eos_id
    prompts = [[eos, *tokenizer.encode(p.text)] for p in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    first = rest = exact = 0
    with recurrence_iterations(model, iterations):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            budget = max(len(items[i].answer) for i in chunk) + 1
            outs = generate(model, [prompts[i] for i in chunk], max_new_tokens=budget, temperature=0.0, eos_id=eos)
            for i, new_ids in zip(chunk, outs):
                text = tokenizer.decode(new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids)
                got, want = _DIGITS.match(text).group(), items[i].answer
                first += got[:1] == want[:1]
                rest += got[1:] == want[1:]
                exact += got == want
    n = len(items)
    return {"first_digit": first / n, "rest": rest / n, "exact": exact / n}


def mean_ci(values: list[float]) -> dict:
    """``{"mean", "ci95"}``: the mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "ci95": 0.0}
    h = float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))
    return {"mean": m, "ci95": h}


def paired(a: list[float], b: list[float]) -> dict:
    """Paired differences a − b over seeds: mean ± CI, the per-seed values, whether the CI excludes 0."""
    diffs = [x - y for x, y in zip(a, b)]
    c = mean_ci(diffs)
    return {**c, "per_seed": diffs, "excludes_zero": len(diffs) > 1 and abs(c["mean"]) > c["ci95"]}


def pct(cell: dict) -> str:
    """A mean ± CI of accuracies as percentages."""
    return f"{100 * cell['mean']:.1f} ± {100 * cell['ci95']:.1f}"


def setup_threads() -> None:
    torch.set_num_threads(1)


def contrast_lines(contrasts: dict, title: str) -> list[str]:
    """A Markdown table of paired contrasts (``paired`` results, in points), headed by ``title``."""
    lines = ["", f"| {title} | mean ± 95% CI (points) | per seed | CI excludes 0 |", "|---|---|---|---|"]
    for name, c in contrasts.items():
        per = ", ".join(f"{100 * d:+.1f}" for d in c["per_seed"])
        lines.append(
            f"| {name} | {100 * c['mean']:+.1f} ± {100 * c['ci95']:.1f} | {per} | "
            f"{'yes' if c['excludes_zero'] else 'no'} |"
        )
    return lines


def runs_lines(per_seed: dict, seeds: list[int]) -> list[str]:
    """A Markdown table of each arm's parameters, final validation loss (mean ± CI) and mean training time."""
    lines = ["", "| arm | params | final val loss | train wall time (s) |", "|---|---|---|---|"]
    for arm, runs in per_seed.items():
        first = runs[str(seeds[0])]
        loss = mean_ci([r["final_val_loss"] for r in runs.values()])
        wall = sum(r["wall_time_s"] for r in runs.values()) / len(runs)
        lines.append(f"| {arm} | {first['params']:,} | {loss['mean']:.3f} ± {loss['ci95']:.3f} | {wall:.0f} |")
    return lines
