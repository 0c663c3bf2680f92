"""Validation studies 5b–5d of issue 5 on the recorded sweeps in ``examples/scaling/sweeps/``.

    python examples/scaling/analyze_sweeps.py [--sweeps DIR] [--out FILE.md]

- 5b Chinchilla: fit L(N, D) (docs/science.md §1.2) on all runs but the held-out largest-compute ones, predict
  the held-out final validation losses.
- 5c annealing: fit the LR-annealing law (§2) jointly on the constant and cosine runs' validation curves,
  predict the WSD run's curve (mean absolute error as a fraction of the loss).
- 5d LR horizon: per horizon, the vertex of a parabola in ln LR (§3); fit LR*(D) = B·D^-beta on the three
  shorter horizons and predict LR* at the 4x longer one, compared with its measured vertex.

The sweeps were produced by ``lmlab sweep configs/scaling/{chinchilla,annealing,lr_horizon}_sweep.yaml``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from lmlab.science.annealing import fit_annealing
from lmlab.science.chinchilla import chinchilla_loss, fit_chinchilla
from lmlab.science.curves import curve_from_run
from lmlab.science.lr_horizon import fit_lr_horizon, lr_vertex
from lmlab.science.results import collect_results

HERE = Path(__file__).resolve().parent


def chinchilla_study(sweep: Path, held_out: int) -> list[str]:
    rows = [r for r in collect_results(sweep) if r["status"] == "finished"]
    rows.sort(key=lambda r: float(r["flops"]))
    fit_rows, test_rows = rows[:-held_out], rows[-held_out:]
    col = lambda rs, k: np.array([float(r[k]) for r in rs])  # noqa: E731
    fit = fit_chinchilla(col(fit_rows, "params"), col(fit_rows, "tokens"), col(fit_rows, "loss"))
    p = fit.params
    lines = [
        "### 5b. Chinchilla fit, held-out prediction",
        "",
        f"{len(rows)} runs (5 sizes × 4 budgets); fitted on the {len(fit_rows)} lowest-compute runs, "
        f"{held_out} highest-compute runs held out. N = total parameters, D = training tokens.",
        "",
        f"Fit: E = {p.E:.4f}, A = {p.A:.4g}, B = {p.B:.4g}, alpha = {p.alpha:.4f}, beta = {p.beta:.4f}; "
        f"Huber objective {fit.objective:.3e}, RMSE on the fitted runs {fit.rmse:.4f}.",
        "",
        "| held-out run | params | tokens | FLOPs | measured loss | predicted | error |",
        "|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in test_rows:
        pred = float(chinchilla_loss(float(r["params"]), float(r["tokens"]), p))
        err = (pred - float(r["loss"])) / float(r["loss"])
        errors.append(abs(err))
        lines.append(
            f"| {r['run']} | {float(r['params']):,.0f} | {float(r['tokens']):,.0f} | {float(r['flops']):.3g} | "
            f"{float(r['loss']):.4f} | {pred:.4f} | {100 * err:+.1f}% |"
        )
    lines += ["", f"Mean absolute error on held-out runs: **{100 * np.mean(errors):.1f}%** (goal ≤ 2%).", ""]
    return lines


def annealing_study(sweep: Path) -> list[str]:
    runs = {p.name: p for p in sweep.iterdir() if (p / "summary.json").is_file()}
    constant = curve_from_run(next(v for k, v in runs.items() if "constant" in k))
    cosine = curve_from_run(next(v for k, v in runs.items() if "cosine" in k))
    wsd = curve_from_run(next(v for k, v in runs.items() if "wsd" in k))
    skip = lambda c: c.steps >= 2 * c.warmup_steps  # noqa: E731 - drop the warmup region (§2.2)
    for c in (constant, cosine, wsd):
        keep = skip(c)
        c.steps, c.losses = c.steps[keep], c.losses[keep]
    fit = fit_annealing([constant, cosine])
    pred = fit.params.predict(wsd.lrs, wsd.warmup_steps)[wsd.steps]
    mae = float(np.mean(np.abs(pred - wsd.losses)))
    rel = float(np.mean(np.abs(pred - wsd.losses) / wsd.losses))
    decay = wsd.steps >= int(0.8 * len(wsd.lrs))
    rel_decay = float(np.mean(np.abs(pred[decay] - wsd.losses[decay]) / wsd.losses[decay]))
    p = fit.params
    sensitivity = [
        "",
        "Sensitivity to where fitting starts (same data; the law has no term for the plateau and "
        "sudden drops these synthetic-story curves show early on):",
        "",
        "| first fitted step | L0 | A | C | alpha | WSD mean abs. error |",
        "|---|---|---|---|---|---|",
    ]
    for start in (300, 500, 800):
        cs = [curve_from_run(p_) for p_ in (runs[k] for k in sorted(runs))]
        for c in cs:
            keep = c.steps >= start
            c.steps, c.losses = c.steps[keep], c.losses[keep]
        con, cos, w = (next(c for c in cs if tag in c.name) for tag in ("constant", "cosine", "wsd"))
        f = fit_annealing([con, cos])
        pr = f.params.predict(w.lrs, w.warmup_steps)[w.steps]
        q = f.params
        sensitivity.append(
            f"| {start} | {q.L0:.3f} | {q.A:.3g} | {q.C:.3f} | {q.alpha:.3f} | "
            f"{100 * float(np.mean(np.abs(pr - w.losses) / w.losses)):.2f}% |"
        )
    return [
        "### 5c. LR-annealing law: fit constant + cosine, predict WSD",
        "",
        f"Fit (λ = 0.999): L0 = {p.L0:.4f}, A = {p.A:.4f}, C = {p.C:.4f}, alpha = {p.alpha:.4f}; "
        f"{fit.n_points} points; max |error| on the fitted curves: "
        + ", ".join(f"{k} {v:.4f}" for k, v in fit.max_abs_error.items())
        + ".",
        "",
        f"WSD (20% linear decay) prediction over {len(wsd.steps)} eval points: mean absolute error {mae:.4f} nats "
        f"= **{100 * rel:.2f}%** of the loss (goal ≤ 1%); over the decay phase only: {100 * rel_decay:.2f}%. "
        f"Final loss measured {wsd.losses[-1]:.4f}, predicted {pred[-1]:.4f}.",
        *sensitivity,
        "",
    ]


def lr_horizon_study(sweep: Path) -> list[str]:
    rows = [r for r in collect_results(sweep)]
    by_tokens: dict[float, list[tuple[float, float]]] = {}
    for r in rows:
        loss = float(r["loss"]) if r["status"] == "finished" else math.nan
        by_tokens.setdefault(float(r["tokens"]), []).append((float(r["lr"]), loss))
    horizons = sorted(by_tokens)
    vertices = {}
    lines = [
        "### 5d. Optimal LR across token horizons",
        "",
        "| tokens | LRs swept | final losses | best LR on grid | vertex LR* (parabola in ln LR) |",
        "|---|---|---|---|---|",
    ]
    for d in horizons:
        pts = sorted(by_tokens[d])
        lrs, losses = [p[0] for p in pts], [p[1] for p in pts]
        v = lr_vertex(lrs, losses)
        vertices[d] = v.lr_opt
        best = lrs[int(np.nanargmin(losses))]
        lines.append(
            f"| {d:,.0f} | {', '.join(f'{x:g}' for x in lrs)} | {', '.join(f'{x:.3f}' for x in losses)} | "
            f"{best:g} | {v.lr_opt:.4g}{'' if v.inside else ' (outside the swept range)'} |"
        )
    train_d, target_d = horizons[:-1], horizons[-1]
    fit = fit_lr_horizon(train_d, [vertices[d] for d in train_d])
    pred = float(fit.lr(target_d))
    ratio = pred / vertices[target_d]
    lines += [
        "",
        f"Fit on the {len(train_d)} shorter horizons: LR*(D) = {fit.B:.4g} · D^-{fit.beta:.3f}. Predicted LR* at "
        f"{target_d:,.0f} tokens: {pred:.4g}; measured vertex {vertices[target_d]:.4g}; ratio **{ratio:.2f}** "
        f"(goal within a factor of 1.5). The paper's beta at 50M–125M parameters is 0.65–0.70 and ≈ 0.32 at ≥ 760M "
        "(docs/science.md §3).",
        "",
    ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweeps", type=Path, default=HERE / "sweeps")
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    lines = [
        "# Scaling studies: measured results",
        "",
        "Produced by `python examples/scaling/analyze_sweeps.py` "
        "from the recorded sweeps in `examples/scaling/sweeps/` (trained on one H100, torch 2.11; see each "
        "run's env.json).",
        "",
    ]
    lines += chinchilla_study(args.sweeps / "chinchilla", args.held_out)
    lines += annealing_study(args.sweeps / "annealing")
    lines += lr_horizon_study(args.sweeps / "lr_horizon")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
