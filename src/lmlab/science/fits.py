"""``lmlab fit``: fit one law to sweep results and write ``fit.json`` and ``fit.png`` into an output directory.

Inputs (a sweep directory, whose ``results.csv`` is used or rebuilt from its run directories, or a CSV file):

- ``chinchilla``: columns ``params, tokens, loss`` (``flops`` optional, else 6ND; ``status`` and ``run`` optional).
  Writes the §1.2 fit, bootstrap 95% intervals, the fit error and ``N_opt, D_opt`` per ``--compute``; when every
  budget has three or more sizes, Approach 2 (IsoFLOP parabolas) too.
- ``annealing``: a directory of runs or a ``curve, step, lr, loss`` CSV (:mod:`lmlab.science.curves`), §2.
- ``lr-horizon``: columns ``params, tokens, lr, loss``; one LR sweep per (params, tokens); §3.
- ``mixture``: columns ``family, params, tokens, p, loss`` (``p``: the family's sampling ratio); §4.
- ``step-law``: columns ``non_embedding_params, tokens, lr, batch_tokens, loss``; one LR × batch grid per
  (N, D); §27.

Every ``fit.json`` has ``law``, ``input``, ``params``, ``intervals`` (95% bootstrap; empty with ``--bootstrap 0``),
``fit_error``, ``n_points``, ``excluded`` (runs left out and why), ``plot``, and what says how far to trust it
(:mod:`lmlab.science.fit_checks`): ``warnings``, ``leave_one_out`` errors beside a trivial baseline's (per family
for a mixture fit, one curve at a time for an annealing fit) and the ``data_range`` it covers. A Chinchilla fit
adds ``holdout`` errors (``--holdout``) and ``fixed_E``; an annealing fit the curves' ``models``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import UserError
from lmlab.science import plots
from lmlab.science.annealing import MOMENTUM, AnnealingParams, fit_annealing
from lmlab.science.chinchilla import (
    BOOTSTRAP_COLUMNS,
    ChinchillaParams,
    bootstrap_chinchilla_draws,
    chinchilla_loss,
    compute_optimal,
    fit_chinchilla,
    percentile_intervals,
)
from lmlab.science.curves import load_curves
from lmlab.science.fit_checks import (
    annealing_warnings,
    curve_errors,
    error_summary,
    extrapolation_warning,
    fit_warnings,
    leave_one_curve_out,
    leave_one_out_baseline,
    leave_one_out_predictions,
    lr_horizon_warnings,
    lr_leave_one_out,
    mixture_leave_one_out,
    mixture_warnings,
    split_holdout,
    step_law_warnings,
)
from lmlab.science.isoflop import fit_isoflop
from lmlab.science.lr_horizon import fit_lr_horizon, fit_lr_joint, local_lr_vertex, lr_vertex
from lmlab.science.mixture import fit_gamma, optimal_ratios
from lmlab.science.results import column, load_results, require_columns, usable_rows
from lmlab.science.step_law import STEP_LAW, GridOptimum, fit_step_law, grid_optimum, step_law_leave_one_out

FIT_FILE = "fit.json"
MAX_DRAWS_SAVED = 500  # bootstrap refits kept in fit.json for the report's bands
PLOT_FILE = "fit.png"


def write_fit(out: Path, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / FIT_FILE
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def read_fit(fit_dir: str | Path) -> dict[str, Any]:
    """The ``fit.json`` of a fit directory (or the file itself)."""
    p = Path(fit_dir)
    path = p / FIT_FILE if p.is_dir() else p
    if not path.is_file():
        raise UserError(f"no {FIT_FILE} in {p}; run 'lmlab fit ... --out {p}' first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


# --------------------------------------------------------------------------- chinchilla


def fit_chinchilla_command(
    source: str,
    out: Path,
    *,
    computes: list[float],
    bootstrap: int,
    seed: int = 42,
    grid: str = "default",
    params_column: str = "params",
    method: str = "batched",
    holdout: Sequence[str] = (),
    fixed_E: float | None = None,
    loss_column: str = "loss",
) -> dict[str, Any]:
    """``params_column`` picks N: ``params`` (total, Chinchilla's convention) or ``non_embedding_params`` (Kaplan's).

    ``holdout`` (run names, or ``["top:K"]``) leaves runs out of the fit and reports the law's error on them beside
    the trivial baseline's; every fit also reports its leave-one-out error (:mod:`lmlab.science.fit_checks`).
    ``fixed_E`` holds E at a known floor; ``loss_column`` picks the loss (``loss``, the final validation loss, or
    e.g. ``val_loss_docs``, the loss on whole documents of a world with an exact floor)."""
    from lmlab.science.chinchilla import small_grid

    rows = load_results(source)
    require_columns(rows, [params_column, "tokens", loss_column], source)
    rows = [{**r, "params": r[params_column], "loss": r[loss_column]} for r in rows]
    sel = usable_rows(rows, ["params", "tokens", "loss"])
    split = split_holdout(sel.rows, list(holdout))
    if len(split.fitted) < 6:
        left_out = ", ".join(f"{k} ({v})" for k, v in sel.excluded.items()) or "none"
        raise UserError(
            f"{source}: a Chinchilla fit needs at least 6 finished runs, got {len(split.fitted)} (excluded: "
            f"{left_out}; held out: {len(split.held_out)})"
        )
    n, d, loss, flops = _chinchilla_columns(split.fitted)
    fit = fit_chinchilla(n, d, loss, grid=small_grid() if grid == "small" else None, method=method, fixed_E=fixed_E)
    draws = (
        bootstrap_chinchilla_draws(n, d, loss, fit, n_resamples=bootstrap, seed=seed, fixed_E=fixed_E)
        if bootstrap > 0
        else None
    )
    loo = error_summary(leave_one_out_predictions(n, d, loss, fit, fixed_E=fixed_E), leave_one_out_baseline(loss), loss)
    held: dict[str, Any] | None = None
    if split.held_out:
        hn, hd, hloss, _ = _chinchilla_columns(split.held_out)
        predicted = chinchilla_loss(hn, hd, fit.params)
        held = error_summary(predicted, np.full(len(hloss), np.min(loss)), hloss)
        held["runs"] = [
            {"run": r.get("run"), "loss": float(a), "predicted": float(p), "rel_error": float(abs(p - a) / a)}
            for r, a, p in zip(split.held_out, hloss, predicted)
        ]
    intervals = percentile_intervals(draws, list(BOOTSTRAP_COLUMNS)) if draws is not None else {}
    isoflop = None
    try:
        isoflop = fit_isoflop(n, flops, loss)
    except UserError:
        isoflop = None
    allocation = []
    for c in computes:
        n_opt, d_opt = compute_optimal(c, fit.params)
        allocation.append(
            {
                "compute": c,
                "N_opt": float(n_opt),
                "D_opt": float(d_opt),
                "tokens_per_param": float(d_opt / n_opt),
                "loss": float(chinchilla_loss(n_opt, d_opt, fit.params)),
                **({"N_opt_isoflop": float(isoflop.n_opt(c))} if isoflop else {}),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_chinchilla(out / PLOT_FILE, n, d, loss, flops, fit.params, isoflop)
    result = {
        "law": "chinchilla",
        "input": str(source),
        "params": fit.params.to_dict(),
        "a_opt": fit.params.a_opt,
        "b_opt": fit.params.b_opt,
        "intervals": intervals,
        "bootstrap_resamples": bootstrap,
        # the refits themselves, so a report can draw the fitted curve's band (not only per-parameter intervals)
        "bootstrap_params": [
            dict(zip(BOOTSTRAP_COLUMNS[:5], map(float, row[:5]))) for row in (draws if draws is not None else [])
        ][:MAX_DRAWS_SAVED],
        "warnings": chinchilla_warnings(fit.params.to_dict(), intervals, sel, flops, computes)
        + fit_warnings(fit.params.to_dict(), intervals, n, flops, loss, fixed_E=fixed_E, loo=loo, holdout=held),
        "leave_one_out": loo,
        "holdout": held,
        "fixed_E": fixed_E,
        "data_range": data_range({"params": n, "tokens": d, "flops": flops, "loss": loss}),  # of the fitted runs
        "fit_error": {"huber_objective": fit.objective, "rmse": fit.rmse},
        "n_points": fit.n_points,
        "n_starts": fit.n_starts,
        "compute_optimal": allocation,
        "isoflop": isoflop.to_dict() if isoflop else None,
        "params_column": params_column,
        "loss_column": loss_column,
        "method": method,
        "n_excluded": len(sel.excluded),
        "excluded": sel.excluded,
        "plot": PLOT_FILE,
    }
    write_fit(out, result)
    return result


def _chinchilla_columns(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """N, D, loss and compute (``flops``, else 6ND) of usable rows."""
    n, d, loss = column(rows, "params"), column(rows, "tokens"), column(rows, "loss")
    flops = column(rows, "flops") if rows and "flops" in rows[0] else np.full(len(n), np.nan)
    return n, d, loss, np.where(np.isfinite(flops), flops, 6.0 * n * d)


def chinchilla_warnings(params: dict, intervals: dict, sel, flops: np.ndarray, computes: list[float]) -> list[str]:
    """What a reader of a Chinchilla fit should be told before trusting it: few points, runs left out, exponents the
    bootstrap cannot pin down, and predictions far beyond the largest run."""
    out = []
    if len(sel.rows) < 10:
        out.append(f"only {len(sel.rows)} runs: the five parameters are weakly constrained (Chinchilla used ~400)")
    if sel.excluded:
        out.append(f"{len(sel.excluded)} run(s) left out of the fit: " + ", ".join(sorted(sel.excluded)))
    for name in ("alpha", "beta"):
        lo_hi = intervals.get(name)
        if lo_hi and params.get(name) and (lo_hi[1] - lo_hi[0]) > 0.5 * abs(params[name]):
            out.append(
                f"{name}={params[name]:.3g} has a 95% interval {lo_hi[0]:.3g}–{lo_hi[1]:.3g}: wider than half its value"
            )
    largest = float(np.nanmax(flops)) if len(flops) else 0.0
    out += [w for w in (extrapolation_warning(c, largest) for c in computes) if w]
    return out


# --------------------------------------------------------------------------- annealing


def fit_annealing_command(
    source: str,
    out: Path,
    *,
    bootstrap: int,
    seed: int = 42,
    lam: float = MOMENTUM,
    holdout: Sequence[str] = (),
    metric: str = "val_loss",
) -> dict[str, Any]:
    """``holdout`` names curves left out of the fit and predicted from it (beside the trivial baseline); ``metric``
    is the eval record's loss read from run directories (e.g. ``val_loss_docs``)."""
    curves, excluded = load_curves(source, metric=metric)
    unknown = [h for h in holdout if h not in {c.name for c in curves}]
    if unknown:
        raise UserError(
            f"--holdout: no usable curve named {', '.join(unknown)} (curves: {', '.join(c.name for c in curves)})"
        )
    held_out = [c for c in curves if c.name in holdout]
    curves = [c for c in curves if c.name not in holdout]
    if not curves:
        raise UserError("--holdout leaves no curve to fit")
    fit = fit_annealing(curves, lam=lam)
    intervals: dict = {}
    samples: list[list[float]] = []
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        start = np.array([[fit.params.L0, fit.params.A, fit.params.C, fit.params.alpha]])
        for _ in range(bootstrap):
            resampled = []
            for c in curves:
                idx = rng.integers(0, len(c.steps), len(c.steps))
                resampled.append(type(c)(c.name, c.lrs, c.steps[idx], c.losses[idx], c.warmup_steps))
            try:
                p = fit_annealing(resampled, lam=lam, grid=start).params
            except UserError:
                continue
            samples.append([p.L0, p.A, p.C, p.alpha])
        intervals = percentile_intervals(np.array(samples), ["L0", "A", "C", "alpha"])
    predicted = {c.name: fit.params.predict(c.lrs, c.warmup_steps, lam) for c in curves}
    loo = leave_one_curve_out(curves, fit.params, lam)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_annealing(out / PLOT_FILE, curves, fit.params, predicted)
    result = {
        "law": "annealing",
        "input": str(source),
        "params": fit.params.to_dict(),
        "momentum": lam,
        "intervals": intervals,
        # the refits themselves, so `lmlab predict curve` can give a prediction interval
        "bootstrap_params": [dict(zip(("L0", "A", "C", "alpha"), map(float, x))) for x in samples][:MAX_DRAWS_SAVED],
        "bootstrap_resamples": bootstrap,
        "fit_error": {"huber_objective": fit.objective, "max_abs_error": fit.max_abs_error},
        "leave_one_out": loo,
        "holdout": curve_errors(fit.params, held_out, curves, lam) if held_out else None,
        "warnings": annealing_warnings(fit.params.to_dict(), intervals, curves, loo),
        "n_points": fit.n_points,
        "curves": [c.name for c in curves],
        "models": {c.name: c.model for c in curves if c.model},
        "data_range": data_range(
            {"steps": np.concatenate([c.steps for c in curves]), "loss": np.concatenate([c.losses for c in curves])}
        ),
        "n_excluded": len(excluded),
        "excluded": excluded,
        "plot": PLOT_FILE,
    }
    write_fit(out, result)
    return result


