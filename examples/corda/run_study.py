"""CorDA at CPU scale: does a knowledge-preserved start forget less than plain LoRA?

Yang et al. 2024 ("CorDA", arXiv 2406.05223) start each LoRA adapter from a decomposition of W·C, C the covariance
of the layer's inputs on context data. Knowledge-preserved mode (``corda_kpm``) takes C from data of the knowledge
to keep and starts the adapter on its *smallest* components, leaving the directions that knowledge uses in the
frozen part; the paper reports that it forgets less than LoRA. Instruction-previewed mode (``corda_ipm``) takes C
from the task and adapts its *largest* components. This script checks the first claim with lmlab's adapter runs:

- **Base**: a small decoder pretrained on the ``facts`` world's biographies (``BASE``): the knowledge.
- **New task**: continued training on the ``stories`` world with rank-8 adapters on every projection
  (``ADAPT``), from three starts: ``lora`` (B = 0), ``corda_kpm`` (context: 64 biographies, ``adapter.corda_file``)
  and ``corda_ipm`` (context: the run's own story batches); same steps, learning rate and data per seed.
- **Measured**: forgetting = the loss on the biographies after − before (nats/token, lower is better) and the
  task's validation loss; per seed, and over 5 seeds the mean ± the half-width of the 95% Student-t interval of
  forgetting(lora) − forgetting(corda_kpm), > 0 when the knowledge-preserved start forgets less.

    python examples/corda/run_study.py --out runs/corda          # ~12 min on 2 CPU cores
    python examples/corda/run_study.py --out /tmp/corda --quick  # smoke test

Finished runs are reused, so an interrupted study continues where it stopped. Results: ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.pretrained import load_run_model

N_PEOPLE = 400
MODEL = ["model.d_model=96", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=128"]
COMMON = ["train.progress=false", "train.device=cpu", "train.threads=2", "train.seq_len=128"]
BASE = [
    *MODEL, *COMMON, "tokenizer.vocab_size=1024", "data.synthetic.world=facts", f"data.synthetic.n_docs={N_PEOPLE}",
    "train.steps=600", "train.micro_batch_size=16", "optim.lr=3e-3", "schedule.warmup_steps=30",
    "train.eval_every=600", "train.ckpt_every=600",
]  # fmt: skip
ADAPT = [
    *COMMON, "data.synthetic.world=stories", "data.synthetic.n_docs=3000", "train.micro_batch_size=16",
    "optim.lr=1e-3", "schedule.warmup_steps=10", "adapter.kind=lora", "adapter.rank=8", "adapter.alpha=16",
    "adapter.corda_samples=64",
]  # fmt: skip
STARTS = ("lora", "corda_kpm", "corda_ipm")
SEEDS = (0, 1, 2, 3, 4)


def finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"


@torch.no_grad()
def knowledge_loss(run: Path, texts: list[str]) -> float:
    """Mean next-token loss (nats/token) of ``run``'s model on ``texts`` (the base's biographies)."""
    loaded = load_run_model(run)
    model, tok = loaded.model, loaded.tokenizer
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([tok.encode_document(text)[: model.cfg.max_seq_len]])
        logits = model(ids)[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return total / count


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, half


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/corda")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bios = list(FactsWorld().documents(0, N_PEOPLE))
    context = out / "knowledge.jsonl"
    context.write_text("".join(json.dumps({"text": t}) + "\n" for t in bios[:64]))
    probe = bios[:200] if not args.quick else bios[:20]
    base = out / "base"
    quick = ["train.steps=20", "schedule.warmup_steps=2"] if args.quick else []
    if not finished(base):
        run_pretraining(load_config(None, [*BASE, *quick]), base, quiet=True, overwrite=True)
    before = knowledge_loss(base, probe)
    steps = 10 if args.quick else 150
    rows = []
    for seed in SEEDS if not args.quick else SEEDS[:1]:
        row = {"seed": seed}
        for start in STARTS:
            run = out / f"seed{seed}" / start
            extra = [f"adapter.init={start}"] + ([f"adapter.corda_file={context}"] if start == "corda_kpm" else [])
            cfg = load_config(
                None,
                [*ADAPT, f"init_from={base}", f"train.steps={steps}", f"train.eval_every={steps}",
                 f"train.ckpt_every={steps}", f"train.seed={seed}", f"data.seed={seed}", *extra],
            )  # fmt: skip
            if not finished(run):
                run_pretraining(cfg, run, quiet=True, overwrite=True)
            summary = json.loads((run / "summary.json").read_text())
            row[start] = {
                "forgetting": knowledge_loss(run, probe) - before,
                "task_val_loss": summary["final_val_loss"],
            }
        rows.append(row)
        print(json.dumps(row))
    gap = [r["lora"]["forgetting"] - r["corda_kpm"]["forgetting"] for r in rows]
    results = {
        "base_knowledge_loss": before,
        "per_seed": rows,
        "lora_minus_kpm_forgetting": t_interval(gap),
        "means": {
            s: {k: statistics.mean(r[s][k] for r in rows) for k in ("forgetting", "task_val_loss")} for s in STARTS
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    mean, half = results["lora_minus_kpm_forgetting"]
    print(f"forgetting(lora) - forgetting(corda_kpm) = {mean:+.4f} ± {half:.4f} nats/token over {len(rows)} seeds")
    for s in STARTS:
        m = results["means"][s]
        print(f"{s:10s} forgetting {m['forgetting']:+.4f}  task val loss {m['task_val_loss']:.4f}")


if __name__ == "__main__":
    main()
