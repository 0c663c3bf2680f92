"""Running a recipe: the one sequence every kind of run goes through.

A recipe (``lmlab.recipes``) says what a kind of run trains: ``setup(job)`` returns a ``Plan`` (the
resolved config, the model, the batches, the loss, the evaluation, callbacks and the recipe's summary
fields) and ``finish(job, trainer, result)`` does its end-of-run work (samples, task metrics). Everything
else is here and in ``lmlab.train.run``: processes and devices, claiming the run directory, checking a
checkpoint before anything is rewritten, writing the run's description, the loop, stop signals,
divergence, the summary and the report. ``Job.start_model`` is the one way a recipe gets its model:
built from the config and, unless the run continues from its own checkpoint, loaded from ``init_from``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmlab.config import RunConfig, validate
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.build import Head, build_model
from lmlab.models.counting import count_params, flops_per_token
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.adapters import (
    BASE_KEY,
    attach_adapters,
    base_record,
    build_run_model,
    check_base,
    corda_start,
    full_precision_model,
    quantize_frozen_base,
)
from lmlab.train.callbacks import Callback
from lmlab.train.distributed import DistContext, check_world, full_state_dict, setup_distributed
from lmlab.train.loop import BatchSource, LossFn, Trainer, TrainResult
from lmlab.train.pretrained import load_init_weights
from lmlab.train.run import Run, RunSummary
from lmlab.train.runtime import seed_everything


@dataclass
class Plan:
    """What a recipe trains (returned by ``Recipe.setup``)."""

    cfg: RunConfig  # fully resolved (model from init_from, vocabulary from the tokenizer, steps from epochs ...)
    model: nn.Module
    batches: BatchSource
    loss_fn: LossFn
    tokenizer: Any = None  # written to RUN_DIR/tokenizer.json
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None
    callbacks: list[Callback] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # the recipe's own summary.json fields
    first_records: list[dict[str, Any]] = field(default_factory=list)  # logged before step 1 of a new run
    files: dict[str, str] = field(default_factory=dict)  # extra files of the run directory (name -> text)
    headline: str = ""  # one line printed before training
    extra_params: int = 0  # parameters beyond the decoder's (e.g. a reward head)


class Recipe(Protocol):
    """A kind of run (see the module docstring)."""

    name: str  # the run's kind, in run.json and summary.json

    def setup(self, job: Job) -> Plan: ...

    def finish(self, job: Job, trainer: Trainer, result: TrainResult) -> None: ...

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        """Print the end-of-run report (rank 0, not quiet; ``print_report`` is the common one)."""
        ...


@dataclass
class Job:
    """What a recipe may use while it sets up and finishes: the requested config, the claimed run, where
    this process sits, and the shared ways to get models."""

    requested: RunConfig
    run: Run
    ctx: DistContext
    quiet: bool
    head: Head = "lm"  # the model head of this run, set by ``start_model``
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # added to every checkpoint's meta.json

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def summary(self) -> RunSummary:
        return self.run.summary

    def say(self, text: str) -> None:
        """Print on rank 0 unless quiet."""
        if not self.quiet:
            print(text)

    def start_model(self, cfg: RunConfig, head: Head = "lm") -> nn.Module:
        """The model to train: seeded, built from ``cfg.model`` and, on a new run with ``init_from``, loaded
        from that run (a reward model loads its decoder). Logged and recorded in ``summary.init_from``.
        With ``cfg.adapter`` the init_from weights are loaded on every start (checkpoints hold only the
        adapters), frozen, and wrapped in adapters (``lmlab.train.adapters``)."""
        seed_everything(cfg.train.seed)
        self.head = head
        model = build_model(cfg.model, head)
        adapters = cfg.adapter.enabled
        if cfg.init_from and (adapters or not self.run.resuming):
            decoder = model.decoder if head == "reward" else model
            loaded = load_init_weights(decoder, cfg.init_from, cfg)
            if self.run.resuming:
                check_base(self.run.checkpoint, loaded.checkpoint)
            else:
                self.summary.init_from = loaded.describe()
                self.say(f"init_from {cfg.init_from}: loaded {loaded.checkpoint.name} (step {loaded.step})")
        if adapters:
            adapted = attach_adapters(model, cfg)
            if cfg.adapter.quantize != "none":
                quantized = quantize_frozen_base(model, cfg, self.device)
                self.say(f"QLoRA: {quantized} frozen linear layers in 4-bit {cfg.adapter.quantize}")
            self.checkpoint_meta[BASE_KEY] = base_record(cfg.init_from)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            self.summary.extra["trainable_params"] = trained
            self.say(
                f"{cfg.adapter.kind} adapters (rank {cfg.adapter.rank}) on {len(adapted)} layers: {trained:,} "
                f"trainable parameters ({100 * trained / total:.2f}% of {total:,})"
            )
        return model.to(self.device)

    def plain_model(self, trainer: Trainer) -> nn.Module | None:
        """The trained weights as a plain module on rank 0, for generation and task evaluation (a gather under
        FSDP, so every rank must call it); None on the other ranks."""
        cfg = trainer.cfg
        if cfg.adapter.quantize != "none":  # generate and evaluate on the full-precision base (one process)
            return (
                full_precision_model(cfg, self.head, trainer.model).to(self.device).eval() if self.ctx.is_main else None
            )
        wrapped = self.ctx.strategy == "fsdp" or cfg.train.compile or cfg.distributed.activation_checkpointing != "none"
        if not wrapped:
            return trainer.model if self.ctx.is_main else None
        weights = full_state_dict(trainer.model, self.ctx)
        if not self.ctx.is_main:
            return None
        model = build_run_model(cfg, self.head)
        model.load_state_dict(weights)
        return model.to(self.device).eval()


def execute(
    recipe: Recipe,
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    quiet: bool = False,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` per ``cfg`` in ``run_dir``; returns the content of ``summary.json``.

    ``resume``: continue from the run's latest checkpoint (True), from the given checkpoint directory, or
    ``"auto"``: continue the run ``run_dir`` holds when it is this one (same kind and config), else start.
    With ``dist`` (from ``setup_distributed``) every rank of a torchrun job calls this.
    """
    ctx = dist if dist is not None else setup_distributed(cfg)
    try:
        cfg = check_world(cfg, ctx.world_size)
        if cfg.train.precision == "fp16" and ctx.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        with Run.open(
            run_dir, kind=recipe.name, requested=cfg, resume=resume, overwrite=overwrite, ctx=ctx, quiet=quiet
        ) as run:
            return _train(recipe, Job(cfg, run, ctx, run.quiet)).as_json()
    finally:
        if dist is None:
            ctx.close()