# --------------------------------------------------------------------------- LR horizon


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(float(r[k]) for k in keys), []).append(r)
    return out


def fit_lr_horizon_command(
    source: str, out: Path, *, bootstrap: int, seed: int = 42, loss_column: str = "loss", vertex: str = "local"
) -> dict[str, Any]:
    """``vertex``: ``local`` (a parabola through the five LRs around the best, with its interval) or ``global``
    (through the whole sweep)."""
    find_vertex = local_lr_vertex if vertex == "local" else lr_vertex
    rows = load_results(source)
    require_columns(rows, ["params", "tokens", "lr", loss_column], source)
    rows = [{**r, "loss": r[loss_column]} for r in rows]
    # Diverged runs are part of an LR sweep's story but carry no loss: they are excluded from the parabola.
    sel = usable_rows(rows, ["params", "tokens", "lr", "loss"])
    groups = _groups(sel.rows, ("params", "tokens"))
    vertices, plot_groups = [], []
    for (n, d), items in sorted(groups.items()):
        lrs = [r["lr"] for r in items]
        losses = [r["loss"] for r in items]
        try:
            v = find_vertex(lrs, losses)
        except UserError as err:
            raise UserError(f"{source}: LR sweep at params={n:.4g}, tokens={d:.4g}: {err}") from None
        vertices.append(
            {"params": n, "tokens": d, "lr_opt": v.lr_opt, "loss_opt": v.loss_opt, "inside": v.inside,
             "lr_interval": list(v.interval) if v.interval else None}
        )  # fmt: skip
        plot_groups.append({"label": f"N={n:.3g} D={d:.3g}", "lrs": lrs, "losses": losses, "vertex": v})
    per_size: dict[str, Any] = {}
    for n in sorted({v["params"] for v in vertices}):
        vs = [v for v in vertices if v["params"] == n]
        if len({v["tokens"] for v in vs}) >= 2:
            per_size[f"{n:.6g}"] = fit_lr_horizon([v["tokens"] for v in vs], [v["lr_opt"] for v in vs]).to_dict()
    joint = None
    if len({v["params"] for v in vertices}) >= 2 and len({v["tokens"] for v in vertices}) >= 2:
        joint = fit_lr_joint(
            [v["params"] for v in vertices], [v["tokens"] for v in vertices], [v["lr_opt"] for v in vertices]
        ).to_dict()
    if not per_size and joint is None:
        raise UserError(f"{source}: fitting LR*(D) needs LR sweeps at two or more token horizons for one model size")
    intervals: dict = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            try:
                vs = []
                for (n, d), items in groups.items():
                    idx = rng.integers(0, len(items), len(items))
                    vs.append(
                        (n, d, find_vertex([items[i]["lr"] for i in idx], [items[i]["loss"] for i in idx]).lr_opt)
                    )
                ns, ds, lr = zip(*vs)
                if joint is not None:
                    j = fit_lr_joint(ns, ds, lr)
                    samples.append([j.alpha, j.beta])
                else:
                    samples.append([fit_lr_horizon(ds, lr).beta])
            except UserError:  # a resample whose parabola has no minimum
                continue
        names = ["alpha", "beta"] if joint is not None else ["beta"]
        intervals = percentile_intervals(np.array(samples), names)
    loo = lr_leave_one_out(vertices, joint=joint is not None)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_lr_sweeps(out / PLOT_FILE, plot_groups)
    result = {
        "law": "lr-horizon",
        "input": str(source),
        "params": {"per_size": per_size, "joint": joint},
        "vertex": vertex,
        "vertices": vertices,
        "intervals": intervals,
        "bootstrap_resamples": bootstrap,
        "fit_error": {
            "rmse_log": (joint or next(iter(per_size.values())))["rmse_log"],
        },
        "leave_one_out": loo,
        "warnings": lr_horizon_warnings(vertices, intervals, loo),
        "data_range": data_range({c: column(sel.rows, c) for c in ("params", "tokens", "lr", "loss")}),
        **rows_used(sel),
    }
    write_fit(out, result)
    return result


