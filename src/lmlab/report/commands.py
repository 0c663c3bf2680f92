"""``lmlab report DIR``: write ``DIR/report.html`` for a run directory or a sweep directory.

- A **run directory** (``config.yaml`` / ``summary.json`` / ``metrics.jsonl``, docs/CONTRACTS.md): the summary as a
  table, the loss curves (``loss.png`` if the run wrote one, else a plot drawn from ``metrics.jsonl``), the last
  eval's per-source losses, ``samples.txt`` and the resolved config.
- A **sweep directory** (run directories as subdirectories): the results table (``results.csv`` columns, one row per
  run; unfinished or diverged runs in red), final loss against FLOPs, and every fit found below it (a directory
  holding ``fit.json``, e.g. made by ``lmlab fit ... --out DIR/fit-chinchilla``) with its plot and parameters.

Images are embedded (base64), so ``report.html`` is self-contained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.errors import UserError
from lmlab.report.html import esc, fmt, image_bytes, image_file, page, table
from lmlab.science.results import BASE_COLUMNS, collect_results, is_run_dir, read_jsonl, read_summary


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab report", description="Write an HTML report for a run or a sweep.")
    p.add_argument("dir", help="a run directory or a sweep directory")
    p.add_argument("--out", help="output file (default DIR/report.html)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"not a directory: {root}")
    text = run_report(root) if is_single_run(root) else sweep_report(root)
    out = Path(args.out) if args.out else root / "report.html"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def is_single_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "summary.json").is_file()


# --------------------------------------------------------------------------- run


def _loss_plot_from_metrics(records: list[dict]) -> bytes | None:
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    if not train and not evals:
        return None
    from lmlab.report.html import figure_png
    from lmlab.science.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=1, label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def run_report(run_dir: Path) -> str:
    summary = read_summary(run_dir) or {}
    records = read_jsonl(run_dir / "metrics.jsonl")
    sections = []
    status = summary.get("status", "no summary.json")
    sections.append(f"<p>Run directory: <code>{esc(run_dir.resolve())}</code>; status: <b>{esc(status)}</b></p>")
    if summary:
        sections.append("<h2>Summary</h2>" + table([{"key": k, "value": v} for k, v in summary.items()]))
    img = image_file(run_dir / "loss.png", "loss curves")
    if not img:
        png = _loss_plot_from_metrics(records)
        img = image_bytes(png, "loss curves") if png else ""
    if img:
        sections.append("<h2>Loss</h2>" + img)
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals:
        last = evals[-1]
        per_source = [
            {"source": k.split("/", 1)[1], "val_loss": v} for k, v in last.items() if k.startswith("val_loss/")
        ]
        if per_source:
            sections.append(f"<h2>Validation loss by source (step {esc(last.get('step'))})</h2>" + table(per_source))
    samples = run_dir / "samples.txt"
    if samples.is_file():
        sections.append(f"<h2>Samples</h2><pre>{esc(samples.read_text())}</pre>")
    config = run_dir / "config.yaml"
    if config.is_file():
        sections.append(f"<h2>Config</h2><pre>{esc(config.read_text())}</pre>")
    return page(f"lmlab run: {run_dir.name}", sections)


# --------------------------------------------------------------------------- sweep


def find_fits(root: Path, depth: int = 2) -> list[Path]:
    """Directories holding a ``fit.json`` at most ``depth`` levels below ``root`` (``root`` included)."""
    found = []
    frontier = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            if (d / "fit.json").is_file():
                found.append(d)
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir()] if d.is_dir() else []
        frontier = nxt
    return found


def _fit_section(fit_dir: Path, root: Path) -> str:
    try:
        fit = json.loads((fit_dir / "fit.json").read_text())
    except json.JSONDecodeError:
        return f"<p class=bad>{esc(fit_dir / 'fit.json')}: not valid JSON</p>"
    params = fit.get("params", {})
    flat = [{"parameter": k, "value": v} for k, v in params.items() if not isinstance(v, dict | list | None)]
    intervals = fit.get("intervals") or {}
    for row in flat:
        lo_hi = intervals.get(row["parameter"])
        row["95% interval"] = f"{fmt(lo_hi[0])} – {fmt(lo_hi[1])}" if lo_hi else ""
    parts = [f"<h3>{esc(fit.get('law', 'fit'))} fit: <code>{esc(fit_dir.relative_to(root) or '.')}</code></h3>"]
    if flat:
        parts.append(table(flat))
    else:
        parts.append(f"<pre>{esc(json.dumps(params, indent=1))}</pre>")
    if fit.get("compute_optimal"):
        parts.append(table(fit["compute_optimal"]))
    if fit.get("excluded"):
        parts.append("<p>Excluded: " + esc(", ".join(f"{k} ({v})" for k, v in fit["excluded"].items())) + "</p>")
    parts.append(image_file(fit_dir / str(fit.get("plot", "fit.png")), f"{fit.get('law')} fit"))
    return "\n".join(parts)


def _loss_vs_flops(rows: list[dict]) -> bytes | None:
    pts = [
        (r["flops"], r["loss"]) for r in rows if isinstance(r.get("flops"), float) and isinstance(r.get("loss"), float)
    ]
    pts = [(f, loss) for f, loss in pts if f == f and loss == loss and f > 0]
    if not pts:
        return None
    from lmlab.report.html import figure_png
    from lmlab.science.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(*zip(*pts), s=16)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss")
    fig.tight_layout()
    return figure_png(fig)


def sweep_report(root: Path) -> str:
    has_runs = any(is_run_dir(p) for p in root.iterdir())
    fits = find_fits(root)
    if not has_runs and not fits:
        raise UserError(f"{root}: neither a run directory nor a sweep directory (no run subdirectories, no fit.json)")
    sections = [f"<p>Sweep directory: <code>{esc(root.resolve())}</code></p>"]
    if has_runs:
        rows = collect_results(root)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        sections.append(
            f"<h2>Results ({len(rows)} runs: "
            + esc(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
            + ")</h2>"
        )
        extra = sorted({k for r in rows for k in r if k not in BASE_COLUMNS})
        sections.append(table(rows, [c for c in BASE_COLUMNS if c != "curve"] + extra, bad_key="status"))
        png = _loss_vs_flops([r for r in rows if r["status"] == "finished"])
        if png:
            sections.append(image_bytes(png, "loss vs FLOPs"))
    if fits:
        sections.append("<h2>Fits</h2>")
        sections += [_fit_section(f, root) for f in fits]
    return page(f"lmlab sweep: {root.name}", sections)
