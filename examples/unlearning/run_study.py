"""Unlearning on lmlab's TOFU-style benchmark: every method on the forget splits, and the papers' claims.

The benchmark (``lmlab unlearn bench prepare``) is built once: a target fine-tuned on 400 fictitious people of the
facts world and, per forget split, a gold model that never saw that split's people. Each method then unlearns each
split from the target with the same schedule (``COMMON``) and its own options (``METHODS``), for several seeds (the
order of the forget batches and the retain pairs). Every evaluation of a run scores forget quality and model
utility (docs/science.md §13), so each run is a curve over unlearning steps. Measured:

- (a) the forget-quality / model-utility trade-off of every method on every split, final values and curves;
- (b) NPO's collapse is slower than gradient ascent's: model utility over steps (Zhang et al. 2024);
- (c) ULD keeps the retain loss within a few percent while forgetting (Ji et al. 2024);
- (d) FLAT with forget data only against GradDiff with retain data (Wang et al. 2025);
- (e) membership inference (Min-40% AUC, forget vs holdout biographies) before and after unlearning against the
  gold model: PrivLeak (Shi et al. 2024).

    python examples/unlearning/run_study.py --out runs/unlearning              # the whole study (hours on CPU)
    python examples/unlearning/run_study.py --out runs/unlearning --splits forget05 --seeds 0
    python examples/unlearning/run_study.py --out /tmp/u --quick               # smoke test (tiny benchmark)
    python examples/unlearning/run_study.py --out runs/unlearning --methods flat --splits forget05 --seeds 0 \
        --set optim.lr=2e-5 --tag _lr2e-5                                         # one method at other settings

Finished runs are reused, so an interrupted study continues where it stopped. Results: ``OUT/results.json`` and
``OUT/results.md`` (the tables of examples/unlearning/README.md; a copy is examples/unlearning/results.md) and
``OUT/curves_SPLIT.png`` (forget quality and model utility over steps, seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

from lmlab.config import load_config
from lmlab.recipes.unlearn import run_unlearn
from lmlab.recipes.unlearn_bench import prepare_bench

COMMON = [
    "optim.lr=1e-4", "optim.weight_decay=0.01", "schedule.name=constant", "schedule.warmup_steps=0",
    "unlearn.epochs=10", "train.micro_batch_size=16", "train.eval_every=10", "train.log_every=5",
    "train.ckpt_every=1000000", "train.keep_last=1", "train.progress=false", "train.device=cpu", "train.threads=1",
    "unlearn.eval_items=60", "sample.max_new_tokens=24",
]  # fmt: skip
METHODS: dict[str, list[str]] = {
    "ga": ["unlearn.method.kind=ga"],
    "grad_diff": ["unlearn.method.kind=grad_diff"],
    "npo": ["unlearn.method.kind=npo"],
    "simnpo": ["unlearn.method.kind=simnpo", "unlearn.method.beta=2.5"],
    "idk_dpo": ["unlearn.method.kind=idk_dpo"],
    "idk_nll": ["unlearn.method.kind=idk_nll"],
    "flat": ["unlearn.method.kind=flat"],
    "rmu": ["unlearn.method.kind=rmu", "unlearn.method.retain_coeff=100", "optim.lr=1e-3"],
    "uld": [
        "unlearn.method.kind=uld", "adapter.kind=lora", "adapter.rank=16", "adapter.alpha=32",
        "adapter.dropout=0.05", "optim.lr=1e-3",
    ],
}  # fmt: skip
SPLITS = ("forget01", "forget05", "forget10")
SEEDS = (0, 1, 2)
QUICK_BENCH = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "tokenizer.vocab_size=400", "sft.epochs=2"]


def finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"


def unlearn_run(
    bench: Path, out: Path, method: str, split: str, seed: int, extra: list[str], tag: str = ""
) -> dict[str, Any]:
    """One run (reused when finished): its final report and its evaluation curve."""
    run = out / f"{method}{tag}-{split}-s{seed}"
    if not finished(run):
        overrides = [
            *COMMON, *METHODS[method], f"unlearn.bench={bench}", f"unlearn.split={split}", f"train.seed={seed}",
            f"name={run.name}", *extra,
        ]  # fmt: skip
        run_unlearn(load_config(None, overrides), run, overwrite=True, quiet=True)
    report = json.loads((run / "unlearning.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [
        {k: r.get(k) for k in ("step", "forget_quality", "model_utility", "retain/probability", "forget/probability")}
        for r in records
        if r.get("kind") == "eval"
    ]
    start = next(r for r in records if r.get("kind") == "eval")
    return {"report": report, "curve": curve, "start": {k: v for k, v in start.items() if k not in ("kind", "tokens")}}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) < 2:
        return values[0], 0.0
    return statistics.fmean(values), stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values)
    )


def fmt(values: list[float], digits: int = 3) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.{digits}g} ± {half:.{digits - 1}g}" if half else f"{mean:.{digits}g}"


def steps_to_collapse(curve: list[dict], start: float, fraction: float = 0.5) -> int | None:
    """The first evaluated step whose model utility is below ``fraction`` of the start's (None: never)."""
    for point in curve:
        if point["model_utility"] is not None and point["model_utility"] < fraction * start:
            return point["step"]
    return None