def _train(recipe: Recipe, job: Job) -> RunSummary:
    run, ctx = job.run, job.ctx
    plan = recipe.setup(job)
    cfg = validate(plan.cfg)  # the config is complete only now
    if cfg.adapter.enabled:  # the saved config must find the base from anywhere
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).resolve()))
    if cfg.adapter.enabled and cfg.adapter.init != "lora" and run.checkpoint is None:
        job.summary.extra["corda"] = corda_start(plan.model, cfg, plan.batches, plan.tokenizer, ctx.device, ctx)
    if run.checkpoint is not None:  # refuse a mismatched model before anything in the run is rewritten
        meta = ctx.broadcast_object(ctx.main_first(lambda: verify_resumable(run, cfg), others=False))
        cfg = keep_global_batch(cfg, meta.get("global_batch"), ctx.world_size, quiet=job.quiet)
    run.start(cfg, job.requested, tokenizer=plan.tokenizer, files=plan.files)
    params = count_params(cfg.model)
    summary = job.summary
    summary.params = params["total"] + plan.extra_params
    summary.non_embedding_params = params["non_embedding"] + plan.extra_params
    if params["active"] != params["total"]:  # a mixture of experts: what one token uses
        summary.extra["active_params"] = params["active"] + plan.extra_params
    summary.extra.update(plan.summary)
    callbacks = list(plan.callbacks)
    if cfg.train.evals:  # downstream tasks during any kind of run; lm-eval is an optional dependency
        from lmlab.eval.in_loop import task_evals

        callbacks.append(task_evals(cfg, plan.tokenizer))
    trainer = Trainer(
        cfg,
        run.path,
        plan.model,
        plan.batches,
        plan.loss_fn,
        device=ctx.device,
        eval_fn=plan.eval_fn,
        dist=ctx,
        callbacks=callbacks,
        stop=run.stop,
        meta={"run_id": run.run_id, "kind": recipe.name, **job.checkpoint_meta},
    )
    if run.checkpoint is not None:
        trainer.resume(run.checkpoint, verified=True)  # checked once, on rank 0, above
    if plan.headline:
        job.say(plan.headline)
    result = run.fit(trainer, plan.first_records)
    final = run.final_eval(result)
    summary.final_val_loss, summary.final_val_ppl = final.get("val_loss"), final.get("val_ppl")
    summary.flops = flops_per_token(cfg.model, cfg.train.seq_len)["training"] * result.tokens
    if result.status == "finished":
        recipe.finish(job, trainer, result)
    summary = run.finish(unigram_entropy=plan.summary.get("unigram_entropy"))
    if result.status == "finished" and not job.quiet:
        recipe.report(job, summary.as_json())
    return summary


