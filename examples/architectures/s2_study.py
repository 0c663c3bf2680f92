"""S2-Attention vs dense attention on the recall world (issue 14, study b), CPU-sized.

Four arms, each trained with the same data, token budget, schedule and seeds from ``s2_study.yaml`` (a small
decoder with grouped-query attention, 4 KV heads, on the synthetic ``recall`` world: key=value pairs, then
queries of some keys; every document fits in one training window, so every needle lies within the training
length):

- ``dense``: dense causal GQA;
- ``s2_hybrid``: S2-Attention (Lin et al. 2024, arXiv 2407.17678; docs/science.md §9.2) in every other block,
  dense in the others (``dense_every=2``, Phi-3-small's layout);
- ``s2_sparse``: S2 in every block (``dense_every=0``);
- ``sliding``: the control: a causal sliding window as wide as S2's local window (``block_size × local_blocks``)
  in every block, no global layers: pure locality, which cannot read needles beyond the window.

S2 keys are grouped in blocks of ``--block`` tokens; KV head h sees the blocks j with
``(j + h·step) mod --stride == 0`` plus the ``--local-blocks`` most recent blocks; with ``--stride`` equal to
the number of KV heads the heads' shards together cover every block.

Per arm (mean ± 95% Student-t CI over seeds; paired differences to ``dense`` on the same seed): the final
validation loss on a fixed held-out set; needle retrieval accuracy on held-out recall questions
(``lmlab.eval.recall``, greedy, overall and by the needle's depth in the list, fifths: depth 0 = the first pair,
the farthest from the question); the KV cache a decode step needs at the end of the training context
(``kv_cache``, the counting rule is in its docstring), in entries and bytes, and its ratio to dense.

    OMP_NUM_THREADS=1 python examples/architectures/s2_study.py --out runs/s2_study          # ~16 min, 1 core
    OMP_NUM_THREADS=1 python examples/architectures/s2_study.py --out /tmp/s2 --steps 20 --seeds 0  # smoke test

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

from lmlab.config import load_config
from lmlab.data.synthetic.recall import SUBSETS, RecallWorld, recall_items
from lmlab.eval.recall import DEPTH_BINS, evaluate_recall
from lmlab.models.attention import Attention
from lmlab.models.masks import and_masks, causal, materialize
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.pretrained import load_model

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "s2_study.yaml"
ARM_NAMES = ("dense", "s2_hybrid", "s2_sparse", "sliding")
RECALL_ITEMS = 500  # held-out questions per model (lmlab.data.synthetic.recall.recall_items)


def arm_overrides(arm: str, block: int, local_blocks: int, stride: int) -> list[str]:
    """Overrides of ``s2_study.yaml`` (the dense arm) for one arm."""
    s2 = [
        "model.attention.kind=s2",
        f"model.attention.block_size={block}",
        f"model.attention.local_blocks={local_blocks}",
        f"model.attention.vert_stride={stride}",
    ]
    return {
        "dense": [],
        "s2_hybrid": [*s2, "model.attention.dense_every=2"],
        "s2_sparse": [*s2, "model.attention.dense_every=0"],
        "sliding": [
            "model.attention.kind=sliding",
            f"model.attention.window={block * local_blocks}",
            "model.attention.global_every=0",
        ],
    }[arm]


def overrides(arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    every = max(1, args.steps // 5)  # five evaluations, the last at the final step
    return [
        f"name=s2-study-{arm}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.eval_every={every}",
        f"schedule.warmup_steps={min(args.warmup, args.steps)}",
        *arm_overrides(arm, args.block, args.local_blocks, args.stride),
        *args.overrides,
    ]


def train(out: Path, arm: str, seed: int, args: argparse.Namespace) -> Path:
    """One run in ``OUT/ARM_sSEED`` (kept when it finished with this many steps)."""
    run_dir = out / f"{arm}_s{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s["status"] == "finished" and s["steps"] == args.steps:
            return run_dir
    cfg = load_config(BASE_CONFIG, overrides(arm, seed, args))
    t0 = time.perf_counter()
    s = run_pretraining(cfg, run_dir, quiet=True, overwrite=run_dir.exists())
    if s["status"] != "finished":
        raise SystemExit(f"{run_dir}: run ended with status {s['status']} ({s.get('error')})")
    print(f"  {arm} seed {seed}: val loss {s['final_val_loss']:.4f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return run_dir


# --------------------------------------------------------------------------- the KV cache a decode step needs


def kv_cache(model: torch.nn.Module, context: int, bytes_per_element: int, horizon: int | None = None) -> dict:
    """Per layer, the (KV head, position) entries a decode step at the end of the training context must keep.

    For the query at position ``T − 1`` (``T = context``; keys 0 … T − 1, its own included) a KV head must hold
    the positions that any query head of its GQA group may read: the union over the group of the last row of
    the layer's mask (causal AND the layer's pattern, ``lmlab.models.masks.materialize``). ``future`` counts
    what a cache must keep to serve every later query as well: the positions ≤ T − 1 that any query at
    T − 1 … T − 1 + horizon may read. The two are equal when the pattern is "KV-cache efficient" (S2's design:
    a key no query needs now is never needed again); a dense layer needs all T per KV head. Bytes:
    entries × 2 (K and V) × head_dim × ``bytes_per_element``."""
    horizon = horizon or 4 * context
    layers = []
    for m in (x for x in model.modules() if isinstance(x, Attention)):
        heads, kv_heads = m.n_heads, m.n_kv_heads
        if m.pattern is None:
            now = future = kv_heads * context
        else:
            q = torch.arange(context - 1, context - 1 + horizon)
            allowed = materialize(and_masks(causal, m.pattern), 1, heads, q, context)[0].expand(heads, horizon, context)
            per_kv = allowed.reshape(kv_heads, heads // kv_heads, horizon, context).any(dim=1)  # [H_kv, F, T]
            now, future = int(per_kv[:, 0].sum()), int(per_kv.any(dim=1).sum())
        layers.append(
            {
                "entries": now,
                "entries_future": future,
                "dense_entries": kv_heads * context,
                "bytes": now * 2 * m.head_dim * bytes_per_element,
            }
        )
    entries = sum(r["entries"] for r in layers)
    dense = sum(r["dense_entries"] for r in layers)
    return {
        "context": context,
        "bytes_per_element": bytes_per_element,
        "per_layer_entries": [r["entries"] for r in layers],
        "per_layer_entries_future": [r["entries_future"] for r in layers],
        "kv_cache_efficient": all(r["entries"] == r["entries_future"] for r in layers),
        "entries": entries,
        "bytes": sum(r["bytes"] for r in layers),
        "ratio_to_dense": entries / dense,
    }


@torch.no_grad()
def pruned_cache_check(model: torch.nn.Module, context: int) -> dict | None:
    """Cross-check of ``kv_cache`` with lmlab's pruned S2 cache (``new_kv_cache(prune=True)``, if this lmlab has
    it): after a prefill of T − 1 tokens it holds what the query at T − 1 reads among the earlier positions;
    adding that query's own key per KV head and layer gives the count of ``kv_cache``."""
    try:
        cache = model.new_kv_cache(prune=True)
    except (TypeError, ValueError) as err:
        return {"available": False, "why": str(err)}
    ids = torch.randint(0, model.cfg.vocab_size, (1, context - 1), device=next(model.parameters()).device)
    model(ids, kv_cache=cache)
    own = sum(m.n_kv_heads for m in model.modules() if isinstance(m, Attention))
    return {"available": True, "entries_after_prefill": cache.entries(), "plus_own_keys": cache.entries() + own}


