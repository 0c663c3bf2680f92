"""Shared pieces of the distributed tests: a rank-aware fixed batch stream, a tiny trainer run, and
a spawner of gloo processes with a deadline (so a broken test fails instead of hanging CI).

Worker functions live here, in an importable module, because ``torch.multiprocessing`` spawns
fresh interpreters that import the function by its module name.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from lmlab.config import RunConfig
from lmlab.errors import DataError
from lmlab.objectives.lm import causal_lm_loss
from lmlab.train.distributed import DistContext

from helpers import tiny_config

VOCAB = 64
GLOBAL_BATCH = 4  # rows per optimizer step in every equivalence run
STEPS = 10


class RankBatches:
    """A fixed stream of rows with ragged label masks; each global micro-batch of ``b · world`` rows is
    split into contiguous per-rank slices, as ``WindowSampler`` does. Ranks see different target
    counts, so only a correctly all-reduced token normalisation matches one process."""

    def __init__(self, rank: int = 0, world_size: int = 1, n_rows: int = 64, seq: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n_rows, seq), generator=g)
        self.y = (3 * self.x + 1) % VOCAB  # a learnable map, so the loss falls within 10 steps
        for i in range(n_rows):
            self.y[i, 1 + (i * 7) % seq :] = -100
        self.rank, self.world_size, self.pos = rank, world_size, 0

    def next_batch(self, b: int) -> dict[str, torch.Tensor]:
        start = self.pos + self.rank * b
        self.pos += b * self.world_size
        return {"input_ids": self.x[start : start + b], "labels": self.y[start : start + b]}

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])


def loss_fn(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def config(world_size: int = 1, *overrides: str) -> RunConfig:
    """10 steps of the tiny model on ``GLOBAL_BATCH`` rows split over ``world_size`` ranks."""
    return tiny_config(
        f"model.vocab_size={VOCAB}",
        f"train.steps={STEPS}",
        f"train.micro_batch_size={GLOBAL_BATCH // world_size}",
        "train.ckpt_every=5",
        "train.keep_last=5",
        "optim.lr=1e-2",
        *overrides,
    )


def train(
    cfg: RunConfig,
    run_dir: Path,
    ctx: DistContext | None = None,
    *,
    resume_from: Path | None = None,
    compile_backend: str | None = None,
) -> list[tuple[int, float, float]]:
    """Train a fresh seed-0 tiny decoder; return ``(step, loss, grad_norm)`` per step."""
    from lmlab.models.decoder import Decoder
    from lmlab.train.distributed import prepare_model
    from lmlab.train.loop import Trainer

    ctx = ctx or DistContext()
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    if compile_backend is not None:
        model = prepare_model(model, cfg, ctx, compile_backend=compile_backend)
    records: list[dict[str, Any]] = []
    batches = RankBatches(ctx.rank, ctx.world_size)
    trainer = Trainer(cfg, run_dir, model, batches, loss_fn, device=ctx.device, on_log=records.append, dist=ctx)
    if resume_from is not None:
        trainer.resume(resume_from)
    trainer.fit()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]


def assert_same(got, want, steps, tol: float = 1e-5) -> None:
    """``got`` has exactly ``steps`` and, at each, the loss and gradient norm of ``want`` within ``tol``."""
    import pytest

    assert [s for s, _, _ in got] == list(steps)
    want = {s: (loss, norm) for s, loss, norm in want}
    for step, loss, norm in got:
        assert loss == pytest.approx(want[step][0], abs=tol), f"loss at step {step}"
        assert norm == pytest.approx(want[step][1], abs=tol), f"grad norm at step {step}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        LMLAB_DIST_TIMEOUT_S="60",
    )
    torch.set_num_threads(1)
    fn(rank, *args)


def spawn(fn, world_size: int, *args: Any, timeout_s: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes joined by torchrun-style env vars."""
    context = mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"distributed test workers did not finish in {timeout_s:.0f} s")


# --------------------------------------------------------------------------- workers

