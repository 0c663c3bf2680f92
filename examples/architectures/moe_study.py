"""Mixture-of-experts vs dense FFN at equal active parameters and tokens (issue 14, study a), CPU-sized.

Five arms, each trained with the same data, token budget, schedule and seeds from ``moe_study.yaml`` (a
4-layer, d = 64 decoder on the synthetic ``stories`` world, 512-token BPE, 16 × 128 tokens per step):

- ``dense``: SwiGLU FFN of width H = 128;
- ``moe_topk``: 8 SwiGLU experts of width H/2 = 64, top-2 softmax router (renormalised gates), so a token's
  active FFN parameters equal the dense FFN's (plus the 64 × 8 router); Switch balancing loss 0.01 (Fedus et
  al. 2022), router z-loss 0.001 (lmlab's defaults);
- ``moe_grin``: the same with GRIN's SparseMixer-v2 router (Liu et al. 2024, arXiv 2409.12136);
- ``moe_bias``: ``moe_topk`` without the balancing loss, with DeepSeek-V3's auxiliary-loss-free bias
  (γ = 0.001, DeepSeek-AI 2024, §2.1.2);
- ``moe_nobalance``: ``moe_topk`` with neither (the control that shows the imbalance).

Per arm: the final validation loss on a fixed held-out set (the first ``train.eval_tokens`` of the validation
split) as mean ± 95% CI (Student t over seeds) and the paired difference to ``dense`` (same seed: same
batches), the parameter counts, the routing statistics averaged over the last 20% of steps and the median
training throughput. Finished runs in ``--out`` are reused. Results go to ``--results`` (JSON and Markdown).

    OMP_NUM_THREADS=1 python examples/architectures/moe_study.py --out runs/moe_study           # ~25 min, 1 core
    OMP_NUM_THREADS=1 python examples/architectures/moe_study.py --out /tmp/moe --steps 20 --seeds 0 \
        --results /tmp/moe/results                                                    # smoke test, < 1 min

Trailing ``key=value`` arguments are passed to every run (a GPU-sized variant: see README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.config import load_config, to_dict
from lmlab.recipes.pretrain import run_pretraining

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "moe_study.yaml"
MOE = ["model.ffn.kind=moe", "model.ffn.experts=8", "model.ffn.top_k=2"]
ARMS = {  # name -> overrides of moe_study.yaml (which is the dense arm); widths are set by ``widths``
    "dense": [],
    "moe_topk": [*MOE, "model.ffn.router=softmax"],
    "moe_grin": [*MOE, "model.ffn.router=sparsemixer"],
    "moe_bias": [*MOE, "model.ffn.load_balance_coef=0", "model.ffn.bias_update_rate=0.001"],
    "moe_nobalance": [*MOE, "model.ffn.load_balance_coef=0", "model.ffn.bias_update_rate=0"],
}
ROUTING = ("moe_max_load", "moe_overflow", "moe_balance", "moe_router_z")
CONTRASTS = {  # name -> (arm a, arm b, metric): paired differences a − b over seeds
    "moe_topk - dense: val loss": ("moe_topk", "dense", "final_val_loss"),
    "moe_grin - dense: val loss": ("moe_grin", "dense", "final_val_loss"),
    "moe_bias - dense: val loss": ("moe_bias", "dense", "final_val_loss"),
    "moe_nobalance - dense: val loss": ("moe_nobalance", "dense", "final_val_loss"),
    "moe_grin - moe_topk: val loss": ("moe_grin", "moe_topk", "final_val_loss"),
    "moe_bias - moe_topk: val loss": ("moe_bias", "moe_topk", "final_val_loss"),
    "moe_bias - moe_nobalance: val loss": ("moe_bias", "moe_nobalance", "final_val_loss"),
    "moe_bias - moe_nobalance: max load": ("moe_bias", "moe_nobalance", "moe_max_load"),
    "moe_topk - moe_nobalance: max load": ("moe_topk", "moe_nobalance", "moe_max_load"),
    "moe_bias - moe_topk: max load": ("moe_bias", "moe_topk", "moe_max_load"),
    "moe_grin - moe_topk: max load": ("moe_grin", "moe_topk", "moe_max_load"),
}
TAIL = 0.2  # routing statistics: mean over this last fraction of the steps


def widths(arm: str, hidden: int) -> list[str]:
    """Dense: one SwiGLU of width H; MoE: experts of width H/2, so the top-2 active experts match the dense FFN."""
    return [f"model.ffn.hidden={hidden if arm == 'dense' else hidden // 2}"]


def overrides(arm: str, seed: int, steps: int, hidden: int, extra: list[str]) -> list[str]:
    every = max(1, steps // 6)  # six evaluations, the last at the final step
    return [f"name=moe-study-{arm}", f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={every}",
            f"schedule.warmup_steps={min(20, steps)}", *ARMS[arm], *widths(arm, hidden), *extra]  # fmt: skip


def same_settings(a: object, b: object) -> bool:
    """Whether two config dicts agree on every key both have (keys added to lmlab since a run are ignored)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(same_settings(a[k], b[k]) for k in a.keys() & b.keys())
    return a == b