# --------------------------------------------------------------------------- per-run measures


def recall_questions(subset: str | None, n: int = RECALL_ITEMS) -> list:
    pairs = SUBSETS[subset]["pairs"] if subset else RecallWorld().pairs
    return recall_items(n, pairs)


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer, items: list, batch_size: int = 100) -> dict:
    """Teacher-forced cross-entropy (nats per answer token) of each question's answer after its prompt, overall and
    by the needle's depth (fifths, as ``evaluate_recall``): graded where exact-match accuracy is all or nothing
    (ln 10 = 2.303 per digit is a guess among the ten digits). Questions are batched by equal length."""
    groups: dict[int, list[tuple[int, list[int], int]]] = {}
    for i, item in enumerate(items):
        prompt = [tokenizer.eos_id, *tokenizer.encode(item.prompt)]
        ids = prompt + tokenizer.encode(item.answer)
        groups.setdefault(len(ids), []).append((i, ids, len(prompt)))
    per_item = [0.0] * len(items)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = torch.tensor([x for _, x, _ in chunk], device=next(model.parameters()).device)
            logp = model(ids[:, :-1]).float().log_softmax(dim=-1)  # [B, T - 1, V]
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T - 1]
            for row, (i, _, n_prompt) in enumerate(chunk):
                per_item[i] = float(nll[row, n_prompt - 1 :].mean())
    bins: dict[str, list[float]] = {}
    for item, loss in zip(items, per_item):
        low = min(int(item.depth * DEPTH_BINS), DEPTH_BINS - 1) / DEPTH_BINS
        bins.setdefault(f"{low:.1f}-{low + 1 / DEPTH_BINS:.1f}", []).append(loss)
    return {"loss": statistics.fmean(per_item), "by_depth": {k: statistics.fmean(v) for k, v in sorted(bins.items())}}


