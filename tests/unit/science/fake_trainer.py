"""A stand-in for ``lmlab train`` used by the sweep tests: writes a run directory per docs/CONTRACTS.md.

``fake_trainer.py BASE --out DIR --quiet key=value ...`` or ``fake_trainer.py --resume DIR --quiet``. The final
loss is ``3 + (log10(lr) + 2.5)^2`` so LR sweeps have a known optimum; ``FAKE_TRAINER_LOG`` receives one line per
call; an override ``fake.diverge=true`` writes a NaN loss. With ``fake.wait_for_stop=true`` a fresh start behaves
like the engine under preemption: it writes ``started``, waits (up to 60 s) for SIGTERM, then leaves a checkpoint
and an ``interrupted`` summary and exits 75; ``--resume`` finishes the run as usual. ``fake.kill_parent=true``
kills the process that started the trainer (SIGKILL: a launcher's task dying, as under the OOM killer).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
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
        if cfg.get("fake", {}).get("wait_for_stop"):
            return wait_for_stop(run)
        if cfg.get("fake", {}).get("kill_parent"):
            os.kill(os.getppid(), signal.SIGKILL)
            return 1
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


def wait_for_stop(run: Path) -> int:
    """What lmlab.train.signals does on SIGTERM, without the training: a checkpoint, an interrupted summary, 75."""
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    (run / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    if not stop:
        return 1
    (run / "checkpoints" / "step_0000005").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted", "steps": 5, "signal": "SIGTERM"}))
    return 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
