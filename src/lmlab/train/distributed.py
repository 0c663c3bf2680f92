"""Multi-process training on PyTorch's own stack: torchrun, DDP, FSDP2, and the speed switches.

lmlab writes no distributed engine of its own (issue 6; docs/design.md, principle 1): processes are
started by ``torchrun`` (or ``lmlab train --nproc N``, which runs torchrun), each reads its rank
from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets, and the model is
wrapped from the outside, here, never inside ``lmlab.models``:

- activation checkpointing of every block (``torch.utils.checkpoint``, non-reentrant): the
  block's activations are recomputed in the backward pass instead of being stored;
- ``torch.compile`` of every block in place (``nn.Module.compile``; ``train.compile=true`` or
  ``blocks``), so parameter names and checkpoints do not change with the switch; or
  (``train.compile=full``, one process) of the whole forward with ``fullgraph=True``: the returned
  forward module is ``torch.compile(model)``, which the LM objective calls with its loss as the
  ``Decoder``'s ``head_fn``, so embedding, blocks, head and loss are one graph;
- ``DistributedDataParallel`` (every rank holds the whole model, gradients are all-reduced) or
  FSDP2 (``fully_shard`` on every block, then on the root; parameters, gradients and optimizer
  state sharded across ranks), with a bf16 ``MixedPrecisionPolicy`` when
  ``distributed.mixed_precision_param=bf16``.

The global batch is ``micro_batch_size × grad_accum × world_size`` rows; the loop divides the
summed loss by the summed target count over all micro-batches and ranks, so any split of the
same global batch gives the same gradient. A process-group timeout (``LMLAB_DIST_TIMEOUT_S``,
default 600 s) turns a lost peer into an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmlab.config import RunConfig
from lmlab.errors import ConfigError, UserError
from lmlab.train.runtime import resolve_device

TIMEOUT_ENV = "LMLAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
PREPARED_ATTR = "_lmlab_prepared"

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process sits in the job. The default is one process without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # none | ddp | fsdp
    backend: str | None = None  # None: no process group
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    @property
    def sharded(self) -> bool:
        """True when checkpoints are written with ``torch.distributed.checkpoint`` (several ranks or FSDP)."""
        return self.has_group and (self.world_size > 1 or self.strategy == "fsdp")

    @property
    def averages_gradients(self) -> bool:
        """DDP and FSDP divide the reduced gradients by the world size."""
        return self.has_group and (self.strategy == "fsdp" or (self.strategy == "ddp" and self.world_size > 1))

    def barrier(self) -> None:
        if self.has_group and self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (float64 on CPU in, same out); identity on one process."""
        if not (self.has_group and self.world_size > 1):
            return tensor
        work = tensor.to(self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not (self.has_group and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T], *, others: bool = True) -> T | None:
        """Run ``fn`` on rank 0, then (if ``others``) on the other ranks.

        A ``UserError`` raised on rank 0 is re-raised on every rank, so a bad input stops the
        whole job with one message instead of leaving the other ranks waiting at a barrier.
        """
        result: T | None = None
        error: UserError | None = None
        if self.is_main:
            try:
                result = fn()
            except UserError as err:
                error = err
        error = self.broadcast_object(error)
        if error is not None:
            raise error
        if not self.is_main and others:
            result = fn()
        return result

    def close(self) -> None:
        """Destroy the process group this context created."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


# --------------------------------------------------------------------------- setup


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def resolve_backend(cfg: RunConfig, device: torch.device) -> str:
    """``auto`` -> nccl on CUDA, gloo on CPU; NCCL without a GPU is a ConfigError."""
    backend = cfg.distributed.backend
    if backend == "nccl" and (not torch.cuda.is_available() or device.type != "cuda"):
        where = "CUDA is not available on this machine" if not torch.cuda.is_available() else f"train.device={device}"
        raise ConfigError(
            f"distributed.backend=nccl needs CUDA GPUs, but {where}; "
            "use distributed.backend=gloo (or auto) to train on CPU"
        )
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def check_world(cfg: RunConfig, world_size: int) -> RunConfig:
    """Validate the distributed settings for ``world_size`` processes; return the config with the
    batch geometry resolved (``grad_accum`` from ``train.global_batch_size`` when that is set).

    ``train.global_batch_size`` (rows per optimizer step; 0 or absent: micro × accum × world)
    must be a multiple of ``train.micro_batch_size × world_size``.
    """
    d, t = cfg.distributed, cfg.train
    if world_size < 1:
        raise ConfigError(f"the world size must be >= 1, got {world_size}")
    if world_size > 1 and d.strategy == "none":
        raise ConfigError(
            f"{world_size} processes were started but distributed.strategy=none; "
            "set distributed.strategy=ddp or distributed.strategy=fsdp"
        )
    if d.mixed_precision_param == "bf16" and d.strategy != "fsdp":
        raise ConfigError(
            "distributed.mixed_precision_param=bf16 needs distributed.strategy=fsdp; "
            "with DDP or one process use train.precision=bf16 (autocast)"
        )
    global_batch = int(getattr(t, "global_batch_size", 0) or 0)
    if global_batch < 0:
        raise ConfigError(f"train.global_batch_size={global_batch} must be >= 0 (0: micro × accum × world size)")
    if global_batch:
        per_pass = t.micro_batch_size * world_size
        if global_batch % per_pass:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                f"{t.micro_batch_size} × world size {world_size} = {per_pass}; choose a global batch that is a "
                "multiple of it, or another micro-batch size or number of processes"
            )
        accum = global_batch // per_pass
        if accum != t.grad_accum:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accum))
            cfg.train.global_batch_size = global_batch  # keeps the key when TrainConfig does not declare it
    return cfg


def check_launch(cfg: RunConfig, nproc: int) -> None:
    """Everything that can be refused before ``nproc`` processes are started: world, batch, backend."""
    check_world(cfg, nproc)
    resolve_backend(cfg, resolve_device(cfg.train.device))


def setup_distributed(cfg: RunConfig, env: Mapping[str, str] | None = None) -> DistContext:
    """Join the job described by torchrun's environment (or run alone) and return where we are.

    One process with ``strategy`` none or ddp gets no process group; FSDP on one process gets a
    one-member group (FSDP2 needs a device mesh). Raises ``ConfigError`` for NCCL without a GPU,
    ``strategy=none`` with several processes, or a batch the world size does not divide.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    check_world(cfg, world)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        if device.index is None or world > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    ctx = DistContext(rank, world, local_rank, device, cfg.distributed.strategy)
    if world == 1 and cfg.distributed.strategy != "fsdp":
        if cfg.distributed.backend == "nccl":
            resolve_backend(cfg, device)  # still refuse NCCL without a GPU
        return ctx
    ctx.backend = resolve_backend(cfg, device)
    if dist.is_initialized():  # the caller set the group up (e.g. a test harness)
        return ctx
    # distributed.timeout_s, unless the environment overrides it (tests shorten it this way)
    timeout = timedelta(seconds=float(env.get(TIMEOUT_ENV, cfg.distributed.timeout_s)))
    if world > 1:
        dist.init_process_group(ctx.backend, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(ctx.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    ctx.owns_group = True
    return ctx


# --------------------------------------------------------------------------- model wrapping


class _CheckpointedForward:
    """A block's ``forward`` run under non-reentrant activation checkpointing while gradients are on."""

    def __init__(self, forward: Callable[..., torch.Tensor]):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward (memory ~ one block instead of all)."""
    for block in blocks:
        if not isinstance(block.forward, _CheckpointedForward):
            block.forward = _CheckpointedForward(block.forward)


def compile_blocks(blocks: nn.ModuleList, backend: str = "inductor") -> None:
    """``torch.compile`` each block in place; names and state dicts are unchanged."""
    for block in blocks:
        block.compile(backend=backend)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList to wrap per block")
    return layers


def shard_model(model: nn.Module, cfg: RunConfig, ctx: DistContext) -> nn.Module:
    """FSDP2: ``fully_shard`` every block, then the root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if cfg.distributed.mixed_precision_param == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare_model(
    model: nn.Module, cfg: RunConfig, ctx: DistContext | None = None, *, compile_backend: str = "inductor"
) -> nn.Module:
    """Apply the configured switches to ``model`` (in place) and return the module to call forward on.

    Order as in torchtitan: activation checkpointing, then compile, then DDP / FSDP. The returned
    module is a DDP wrapper for DDP on several ranks, ``torch.compile(model, fullgraph=True)`` for
    ``train.compile=full`` (``model`` itself keeps its names and runs eagerly when called directly),
    else ``model`` itself. Applying twice is a no-op.
    """
    if getattr(model, PREPARED_ATTR, False) or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    ctx = ctx or DistContext()
    has_blocks = isinstance(getattr(model, "layers", None), nn.ModuleList)
    if cfg.train.float8:  # torchao's order: float8 first, then checkpointing, compile and FSDP2
        from lmlab.train.float8 import apply_float8

        apply_float8(model, ctx.device)
    if cfg.distributed.activation_checkpointing == "full" and has_blocks:
        apply_activation_checkpointing(model.layers)
    mode = cfg.train.compile_mode
    if mode == "full" and ctx.has_group:
        raise ConfigError(
            f"train.compile=full compiles the whole forward in one process, but distributed.strategy={ctx.strategy}; "
            "use train.compile=blocks with DDP / FSDP"
        )
    if mode == "blocks":
        if has_blocks:
            compile_blocks(model.layers, compile_backend)
        else:
            model.compile(backend=compile_backend)
    forward_model = model
    if ctx.has_group and ctx.strategy == "fsdp":
        shard_model(model, cfg, ctx)
    elif ctx.has_group and ctx.strategy == "ddp" and ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        forward_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if mode == "full":  # fullgraph: a graph break raises instead of silently splitting the step
        # Static shapes: a new batch shape compiles its own graph (fixed shapes, e.g. packed rows, compile once).
        forward_model = torch.compile(model, backend=compile_backend, fullgraph=True, dynamic=False)
    setattr(model, PREPARED_ATTR, True)
    return forward_model


def unwrap(model: nn.Module) -> nn.Module:
    """The module that owns the parameters (``torch.compile``'s ``._orig_mod``, DDP's ``.module``; FSDP2
    shards in place)."""
    model = model._modules.get("_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(forward_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction on all but the last micro-batch of an accumulated step."""
    if enabled:
        yield
    elif isinstance(forward_model, nn.parallel.DistributedDataParallel):
        with forward_model.no_sync():
            yield
    elif hasattr(forward_model, "set_requires_gradient_sync"):  # an FSDP2 module
        forward_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            forward_model.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (CPU); an empty dict on the other ranks. Collective."""
    module = unwrap(model)
    if ctx.has_group and ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)
    if not ctx.is_main:
        return {}
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
