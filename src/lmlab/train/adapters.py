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

import torch
from torch import nn

from lmlab.config import RunConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.build import Head, build_model
from lmlab.models.corda import corda_init, input_covariances
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


def quantize_frozen_base(model: nn.Module, cfg: RunConfig, device: torch.device) -> int:
    """QLoRA (``adapter.quantize: nf4``): the frozen block weights in 4-bit NF4 on a CUDA ``device``; returns how
    many layers were quantized."""
    if device.type != "cuda":
        raise ConfigError(
            f"adapter.quantize={cfg.adapter.quantize} (QLoRA) trains on a 4-bit base with bitsandbytes' CUDA kernels, "
            f"and this run's device is {device.type}; on a CPU train the adapters on the full-precision base "
            "(adapter.quantize=none)"
        )
    from lmlab.models.qlora import quantize_base

    decoder = getattr(model, "decoder", model)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return quantize_base(decoder, compute_dtype=dtype)


def full_precision_model(cfg: RunConfig, head: Head, trained: nn.Module) -> nn.Module:
    """The model of a run whose base was quantized for training, rebuilt on the full-precision base of
    ``init_from`` with the adapters (and head) of ``trained``: what generation and evaluation use."""
    from lmlab.train.pretrained import adapter_model

    model, _ = adapter_model(cfg, head)
    model.load_state_dict(ckpt_io.model_state_dict(trained), strict=False)
    return model


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


def corda_start(model: nn.Module, cfg: RunConfig, batches, tokenizer, device, ctx) -> dict[str, Any]:
    """Initialise the adapters of a new run by CorDA (``adapter.init``, ``lmlab.models.corda``) from
    ``adapter.corda_samples`` sequences of context: ``adapter.corda_file`` (any SFT-format file), or the run's
    own first training rows (the batch stream is rewound afterwards, so training sees the same data). The
    covariances are summed over ranks, so every rank starts alike. Returns what was used, for the summary."""
    a = cfg.adapter
    if a.corda_file:
        from lmlab.data.chat import read_records

        records = read_records(a.corda_file)[: a.corda_samples]
        rows = [torch.tensor(r.encode(tokenizer)[0][: cfg.model.max_seq_len]) for r in records]
        source = a.corda_file
    else:
        state = batches.state_dict()
        rows = []
        while len(rows) < a.corda_samples:
            rows.extend(batches.next_batch(cfg.train.micro_batch_size)["input_ids"])
        batches.load_state_dict(state)
        rows, source = rows[: a.corda_samples], "training data"
    pad = getattr(tokenizer, "pad_id", None)
    rows = [_strip_padding(r, pad) for r in rows]
    decoder = getattr(model, "decoder", model)

    def forward(_, row: torch.Tensor) -> None:
        decoder(row[None].to(device))

    sums, passes = input_covariances(decoder, forward, [r for r in rows if r.numel()])
    passes = int(ctx.all_reduce_sum(torch.tensor(float(passes), dtype=torch.float64)))
    covs = {name: ctx.all_reduce_sum(c) / max(passes, 1) for name, c in sums.items()}  # the mean per sequence
    corda_init(decoder, covs, a.init)
    return {"mode": a.init, "source": source, "sequences": len(rows), "tokens": int(sum(r.numel() for r in rows))}


def _strip_padding(row: torch.Tensor, pad: int | None) -> torch.Tensor:
    """``row`` without its trailing padding."""
    if pad is None:
        return row
    real = (row != pad).nonzero()
    return row[: int(real[-1]) + 1] if real.numel() else row[:0]
