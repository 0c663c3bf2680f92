"""A stand-in for ``lmlab train`` used by the sweep tests: writes a run directory per docs/CONTRACTS.md.

``fake_trainer.py BASE --out DIR --quiet key=value ...`` or ``fake_trainer.py --resume DIR --quiet``. The final
loss is ``3 + (log10(lr) + 2.5)^2`` so LR sweeps have a known optimum; ``FAKE_TRAINER_LOG`` receives one line per
call; an override ``fake.diverge=true`` writes a NaN loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import yaml


def main(argv: list[str]) -> int:
    log = os.environ.get("FAKE_TRAINER_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(argv) + "\n")
    if argv[0] == "--resume":
        run = Path(argv[1])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    else:
        base, run = argv[0], Path(argv[argv.index("--out") + 1])
        cfg = yaml.safe_load(Path(base).read_text())
        for item in argv[argv.index("--out") + 2 :]:
            if item == "--quiet":
                continue
            key, value = item.split("=", 1)
            node = cfg
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = yaml.safe_load(value)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lr = float(cfg["optim"]["lr"])
    steps = int(cfg["train"]["steps"])
    loss = 3.0 + (math.log10(lr) + 2.5) ** 2
    if cfg.get("fake", {}).get("diverge"):
        loss = float("nan")
    tokens = steps * 1000
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "train", "step": steps, "tokens": tokens, "loss": loss, "lr": lr}) + "\n")
        fh.write(
            json.dumps({"kind": "eval", "step": steps, "tokens": tokens, "val_loss": loss, "val_loss/stories": loss})
            + "\n"
        )
    summary = {
        "status": "diverged" if math.isnan(loss) else "finished",  # as the real trainer does
        "steps": steps,
        "tokens": tokens,
        "params": 1e6,
        "non_embedding_params": 5e5,
        "flops": 6e6 * tokens,
        "final_val_loss": None if math.isnan(loss) else loss,
        "final_train_loss": None if math.isnan(loss) else loss,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
