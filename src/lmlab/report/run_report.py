"""The report of one run directory: what ran, every logged metric as a curve, evaluations, samples, config, machine.

Reads only the run directory (docs/CONTRACTS.md): ``summary.json``, ``run.json``, ``metrics.jsonl``, ``evals/*.json``,
``samples.txt`` / ``samples.jsonl``, ``config.yaml`` and ``env.json``; any of them may be missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.report.config_diff import config_diff
from lmlab.report.evals import harness_files, harness_rows, record_rows, task_rows
from lmlab.report.figures import Line, lines_png
from lmlab.report.html import Section, esc, figure, figure_file, figures, kv_table, page, table, warning
from lmlab.report.metrics import KIND_ORDER, Series, groups, last_record, series_by_kind
from lmlab.science.results import read_config, read_jsonl

#: At most this many ``samples.jsonl`` records are tabled (alignment runs write one per prompt).
MAX_SAMPLES = 50


def read_json(path: Path) -> tuple[dict, str]:
    """``(object, "")``, or ``({}, why)`` when the file is missing or unreadable (the report still gets written)."""
    if not path.is_file():
        return {}, ""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"{path.name}: not readable JSON ({err.__class__.__name__}); left out"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name}: not a JSON object; left out")


def _line(s: Series, label: str | None = None) -> Line:
    return Line(label or s.key, s.steps, s.values)


def metric_figures(records: list[dict]) -> tuple[list[str], list[dict]]:
    """``(figures, once)``: one figure per (record kind, key group), the training loss first with the eval points;
    ``once`` holds the records of other kinds logged a single time (e.g. SFT's ``data`` counts), for a table."""
    by_kind = series_by_kind(records)
    train, evals = by_kind.get("train", {}), by_kind.get("eval", {})
    out = []
    pairs = ((train.get("loss"), "train"), (evals.get("val_loss"), "validation"))
    loss_lines = [_line(s, label) for s, label in pairs if s is not None]
    if loss_lines:
        names = " and ".join(line.label for line in loss_lines)
        out.append(figure(lines_png(loss_lines, title="loss", xlabel="step"), f"loss: {names} loss against step"))
    once = []
    for kind, series in by_kind.items():
        if kind not in KIND_ORDER and all(len(s.values) == 1 for s in series.values()):
            once.append(last_record(records, kind) or {})
            continue
        for group, members in groups(series).items():
            keys = [s.key for s in members]
            if (kind, keys) in (("train", ["loss"]), ("eval", ["val_loss"])):
                continue  # already drawn in the loss figure
            caption = f"{kind}: {group}" + ("" if keys == [group] else f" ({', '.join(keys)})")
            png = lines_png([_line(s) for s in members], title=f"{kind}: {group}", xlabel="step")
            out.append(figure(png, caption))
    return out, once


def evaluation_body(run_dir: Path, records: list[dict], once: list[dict]) -> str:
    parts = []
    last = last_record(records, "eval")
    if last:
        parts.append(f"<h3>Last evaluation (step {esc(last.get('step'))})</h3>" + table(record_rows(last)))
    last_task = last_record(records, "task_eval")
    if last_task:
        scores, cost = task_rows(last_task)
        parts.append(f"<h3>Task evaluations (step {esc(last_task.get('step'))})</h3>" + table(scores))
        if cost:
            parts.append(table([cost]))
    for path in harness_files(run_dir):
        rows = harness_rows(path)
        body = warning(rows) if isinstance(rows, str) else table(rows)
        parts.append(f"<h3>Harness results: <code>{esc(path.relative_to(run_dir))}</code></h3>" + body)
    for record in once:
        parts.append(f"<h3>Logged once: {esc(record.get('kind'))} (step {esc(record.get('step'))})</h3>")
        parts.append(kv_table({k: v for k, v in record.items() if k not in ("kind", "step")}))
    return "\n".join(parts)


def samples_body(run_dir: Path) -> str:
    parts = []
    text = run_dir / "samples.txt"
    if text.is_file():
        parts.append(f"<pre>{esc(text.read_text(errors='replace'))}</pre>")
    jsonl = run_dir / "samples.jsonl"
    if jsonl.is_file():
        rows = [r for r in read_jsonl(jsonl) if isinstance(r, dict)]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        more = f"<p>First {MAX_SAMPLES} of {len(rows)} samples.</p>" if len(rows) > MAX_SAMPLES else ""
        parts.append(more + table(rows[:MAX_SAMPLES], columns))
    return "\n".join(parts)


def config_body(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    diff = config_diff(read_config(run_dir))
    intro = "<p>Settings that differ from lmlab's defaults (the resolved <code>config.yaml</code>):</p>"
    return (
        intro
        + (table(diff) if diff else "<p>(none: every setting is the default)</p>")
        + f"<details><summary>Full config.yaml</summary><pre>{esc(path.read_text())}</pre></details>"
    )


def run_body(facts: dict) -> str:
    if not facts:
        return ""
    starts = facts.get("starts") or []
    rows = [
        {
            "time": s.get("time"),
            "command": " ".join(map(str, s.get("argv") or [])),
            "world_size": s.get("world_size"),
            "from_checkpoint": s.get("from_checkpoint") or "",
        }
        for s in starts
        if isinstance(s, dict)
    ]
    shown = {k: v for k, v in facts.items() if k not in ("starts", "requested_config")}
    return kv_table(shown) + (f"<h3>Starts ({len(rows)})</h3>" + table(rows) if rows else "")


def run_report(run_dir: Path) -> str:
    """The HTML page for ``run_dir``."""
    summary, bad_summary = read_json(run_dir / "summary.json")
    facts, bad_facts = read_json(run_dir / "run.json")
    env, bad_env = read_json(run_dir / "env.json")
    records = read_jsonl(run_dir / "metrics.jsonl")
    curves, once = metric_figures(records)
    if not curves:
        curves = [f for f in [figure_file(run_dir / "loss.png", "loss curves (loss.png)")] if f]
    status = summary.get("status", "no summary.json")
    kind = facts.get("kind") or summary.get("kind") or "run"
    intro = (
        f"<p>{esc(kind)} run <code>{esc(run_dir.resolve())}</code>; status: "
        f"<b class={'' if status == 'finished' else 'bad'}>{esc(status)}</b></p>"
        + "".join(warning(w) for w in (bad_summary, bad_facts, bad_env) if w)
    )
    sections = [
        Section("summary", "Summary", kv_table(summary) if summary else ""),
        Section("curves", f"Curves ({len(curves)})", figures(curves)),
        Section("evaluation", "Evaluation", evaluation_body(run_dir, records, once)),
        Section("samples", "Samples", samples_body(run_dir)),
        Section("config", "Config", config_body(run_dir)),
        Section("run", "Run", run_body(facts)),
        Section("environment", "Environment", kv_table(env) if env else ""),
    ]
    return page(f"lmlab {kind}: {run_dir.name}", intro, sections)
