"""Adapter runs: LoRA / DoRA (``lmlab.models.lora``) trained on the frozen weights of ``init_from``, by any
recipe (``adapter.kind: lora | dora``).

The base model is never copied: an adapter run's checkpoints hold only what trains (the adapters, and a reward
model's head) with the optimizer state for it, and ``meta.json`` names the base (``adapter_base``: the init_from
run, its checkpoint and that checkpoint's weight digests). Loading an adapter run reads the base first, checks it
is the one the adapters were trained on, then adds the adapters (merged into the weights for generation and
evaluation unless asked otherwise). A base that is itself an adapter run is loaded merged, so adapters stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmlab.config import RunConfig
from lmlab.errors import CheckpointError
from lmlab.models.build import Head, build_model
from lmlab.models.lora import apply_adapters
from lmlab.train import checkpoint as ckpt_io

BASE_KEY = "adapter_base"  # meta.json: what the adapters were trained on


def attach_adapters(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Freeze ``model`` and wrap the linear layers that ``cfg.adapter.targets`` names in adapters (of the decoder
    of a reward model, whose head stays trainable); returns the adapted layers' names."""
    model.requires_grad_(False)
    decoder = getattr(model, "decoder", None)
    adapted = apply_adapters(decoder if isinstance(decoder, nn.Module) else model, cfg.adapter)
    if isinstance(decoder, nn.Module):
        inside = {id(p) for p in decoder.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(True)
    return adapted


def build_run_model(cfg: RunConfig, head: Head = "lm") -> nn.Module:
    """A fresh model of the run's shape: the decoder (or reward model), with the run's adapters when it has any."""
    model = build_model(cfg.model, head)
    if cfg.adapter.enabled:
        attach_adapters(model, cfg)
    return model


def base_record(init_from: str | Path) -> dict[str, Any]:
    """``adapter_base`` of the checkpoints of a run whose adapters train on ``init_from``."""
    ckpt = ckpt_io.resolve_checkpoint(init_from)
    meta = ckpt_io.read_meta(ckpt)
    return {"run": str(Path(init_from).resolve()), "checkpoint": ckpt.name, "sha256": meta.get("sha256", {})}


def check_base(ckpt: Path, base_ckpt: Path) -> None:
    """Refuse to add the adapters of ``ckpt`` to a base other than the one they were trained on."""
    recorded = ckpt_io.read_meta(ckpt).get(BASE_KEY)
    if not recorded:
        return  # written by hand (e.g. an imported PEFT adapter without a digest): nothing to compare
    now = ckpt_io.read_meta(base_ckpt).get("sha256", {})
    if recorded.get("sha256") and recorded["sha256"] != now:
        raise CheckpointError(
            f"{ckpt}: its adapters were trained on {recorded.get('run')} ({recorded.get('checkpoint')}), whose "
            f"weights have changed since (the base now read is {base_ckpt}); restore that base or retrain the adapters"
        )