def measure(run_dir: Path, items: list, kv_bytes: int, device: str = "cpu") -> dict:
    """What one run contributes: summary numbers, the eval curve, recall accuracy, the KV cache it needs."""
    s = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    model, cfg, tokenizer = load_model(run_dir, device)
    recall = evaluate_recall(model, tokenizer, items, batch_size=100)
    answer = answer_loss(model, tokenizer, items)
    return {
        "final_val_loss": s["final_val_loss"],
        "final_train_loss": s["final_train_loss"],
        "recall_accuracy": recall["accuracy"],
        "recall_by_depth": recall["by_depth"],
        "recall_n": recall["n"],
        "answer_loss": answer["loss"],
        "answer_loss_by_depth": answer["by_depth"],
        "params": s["params"],
        "tokens": s["tokens"],
        "wall_time_s": s["wall_time_s"],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train_rows),
        "eval_curve": [[r["step"], r["val_loss"]] for r in evals],
        "kv_cache": kv_cache(model, cfg.train.seq_len, kv_bytes),
        "pruned_cache_check": pruned_cache_check(model, cfg.train.seq_len),
    }


def fit_check(cfg, tokenizer, items: list) -> dict:
    """Token lengths of a training document and of the recall prompts against the training context."""
    world = RecallWorld(**SUBSETS[cfg.data.synthetic.subset]) if cfg.data.synthetic.subset else RecallWorld()
    docs = list(world.documents(cfg.data.synthetic.seed, 100))
    doc_tokens = [len(tokenizer.encode(d)) + 1 for d in docs]  # + the EOS that separates documents
    prompt_tokens = [1 + len(tokenizer.encode(i.prompt)) + len(tokenizer.encode(i.answer)) for i in items]
    return {
        "seq_len": cfg.train.seq_len,
        "document_tokens_max": max(doc_tokens),
        "document_tokens_mean": statistics.fmean(doc_tokens),
        "question_tokens_max": max(prompt_tokens),
        "fits": max(doc_tokens) <= cfg.train.seq_len and max(prompt_tokens) <= cfg.train.seq_len,
    }


# --------------------------------------------------------------------------- statistics and the table


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def cell(values: list[float]) -> dict:
    m, h = mean_ci(values)
    return {"mean": m, "ci95": h, "per_seed": values}


def fmt(c: dict | None, digits: int = 3, sign: bool = False) -> str:
    if c is None:
        return "—"
    return f"{c['mean']:{'+' if sign else ''}.{digits}f} ± {c['ci95']:.{digits}f}"


