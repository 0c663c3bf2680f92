"""How far to trust a fit: errors on runs the fit did not see, beside a trivial baseline, and warnings.

A law is worth its five parameters only if it predicts runs it was not fitted on better than doing nothing clever.
Here, for a fit of ``L(N, D) = E + A/N^α + B/D^β`` (docs/science.md §1):

- **leave-one-out**: each run's loss predicted by the law refitted without it (all refits batched, each from the
  full-data optimum, as the bootstrap does);
- **held-out**: runs left out of the fit altogether (``--holdout``: names, or ``top:K`` = the K largest by compute);
- the **trivial baseline** for both: predict the lowest loss among the runs the fit saw (a law that cannot beat
  it on the largest runs has learned nothing about scale);
- **warnings** for what a reader must know before trusting the numbers: E at its lower bound (no floor found),
  exponents near 0, intervals spanning more than 10×, fewer than 3 model sizes or compute budgets, and
  predictions beyond 10× the largest run's compute.

For an annealing fit (§2): leave-one-curve-out error beside the baseline "the schedule does not matter" (the other
curves' mean loss at each step), and warnings for constants at their bound, loose intervals, curves of different
models, and a single curve. For an LR-horizon fit (§3): leave-one-sweep-out error of LR* beside a constant LR*, and
warnings for vertices outside their sweeps, fewer than 3 horizons and exponents whose interval includes 0. For a
mixture fit (§4): per family, leave-one-out error beside "the sampling ratio does not matter", γ ≤ 0 and fewer
than 3 ratios.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmlab.errors import UserError
from lmlab.science.annealing import AnnealingParams, Curve, fit_annealing
from lmlab.science.chinchilla import (
    ChinchillaFit,
    ChinchillaParams,
    chinchilla_loss,
    params_from_raw,
    refit_weighted,
)
from lmlab.science.huber import HUBER_DELTA
from lmlab.science.lr_horizon import fit_lr_horizon, fit_lr_joint
from lmlab.science.mixture import fit_gamma

#: E below this fraction of the lowest observed loss is "at its lower bound": the fit found no floor.
E_FLOOR_FRACTION = 1e-3
#: A predicted compute more than this many times the largest run's is an extrapolation worth a warning.
EXTRAPOLATION_FACTOR = 10.0
#: An interval whose upper end is more than this many times its lower end pins nothing down.
INTERVAL_SPAN = 10.0


def relative_errors(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``|predicted − actual| / actual`` per run."""
    return np.abs(np.asarray(predicted, dtype=float) - actual) / actual


def error_summary(predicted: np.ndarray, baseline: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Mean and max relative error of the law and of the trivial baseline on the same runs (nan rows skipped)."""
    ok = np.isfinite(predicted)
    law, base = relative_errors(predicted[ok], actual[ok]), relative_errors(baseline[ok], actual[ok])
    if not ok.any():
        return {"n": 0}
    return {
        "n": int(ok.sum()),
        "mean_rel_error": float(law.mean()),
        "max_rel_error": float(law.max()),
        "baseline_mean_rel_error": float(base.mean()),
        "baseline_max_rel_error": float(base.max()),
    }


def leave_one_out_predictions(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, fit: ChinchillaFit, *, fixed_E: float | None = None,
    delta: float = HUBER_DELTA,
) -> np.ndarray:  # fmt: skip
    """Each run's loss predicted by the law refitted on the other runs (nan where those leave one model size or
    one token count: the law cannot be fitted)."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    ends, fs = refit_weighted(n, d, loss, fit, 1.0 - np.eye(len(n)), fixed_E=fixed_E, delta=delta)
    out = np.full(len(n), np.nan)
    for i, (x, f) in enumerate(zip(ends, fs)):
        others = np.arange(len(n)) != i
        if np.isfinite(f) and len(np.unique(n[others])) >= 2 and len(np.unique(d[others])) >= 2:
            out[i] = float(chinchilla_loss(n[i], d[i], params_from_raw(x)))
    return out


