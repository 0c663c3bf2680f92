"""Two gloo ranks training with the LM objective's ``loss_impl`` (fused linear cross-entropy) under DDP and FSDP2.

Lives in an importable module because ``torch.multiprocessing`` spawns fresh interpreters that import the
worker by its module name (as ``dist_harness``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from unit.distributed.dist_harness import RankBatches, config

from lmlab.config import RunConfig
from lmlab.train.distributed import DistContext

FUSED_RUNS = {
    "fsdp_fused": ("distributed.strategy=fsdp", "objective.loss_impl=fused"),
    "fsdp_fused_untied": ("distributed.strategy=fsdp", "objective.loss_impl=fused", "model.tie_embeddings=false"),
    "ddp_fused": ("distributed.strategy=ddp", "objective.loss_impl=fused"),
    "fsdp_chunked": ("distributed.strategy=fsdp", "objective.loss_impl=chunked"),
}
OPTIONS = ("objective.loss_chunk_tokens=5", "objective.z_loss=1e-3", "objective.label_smoothing=0.1")


def train_objective(cfg: RunConfig, run_dir: Path, ctx: DistContext | None = None) -> list[tuple[int, float, float]]:
    """``dist_harness.train`` with ``build_lm_loss(cfg.objective)`` as the loss: ``(step, loss, grad_norm)``."""
    from lmlab.models.decoder import Decoder
    from lmlab.objectives.lm_objective import build_lm_loss
    from lmlab.train.loop import Trainer

    ctx = ctx or DistContext()
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    records: list[dict[str, Any]] = []
    batches = RankBatches(ctx.rank, ctx.world_size)
    loss_fn = build_lm_loss(cfg.objective)
    trainer = Trainer(cfg, run_dir, model, batches, loss_fn, device=ctx.device, on_log=records.append, dist=ctx)
    trainer.fit()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]


def fused_worker(rank: int, out_dir: str) -> None:
    """Every run of ``FUSED_RUNS`` on 2 ranks in one pair of processes; rank 0 writes ``results.json``."""
    from lmlab.train.distributed import setup_distributed

    out = Path(out_dir)
    results: dict[str, list] = {}
    group = setup_distributed(config(2, *FUSED_RUNS["ddp_fused"], *OPTIONS))
    try:
        for name, overrides in FUSED_RUNS.items():
            cfg = config(2, *overrides, *OPTIONS)
            ctx = setup_distributed(cfg)  # joins the existing group with this strategy
            results[name] = train_objective(cfg, out / name, ctx)
    finally:
        group.close()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
