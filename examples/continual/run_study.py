"""Continual pre-training with replay: the stability gap on the parent's domain, and what replay buys and costs.

    python examples/continual/run_study.py --out runs/continual [--jobs 2] [--record]

A parent is pretrained on the ``stories`` world; children continue it on the ``facts`` world (``init_from``) with a
re-warmed cosine (warmup to the parent's peak LR, then decay), replaying a share f ∈ {0, 0.05, 0.25} of their rows
from the parent's data (``data.replay_fraction``), 2 seeds each. Every evaluation logs the new domain's
``val_loss`` and the old domain's ``val_loss/parent``. The stability gap (Guo et al. 2024, arXiv 2406.14833;
docs/science.md §4) shows as the parent-domain loss jumping at the start of continual training, then recovering
in part; the study measures the jump, how much of it is recovered, the final forgetting, and the new domain's
final loss for each replay share. Results: ``OUT/RESULTS.md`` (``--record`` copies it and the runs' metrics here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPLAY = [0.0, 0.05, 0.25]
SEEDS = [0, 1]
PARENT = {
    "name": "continual-parent",
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 128, "tie_embeddings": True},
    "tokenizer": {"vocab_size": 1024, "train_docs": 5000},
    "data": {"source": "synthetic", "synthetic": {"world": "stories", "n_docs": 20000, "seed": 0}},
    "optim": {"lr": 3.0e-3, "weight_decay": 0.1},
    "schedule": {"name": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
    "train": {
        "steps": 1500,
        "micro_batch_size": 8,
        "seq_len": 128,
        "eval_every": 250,
        "eval_tokens": 32768,
        "log_every": 50,
        "ckpt_every": 100000,
        "progress": False,
    },
    "sample": {"max_new_tokens": 16},
}


def child_config(parent: Path) -> dict:
    """The children's base: the parent's model and LR, continued on ``facts`` with a re-warmed cosine."""
    return {
        **PARENT,
        "name": "continual-child",
        "init_from": str(parent),
        "data": {"source": "synthetic", "synthetic": {"world": "facts", "n_docs": 20000, "seed": 0}},
        "schedule": {"name": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
        "train": {**PARENT["train"], "steps": 600, "eval_every": 20},
    }


def lmlab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmlab", *args], check=True)


def evals(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "eval"]


def measure(child: Path, before: float) -> dict:
    """The parent-domain jump (peak − before), its recovery (peak − final), the final forgetting and new loss."""
    rows = evals(child)
    old = np.array([r["val_loss/parent"] for r in rows])
    peak = int(np.argmax(old))
    return {
        "peak_step": rows[peak]["step"],
        "jump": float(old[peak] - before),
        "recovered": float(old[peak] - old[-1]),
        "forgetting": float(old[-1] - before),
        "new_loss": float(rows[-1]["val_loss"]),
        "new_loss_first": float(rows[0]["val_loss"]),
    }


def report(parent_loss: float, results: dict[float, list[dict]], command: str) -> str:
    lines = [
        "# Continual pre-training with replay: measured",
        "",
        f"Command: `{command}`",
        "",
        f"Parent (stories, d_model 64, 1,500 steps): final validation loss {parent_loss:.4f}. Children: 600 steps",
        "on facts, re-warmed cosine to the parent's peak LR 3e-3, 30 evaluations; 2 seeds each (mean, and the",
        "two seeds in brackets).",
        "",
        "| replay share | parent-domain jump | step of the peak | recovered after it | final forgetting | "
        "new-domain loss |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], fmt: str = "+.4f") -> str:
        return f"{np.mean(values):{fmt}} [{', '.join(f'{v:{fmt}}' for v in values)}]"

    for f, rows in results.items():
        lines.append(
            f"| {f:g} | {cell([r['jump'] for r in rows])} | {cell([r['peak_step'] for r in rows], '.0f')} | "
            f"{cell([r['recovered'] for r in rows])} | {cell([r['forgetting'] for r in rows])} | "
            f"{cell([r['new_loss'] for r in rows], '.4f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--record", action="store_true", help="copy RESULTS.md and the runs' metrics into this folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parent = out / "parent"
    if not (parent / "summary.json").exists():
        (out / "parent.yaml").write_text(yaml.safe_dump(PARENT, sort_keys=False))
        lmlab("train", str(out / "parent.yaml"), "--out", str(parent), "--overwrite", "--quiet")
    (out / "child.yaml").write_text(yaml.safe_dump(child_config(parent.resolve()), sort_keys=False))
    spec = {
        "base": str((out / "child.yaml").resolve()),
        "grid": {"data.replay_fraction": REPLAY, "train.seed": SEEDS},
    }
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    lmlab("sweep", str(out / "sweep.yaml"), "--out", str(out / "children"), "--jobs", str(args.jobs))
    parent_loss = evals(parent)[-1]["val_loss"]
    results: dict[float, list[dict]] = {f: [] for f in REPLAY}
    for run in sorted((out / "children").iterdir()):
        if (run / "summary.json").exists():
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            results[float(cfg["data"]["replay_fraction"])].append(measure(run, parent_loss))
    command = "python examples/continual/run_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(parent_loss, results, command)
    (out / "RESULTS.md").write_text(text + "\n")
    print(text)
    if args.record:
        shutil.copy(out / "RESULTS.md", HERE / "RESULTS.md")
        for run in [parent, *sorted((out / "children").iterdir())]:
            if (run / "metrics.jsonl").exists():
                dest = HERE / "runs" / run.name
                dest.mkdir(parents=True, exist_ok=True)
                for name in ("config.yaml", "metrics.jsonl", "summary.json"):
                    shutil.copy(run / name, dest / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