def leave_one_out_baseline(loss: np.ndarray) -> np.ndarray:
    """The trivial prediction for each run when it is left out: the lowest loss among the others."""
    loss = np.asarray(loss, dtype=float)
    return np.array([np.min(np.delete(loss, i)) for i in range(len(loss))])


@dataclass(frozen=True)
class HoldoutSplit:
    fitted: list[dict]
    held_out: list[dict]


def split_holdout(rows: list[dict], spec: Sequence[str], flops_key: str = "flops") -> HoldoutSplit:
    """Rows to fit and rows to hold out: ``spec`` names runs, or is ``["top:K"]``, the K runs of largest compute
    (``flops``, else 6·N·D)."""
    if not spec:
        return HoldoutSplit(list(rows), [])

    def compute(r: dict) -> float:
        try:
            c = float(r.get(flops_key))  # type: ignore[arg-type]
        except (TypeError, ValueError):  # missing or not a number: 6ND, as the fit itself counts it
            c = float("nan")
        return c if np.isfinite(c) else 6.0 * float(r["params"]) * float(r["tokens"])

    if len(spec) == 1 and spec[0].startswith("top:"):
        try:
            k = int(spec[0][4:])
        except ValueError:
            raise UserError(f"--holdout {spec[0]}: expected top:K with K a whole number") from None
        if not 1 <= k < len(rows):
            raise UserError(
                f"--holdout {spec[0]}: K must be between 1 and {len(rows) - 1} (there are {len(rows)} runs)"
            )
        order = sorted(range(len(rows)), key=lambda i: compute(rows[i]), reverse=True)
        held = set(order[:k])
    else:
        names = [str(r.get("run", "")) for r in rows]
        unknown = [s for s in spec if s not in names]
        if unknown:
            raise UserError(f"--holdout: no usable run named {', '.join(unknown)} (runs: {', '.join(names)})")
        held = {i for i, name in enumerate(names) if name in spec}
    return HoldoutSplit([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def fit_warnings(
    params: dict[str, float], intervals: dict, n: np.ndarray, flops: np.ndarray, loss: np.ndarray,
    *, fixed_E: float | None = None, loo: dict | None = None, holdout: dict | None = None,
) -> list[str]:  # fmt: skip
    """The warnings of a Chinchilla fit that are about its numbers (not its inputs)."""
    out = []
    e_at_bound = fixed_E is None and params["E"] < E_FLOOR_FRACTION * float(np.min(loss))
    if e_at_bound:
        out.append(
            f"E={params['E']:.3g} is at its lower bound (0): the fit found no loss floor; the other constants absorb "
            "it (fix E with --fix-E when the floor is known)"
        )
    for name in ("alpha", "beta"):
        if params[name] < 0.02:
            out.append(
                f"{name}={params[name]:.3g} is at its lower bound (0): the loss does not follow a power law here"
            )
    for name in ("A", "B") if e_at_bound else ("E", "A", "B"):  # E at 0 was named above
        lo_hi = intervals.get(name)
        if lo_hi and (lo_hi[0] <= 0 or lo_hi[1] / lo_hi[0] > INTERVAL_SPAN):
            out.append(f"{name}'s 95% interval {lo_hi[0]:.3g}–{lo_hi[1]:.3g} spans more than {INTERVAL_SPAN:g}×")
    sizes = len(np.unique(n))
    budgets = len(np.unique(np.round(np.log10(flops), 2)))
    if sizes < 3 or budgets < 3:
        out.append(f"{sizes} model size(s) and {budgets} compute budget(s): a fit needs at least 3 of each")
    for what, errors in (("leave-one-out", loo), ("held-out", holdout)):
        if errors and errors.get("n") and errors["mean_rel_error"] > errors["baseline_mean_rel_error"]:
            out.append(
                f"{what} error {100 * errors['mean_rel_error']:.2f}% is worse than the trivial baseline's "
                f"{100 * errors['baseline_mean_rel_error']:.2f}% (predict the lowest fitted loss)"
            )
    return out


def extrapolation_warning(compute: float, largest: float) -> str | None:
    """A warning when ``compute`` is more than 10× the largest fitted run's."""
    if largest > 0 and compute > EXTRAPOLATION_FACTOR * largest:
        return f"compute {compute:.3g} is {compute / largest:,.0f}× the largest run's FLOPs ({largest:.3g}): an extrapolation"
    return None


def predicted_loss_report(fit: dict, law: ChinchillaParams, params: float, tokens: float) -> str:
    """``lmlab predict loss``: the predicted loss, its 95% interval over the fit's bootstrap refits, and a warning
    when 6·N·D is beyond 10× the largest fitted run."""
    line = f"{float(law.loss(params, tokens)):.6f}"
    draws = [float(ChinchillaParams.from_dict(p).loss(params, tokens)) for p in fit.get("bootstrap_params", [])]
    if draws:
        lo, hi = np.percentile(draws, [2.5, 97.5])
        line += f" (95% interval {lo:.6f}–{hi:.6f} over {len(draws)} bootstrap refits)"
    warning = extrapolation_warning(6.0 * params * tokens, fit.get("data_range", {}).get("flops", [0.0, 0.0])[1])
    return line + (f"\nwarning: {warning}" if warning else "")


# --------------------------------------------------------------------------- annealing


def _after_warmup(curve: Curve) -> np.ndarray:
    return curve.steps >= curve.warmup_steps


def curve_errors(law: AnnealingParams, curves: Sequence[Curve], seen: Sequence[Curve], lam: float) -> dict[str, Any]:
    """``curves``' points (after warmup) predicted by ``law``, beside the trivial baseline "the schedule does not
    matter": at each step, the mean loss of the ``seen`` curves (interpolated). Pooled over every point."""
    predicted, baseline, actual, per_curve = [], [], [], {}
    for curve in curves:
        keep = _after_warmup(curve)
        steps, losses = curve.steps[keep], curve.losses[keep]
        if not len(steps):
            continue
        pred = law.predict(curve.lrs, curve.warmup_steps, lam)[steps]
        predicted.append(pred)
        baseline.append(np.mean([np.interp(steps, c.steps, c.losses) for c in seen], axis=0))
        actual.append(losses)
        per_curve[curve.name] = float(relative_errors(pred, losses).mean())
    if not actual:
        return {"n": 0}
    out: dict[str, Any] = error_summary(np.concatenate(predicted), np.concatenate(baseline), np.concatenate(actual))
    out["per_curve"] = per_curve
    return out


def leave_one_curve_out(curves: Sequence[Curve], fit: AnnealingParams, lam: float) -> dict[str, Any]:
    """Each curve predicted by the law refitted on the other curves (from the full fit's constants), beside the
    baseline of :func:`curve_errors`; ``{"n": 0}`` with fewer than two curves."""
    if len(curves) < 2:
        return {"n": 0}
    start = np.array([[fit.L0, fit.A, fit.C, fit.alpha]])
    parts = []
    for i, curve in enumerate(curves):
        others = [c for j, c in enumerate(curves) if j != i]
        try:
            law = fit_annealing(others, lam=lam, grid=start).params
        except UserError:  # the other curves hold fewer than 5 points
            continue
        parts.append(curve_errors(law, [curve], others, lam))
    parts = [x for x in parts if x.get("n")]
    if not parts:
        return {"n": 0}
    n = sum(x["n"] for x in parts)
    mean = lambda key: sum(x[key] * x["n"] for x in parts) / n  # noqa: E731  (pooled over points)
    return {
        "n": n,
        "mean_rel_error": mean("mean_rel_error"),
        "max_rel_error": max(x["max_rel_error"] for x in parts),
        "baseline_mean_rel_error": mean("baseline_mean_rel_error"),
        "baseline_max_rel_error": max(x["baseline_max_rel_error"] for x in parts),
        "per_curve": {k: v for x in parts for k, v in x["per_curve"].items()},
    }


def annealing_warnings(
    params: dict[str, float], intervals: dict, curves: Sequence[Curve], loo: dict | None
) -> list[str]:
    """Constants at their bound (0), intervals spanning more than 10×, curves of different models, one curve, and a
    law that predicts left-out curves worse than the trivial baseline."""
    out = [f"{k}={v:.3g} is at its lower bound (0)" for k, v in params.items() if v <= 1e-8]
    for name in ("L0", "A", "C"):
        lo_hi = intervals.get(name)
        if lo_hi and (lo_hi[0] <= 0 or lo_hi[1] / lo_hi[0] > INTERVAL_SPAN):
            out.append(f"{name}'s 95% interval {lo_hi[0]:.3g}–{lo_hi[1]:.3g} spans more than {INTERVAL_SPAN:g}×")
    models: dict[str, list[str]] = {}
    for c in curves:
        if c.model:
            models.setdefault(c.model, []).append(c.name)
    if len(models) > 1:
        listed = "; ".join(f"{m}: {', '.join(names)}" for m, names in models.items())
        out.append(
            f"the curves come from {len(models)} different models ({listed}): one annealing law describes one model"
        )
    if len(curves) < 2:
        out.append("one curve: the law's schedule terms are fitted on one schedule and cannot be checked on another")
    if loo and loo.get("n") and loo["mean_rel_error"] > loo["baseline_mean_rel_error"]:
        out.append(
            f"leave-one-curve-out error {100 * loo['mean_rel_error']:.2f}% is worse than the trivial baseline's "
            f"{100 * loo['baseline_mean_rel_error']:.2f}% (the other curves' mean loss at each step)"
        )
    return out


# --------------------------------------------------------------------------- LR horizon


def lr_leave_one_out(vertices: Sequence[dict], joint: bool) -> dict[str, Any]:
    """Each sweep's LR* predicted by the LR*(N, D) law (``joint``) or the per-size LR*(D) law refitted without it,
    beside the baseline "LR* does not move" (the geometric mean of the other LR* the law would use). Errors are
    ``|ln(predicted / measured)|``; ``max_factor`` is the largest ratio either way."""
    n = np.array([v["params"] for v in vertices], dtype=float)
    d = np.array([v["tokens"] for v in vertices], dtype=float)
    lr = np.array([v["lr_opt"] for v in vertices], dtype=float)
    law_err, base_err = [], []
    for i in range(len(vertices)):
        others = np.arange(len(vertices)) != i
        if not joint:
            others &= n == n[i]
        try:
            if joint:
                predicted = float(fit_lr_joint(n[others], d[others], lr[others]).lr(n[i], d[i]))
            else:
                predicted = float(fit_lr_horizon(d[others], lr[others]).lr(d[i]))
        except UserError:  # too few sizes or horizons left
            continue
        law_err.append(abs(math.log(predicted / lr[i])))
        base_err.append(abs(float(np.mean(np.log(lr[others]))) - math.log(lr[i])))
    if not law_err:
        return {"n": 0}
    return {
        "n": len(law_err),
        "mean_abs_log_error": float(np.mean(law_err)),
        "max_factor": float(math.exp(max(law_err))),
        "baseline_mean_abs_log_error": float(np.mean(base_err)),
        "baseline_max_factor": float(math.exp(max(base_err))),
    }


def lr_horizon_warnings(vertices: Sequence[dict], intervals: dict, loo: dict) -> list[str]:
    """Vertices outside their swept LRs, fewer than 3 horizons, an exponent whose interval spans 0, and a law no
    better than a constant LR*."""
    out = [
        f"LR* {v['lr_opt']:.3g} at params={v['params']:.3g}, tokens={v['tokens']:.3g} lies outside the swept LRs: "
        "the parabola is extrapolated (widen that sweep)"
        for v in vertices
        if not v["inside"]
    ]
    horizons = len({v["tokens"] for v in vertices})
    if horizons < 3:
        out.append(f"{horizons} token horizon(s): a power law in D needs at least 3 to be checked")
    for name, (lo, hi) in intervals.items():
        if lo <= 0 <= hi:
            out.append(f"{name}'s 95% interval {lo:.3g}–{hi:.3g} includes 0: the data do not say LR* moves")
    if loo.get("n") and loo["mean_abs_log_error"] > loo["baseline_mean_abs_log_error"]:
        out.append(
            f"leave-one-out LR* error (mean factor {math.exp(loo['mean_abs_log_error']):.2f}) is worse than a constant "
            f"LR*'s ({math.exp(loo['baseline_mean_abs_log_error']):.2f})"
        )
    return out


def step_law_warnings(optima: Sequence, intervals: dict, loo: dict) -> list[str]:
    """Grid optima on a grid's edge, fewer than 3 sizes or budgets, exponents whose interval spans 0, and a law no
    better than constant hyperparameters."""
    out = [
        f"the optimum at N={o.params:.3g}, D={o.tokens:.3g} is the grid's best point, not a convex vertex inside "
        "it: widen that grid"
        for o in optima
        if not o.inside
    ]
    for what, values in (("model sizes", {o.params for o in optima}), ("token budgets", {o.tokens for o in optima})):
        if len(values) < 3:
            out.append(f"{len(values)} {what}: a power law needs at least 3 to be checked")
    for name, (lo, hi) in intervals.items():
        if lo <= 0 <= hi:
            out.append(f"{name}'s 95% interval {lo:.3g}–{hi:.3g} includes 0: the data do not fix that exponent")
    for what in ("lr", "batch"):
        if loo.get("n") and loo[f"{what}_mean_factor"] > loo[f"{what}_base_mean_factor"]:
            out.append(
                f"leave-one-out {what} error (mean factor {loo[f'{what}_mean_factor']:.2f}) is worse than holding it "
                f"constant ({loo[f'{what}_base_mean_factor']:.2f})"
            )
    return out


# --------------------------------------------------------------------------- mixture


def mixture_leave_one_out(n: np.ndarray, d: np.ndarray, p: np.ndarray, loss: np.ndarray) -> dict[str, Any]:
    """One family's runs each predicted by γ refitted without it (``L(N, D, 1)·p^-γ``), beside the baseline "the
    sampling ratio does not matter" (the mean loss of the other runs at the same N and D)."""
    predicted, baseline = np.full(len(loss), np.nan), np.full(len(loss), np.nan)
    for i in range(len(loss)):
        others = np.arange(len(loss)) != i
        same = others & (n == n[i]) & (d == d[i])
        if not same.any():
            continue
        try:
            g = fit_gamma(n[others], d[others], p[others], loss[others])
        except UserError:
            continue
        predicted[i] = math.exp(g.intercepts[(float(n[i]), float(d[i]))]) * p[i] ** (-g.gamma)
        baseline[i] = float(np.mean(loss[same]))
    return error_summary(predicted, baseline, loss)


def mixture_warnings(per_family: dict[str, dict], ratios_per_family: dict[str, int]) -> list[str]:
    """γ ≤ 0 (optimal ratios undefined), fewer than 3 sampling ratios, and a γ worse than a constant loss."""
    out = []
    for fam, info in per_family.items():
        if info["gamma"] <= 0:
            out.append(f"{fam}: gamma={info['gamma']:.3g} <= 0 (more of this family does not lower its loss)")
        if ratios_per_family[fam] < 3:
            out.append(f"{fam}: {ratios_per_family[fam]} sampling ratio(s): a power law in p needs at least 3")
        loo = info.get("leave_one_out", {})
        if loo.get("n") and loo["mean_rel_error"] > loo["baseline_mean_rel_error"]:
            out.append(
                f"{fam}: leave-one-out error {100 * loo['mean_rel_error']:.2f}% is worse than ignoring the ratio "
                f"({100 * loo['baseline_mean_rel_error']:.2f}%)"
            )
    return out
