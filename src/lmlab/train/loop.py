"""The one training loop, objective-agnostic.

``Trainer`` owns the mechanics every objective shares: LR schedule, gradient
accumulation normalised by the number of target tokens, clipping, mixed precision,
periodic evaluation, metrics, atomic checkpoints and exact resume. What is trained
on and how the loss is computed come from outside as a ``BatchSource`` and a
``loss_fn(model, batch) -> LossOutput`` (DESIGN.md principle 4).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmlab.config import RunConfig
from lmlab.objectives.base import LossOutput
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.metrics import MetricsLogger
from lmlab.train.optim import build_optimizer
from lmlab.train.runtime import autocast_context
from lmlab.train.schedule import lr_at

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], LossOutput]


class BatchSource(Protocol):
    """Deterministic, resumable stream of micro-batches."""

    def next_batch(self, batch_size: int) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_train_loss: float | None
    final_eval: dict[str, float] = field(default_factory=dict)
    diverged: bool = False


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
    ):
        self.cfg = cfg
        self.run_dir = run_dir
        self.model = model
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.device = device
        self.meta = meta or {}
        self.on_log = on_log
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.forward_model = torch.compile(model) if cfg.train.compile else model
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
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save(self) -> Path:
        return ckpt_io.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            model_cfg=self.cfg.model,
            train_state=self.state_dict(),
            meta={"tokens": self.tokens, **self.meta},
            keep_last=self.cfg.train.keep_last,
        )

    def resume(self) -> Path:
        """Load the latest checkpoint of the run directory (weights, optimizer, data position, RNG)."""
        ckpt = ckpt_io.resolve_checkpoint(self.run_dir)
        ckpt_io.load_weights(ckpt, self.model, self.cfg.model)
        self.load_state_dict(ckpt_io.load_train_state(ckpt))
        return ckpt

    # ------------------------------------------------------------------ one update

    def train_step(self) -> dict[str, float]:
        """One optimizer update over ``grad_accum`` micro-batches; returns the step's metrics."""
        t = self.cfg.train
        lr = lr_at(self.step, t.steps, self.cfg.optim.lr, self.cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        metric_sums: dict[str, float] = {}
        step_tokens = 0
        for _ in range(t.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.batches.next_batch(t.micro_batch_size).items()}
            step_tokens += int(batch["input_ids"].numel())
            with autocast_context(self.device, t.precision):
                out = self.loss_fn(self.forward_model, batch)
            # Backward on the *sum*; gradients are divided by the total count below, so k
            # micro-batches give exactly the gradient of one batch of all their tokens.
            if self.scaler is not None:
                self.scaler.scale(out.loss_sum).backward()
            else:
                out.loss_sum.backward()
            loss_sum += out.loss_sum.detach().double().cpu()
            count += out.count.detach().double().cpu()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        total = self.reduce_count(count)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        scale = 1.0 / max(float(total), 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += step_tokens * self.world_size()
        n = max(float(count), 1.0)
        metrics = {"loss": float(loss_sum) / n, "lr": lr, "grad_norm": grad_norm}
        metrics.update({k: v / n for k, v in metric_sums.items() if k != "ce"})
        return metrics

    # Hooks the distributed wrapper overrides.
    def reduce_count(self, count: torch.Tensor) -> torch.Tensor:
        return count

    def world_size(self) -> int:
        return 1

    def is_main(self) -> bool:
        return True

    # ------------------------------------------------------------------ the loop

    def fit(self, logger: MetricsLogger | None = None) -> TrainResult:
        t = self.cfg.train
        progress = self._progress_bar()
        last_train_loss = None
        final_eval: dict[str, float] = {}
        window_start, window_tokens = time.perf_counter(), 0
        start_time = time.perf_counter()
        diverged = False
        try:
            while self.step < t.steps:
                tokens_before = self.tokens
                metrics = self.train_step()
                window_tokens += self.tokens - tokens_before
                last_train_loss = metrics["loss"]
                if progress is not None:
                    progress.update(1)
                if not math.isfinite(metrics["loss"]):
                    diverged = True
                if self.step % t.log_every == 0 or self.step == t.steps or diverged:
                    now = time.perf_counter()
                    rate = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    record = {"kind": "train", "step": self.step, "tokens": self.tokens, **metrics}
                    record.update(tokens_per_s=rate, time=now - start_time)
                    self._emit(logger, record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{rate:,.0f}")
                if diverged:
                    break
                if self.eval_fn is not None and (self.step % t.eval_every == 0 or self.step == t.steps):
                    final_eval = self.evaluate()
                    self._emit(logger, {"kind": "eval", "step": self.step, "tokens": self.tokens, **final_eval})
                if self.step % t.ckpt_every == 0 or self.step == t.steps:
                    if self.is_main() or self.saves_on_all_ranks():
                        self.save()
        finally:
            if progress is not None:
                progress.close()
        return TrainResult(self.step, self.tokens, last_train_loss, final_eval, diverged)

    def saves_on_all_ranks(self) -> bool:
        return False

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with autocast_context(self.device, self.cfg.train.precision):
            out = self.eval_fn(self.forward_model)
        self.model.train()
        return out

    def _emit(self, logger: MetricsLogger | None, record: dict[str, Any]) -> None:
        if logger is not None and self.is_main():
            logger.log(record)
        if self.on_log is not None:
            self.on_log(record)

    def _progress_bar(self):
        if not (self.cfg.train.progress and self.is_main()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)


def evaluate_lm(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Mean token cross-entropy and perplexity over a fixed set of windows."""
    from lmlab.objectives.lm import causal_lm_loss

    loss_sum, count = 0.0, 0
    for x, y in batches:
        out = causal_lm_loss(model(x.to(device)), y.to(device))
        loss_sum += float(out.loss_sum)
        count += int(out.count)
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
