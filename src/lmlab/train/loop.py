"""The one training loop, objective-agnostic.

``Trainer`` owns the mechanics every objective shares: LR schedule, gradient
accumulation normalised by the number of target tokens, clipping, mixed precision,
periodic evaluation, metrics, atomic checkpoints and exact resume. What is trained
on and how the loss is computed come from outside as a ``BatchSource`` and a
``loss_fn(model, batch) -> LossOutput`` (docs/design.md, principle 4).

With a ``DistContext`` (``lmlab.train.distributed``) the same loop runs on every rank of a
torchrun job: the loss sum and target count are all-reduced, so the update is the one a single
process would make on the whole global batch; checkpoints become sharded and collective.

The loop stops early in two ways, both reported in ``TrainResult``: a stop request (a signal,
``lmlab.train.signals``) ends it after the current step with a checkpoint; a non-finite loss or
gradient norm ends it at once, naming the first bad step, and no checkpoint of a diverged model is
written. Behaviour is extended with callbacks (``lmlab.train.callbacks``), not subclasses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmlab.config import RunConfig
from lmlab.models.moe import auxiliary_losses, balance_experts
from lmlab.models.mup import mup_width_mult
from lmlab.objectives.base import LossOutput
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.callbacks import Callback
from lmlab.train.distributed import DistContext, gradient_sync, prepare_model, unwrap
from lmlab.train.metrics import MetricsLogger
from lmlab.train.optim import build_optimizer
from lmlab.train.runtime import autocast_context
from lmlab.train.schedule import lr_at
from lmlab.train.signals import StopRequest

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], LossOutput]


class BatchSource(Protocol):
    """Deterministic, resumable stream of micro-batches."""

    def next_batch(self, batch_size: int) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# The token-id tensors of a batch: ``input_ids``, or the parts of an unlearning batch.
TOKEN_KEYS = ("input_ids", "forget_ids", "retain_ids", "idk_ids")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_train_loss: float | None
    final_eval: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    diverged_at: int | None = None  # the first step whose loss or gradient norm was not finite
    stopped_by: str | None = None  # the signal that interrupted the run
    checkpoint: Path | None = None  # the last checkpoint written by this process

    @property
    def status(self) -> str:
        """``finished``, ``diverged`` or ``interrupted``."""
        if self.diverged:
            return "diverged"
        return "interrupted" if self.stopped_by else "finished"


class Trainer:
    """Runs ``cfg.train.steps`` optimizer updates of ``model`` on ``batches`` with ``loss_fn``."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        model: nn.Module,
        batches: BatchSource,
        loss_fn: LossFn,
        *,
        device: torch.device,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        meta: dict[str, Any] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        dist: DistContext | None = None,
        callbacks: Iterable[Callback] = (),
        stop: StopRequest | None = None,
    ):
        """``model`` may be a plain module or one already passed through ``prepare_model``; the
        configured switches (activation checkpointing, compile, DDP / FSDP per ``dist``) are applied
        here otherwise. ``meta`` goes into every checkpoint's meta.json (``run_id`` marks the
        checkpoints this run may prune); ``stop`` is polled after every step."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.device = device
        self.meta = meta or {}
        self.on_log = on_log
        self.callbacks = list(callbacks)
        self.stop = stop or StopRequest()
        self._stop_flag: torch.Tensor | None = None  # this step's stop request summed over ranks (several ranks)
        self._pending_stop: torch.Tensor | None = None  # the previous step's, read on GPUs (no wait)
        self.logger: MetricsLogger | None = None
        self.dist = dist or DistContext(device=device)
        self.forward_model = prepare_model(model, cfg, self.dist)
        self.model = unwrap(self.forward_model)
        self.optimizer = build_optimizer(
            self.model, cfg.optim, device, mup_width_mult(cfg.model), scale_eps=cfg.model.mup.scale_eps
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.step = 0
        self.tokens = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loop state; ``optimizer`` is optional (sharded checkpoints keep it in ``dcp/``)."""
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save(self) -> Path:
        """Write a checkpoint: one file set from one process, or a collective sharded one."""
        t = self.cfg.train
        meta = {
            "tokens": self.tokens,
            "world_size": self.world_size(),
            "global_batch": t.micro_batch_size * t.grad_accum * self.world_size(),
            **self.meta,
        }
        if self.dist.sharded:
            state = self.state_dict()
            del state["optimizer"]
            path = ckpt_io.save_sharded_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                ctx=self.dist,
                model_cfg=self.cfg.model,
                train_state=state,
                meta=meta,
                keep_last=t.keep_last,
            )
        else:
            path = ckpt_io.save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                model_cfg=self.cfg.model,
                train_state=self.state_dict(),
                meta=meta,
                keep_last=t.keep_last,
            )
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def resume(self, path: str | Path | None = None, *, verified: bool = False) -> Path:
        """Load a checkpoint (default: the run directory's latest): weights, optimizer, data position, RNG.

        Either checkpoint format resumes on any world size: a sharded one is resharded by
        ``torch.distributed.checkpoint``, a single-process one is read whole on every rank. ``verified``:
        the caller has just checked the checkpoint (checksums, files, model), so it is not hashed again.
        """
        ckpt = ckpt_io.resolve_checkpoint(self.run_dir if path is None else path)
        if not verified:
            ckpt_io.verify_checkpoint(ckpt, self.cfg.model)
        if ckpt_io.is_sharded(ckpt):
            state = ckpt_io.load_train_state(ckpt)
            ckpt_io.load_sharded_state(ckpt, self.model, self.optimizer)
        elif self.dist.sharded or self.dist.world_size > 1:
            state = ckpt_io.load_train_state(ckpt)
            ckpt_io.load_full_state_sharded(ckpt, self.model, self.optimizer, state.pop("optimizer"))
        else:
            ckpt_io.load_weights(ckpt, self.model, self.cfg.model, verified=True)
            state = ckpt_io.load_train_state(ckpt)
        self.load_state_dict(state)
        return ckpt

    # ------------------------------------------------------------------ one update

    def train_step(self, sync: bool = True) -> dict[str, Any]:
        """One optimizer update over ``grad_accum`` micro-batches; returns the step's metrics.

        With ``sync=False`` the metrics stay tensors on the device, so the host never waits for the
        GPU inside a step and can queue the next one; ``fit`` reads them only when it logs.
        """
        t = self.cfg.train
        sequences = t.micro_batch_size * t.grad_accum * self.world_size()
        lr = lr_at(
            self.step, t.steps, self.cfg.optim.lr, self.cfg.schedule, batch_sequences=sequences, seq_len=t.seq_len
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group runs at its own peak
        self.model.train()
        sums: torch.Tensor | None = None  # [loss_sum, count, *metric sums] on the device
        names: list[str] = []
        step_tokens = 0
        for i in range(t.grad_accum):
            batch = {
                k: v.to(self.device, non_blocking=True) for k, v in self.batches.next_batch(t.micro_batch_size).items()
            }
            step_tokens += sum(int(v.numel()) for k, v in batch.items() if k in TOKEN_KEYS)
            with gradient_sync(self.forward_model, enabled=i == t.grad_accum - 1):
                with autocast_context(self.device, t.precision):
                    out = with_auxiliary_losses(self.loss_fn(self.forward_model, batch), self.model)
                # Backward on the *sum*; gradients are divided by the total count below, so k
                # micro-batches give exactly the gradient of one batch of all their tokens.
                if self.scaler is not None:
                    self.scaler.scale(out.loss_sum).backward()
                else:
                    out.loss_sum.backward()
            if sums is None:
                names = sorted(out.metrics)
            parts = [out.loss_sum, out.count, *(out.metrics[k] for k in names)]
            local = torch.stack([p.detach().to(torch.float64).reshape(()) for p in parts])
            sums = local if sums is None else sums + local
        # One all-reduce of [loss_sum, count, metric sums..., stop flag]: every rank sees the global
        # numbers, and a stop request seen by any rank reaches all of them at the same step. The flag is
        # made on the device (a fill, not a host-to-device copy), so the step stays free of host syncs.
        if self.world_size() > 1:
            flag = torch.full((1,), float(self.stop.requested), dtype=sums.dtype, device=sums.device)
            summed = self._reduce_sums(torch.cat([sums, flag]))
            self._stop_flag, summed = summed[-1], summed[:-1]
        else:
            summed = sums
        total = summed[1].clamp(min=1.0)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # DDP and FSDP average gradients over ranks; multiplying by the world size restores the sum,
        # so the result is the gradient of (global loss sum) / (global target count).
        replicas = self.world_size() if self.dist.averages_gradients else 1
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            if self.dist.sharded:  # DTensor gradients: scale by a host number
                torch._foreach_mul_(grads, replicas / float(total))
            else:  # one multi-tensor kernel, scale read on the device (no host sync)
                torch._foreach_mul_(grads, (replicas / total).to(grads[0].dtype))
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance_experts(self.model, self._reduce_sums if self.world_size() > 1 else None)
        self.step += 1
        self.tokens += step_tokens * self.world_size()
        metrics: dict[str, Any] = {"loss": summed[0] / total, "lr": lr, "grad_norm": grad_norm.detach()}
        metrics.update({k: v / total for k, v in zip(names, summed[2:]) if k != "ce"})
        return to_host(metrics) if sync else metrics

    # Where this process sits in the job (one process unless a DistContext was given).
    def _reduce_sums(self, values: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(values)

    def world_size(self) -> int:
        return self.dist.world_size

    def is_main(self) -> bool:
        return self.dist.is_main

    # ------------------------------------------------------------------ the loop

    def fit(self, logger: MetricsLogger | None = None) -> TrainResult:
        """Train until ``train.steps``, a stop request or divergence; returns what happened."""
        t = self.cfg.train
        self.logger = logger
        progress = self._progress_bar()
        last_train_loss = None
        final_eval: dict[str, float] = {}
        window_start, window_tokens = time.perf_counter(), 0
        start_time = time.perf_counter()
        diverged_at: int | None = None
        stopped_by: str | None = None
        checkpoint: Path | None = None
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step, on the device
        for callback in self.callbacks:
            callback.on_fit_start(self)
        try:
            while self.step < t.steps:
                tokens_before = self.tokens
                metrics = self.train_step(sync=False)
                window_tokens += self.tokens - tokens_before
                bad = ~(torch.isfinite(metrics["loss"]) & torch.isfinite(metrics["grad_norm"]))
                first_bad = torch.where(bad & (first_bad < 0), self.step, first_bad)
                if progress is not None:
                    progress.update(1)
                for callback in self.callbacks:
                    callback.on_step_end(self, metrics)
                is_last = self.step == t.steps
                stopping = self._stop_requested()
                checkpoint_due = self.step % t.ckpt_every == 0 or is_last or stopping
                log_due = self.step % t.log_every == 0 or is_last
                if (log_due or checkpoint_due) and int(first_bad) >= 0:  # never checkpoint a diverged model
                    diverged_at, log_due = int(first_bad), True
                if log_due:
                    metrics = to_host(metrics)  # the only host-device sync of a training step
                    last_train_loss = metrics["loss"]
                    now = time.perf_counter()
                    rate = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    record = {"kind": "train", "step": self.step, "tokens": self.tokens, **metrics}
                    record.update(tokens_per_s=rate, time=now - start_time)
                    self.emit(record)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{rate:,.0f}"
                        )
                if diverged_at is not None:
                    break
                if self.eval_fn is not None and (self.step % t.eval_every == 0 or is_last):
                    final_eval = self.evaluate()
                    self.emit({"kind": "eval", "step": self.step, "tokens": self.tokens, **final_eval})
                    for callback in self.callbacks:
                        callback.on_evaluate(self, final_eval)
                if checkpoint_due:
                    if self.is_main() or self.saves_on_all_ranks():
                        checkpoint = self.save()
                if stopping:
                    stopped_by = self.stop.signal_name or "a signal on another rank"
                    break
        finally:
            if progress is not None:
                progress.close()
        result = TrainResult(
            self.step,
            self.tokens,
            last_train_loss,
            final_eval,
            diverged=diverged_at is not None,
            diverged_at=diverged_at,
            stopped_by=stopped_by,
            checkpoint=checkpoint,
        )
        for callback in self.callbacks:
            callback.on_fit_end(self, result)
        return result

    def _stop_requested(self) -> bool:
        """Whether to stop after this step: the local flag alone, or with several ranks the flag summed over
        ranks in this step's all-reduce (so all ranks stop after the same step)."""
        if self.world_size() == 1:
            return self.stop.requested
        if self.device.type != "cuda":
            return float(self._stop_flag) > 0
        # On GPUs read the previous step's flag, which is long computed, so the host does not wait for this
        # step's all-reduce (the sync-free step); every rank still stops after the same step.
        previous, self._pending_stop = self._pending_stop, self._stop_flag
        return previous is not None and float(previous) > 0

    def saves_on_all_ranks(self) -> bool:
        """Sharded checkpoints are collective: every rank writes its part."""
        return self.dist.sharded

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on every rank (FSDP forward is collective); only rank 0 logs the result."""
        self.model.eval()
        with autocast_context(self.device, self.cfg.train.precision):
            out = self.eval_fn(self.model)
        self.model.train()
        return out

    def emit(self, record: dict[str, Any]) -> None:
        """Log ``record`` to ``metrics.jsonl`` and the trackers (rank 0) and to ``on_log``."""
        if self.logger is not None and self.is_main():
            self.logger.log(record)
        if self.on_log is not None:
            self.on_log(record)

    def _progress_bar(self):
        if not (self.cfg.train.progress and self.is_main()):
            return None
        import sys

        from tqdm import tqdm

        interactive = sys.stderr.isatty()  # in a log file, redraw every 10 s instead of 10 times a second
        return tqdm(
            total=self.cfg.train.steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if interactive else 10.0,
        )


def with_auxiliary_losses(out: LossOutput, model: nn.Module) -> LossOutput:
    """``out`` plus the model's auxiliary losses of this forward (mixture-of-experts balancing,
    ``lmlab.models.moe``), weighted by ``out.count`` so that dividing by the count leaves them as means;
    their value (``moe_aux``) and routing statistics are logged as metrics."""
    aux = auxiliary_losses(model)
    if aux is None:
        return out
    loss, stats = aux
    count = out.count.to(loss.dtype)
    metrics = {**out.metrics, "moe_aux": loss.detach() * count, **{k: v * count for k, v in stats.items()}}
    return LossOutput(out.loss_sum + loss * count, out.count, metrics)


def to_host(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as Python floats (tensors are read from the device)."""
    return {k: float(v) for k, v in metrics.items()}