def summarize(per_seed: dict[str, dict[str, dict]], seeds: list[int]) -> tuple[dict, dict]:
    arms: dict[str, dict] = {}
    for arm, by_seed in per_seed.items():
        runs = [by_seed[str(s)] for s in seeds]
        depths = sorted(runs[0]["recall_by_depth"])
        kv = runs[0]["kv_cache"]
        arms[arm] = {
            "final_val_loss": cell([r["final_val_loss"] for r in runs]),
            "recall_accuracy": cell([r["recall_accuracy"] for r in runs]),
            "recall_by_depth": {d: cell([r["recall_by_depth"][d] for r in runs]) for d in depths},
            "answer_loss": cell([r["answer_loss"] for r in runs]),
            "answer_loss_by_depth": {d: cell([r["answer_loss_by_depth"][d] for r in runs]) for d in depths},
            "tokens_per_s_median": cell([r["tokens_per_s_median"] for r in runs]),
            "params": runs[0]["params"],
            "tokens": runs[0]["tokens"],
            "kv_cache": kv,
            "eval_curve_mean": [
                [st, statistics.fmean(r["eval_curve"][i][1] for r in runs)]
                for i, (st, _) in enumerate(runs[0]["eval_curve"])
            ],
        }
    contrasts = {}
    for arm in per_seed:
        if arm == "dense" or "dense" not in per_seed:
            continue
        for key, label in (
            ("final_val_loss", "val loss"),
            ("recall_accuracy", "recall accuracy"),
            ("answer_loss", "answer loss"),
        ):
            diffs = [per_seed[arm][str(s)][key] - per_seed["dense"][str(s)][key] for s in seeds]
            c = cell(diffs)
            c["excludes_zero"] = len(diffs) > 1 and abs(c["mean"]) > c["ci95"]
            contrasts[f"{arm} - dense: {label}"] = c
    return arms, contrasts


