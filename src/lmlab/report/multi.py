"""Reports comparing runs: several run directories, or a sweep directory (its runs plus the fits found below it).

Every metric logged by at least two of the runs (by the one run, if there is one) is one figure with a line per run
(legend and caption: the run names), drawn against tokens when every point has a token count, else against steps;
records logged once (SFT's ``data`` counts) are left out.
The results table has ``results.csv``'s columns plus each run's last task-evaluation scores and harness results, and
sorts by any column when its header is clicked.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import UserError
from lmlab.report.evals import harness_files, harness_rows, task_rows
from lmlab.report.figures import Line, lines_png, loss_vs_flops_png
from lmlab.report.fits import find_fits, fit_section
from lmlab.report.html import Section, esc, figure, figures, page, table, wide
from lmlab.report.metrics import KIND_ORDER, Series, last_record, series_by_kind
from lmlab.science.results import BASE_COLUMNS, is_run_dir, read_jsonl, run_row


def display_names(dirs: list[Path]) -> list[str]:
    """Each run's directory name; runs with the same name get as much of their path as tells them apart."""
    parts = [d.resolve().parts for d in dirs]
    depth = [1] * len(dirs)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clash = [i for i, name in enumerate(names) if names.count(name) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def overlay_figures(runs: list[tuple[str, list[dict]]]) -> list[str]:
    """One figure per (record kind, metric) shared by the runs, one line per run."""
    shared: dict[tuple[str, str], list[tuple[str, Series]]] = {}
    for name, records in runs:
        for kind, series in series_by_kind(records).items():
            for key, s in series.items():
                shared.setdefault((kind, key), []).append((name, s))
    out = []
    for (kind, key), members in shared.items():
        if len(members) < min(2, len(runs)):
            continue
        if kind not in KIND_ORDER and all(len(s.values) == 1 for _, s in members):
            continue  # counts logged once (SFT's data record) are not curves
        axis = "tokens" if all(s.has_tokens for _, s in members) else "step"
        lines = [Line(name, s.x(axis), s.values) for name, s in members]
        png = lines_png(lines, title=f"{kind}: {key}", xlabel=axis)
        out.append(figure(png, f"{kind}: {key} ({', '.join(name for name, _ in members)})"))
    return out


def extra_columns(run_dir: Path, records: list[dict]) -> dict:
    """The last task-evaluation scores (``<task>/<metric>``) and harness results (``harness:<task>/<metric>``)."""
    row = {}
    last_task = last_record(records, "task_eval")
    if last_task:
        row.update({f"{r['task']}/{r['metric']}": r["value"] for r in task_rows(last_task)[0]})
    for path in harness_files(run_dir):
        rows = harness_rows(path)
        if not isinstance(rows, str):
            row.update({f"harness:{r['task']}/{r['metric']}": r["value"] for r in rows})
    return row


def comparison_sections(dirs: list[Path]) -> list[Section]:
    """Results table, loss against FLOPs and overlaid curves of ``dirs``."""
    names = display_names(dirs)
    runs, rows = [], []
    for name, run_dir in zip(names, dirs):
        records = read_jsonl(run_dir / "metrics.jsonl")
        runs.append((name, records))
        rows.append({**run_row(run_dir), "run": name, **extra_columns(run_dir, records)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    title = f"Results ({len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")"
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in BASE_COLUMNS))
    columns = [c for c in BASE_COLUMNS if c != "curve"] + sorted(extra)
    results = "<p>Click a column header to sort.</p>" + wide(table(rows, columns, bad_key="status", sortable=True))
    finished = [r for r in rows if r["status"] == "finished"]
    png = loss_vs_flops_png([(r["flops"], r["loss"]) for r in finished])
    if png:
        results += figures([figure(png, "final validation loss against training FLOPs (finished runs)")])
    curves = overlay_figures(runs)
    return [Section("results", title, results), Section("curves", f"Curves ({len(curves)})", figures(curves))]


def runs_report(dirs: list[Path]) -> str:
    """The HTML page comparing the run directories ``dirs``."""
    bad = [str(d) for d in dirs if not is_run_dir(d)]
    if bad:
        raise UserError(f"not a run directory (no config.yaml, summary.json or metrics.jsonl): {', '.join(bad)}")
    intro = "<p>Runs: " + ", ".join(f"<code>{esc(d.resolve())}</code>" for d in dirs) + "</p>"
    return page(f"lmlab: {len(dirs)} runs", intro, comparison_sections(dirs))


def sweep_report(root: Path) -> str:
    """The HTML page of a sweep directory: its runs compared, then every fit below it."""
    run_dirs = [p for p in sorted(root.iterdir()) if is_run_dir(p)]
    fits = find_fits(root)
    if not run_dirs and not fits:
        raise UserError(f"{root}: neither a run directory nor a sweep directory (no run subdirectories, no fit.json)")
    sections = comparison_sections(run_dirs) if run_dirs else []
    if fits:
        sections.append(Section("fits", f"Fits ({len(fits)})", "\n".join(fit_section(f, root) for f in fits)))
    intro = f"<p>Sweep directory: <code>{esc(root.resolve())}</code></p>"
    return page(f"lmlab sweep: {root.name}", intro, sections)