# --------------------------------------------------------------------------- Step Law


def fit_step_law_command(
    source: str,
    out: Path,
    *,
    bootstrap: int,
    seed: int = 42,
    params_column: str = "non_embedding_params",
    loss_column: str = "loss",
) -> dict[str, Any]:
    """Grid optima per (N, D) from an LR × batch sweep, then the Step Law constants (docs/science.md §27)."""
    columns = [params_column, "tokens", "lr", "batch_tokens", "loss"]
    rows = load_results(source)
    require_columns(rows, [*columns[:-1], loss_column], source)
    rows = [{**r, "loss": r[loss_column]} for r in rows]
    sel = usable_rows(rows, columns)
    groups = _groups(sel.rows, (params_column, "tokens"))

    def optima_of(grouped: dict[tuple, list[dict]]) -> list[GridOptimum]:
        found = []
        for (n, d), items in sorted(grouped.items()):
            try:
                found.append(grid_optimum(n, d, *(column(items, c) for c in ("lr", "batch_tokens", "loss"))))
            except UserError as err:
                raise UserError(f"{source}: grid at {params_column}={n:.4g}, tokens={d:.4g}: {err}") from None
        return found

    optima = optima_of(groups)
    law = fit_step_law(optima)
    intervals: dict = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            resampled = {k: [v[i] for i in rng.integers(0, len(v), len(v))] for k, v in groups.items()}
            try:
                refit = fit_step_law(optima_of(resampled))
            except UserError:  # a resample with fewer than 3 distinct LRs or batches
                continue
            draws.append([refit.lr_n, refit.lr_d, refit.batch_d])
        intervals = percentile_intervals(np.array(draws), ["lr_n", "lr_d", "batch_d"]) if draws else {}
    loo = step_law_leave_one_out(optima)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_step_law(out / PLOT_FILE, optima, law)
    result = {
        "law": "step-law",
        "input": str(source),
        "params": law.to_dict(),
        "paper_params": STEP_LAW.to_dict(),
        "params_column": params_column,
        "optima": [vars(o) for o in optima],
        "intervals": intervals,
        "bootstrap_resamples": bootstrap,
        "leave_one_out": loo,
        "warnings": step_law_warnings(optima, intervals, loo),
        "data_range": data_range({c: column(sel.rows, c) for c in columns}),
        **rows_used(sel),
    }
    write_fit(out, result)
    return result