def verify_resumable(run: Run, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint's meta after verifying it belongs to ``cfg``; a corrupted one names the earlier
    checkpoints to continue from instead."""
    try:
        return ckpt_io.verify_checkpoint(run.checkpoint, cfg.model)
    except CheckpointError as err:
        earlier = [p for p in ckpt_io.list_checkpoints(run.path) if p.name < run.checkpoint.name]
        if not earlier or "another model" in str(err):
            raise
        raise CheckpointError(f"{err}; continue from an earlier one with --resume {earlier[-1]}") from None


def keep_global_batch(cfg: RunConfig, saved_global: int | None, world_size: int, *, quiet: bool = True) -> RunConfig:
    """On resume, keep the checkpoint's global batch (rows per step) when the world size changed, by
    choosing ``grad_accum``; the same data then flows in the same order and the trajectory continues."""
    t = cfg.train
    now = t.micro_batch_size * t.grad_accum * world_size
    if not saved_global or saved_global == now:
        return cfg
    per_pass = t.micro_batch_size * world_size
    if saved_global % per_pass:
        raise ConfigError(
            f"the checkpoint was trained with a global batch of {saved_global} rows, which "
            f"train.micro_batch_size={t.micro_batch_size} × world size {world_size} = {per_pass} does not divide; "
            "resume with a micro-batch size or number of processes that divides it"
        )
    accum = saved_global // per_pass
    if not quiet:
        print(
            f"world size {world_size}: train.grad_accum={accum} keeps the checkpoint's global batch of {saved_global}"
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accum))


def print_report(run_dir: Path, summary: dict[str, Any]) -> None:
    """The end-of-run report every recipe prints: steps, tokens, time, final validation loss, samples."""
    val, ent = summary.get("final_val_loss"), summary.get("unigram_entropy")
    print(
        f"\nfinished {summary['steps']} steps, {summary.get('tokens', 0):,} tokens in {summary.get('wall_time_s') or 0:.0f}s"
    )
    if val is not None:
        line = f"final validation loss {val:.4f} nats/token (perplexity {math.exp(min(val, 50.0)):.2f})"
        if ent:
            line += f"; corpus unigram entropy {ent:.4f} -> {100 * (1 - val / ent):.1f}% below it"
        print(line)
    samples = Path(run_dir) / "samples.txt"
    if samples.exists():
        print("\nsamples:\n")
        print(samples.read_text())
    print(f"run directory: {run_dir}")