TWO_RANK_RUNS = {
    "ddp": ("distributed.strategy=ddp",),
    "fsdp": ("distributed.strategy=fsdp",),
    "fsdp_ac": ("distributed.strategy=fsdp", "distributed.activation_checkpointing=full"),
    # 2 ranks × 2 accumulated micro-batches of 1 row: gradient sync only on the last micro-batch
    "ddp_accum": ("distributed.strategy=ddp", "train.micro_batch_size=1", "train.grad_accum=2"),
    "fsdp_accum": ("distributed.strategy=fsdp", "train.micro_batch_size=1", "train.grad_accum=2"),
}


def _missing_data() -> None:
    raise DataError("no data in /nowhere (rank 0 looked)")


def equivalence_worker(rank: int, out_dir: str, single_process_ckpt: str) -> None:
    """Every two-rank run of the equivalence tests in one pair of processes (one start-up cost):
    10 steps per strategy, then each strategy resumed from the one-process checkpoint of step 5."""
    import json

    from lmlab.train.distributed import setup_distributed

    out = Path(out_dir)
    results: dict[str, list] = {}
    group = setup_distributed(config(2, *TWO_RANK_RUNS["ddp"]))
    try:
        try:  # a bad input found by rank 0 alone must stop every rank, with rank 0's message
            group.main_first(_missing_data)
        except DataError as err:
            (out / f"main_first_{rank}.txt").write_text(str(err))
        for name, overrides in TWO_RANK_RUNS.items():
            cfg = config(2, *overrides)
            ctx = setup_distributed(cfg)  # joins the existing group with this strategy
            results[name] = train(cfg, out / name, ctx)
            if name in ("ddp", "fsdp"):
                resumed = train(cfg, out / f"{name}_from1", ctx, resume_from=Path(single_process_ckpt))
                results[f"{name}_from1"] = resumed
    finally:
        group.close()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))


MUON_RUNS = {
    "muon_ddp": ("optim.name=muon", "distributed.strategy=ddp"),
    "muon_fsdp": ("optim.name=muon", "distributed.strategy=fsdp"),
    "normuon_fsdp": ("optim.name=muon", "optim.muon.normuon=true", "distributed.strategy=fsdp"),
}


# Mixture-of-experts runs: the routing decisions and DeepSeek-V3's bias (its loads all-reduced) are exact across
# ranks; the balancing losses are per micro-batch and rank (as in Megatron and OLMo-core), so they are off here.
MOE = ("model.ffn.kind=moe", "model.ffn.experts=4", "model.ffn.top_k=2", "model.ffn.hidden=32",
       "model.ffn.load_balance_coef=0", "model.ffn.z_loss_coef=0", "model.ffn.bias_update_rate=0.01")  # fmt: skip
MOE_RUNS = {
    "moe_ddp": (*MOE, "distributed.strategy=ddp"),
    "moe_fsdp": (*MOE, "distributed.strategy=fsdp"),
    "moe_fsdp_ac": (*MOE, "distributed.strategy=fsdp", "distributed.activation_checkpointing=full"),
}


def named_runs_worker(rank: int, out_dir: str, runs: dict[str, tuple[str, ...]]) -> None:
    """Each of ``runs`` (name -> overrides) for 10 steps on two ranks in one process group; rank 0 writes every
    run's ``(step, loss, grad_norm)`` records to ``results.json``."""
    import json

    from lmlab.train.distributed import setup_distributed

    out = Path(out_dir)
    results: dict[str, list] = {}
    group = setup_distributed(config(2, *next(iter(runs.values()))))
    try:
        for name, overrides in runs.items():
            cfg = config(2, *overrides)
            results[name] = train(cfg, out / name, setup_distributed(cfg))
    finally:
        group.close()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))


def moe_worker(rank: int, out_dir: str) -> None:
    """The two-rank MoE runs of ``test_dist_moe``."""
    named_runs_worker(rank, out_dir, MOE_RUNS)


def muon_worker(rank: int, out_dir: str) -> None:
    """The two-rank Muon runs of ``test_dist_muon``."""
    named_runs_worker(rank, out_dir, MUON_RUNS)
