"""``lmlab export``: consolidate a run's checkpoint into one ``model.safetensors``.

A checkpoint written by several ranks (``torch.distributed.checkpoint``, one shard file per rank)
or by one process is read into a plain model and written as a single safetensors file with the
model config in its metadata, ready for ``export-hf``, inference or sharing. An ``--out`` file that
already exists is replaced only with ``--overwrite``; the default target, the run's own
``model.safetensors``, is refreshed on every export.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from lmlab.config import to_dict
from lmlab.errors import UserError
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.pretrained import load_model


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a directory, or an existing file unless ``overwrite``."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path such as {out / ckpt_io.MODEL_FILE}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")


def export_checkpoint(path: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the weights of ``path`` (a run directory -> its latest checkpoint, or a checkpoint
    directory) to ``out`` (default: ``RUN_DIR/model.safetensors``), atomically; return ``out``.
    An existing ``out`` is replaced only when ``overwrite``."""
    if out is not None:
        check_target(Path(out), overwrite)
    ckpt = ckpt_io.resolve_checkpoint(path)
    model, cfg, _ = load_model(ckpt)
    meta = ckpt_io.read_meta(ckpt)
    target = Path(out) if out is not None else ckpt.parent.parent / ckpt_io.MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    metadata = {
        "format": "lmlab",
        "step": str(meta.get("step")),
        "model_config": json.dumps(to_dict(cfg.model)),
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    target = export_checkpoint(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {target}")
    return 0