def plot_curves(runs: dict[str, dict], methods, split: str, seed: int, out: Path, tag: str = "") -> None:
    """Forget quality and model utility over unlearning steps, one line per method (one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (fq, mu) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        run = runs.get(f"{m}-{split}-s{seed}")
        if run is None:
            continue
        steps = [p["step"] for p in run["curve"]]
        fq.plot(steps, [max(p["forget_quality"], 1e-30) for p in run["curve"]], label=m)
        mu.plot(steps, [p["model_utility"] for p in run["curve"]], label=m)
    fq.set(yscale="log", xlabel="step", ylabel="forget quality (KS p vs gold)", title=f"{split}, seed {seed}")
    mu.set(xlabel="step", ylabel="model utility (no decoding)", title=f"{split}, seed {seed}")
    mu.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"curves{tag}_{split}.png", dpi=110)
    plt.close(fig)


def analyse(runs: dict[str, dict], methods, splits, seeds, out_dir: Path, tag: str = "") -> tuple[dict, str]:
    """The tables of the study (results.json and its markdown): (a) over every split, (b)-(e) per split."""
    lines = ["## (a) Forget quality / model utility after 10 epochs (mean ± 95% CI over seeds)", ""]
    lines += ["| method | " + " | ".join(f"{s} FQ | {s} MU" for s in splits) + " |"]
    lines += ["|---|" + "---|---|" * len(splits)]
    table: dict[str, dict] = {}
    for m in methods:
        row = []
        for s in splits:
            reports = [runs[f"{m}-{s}-s{seed}"]["report"] for seed in seeds if f"{m}-{s}-s{seed}" in runs]
            fq = [r["forget_quality"] for r in reports]
            mu = [r["model_utility"] for r in reports]
            table.setdefault(m, {})[s] = {
                "forget_quality": mean_ci(fq),
                "model_utility": mean_ci(mu),
                "n": len(reports),
            }
            row += [fmt(fq), fmt(mu)]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    # Step 0 of any run on a split is the target itself, scored against that split's gold model.
    targets = {s: runs[f"{methods[0]}-{s}-s{seeds[0]}"]["start"] for s in splits}
    lines += ["", "Target before unlearning (step 0, no decoding): " + "; ".join(
        f"{s} FQ {t['forget_quality']:.3g}, MU {t['model_utility']:.3g}, PrivLeak {t['privleak']:.3g}"
        for s, t in targets.items()), ""]  # fmt: skip
    results: dict[str, Any] = {"table": table, "target": targets}
    for split in splits:
        results[split] = analyse_split(runs, methods, split, seeds, lines)
    for split in splits:
        plot_curves(runs, methods, split, seeds[0], out_dir, tag)
    return results, "\n".join(lines)


def analyse_split(runs: dict[str, dict], methods, split: str, seeds, lines: list[str]) -> dict[str, Any]:
    """Claims (b)-(e) on one split; appends their markdown to ``lines``."""
    results: dict[str, Any] = {}

    def per_seed(method: str, key) -> list:
        return [key(runs[f"{method}-{split}-s{seed}"]) for seed in seeds if f"{method}-{split}-s{seed}" in runs]

    lines += [f"### {split}", ""]
    if "ga" in methods and "npo" in methods:
        start = lambda r: r["curve"][0]["model_utility"]  # noqa: E731
        ga = per_seed("ga", lambda r: steps_to_collapse(r["curve"], start(r)))
        npo = per_seed("npo", lambda r: steps_to_collapse(r["curve"], start(r)))
        results["b_collapse_steps"] = {"ga": ga, "npo": npo}
        lines += [f"(b) Steps until model utility halves (None: not within the run): gradient ascent {ga}; NPO {npo}",
                  ""]  # fmt: skip
    for method in ("uld", "npo", "grad_diff"):
        if method not in methods:
            continue
        retain = per_seed(method, lambda r: r["report"]["retain"]["probability"] / r["start"]["retain/probability"])
        nll = per_seed(method, lambda r: r["report"]["retain"]["nll"] - r["start"]["retain/nll"])
        forget = per_seed(method, lambda r: r["report"]["forget"]["probability"] / r["start"]["forget/probability"])
        results.setdefault("c_retain", {})[method] = {"retain_probability_ratio": retain, "retain_nll_change": nll,
                                                      "forget_probability_ratio": forget}  # fmt: skip
        lines += [f"- (c) {method}: retain probability ×{fmt(retain)} (retain NLL {fmt(nll)} nats), forget "
                  f"probability ×{fmt(forget)}"]  # fmt: skip
    lines += [""]
    if "flat" in methods and "grad_diff" in methods:
        rows = {m: (per_seed(m, lambda r: r["report"]["forget_quality"]), per_seed(m, lambda r: r["report"]["model_utility"]))
                for m in ("flat", "grad_diff")}  # fmt: skip
        results["d_flat_vs_grad_diff"] = rows
        lines += [f"(d) FLAT: FQ {fmt(rows['flat'][0])}, MU {fmt(rows['flat'][1])}; GradDiff: FQ "
                  f"{fmt(rows['grad_diff'][0])}, MU {fmt(rows['grad_diff'][1])}", ""]  # fmt: skip
    privacy = {m: per_seed(m, lambda r: r["report"].get("privleak")) for m in methods}
    results["e_privleak"] = privacy
    lines += ["(e) PrivLeak (0 = like the gold model): " + "; ".join(f"{m} {fmt(v)}" for m, v in privacy.items()), ""]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bench", help="an existing benchmark (default: OUT/bench, prepared when missing)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--quick", action="store_true", help="a tiny benchmark and 1 epoch: a smoke test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    p.add_argument("--tag", default="", help="runs OUT/METHOD{TAG}-SPLIT-sSEED, results{TAG}.json (with --set)")
    args = p.parse_args()
    out = Path(args.out)
    methods, splits = args.methods.split(","), args.splits.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    bench = Path(args.bench) if args.bench else out / "bench"
    extra = (["unlearn.epochs=1", "unlearn.eval_items=12"] if args.quick else []) + args.set
    if args.set and not args.tag:
        p.error("--set needs a --tag, so the changed runs do not mix with the study's")
    if not (bench / "bench.json").is_file() or not args.bench:
        size = {"n_people": 100, "n_holdout": 12, "overrides": QUICK_BENCH} if args.quick else {}
        prepare_bench(bench, splits=splits, quiet=True, **size)
    runs = {}
    for split in splits:
        for method in methods:
            for seed in seeds:
                runs[f"{method}-{split}-s{seed}"] = unlearn_run(bench, out, method, split, seed, extra, args.tag)
                print(f"{method} {split} seed {seed}: FQ {runs[f'{method}-{split}-s{seed}']['report']['forget_quality']:.3g}",
                      flush=True)  # fmt: skip
    results, markdown = analyse(runs, methods, splits, seeds, out, args.tag)
    manifest = json.loads((bench / "bench.json").read_text())
    record = {"bench": {k: manifest[k] for k in ("n_people", "counts", "models")}, "overrides": args.set}
    record |= {"results": results, "runs": runs}
    (out / f"results{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"results{args.tag}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
