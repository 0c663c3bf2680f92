"""Fits found in a sweep directory (``fit.json`` from ``lmlab fit``): parameters with their intervals, warnings, plots.

Intervals are what make a fit a claim, so they sit beside each parameter, and a fit without them (``--bootstrap 0``)
or with ``warnings`` says so in a highlighted box. A Chinchilla fit whose ``fit.json`` carries its bootstrap
parameter draws (``bootstrap_params``: ``[{E, A, B, alpha, beta}, ...]``) is also drawn as the compute-optimal loss
``L(N_opt(C), D_opt(C))`` with its pointwise 95% band over the runs; otherwise the fit's own ``fit.png`` is the figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.report.figures import band_png
from lmlab.report.flat import flatten
from lmlab.report.html import esc, figure, figure_file, fmt, table, warning
from lmlab.science.chinchilla import ChinchillaParams, chinchilla_loss, compute_optimal
from lmlab.science.results import load_results, usable_rows


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


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _interval(value) -> str:
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{fmt(value[0])} – {fmt(value[1])}"
    return ""


def param_rows(fit: dict) -> list[dict]:
    """``{parameter, value, 95% interval}`` for every (flattened) parameter, then derived quantities (``a_opt``)."""
    intervals = fit.get("intervals") or {}
    values = flatten(fit.get("params") or {})
    for key in [*intervals, "a_opt", "b_opt"]:
        if key in intervals or key in fit:
            values.setdefault(key, fit.get(key, ""))
    return [{"parameter": k, "value": v, "95% interval": _interval(intervals.get(k))} for k, v in values.items()]


def warnings_of(fit: dict) -> list[str]:
    """The fit's own ``warnings`` and a note when it has no intervals."""
    raw = fit.get("warnings") or []
    found = [raw] if isinstance(raw, str) else [str(w) for w in raw]
    if not fit.get("intervals"):
        found.append(
            "no confidence intervals: this fit ran without a bootstrap (--bootstrap 0); treat it as a point estimate"
        )
    return found


def fit_points(fit: dict, fit_dir: Path) -> list[tuple[float, float]]:
    """``(FLOPs, loss)`` of the finished runs the fit read, when its input can still be found."""
    source = fit.get("input")
    if not source:
        return []
    # A relative input was relative to where ``lmlab fit`` ran; the fit usually sits in (or beside) its sweep.
    name = Path(source).name
    candidates = [Path(source), fit_dir.parent / name] + ([fit_dir.parent] if fit_dir.parent.name == name else [])
    for candidate in candidates:
        if candidate.exists():
            try:
                rows = usable_rows(load_results(candidate), ["params", "tokens", "loss"]).rows
            except (UserError, OSError, KeyError, ValueError):
                return []
            out = []
            for r in rows:
                flops = _float(r.get("flops"))
                out.append((flops if math.isfinite(flops) else 6.0 * r["params"] * r["tokens"], r["loss"]))
            return out
    return []


def frontier_band(
    params: ChinchillaParams, draws: list[ChinchillaParams], computes: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centre, lo, hi)``: the compute-optimal loss ``L(N_opt(C), D_opt(C))`` of ``params`` and the pointwise
    ``level`` percentile band of the same curve over the bootstrap ``draws``."""

    def frontier(p: ChinchillaParams) -> np.ndarray:
        return chinchilla_loss(*compute_optimal(computes, p), p)

    curves = np.array([frontier(p) for p in draws])
    q = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(curves, [q, 100.0 - q], axis=0)
    return frontier(params), lo, hi


def chinchilla_band(fit: dict, fit_dir: Path) -> bytes | None:
    """The compute-optimal loss with its band over the runs; ``None`` without two or more bootstrap draws."""
    try:
        params = ChinchillaParams.from_dict(fit.get("params") or {})
        draws = [ChinchillaParams.from_dict(d) for d in fit.get("bootstrap_params") or []]
    except (UserError, TypeError, ValueError):
        return None
    if len(draws) < 2:
        return None
    points = fit_points(fit, fit_dir)
    computes = [p[0] for p in points] + [float(c["compute"]) for c in fit.get("compute_optimal") or []]
    lo_c, hi_c = (min(computes), max(computes)) if computes else (1e15, 1e23)
    c = np.geomspace(lo_c / 2, hi_c * 2, 120)
    centre, lo, hi = frontier_band(params, draws, c)
    return band_png(
        c,
        centre,
        lo,
        hi,
        points=points,
        title=f"Chinchilla fit: compute-optimal loss ({len(draws)} bootstrap draws)",
        xlabel="training FLOPs",
        ylabel="loss",
        label="fitted L(N_opt(C), D_opt(C))",
        band_label="95% bootstrap band (pointwise)",
    )


def fit_section(fit_dir: Path, root: Path) -> str:
    """One fit: heading, warnings, parameters with intervals, fit error, exclusions, compute-optimal table, figures."""
    try:
        fit = json.loads((fit_dir / "fit.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return warning(f"{fit_dir / 'fit.json'}: not valid JSON")
    law = str(fit.get("law", "fit"))
    where = fit_dir.relative_to(root) if fit_dir.is_relative_to(root) else fit_dir
    parts = [f"<h3>{esc(law)} fit: <code>{esc(where)}</code></h3>"]
    parts += [warning(f"Warning: {w}") for w in warnings_of(fit)]
    parts.append(table(param_rows(fit)))
    facts = {k: fit[k] for k in ("n_points", "n_excluded", "bootstrap_resamples") if k in fit}
    facts.update({f"fit_error.{k}": v for k, v in (fit.get("fit_error") or {}).items()})
    if facts:
        parts.append(table([facts]))
    checks = [
        {"check": name, **{k: v for k, v in (fit.get(key) or {}).items() if isinstance(v, (int, float))}}
        for key, name in (("leave_one_out", "leave-one-out"), ("holdout", "held-out runs"))
        if (fit.get(key) or {}).get("n")
    ]
    if checks:  # errors on runs the fit did not see, beside the trivial baseline's (lmlab.science.fit_checks)
        parts.append("<h4>Errors on unseen runs</h4>" + table(checks))
    if fit.get("excluded"):
        parts.append("<p>Excluded: " + esc(", ".join(f"{k} ({v})" for k, v in fit["excluded"].items())) + "</p>")
    if fit.get("compute_optimal"):
        parts.append("<h4>Compute-optimal allocation</h4>" + table(fit["compute_optimal"]))
    shown = []
    band = chinchilla_band(fit, fit_dir) if law == "chinchilla" else None
    if band:
        shown.append(figure(band, f"{law} fit: fitted compute-optimal loss with its 95% bootstrap band"))
    shown.append(figure_file(fit_dir / str(fit.get("plot", "fit.png")), f"{law} fit: {fit.get('plot', 'fit.png')}"))
    parts.append('<div class="figures">' + "".join(shown) + "</div>")
    return "\n".join(parts)
