"""Sweep results: read run directories into rows, write and read ``results.csv``, select the rows a fit may use.

A sweep directory holds one run directory per subdirectory (docs/CONTRACTS.md: ``config.yaml``,
``metrics.jsonl``, ``summary.json``). :func:`collect_results` turns each into one row with the columns
:data:`BASE_COLUMNS` plus ``val_loss/<source>`` for every per-source validation loss of its last eval record (and
``val_loss_docs``, ``val_floor`` when the data has an exact entropy floor, ``lmlab.eval.perplexity``):

- ``params``, ``non_embedding_params``, ``tokens``, ``flops``: from ``summary.json``;
- ``loss``: ``summary.json``'s ``final_val_loss`` (if it is missing, the last eval record's ``val_loss`` when that
  record is at the run's final step);
- ``lr``, ``schedule``, ``seed``: ``optim.lr``, ``schedule.name``, ``train.seed`` of ``config.yaml``;
- ``batch_tokens``: tokens per optimizer update (``train.micro_batch_size × grad_accum × seq_len`` × ranks);
- ``status``: the summary's own status (``finished``; ``diverged``, which the trainer writes for a NaN/inf loss;
  ``running`` for an interrupted run); ``diverged`` also for a "finished" run with an infinite loss, ``no final
  loss`` for one without a loss; ``missing`` when there is no ``summary.json``;
- ``curve``: the run's name, which groups its eval points into one curve for the annealing fit.

Only ``finished`` rows with a finite loss enter a fit (:func:`usable_rows`); the others are counted and named.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmlab.errors import DataError, UserError

BASE_COLUMNS = [
    "run",
    "params",
    "non_embedding_params",
    "tokens",
    "flops",
    "loss",
    "lr",
    "batch_tokens",
    "schedule",
    "seed",
    "status",
    "curve",
]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; a truncated last line (a run killed mid-write) is ignored."""
    records = []
    if not path.is_file():
        return records
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON") from None
    return records


def read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON") from None


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise DataError(f"{path}: not valid YAML") from None
    return data if isinstance(data, dict) else {}


def _get(data: dict, dotted: str, default: Any = None) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("config.yaml", "summary.json", "metrics.jsonl"))


def run_row(run_dir: Path) -> dict[str, Any]:
    """One ``results.csv`` row for a run directory (see the module docstring)."""
    summary = read_summary(run_dir)
    config = read_config(run_dir)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    last_eval = evals[-1] if evals else {}
    s = summary or {}
    loss = _float(s.get("final_val_loss"))
    if not math.isfinite(loss) and str(s.get("status", "finished")) != "diverged":
        # No final loss in the summary (e.g. a run resumed at its last checkpoint): use the last eval record if it
        # is at the run's final step (or there is no summary at all).
        at_end = summary is None or last_eval.get("step") == s.get("steps")
        if at_end:
            loss = _float(last_eval.get("val_loss"))
    if summary is None:
        status = "missing"
    elif s.get("status") == "finished" and math.isinf(loss):
        status = "diverged"
    elif s.get("status") == "finished" and math.isnan(loss):
        status = "no final loss"
    else:
        status = str(s.get("status", "unknown"))
    row: dict[str, Any] = {
        "run": run_dir.name,
        "params": _float(s.get("params")),
        "non_embedding_params": _float(s.get("non_embedding_params")),
        "tokens": _float(s.get("tokens", last_eval.get("tokens"))),
        "flops": _float(s.get("flops")),
        "loss": loss,
        "lr": _float(_get(config, "optim.lr")),
        "batch_tokens": _batch_tokens(config, s),
        "schedule": _get(config, "schedule.name", ""),
        "seed": _get(config, "train.seed", ""),
        "status": status,
        "curve": run_dir.name,
    }
    for key, value in last_eval.items():
        if key.startswith("val_loss/") or key in ("val_loss_docs", "val_floor"):
            row[key] = _float(value)
    return row


def _batch_tokens(config: dict, summary: dict) -> float:
    """Tokens per optimizer update: rows (micro-batch × accumulation × ranks) × ``train.seq_len``."""
    parts = [_float(_get(config, f"train.{k}")) for k in ("micro_batch_size", "grad_accum", "seq_len")]
    return math.prod(parts) * _float(summary.get("world_size", 1))


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rows for every run directory directly under ``sweep_dir``, sorted by name."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserError(f"sweep directory not found: {root}")
    rows = [run_row(p) for p in sorted(root.iterdir()) if is_run_dir(p)]
    if not rows:
        raise UserError(f"{root}: no run directories (subdirectories with config.yaml / summary.json) found")
    return rows


def write_results_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows with :data:`BASE_COLUMNS` first, then the ``val_loss/<name>`` columns sorted."""
    extra = sorted({k for r in rows for k in r if k not in BASE_COLUMNS})
    columns = BASE_COLUMNS + extra
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, "")) for k in columns})
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings; a missing or empty file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def require_columns(rows: list[dict], columns: list[str], where: str) -> None:
    """``UserError`` naming every required column that is absent."""
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if missing:
        raise UserError(f"{where}: missing required column(s): {', '.join(missing)}")


@dataclass
class Selection:
    """Rows a fit uses and the runs it left out (name -> reason)."""

    rows: list[dict]
    excluded: dict[str, str] = field(default_factory=dict)


def usable_rows(rows: list[dict], numeric: list[str]) -> Selection:
    """Keep rows whose status (if any) is ``finished`` and whose ``numeric`` columns are finite numbers."""
    kept, excluded = [], {}
    for i, row in enumerate(rows):
        name = str(row.get("run") or row.get("curve") or f"row {i + 1}")
        status = str(row.get("status") or "finished")
        if status != "finished":
            excluded[name] = status
            continue
        values = {c: _float(row.get(c)) for c in numeric}
        bad = [c for c, v in values.items() if not math.isfinite(v)]
        if bad:
            excluded[name] = "diverged" if "loss" in bad else f"non-numeric {', '.join(bad)}"
            continue
        kept.append({**row, **values})
    return Selection(kept, excluded)


def column(rows: list[dict], name: str) -> np.ndarray:
    return np.array([_float(r[name]) for r in rows], dtype=float)


def load_results(path: str | Path) -> list[dict]:
    """Rows from a ``results.csv`` or, when ``path`` is a directory, from its run directories."""
    p = Path(path)
    if p.is_dir():
        if (p / "results.csv").is_file():
            return read_csv_rows(p / "results.csv")
        return collect_results(p)
    return read_csv_rows(p)