# --------------------------------------------------------------------------- mixture


def fit_mixture_command(source: str, out: Path, *, weights: list[float] | None = None) -> dict[str, Any]:
    rows = load_results(source)
    require_columns(rows, ["family", "params", "tokens", "p", "loss"], source)
    numeric = ["params", "tokens", "p", "loss"]
    sel = usable_rows(rows, numeric)
    families = sorted({r["family"] for r in sel.rows})
    if len(families) < 1:
        raise UserError(f"{source}: no usable rows")
    per_family, plot_families = {}, []
    for fam in families:
        items = [r for r in sel.rows if r["family"] == fam]
        g = fit_gamma(column(items, "params"), column(items, "tokens"), column(items, "p"), column(items, "loss"))
        per_family[fam] = {"gamma": g.gamma, "rmse_log": g.rmse_log}
        per_family[fam]["leave_one_out"] = mixture_leave_one_out(
            column(items, "params"), column(items, "tokens"), column(items, "p"), column(items, "loss")
        )
        key = next(iter(g.intercepts))
        first = [r for r in items if (r["params"], r["tokens"]) == key]
        plot_families.append(
            {
                "name": fam,
                "p": [r["p"] for r in first],
                "loss": [r["loss"] for r in first],
                "gamma": g.gamma,
                "scale": math.exp(g.intercepts[key]),
            }
        )
    gammas = [per_family[f]["gamma"] for f in families]
    w = weights if weights is not None else [1.0] * len(families)
    if len(w) != len(families):
        raise UserError(f"--weights needs {len(families)} values (families: {', '.join(families)}), got {len(w)}")
    ratios = None
    if all(g > 0 for g in gammas):
        ratios = dict(zip(families, optimal_ratios(gammas, w).tolist()))
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_mixture(out / PLOT_FILE, plot_families)
    result = {
        "law": "mixture",
        "input": str(source),
        "params": per_family,
        "optimal_ratios_normalised": ratios,
        "weights": dict(zip(families, w)),
        "intervals": {},
        "fit_error": {"rmse_log": max(v["rmse_log"] for v in per_family.values())},
        "data_range": data_range({c: column(sel.rows, c) for c in ("params", "tokens", "p", "loss")}),
        "warnings": mixture_warnings(
            per_family, {f: len({r["p"] for r in sel.rows if r["family"] == f}) for f in families}
        ),
        **rows_used(sel),
    }
    write_fit(out, result)
    return result


def rows_used(sel) -> dict[str, Any]:
    """The ``fit.json`` entries on the rows a fit used (``n_points``) and left out (``excluded``, with reasons)."""
    return {"n_points": len(sel.rows), "n_excluded": len(sel.excluded), "excluded": sel.excluded, "plot": PLOT_FILE}


def data_range(values: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """``{name: [min, max]}`` of the fitted data: the region where the law was fitted."""
    return {name: [float(np.min(v)), float(np.max(v))] for name, v in values.items()}


def params_of(fit: dict[str, Any]) -> ChinchillaParams | AnnealingParams:
    """The fitted law of a ``fit.json`` (chinchilla or annealing)."""
    if fit.get("law") == "chinchilla":
        return ChinchillaParams.from_dict(fit["params"])
    if fit.get("law") == "annealing":
        return AnnealingParams.from_dict(fit["params"])
    raise UserError(f"fit.json holds a {fit.get('law')!r} fit; predictions need a chinchilla or annealing fit")
