"""A run's evaluation results as rows: the last eval record, the last in-loop task evaluation, harness result files.

- ``eval`` records (``metrics.jsonl``): validation loss, perplexity, per-source losses, a recipe's own eval metrics.
- ``task_eval`` records: ``{"kind": "task_eval", "step", "tokens", "<task>/<metric>": v, ..., "eval_seconds",
  "eval_cost_pct"}``; the keys without a ``/`` are the evaluation's cost, not a task's score.
- ``RUN/evals/<model>/results_*.json`` written by ``lmlab eval harness`` (or ``RUN/evals/*.json``): lm-evaluation-harness results, whose ``"results"`` maps a
  task to ``{"<metric>,<filter>": value, "<metric>_stderr,<filter>": stderr, "alias": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.report.metrics import BOOKKEEPING, number


def record_rows(record: dict) -> list[dict]:
    """``{metric, value}`` for every numeric non-bookkeeping value of one record."""
    return [{"metric": k, "value": v} for k, v in record.items() if k not in BOOKKEEPING and number(v) is not None]


def task_rows(record: dict) -> tuple[list[dict], dict]:
    """``([{task, metric, value}], cost)`` of one ``task_eval`` record; ``cost`` holds the keys without a ``/``."""
    scores, cost = [], {}
    for key, value in record.items():
        if key in ("kind", "step", "tokens") or number(value) is None:
            continue
        if "/" in key:
            task, metric = key.split("/", 1)
            scores.append({"task": task, "metric": metric, "value": value})
        else:
            cost[key] = value
    return scores, cost


def harness_files(run_dir: Path) -> list[Path]:
    """lm-eval results files under ``RUN/evals``: ``evals/<model>/results_<date>.json`` as lm-eval's tracker writes
    them (``lmlab eval harness``), or ``evals/*.json`` copied there by hand."""
    folder = run_dir / "evals"
    if not folder.is_dir():
        return []
    return sorted({*folder.glob("*.json"), *folder.glob("*/results_*.json")})


def harness_rows(path: Path) -> list[dict] | str:
    """``{task, metric, value, stderr}`` rows of one harness results file, or one line saying why there are none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path.name}: not readable JSON ({err.__class__.__name__})"
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        return f'{path.name}: no "results" object (not an lm-evaluation-harness results file)'
    rows = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or number(value) is None:
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            rows.append(
                {
                    "task": task,
                    "metric": name if filt in ("", "none") else f"{name} ({filt})",
                    "value": value,
                    "stderr": stderr if number(stderr) is not None else "",
                }
            )
    return rows