def train(out: Path, arm: str, seed: int, steps: int, hidden: int, extra: list[str]) -> Path:
    """One run in ``OUT/ARM_sSEED`` (kept when it finished with the same requested config)."""
    run_dir = out / f"{arm}_s{seed}"
    cfg = load_config(BASE_CONFIG, overrides(arm, seed, steps, hidden, extra))
    summary, record = run_dir / "summary.json", run_dir / "run.json"
    if summary.is_file() and record.is_file() and json.loads(summary.read_text())["status"] == "finished":
        requested = json.loads(record.read_text())["requested_config"]
        if same_settings(json.loads(json.dumps(to_dict(cfg))), requested):
            return run_dir
    t0 = time.perf_counter()
    s = run_pretraining(cfg, run_dir, quiet=True, overwrite=run_dir.exists())
    if s["status"] != "finished":
        raise SystemExit(f"{run_dir}: run ended with status {s['status']} ({s.get('error')})")
    print(f"  {arm} seed {seed}: val loss {s['final_val_loss']:.4f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return run_dir


def measure(run_dir: Path) -> dict:
    """What one run contributes: summary numbers, the eval curve, tail routing statistics, throughput."""
    s = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    tail_from = s["steps"] - max(1, round(TAIL * s["steps"]))
    tail = [r for r in train_rows if r["step"] > tail_from]
    row = {
        "final_val_loss": s["final_val_loss"],
        "final_train_loss": s["final_train_loss"],  # includes the weighted auxiliary losses of MoE arms
        "params": s["params"],
        "active_params": s.get("active_params", s["params"]),
        "tokens": s["tokens"],
        "wall_time_s": s["wall_time_s"],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train_rows),
        "eval_curve": [[r["step"], r["val_loss"]] for r in evals],
        "tail_steps": [tail[0]["step"], tail[-1]["step"]] if tail else None,
    }
    for name in ROUTING:
        if tail and name in tail[0]:
            row[name] = statistics.fmean(r[name] for r in tail)
    return row


# --------------------------------------------------------------------------- statistics and the table


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def summarize(per_seed: dict[str, dict[str, dict]], seeds: list[int]) -> tuple[dict, dict]:
    """Per arm: mean ± CI of each measure; per contrast of two trained arms: the paired differences."""
    arms: dict[str, dict] = {}
    for arm in per_seed:
        runs = [per_seed[arm][str(s)] for s in seeds]
        entry: dict = {}
        for key in ("final_val_loss", "tokens_per_s_median", *ROUTING):
            if key in runs[0]:
                m, h = mean_ci([r[key] for r in runs])
                entry[key] = {"mean": m, "ci95": h}
        for key in ("params", "active_params", "tokens"):
            entry[key] = runs[0][key]
        steps = [step for step, _ in runs[0]["eval_curve"]]
        entry["eval_curve_mean"] = [[st, statistics.fmean(r["eval_curve"][i][1] for r in runs)]
                                    for i, st in enumerate(steps)]  # fmt: skip
        arms[arm] = entry
    contrasts = {}
    for name, (a, b, key) in CONTRASTS.items():
        if a not in per_seed or b not in per_seed or key not in per_seed[a][str(seeds[0])]:
            continue
        diffs = [per_seed[a][str(s)][key] - per_seed[b][str(s)][key] for s in seeds]
        m, h = mean_ci(diffs)
        contrasts[name] = {"mean": m, "ci95": h, "per_seed": diffs, "excludes_zero": abs(m) > h and len(diffs) > 1}
    return arms, contrasts


