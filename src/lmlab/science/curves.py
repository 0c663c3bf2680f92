"""Training curves for the annealing-law fit (docs/science.md §2), read from run directories or a CSV.

**Run directories.** ``INPUT`` is a run directory or a directory of them. A run's schedule is rebuilt from its
``config.yaml`` with the trainer's own ``lmlab.train.schedule.lr_schedule``; its points are the ``eval`` records of
``metrics.jsonl`` (``val_loss``, or another of their losses such as ``val_loss_docs``). An eval record at ``step = k`` comes after updates ``0 … k−1``, so it is the law's ``s = k − 1``
(``S1(s) = Σ_{i≤s} η_i``). Warmup is ``schedule.warmup_steps``. Runs whose ``summary.json`` is not ``finished``
(interrupted or diverged) are excluded and named; non-finite losses are dropped.

**CSV.** Columns ``curve, step, lr, loss``: ``step`` is the law's 0-based step index ``s`` and ``lr`` is ``η_s``;
``loss`` may be empty on rows that only give the LR. The schedule of each curve is the LR at every step
``0 … max step``, linearly interpolated between the given rows (give every step, or dense enough rows, for an exact
schedule). Warmup is detected as the steps before the LR first reaches its maximum. An optional ``params`` column
names each curve's model size (an annealing fit warns when its curves come from different models).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.science.annealing import Curve, detect_warmup
from lmlab.science.results import is_run_dir, read_csv_rows, read_jsonl, read_summary, require_columns


def curve_from_run(run_dir: Path, metric: str = "val_loss") -> Curve:
    from lmlab.config import load_config
    from lmlab.train.schedule import lr_schedule

    cfg = load_config(run_dir / "config.yaml")
    t = cfg.train
    world_size = int((read_summary(run_dir) or {}).get("world_size") or 1)
    sequences = t.micro_batch_size * t.grad_accum * world_size  # the power schedule depends on the global batch
    lrs = np.array(
        lr_schedule(t.steps, cfg.optim.lr, cfg.schedule, batch_sequences=sequences, seq_len=t.seq_len), dtype=float
    )
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    points = [
        (int(r["step"]) - 1, float(r[metric]))
        for r in evals
        if r.get(metric) is not None and math.isfinite(float(r[metric])) and 1 <= int(r["step"]) <= len(lrs)
    ]
    steps = np.array([p[0] for p in points], dtype=int)
    losses = np.array([p[1] for p in points], dtype=float)
    m = cfg.model
    model = f"d_model={m.d_model}, n_layers={m.n_layers}, n_heads={m.n_heads}, vocab={m.vocab_size}"
    return Curve(run_dir.name, lrs, steps, losses, cfg.schedule.warmup_steps, model)


def curves_from_dir(path: Path, metric: str = "val_loss") -> tuple[list[Curve], dict[str, str]]:
    """Curves of a run directory or of every run directory under ``path``; returns (curves, excluded runs)."""
    run_dirs = [path] if (path / "config.yaml").is_file() else sorted(p for p in path.iterdir() if is_run_dir(p))
    curves, excluded = [], {}
    for rd in run_dirs:
        summary = read_summary(rd)
        status = "missing" if summary is None else str(summary.get("status"))
        if status != "finished":
            excluded[rd.name] = status
            continue
        curve = curve_from_run(rd, metric)
        if len(curve.steps) == 0:
            excluded[rd.name] = f"no finite {metric} in its eval records"
            continue
        curves.append(curve)
    if not curves:
        raise UserError(f"{path}: no finished runs with eval losses to fit (excluded: {excluded or 'none found'})")
    return curves, excluded


def curves_from_csv(path: Path) -> list[Curve]:
    """Curves from a ``curve, step, lr, loss`` CSV (module docstring)."""
    rows = read_csv_rows(path)
    require_columns(rows, ["curve", "step", "lr", "loss"], str(path))
    by_curve: dict[str, list[dict]] = {}
    for row in rows:
        by_curve.setdefault(row["curve"], []).append(row)
    curves = []
    for name, items in by_curve.items():
        try:
            steps = np.array([int(float(r["step"])) for r in items])
            lr_rows = [(int(float(r["step"])), float(r["lr"])) for r in items if r["lr"] not in ("", None)]
        except ValueError as err:
            raise UserError(f"{path}: curve {name!r}: non-numeric step or lr ({err})") from None
        if not lr_rows:
            raise UserError(f"{path}: curve {name!r} has no lr values")
        lr_steps, lr_vals = zip(*sorted(lr_rows))
        lrs = np.interp(np.arange(int(steps.max()) + 1), lr_steps, lr_vals)
        pts = [(int(float(r["step"])), float(r["loss"])) for r in items if r["loss"] not in ("", None)]
        pts = [p for p in pts if math.isfinite(p[1])]
        curves.append(
            Curve(
                name,
                lrs,
                np.array([p[0] for p in pts], dtype=int),
                np.array([p[1] for p in pts], dtype=float),
                detect_warmup(lrs),
                str(items[0].get("params") or ""),
            )
        )
    return curves


def load_curves(path: str | Path, metric: str = "val_loss") -> tuple[list[Curve], dict[str, str]]:
    """Curves from a directory of runs (their eval records' ``metric``) or a CSV, and the runs excluded (name ->
    reason)."""
    p = Path(path)
    if p.is_dir():
        return curves_from_dir(p, metric)
    return curves_from_csv(p), {}
