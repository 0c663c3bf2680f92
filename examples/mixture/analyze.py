"""Study 5e of issue 5: the multilingual mixture law (docs/science.md §4) on three synthetic languages.

    lmlab sweep configs/mixture/mixture_sweep.yaml --out runs/mixture --jobs 6
    python examples/mixture/analyze.py runs/mixture [--out examples/mixture/RESULTS.md]

At each model size the runs share (N, D) and differ only in the sampling ratios p. Per language i,
``ln L_i = ln L_i(N, D, 1) − γ_i ln p_i`` is fitted on all mixtures but the held-out last one, which
is then predicted. The normalised optimal ratios ``p* ∝ argmin Σ_i p_i^-γ_i`` (they depend only on
γ) are computed at each size: if they agree, ratios chosen on the small model transfer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from lmlab.data.mixture import mixture_ratios
from lmlab.science.mixture import fit_gamma, optimal_ratios


def load_runs(sweep: Path) -> list[dict]:
    runs = []
    for rd in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((rd / "summary.json").read_text())
        if summary.get("status") != "finished":
            continue
        cfg = yaml.safe_load((rd / "config.yaml").read_text())
        mix = cfg["data"]["mixture"]
        ratios = mixture_ratios([m["weight"] for m in mix], cfg["data"]["mixture_temperature"])
        evals = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in evals if r.get("kind") == "eval"][-1]
        runs.append(
            {
                "run": rd.name,
                "d_model": cfg["model"]["d_model"],
                "params": summary["params"],
                "tokens": summary["tokens"],
                "p": dict(zip([m["name"] for m in mix], ratios)),
                "loss": {m["name"]: last[f"val_loss/{m['name']}"] for m in mix},
            }
        )
    return runs


def analyze(runs: list[dict]) -> list[str]:
    languages = list(runs[0]["p"])
    lines = ["# Mixture study (issue 5, item 5e): measured results", ""]
    optimal = {}
    for size, tokens in sorted({(r["d_model"], r["tokens"]) for r in runs}):
        rs = [r for r in runs if r["d_model"] == size and r["tokens"] == tokens]
        fit_rs, held = rs[:-1], rs[-1]
        gammas, preds = [], []
        for lang in languages:
            g = fit_gamma(
                [r["params"] for r in fit_rs],
                [r["tokens"] for r in fit_rs],
                [r["p"][lang] for r in fit_rs],
                [r["loss"][lang] for r in fit_rs],
            )
            gammas.append(g.gamma)
            intercept = next(iter(g.intercepts.values()))
            preds.append(float(np.exp(intercept - g.gamma * np.log(held["p"][lang]))))
        p_star = optimal_ratios(np.clip(gammas, 1e-6, None), np.ones(len(languages)))
        optimal[(size, tokens)] = p_star
        lines += [
            f"## d_model = {size} ({rs[0]['params']:,} parameters, {rs[0]['tokens']:,} tokens per run)",
            "",
            "| run | "
            + " | ".join(f"p({x})" for x in languages)
            + " | "
            + " | ".join(f"L({x})" for x in languages)
            + " |",
            "|---" * (1 + 2 * len(languages)) + "|",
        ]
        for r in rs:
            lines.append(
                f"| {r['run']} | "
                + " | ".join(f"{r['p'][x]:.3f}" for x in languages)
                + " | "
                + " | ".join(f"{r['loss'][x]:.4f}" for x in languages)
                + " |"
            )
        errs = [(p - held["loss"][x]) / held["loss"][x] for p, x in zip(preds, languages)]
        lines += [
            "",
            "Fitted γ: " + ", ".join(f"{x} {g:.3f}" for x, g in zip(languages, gammas)) + ".",
            f"Held-out mixture {held['run']}: predicted per-language loss "
            + ", ".join(
                f"{x} {p:.4f} (measured {held['loss'][x]:.4f}, {100 * e:+.1f}%)"
                for x, p, e in zip(languages, preds, errs)
            )
            + f"; mean |error| **{100 * np.mean(np.abs(errs)):.1f}%**.",
            "Normalised optimal ratios p*: " + ", ".join(f"{x} {p:.3f}" for x, p in zip(languages, p_star)) + ".",
            "",
        ]
    for tokens in sorted({k[1] for k in optimal}):
        sizes = sorted(k[0] for k in optimal if k[1] == tokens)
        if len(sizes) < 2:
            continue
        a, b = optimal[(sizes[0], tokens)], optimal[(sizes[-1], tokens)]
        lines += [
            f"**Transfer at {tokens:,} tokens:** p* from d_model={sizes[0]} vs d_model={sizes[-1]}: "
            f"max |difference| {float(np.max(np.abs(a - b))):.3f} (ratios "
            + ", ".join(f"{x:.3f}" for x in a)
            + " vs "
            + ", ".join(f"{x:.3f}" for x in b)
            + ").",
            "",
        ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    text = "\n".join(analyze(load_runs(args.sweep))) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
