"""lm-evaluation-harness on lmlab runs: parity with ``lm_eval --model hf`` and the cost of evaluating during training.

1. **Parity.** A small model is pretrained on the ``facts`` world and exported with ``lmlab export-hf``. The same
   lm-eval tasks run through ``lmlab eval harness``'s model (``LmlabLM``, no export) and through lm-eval's own
   ``hf`` model on the export: per-request log-likelihoods (multiple choice and rolling), accuracies and greedy
   generations are compared, and the wall time of each is recorded.
2. **In-loop overhead.** The same training run once more with ``train.evals`` (a task every 100 steps): the
   logged ``eval_cost_pct`` (evaluation time / training time) and the wall time against the run without.

    python examples/eval_harness/run.py --out runs/eval_harness            # ~5 min on 2 CPU cores
    python examples/eval_harness/run.py --out /tmp/eh --quick              # smoke test

Results: ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config
from lmlab.eval.harness import TASKS_DIR, LmlabLM
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics

TASKS = ["lmlab_facts_mc", "lmlab_stories_ppl", "lmlab_facts_qa"]


def overrides(quick: bool) -> list[str]:
    size = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2"]
    if quick:
        size = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1"]
    return size + [
        "model.max_seq_len=128",
        "tokenizer.vocab_size=1024",
        "tokenizer.train_docs=2000",
        "data.synthetic.world=facts",
        f"data.synthetic.n_docs={300 if quick else 2000}",
        "data.val_fraction=0.02",
        f"train.steps={30 if quick else 600}",
        "train.micro_batch_size=16",
        "train.seq_len=128",
        "train.eval_every=100",
        "train.eval_tokens=8192",
        "train.log_every=20",
        "train.ckpt_every=1000",
        "train.progress=false",
        "train.device=cpu",
        "optim.lr=3e-3",
        "schedule.warmup_steps=20",
        "sample.max_new_tokens=16",
    ]


def train(out: Path, extra: list[str], quick: bool) -> float:
    """Train (or reuse) the run at ``out``; returns its training wall time in seconds."""
    if not (out / "summary.json").is_file() or json.loads((out / "summary.json").read_text())["status"] != "finished":
        started = time.perf_counter()
        run_pretraining(load_config(None, overrides(quick) + extra), out, quiet=True, overwrite=True)
        (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    return json.loads((out / "wall.json").read_text())["seconds"]


def parity(run: Path, exported: Path, n_people: int, limit: int) -> dict:
    manager = TaskManager(include_path=[str(TASKS_DIR)], metadata={"n_people": n_people})
    ours_lm = LmlabLM(run=str(run), add_bos_token=False, batch_size=16)
    hf_args = f"pretrained={exported},dtype=float32,prefix_token_id={ours_lm.eot_token_id}"
    common = {"tasks": TASKS, "limit": limit, "log_samples": True, "task_manager": manager}
    started = time.perf_counter()
    hf = simple_evaluate(model="hf", model_args=hf_args, device="cpu", batch_size=16, **common)
    hf_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = simple_evaluate(model=ours_lm, **common)
    ours_seconds = time.perf_counter() - started
    out = {"hf_seconds": hf_seconds, "lmlab_seconds": ours_seconds, "tasks": {}}
    for task in TASKS:
        ref = [r["resps"] for r in hf["samples"][task]]
        got = [r["resps"] for r in ours["samples"][task]]
        row = {"documents": len(ref), "hf": hf["results"][task], "lmlab": ours["results"][task]}
        if task == "lmlab_facts_qa":
            row["same_generations"] = sum(a == b for a, b in zip(ref, got))
        else:
            diffs = [
                abs(
                    float(a[0][0] if isinstance(a[0], list | tuple) else a[0])
                    - float(b[0][0] if isinstance(b[0], list | tuple) else b[0])
                )
                for ra, rb in zip(ref, got)
                for a, b in zip(ra, rb)
            ]
            row["requests"], row["max_abs_loglik_diff"] = len(diffs), max(diffs)
        out["tasks"][task] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/eval_harness")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    n_people = 300 if args.quick else 2000
    limit = 20 if args.quick else 300

    plain_seconds = train(root / "plain", [], args.quick)
    evals = (
        f"train.evals=[{{task: lmlab_facts_mc, every: 100, limit: {limit // 2}, metadata: {{n_people: {n_people}}}}}]"
    )
    evals_seconds = train(root / "with_evals", [evals], args.quick)
    exported = root / "plain_hf"
    if not (exported / "config.json").is_file():
        assert lmlab_main(["export-hf", str(root / "plain"), str(exported)]) == 0
    results = {"parity": parity(root / "plain", exported, n_people, limit)}
    task_evals = [r for r in read_metrics(root / "with_evals") if r["kind"] == "task_eval"]
    results["in_loop"] = {
        "train_seconds_without": plain_seconds,
        "train_seconds_with": evals_seconds,
        "wall_overhead_pct": 100 * (evals_seconds / plain_seconds - 1),
        "eval_cost_pct": task_evals[-1]["eval_cost_pct"],
        "evaluations": len(task_evals),
        "mean_eval_seconds": sum(r["eval_seconds"] for r in task_evals) / len(task_evals),
        "acc_by_step": {r["step"]: r["lmlab_facts_mc/acc"] for r in task_evals},
    }
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