def markdown(res: dict) -> str:
    arms, contrasts = res["arms"], res["contrasts"]
    lines = [
        "| arm | final val loss | Δ val loss vs dense (paired) | recall accuracy | Δ recall vs dense (paired) "
        "| KV entries / layer (T = {}) | KV cache bytes (fp32) | ratio to dense | params |".format(res["context"]),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms.items():
        dl, da = contrasts.get(f"{arm} - dense: val loss"), contrasts.get(f"{arm} - dense: recall accuracy")
        kv = e["kv_cache"]
        lines.append(
            f"| {arm} | {fmt(e['final_val_loss'])} | {fmt(dl, sign=True)} | {fmt(e['recall_accuracy'])} "
            f"| {fmt(da, sign=True)} | {', '.join(map(str, kv['per_layer_entries']))} | {kv['bytes']:,} "
            f"| {kv['ratio_to_dense']:.3f} | {e['params']:,} |"
        )
    depths = list(next(iter(arms.values()))["recall_by_depth"])
    lines += [
        "",
        "Recall accuracy by the needle's depth in the list (0 = first pair, farthest from the question):",
        "",
        "| arm | " + " | ".join(depths) + " |",
        "|---" * (len(depths) + 1) + "|",
    ]
    for arm, e in arms.items():
        lines.append(f"| {arm} | " + " | ".join(fmt(e["recall_by_depth"][d], 2) for d in depths) + " |")
    lines += [
        "",
        "Answer loss (teacher-forced, nats per answer digit; ln 10 = 2.303 is a guess), overall and by depth:",
        "",
        "| arm | all | Δ vs dense (paired) | " + " | ".join(depths) + " |",
        "|---" * (len(depths) + 3) + "|",
    ]
    for arm, e in arms.items():
        d_ans = contrasts.get(f"{arm} - dense: answer loss")
        lines.append(
            f"| {arm} | {fmt(e['answer_loss'])} | {fmt(d_ans, sign=True)} | "
            + " | ".join(fmt(e["answer_loss_by_depth"][d], 2) for d in depths)
            + " |"
        )
    steps = [st for st, _ in next(iter(arms.values()))["eval_curve_mean"]]
    lines += [
        "",
        "| arm (mean over seeds) | " + " | ".join(f"val loss @ {st}" for st in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for arm, e in arms.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for _, v in e["eval_curve_mean"]) + " |")
    n = len(res["seeds"])
    fit = res["fit_check"]
    lines += [
        "",
        f"Seeds {res['seeds']}; {res['steps']} steps × {res['tokens_per_step']:,} tokens per run; mean ± 95% CI "
        f"(Student t, {n - 1} degrees of freedom); {res['recall_items']} recall questions per model "
        f"({res['pairs']} pairs, up to {fit['question_tokens_max']} tokens with the answer; documents up to "
        f"{fit['document_tokens_max']} tokens; context {res['context']}). Wall time {res['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (finished runs are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--block", type=int, default=16, help="S2 block size (tokens)")
    p.add_argument("--local-blocks", type=int, default=2, help="S2 local window in blocks (sliding: block × this)")
    p.add_argument("--stride", type=int, default=4, help="S2 vertical stride (must divide the KV heads)")
    p.add_argument("--arms", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES)
    p.add_argument("--recall-items", type=int, default=RECALL_ITEMS)
    p.add_argument("--results", default=str(HERE / "results"), help="where s2_study.json and .md go")
    p.add_argument("--eval-device", default="cpu", help="device of the recall and KV-cache measurements")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (e.g. train.device=cuda)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, seeds = Path(args.out), args.seeds
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cfg = load_config(BASE_CONFIG, overrides("dense", seeds[0], args))
    items = recall_questions(cfg.data.synthetic.subset, args.recall_items)
    kv_bytes = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    per_seed: dict[str, dict[str, dict]] = {arm: {} for arm in args.arms}
    fit = None
    for seed in seeds:  # seed-major: an interrupted study has whole seeds of every arm
        print(f"seed {seed} ...", flush=True)
        for arm in args.arms:
            run_dir = train(out, arm, seed, args)
            per_seed[arm][str(seed)] = row = measure(run_dir, items, kv_bytes, args.eval_device)
            print(
                f"    recall {row['recall_accuracy']:.3f} {row['recall_by_depth']}, answer loss {row['answer_loss']:.3f}",
                flush=True,
            )
            if fit is None:
                _, run_cfg, tokenizer = load_model(run_dir)
                fit = fit_check(run_cfg, tokenizer, items)
    arms, contrasts = summarize(per_seed, seeds)
    res = {
        "study": "S2-Attention vs dense on the recall world (issue 14, study b)",
        "command": "OMP_NUM_THREADS=1 python examples/architectures/s2_study.py " + " ".join(argv or sys.argv[1:]),
        "base_config": str(BASE_CONFIG.relative_to(HERE.parent.parent)),
        "arms": arms,
        "arm_overrides": {a: arm_overrides(a, args.block, args.local_blocks, args.stride) for a in args.arms},
        "extra_overrides": args.overrides,
        "contrasts": contrasts,
        "seeds": seeds,
        "steps": args.steps,
        "context": cfg.train.seq_len,
        "subset": cfg.data.synthetic.subset,
        "pairs": len(items[0].prompt.split(" ;")[0].split()),
        "recall_items": len(items),
        "s2": {
            "block_size": args.block,
            "local_blocks": args.local_blocks,
            "vert_stride": args.stride,
            "sliding_window": args.block * args.local_blocks,
        },
        "model": {
            "d_model": cfg.model.d_model,
            "n_layers": cfg.model.n_layers,
            "n_heads": cfg.model.n_heads,
            "n_kv_heads": cfg.model.kv_heads,
            "head_dim": cfg.model.head_dim,
        },
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len,
        "fit_check": fit,
        "per_seed": per_seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    table = markdown(res)
    for folder in (out, Path(args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "s2_study.json").write_text(json.dumps(res, indent=1) + "\n")
        (folder / "s2_study.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
