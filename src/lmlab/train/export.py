"""``lmlab export``: consolidate a run's checkpoint into one ``model.safetensors``.

A checkpoint written by several ranks (``torch.distributed.checkpoint``, one shard file per rank)
or by one process is read into a plain model and written as a single safetensors file with the
model config in its metadata, ready for ``export-hf``, inference or sharing.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from lmlab.train import checkpoint as ckpt_io


def export_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the weights of ``path`` (a run directory -> its latest checkpoint, or a checkpoint
    directory) to ``out`` (default: ``RUN_DIR/model.safetensors``), atomically; return ``out``."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    model, cfg, _ = ckpt_io.load_model(ckpt)
    meta = ckpt_io.read_meta(ckpt)
    target = Path(out) if out is not None else ckpt.parent.parent / ckpt_io.MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    metadata = {
        "format": "lmlab",
        "step": str(meta.get("step")),
        "model_config": json.dumps(asdict(cfg.model)),
        "source": str(ckpt),
    }
    save_file(ckpt_io.model_state_dict(model), str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return target


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab export",
        description="Consolidate a run's latest checkpoint (sharded or not) into one safetensors file.",
    )
    p.add_argument("run_dir", help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", help="output file (default: RUN_DIR/model.safetensors)")
    args = p.parse_args(argv)
    target = export_checkpoint(args.run_dir, args.out)
    print(f"wrote {target}")
    return 0