def fmt(cell: dict | None, digits: int = 3) -> str:
    return "—" if cell is None else f"{cell['mean']:.{digits}f} ± {cell['ci95']:.{digits}f}"


def markdown(res: dict) -> str:
    arms, contrasts = res["arms"], res["contrasts"]
    vs_dense = {a: contrasts.get(f"{a} - dense: val loss") for a in arms}
    lines = [
        "| arm | final val loss | Δ vs dense (paired) | params | active params | max load | overflow | balance "
        "| tokens/s (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms.items():
        lines.append(
            f"| {arm} | {fmt(e['final_val_loss'])} | {fmt(vs_dense[arm]) if vs_dense[arm] else '—'} "
            f"| {e['params']:,} | {e['active_params']:,} | {fmt(e.get('moe_max_load'), 2)} "
            f"| {fmt(e.get('moe_overflow'))} | {fmt(e.get('moe_balance'))} | {e['tokens_per_s_median']['mean']:,.0f} |"
        )
    lines += [
        "",
        "| paired contrast (a − b, same seed) | mean ± 95% CI | per seed | CI excludes 0 |",
        "|---|---|---|---|",
    ]
    for name, c in contrasts.items():
        per = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
        lines.append(
            f"| {name} | {c['mean']:+.3f} ± {c['ci95']:.3f} | {per} | {'yes' if c['excludes_zero'] else 'no'} |"
        )
    steps = [st for st, _ in next(iter(arms.values()))["eval_curve_mean"]]
    lines += ["", "| arm | " + " | ".join(f"val loss @ {st}" for st in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm, e in arms.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for _, v in e["eval_curve_mean"]) + " |")
    n = len(res["seeds"])
    lines += [
        "",
        f"Seeds {res['seeds']}; {res['steps']} steps × {res['tokens_per_step']:,} tokens per run; mean ± 95% CI "
        f"(Student t, {n - 1} degrees of freedom). Routing statistics: mean over steps {res['tail_steps'][0]}–"
        f"{res['tail_steps'][1]} (last {TAIL:.0%}) and over the MoE layers; tokens/s is informative only. "
        f"Training loops: {res['runs_wall_time_s']:.0f} s in all (the runs' summary.json); this invocation: "
        f"{res['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (finished runs are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--hidden", type=int, default=128, help="dense FFN width H (each expert: H/2)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--results", default=str(HERE / "results"), help="where moe_study.json and .md go")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (e.g. train.device=cuda)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, seeds = Path(args.out), args.seeds
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed: dict[str, dict[str, dict]] = {arm: {} for arm in args.arms}
    for seed in seeds:  # seed-major: an interrupted study has whole seeds of every arm
        print(f"seed {seed} ...", flush=True)
        for arm in args.arms:
            per_seed[arm][str(seed)] = measure(train(out, arm, seed, args.steps, args.hidden, args.overrides))
    arms, contrasts = summarize(per_seed, seeds)
    cfg = load_config(BASE_CONFIG, overrides(args.arms[0], seeds[0], args.steps, args.hidden, args.overrides))
    first = per_seed[args.arms[0]][str(seeds[0])]
    res = {
        "study": "MoE vs dense at equal active parameters and tokens (issue 14, study a)",
        "command": "OMP_NUM_THREADS=1 python examples/architectures/moe_study.py " + " ".join(argv or sys.argv[1:]),
        "base_config": str(BASE_CONFIG.relative_to(HERE.parent.parent)),
        "arms": arms,
        "arm_overrides": {a: ARMS[a] + widths(a, args.hidden) for a in args.arms},
        "extra_overrides": args.overrides,
        "contrasts": contrasts,
        "seeds": seeds,
        "steps": args.steps,
        "dense_hidden": args.hidden,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len,
        "tail_fraction": TAIL,
        "tail_steps": first["tail_steps"],
        "per_seed": per_seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 1),  # this invocation (reused runs cost ~0)
        "runs_wall_time_s": round(sum(r["wall_time_s"] for arm in per_seed.values() for r in arm.values()), 1),
    }
    table = markdown(res)
    for folder in (out, Path(args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "moe_study.json").write_text(json.dumps(res, indent=1) + "\n")
        (folder / "moe_study.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
