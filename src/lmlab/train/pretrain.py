"""Pretraining a decoder on a token corpus: builds data, model and loop from a ``RunConfig``
and leaves a self-describing run directory (DESIGN.md principle 8)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig, save_config
from lmlab.data.sampler import WindowSampler, eval_batches
from lmlab.data.shards import TokenShards, load_manifest
from lmlab.errors import CheckpointError, ConfigError, UserError
from lmlab.eval.perplexity import evaluate_lm, evaluate_sources
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.distributed import DistContext, check_world, full_state_dict, setup_distributed
from lmlab.train.lm_objective import attach_objective_hooks, build_lm_loss
from lmlab.train.loop import Trainer, fit_logged
from lmlab.train.runtime import environment, seed_everything


class LMBatches:
    """Adapts ``WindowSampler`` to the loop's dict batches."""

    def __init__(self, sampler: WindowSampler):
        self.sampler = sampler

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        x, y = self.sampler.next_batch(batch_size)
        return {"input_ids": x, "labels": y}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def resolve_vocab(cfg: RunConfig, tokenizer_vocab: int) -> RunConfig:
    """Fill ``model.vocab_size`` from the tokenizer; refuse a model vocabulary too small for it."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer_vocab))
    if cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
            "set model.vocab_size=0 to take it from the tokenizer"
        )
    return cfg


def prepare_run_dir(out: Path, resume: bool) -> Path:
    """Create a new run directory, refusing to overwrite one that already holds checkpoints."""
    if resume:
        if not out.is_dir():
            raise CheckpointError(f"run directory does not exist: {out}")
        if ckpt_io.latest_checkpoint(out) is None:
            raise CheckpointError(f"{out}: nothing to resume (no checkpoint in {out / ckpt_io.CKPT_DIR})")
        return out
    if ckpt_io.latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; resume it with --resume {out} or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_pretraining(
    cfg: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False, dist: DistContext | None = None
) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; returns the summary also written to ``summary.json``.

    With ``dist`` (from ``setup_distributed``) every rank of a torchrun job calls this: rank 0 prepares
    the data and writes the run directory, each rank reads its slice of every global micro-batch, and
    checkpoints are sharded. Resuming on another world size keeps the checkpoint's global batch.
    """
    if dist is not None:
        return _run_pretraining(cfg, Path(run_dir), resume, quiet, dist)
    ctx = setup_distributed(cfg)
    try:
        return _run_pretraining(cfg, Path(run_dir), resume, quiet, ctx)
    finally:
        ctx.close()


def _run_pretraining(cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool, ctx: DistContext) -> dict[str, Any]:
    from lmlab.data.pipeline import prepare_run_data
    from lmlab.models.counting import count_params, flops_per_token
    from lmlab.models.decoder import Decoder

    cfg = check_world(cfg, ctx.world_size)
    main = ctx.is_main
    quiet = quiet or not main
    ctx.main_first(lambda: prepare_run_dir(run_dir, resume))
    device = ctx.device
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    data_dir, tokenizer = ctx.main_first(lambda: prepare_run_data(cfg, run_dir))
    mixture_dirs = None
    if cfg.data.source == "mixture":
        from lmlab.data.mixture import prepare_mixture_data

        mixture_dirs, _ = prepare_mixture_data(cfg)  # cached by the call above: opens, does not rebuild
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    if resume:  # refuse a mismatched model before anything in the run directory is rewritten
        meta = ckpt_io.verify_checkpoint(ckpt_io.resolve_checkpoint(run_dir), cfg.model)
        cfg = keep_global_batch(cfg, meta.get("global_batch"), ctx.world_size, quiet=quiet)
    ctx.barrier()
    if main:
        save_config(cfg, run_dir / "config.yaml")
        env = environment(device)
        env.update(world_size=ctx.world_size, strategy=ctx.strategy, backend=ctx.backend)
        (run_dir / "env.json").write_text(json.dumps(env, indent=1))
    manifest = load_manifest(data_dir)
    entropy = None if mixture_dirs else manifest.get("splits", {}).get("train", {}).get("unigram_entropy")

    seed_everything(cfg.train.seed)
    model = Decoder(cfg.model).to(device)
    data_seed = cfg.data.seed + cfg.train.seed
    if mixture_dirs:
        from lmlab.data.mixture import build_mixture

        batches, val_splits, ratios = build_mixture(
            cfg, mixture_dirs, seed=data_seed, rank=ctx.rank, world_size=ctx.world_size
        )

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            t = cfg.train
            return evaluate_sources(
                m,
                val_splits,
                ratios,
                seq_len=t.seq_len,
                batch_size=t.micro_batch_size,
                budget_tokens=t.eval_tokens,
                device=device,
            )
    else:
        train_tokens = TokenShards.open(data_dir, "train")
        val_tokens = TokenShards.open(data_dir, "val")
        sampler = WindowSampler(train_tokens, cfg.train.seq_len, data_seed, rank=ctx.rank, world_size=ctx.world_size)
        batches = LMBatches(sampler)

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            t = cfg.train
            return evaluate_lm(m, eval_batches(val_tokens, t.seq_len, t.micro_batch_size, t.eval_tokens), device)

    attach_objective_hooks(model, cfg.objective, pad_id=None)
    teacher = None
    if cfg.objective.distill.teacher:
        if cfg.objective.distill.topk_cache > 0:
            raise ConfigError(
                "objective.distill.topk_cache needs a fixed dataset (lmlab sft); lmlab train samples random windows"
            )
        from lmlab.train.teacher import load_teacher

        teacher = load_teacher(cfg.objective.distill.teacher, tokenizer, cfg.model.vocab_size, device)
    loss_fn = build_lm_loss(cfg.objective, teacher)
    trainer = Trainer(cfg, run_dir, model, batches, loss_fn, device=device, eval_fn=eval_fn, dist=ctx)
    if resume:
        ckpt = trainer.resume()
        if not quiet:
            print(f"resumed from {ckpt} (step {trainer.step})")
    params = count_params(cfg.model)
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)["training"]
    summary: dict[str, Any] = {
        "status": "running",
        "steps": trainer.step,
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "unigram_entropy": entropy,
        "data_dir": str(data_dir),
        "world_size": ctx.world_size,
    }
    if main:
        _write_summary(run_dir, summary)
    if not quiet:
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world_size
        where = f"{ctx.world_size} processes ({ctx.strategy}, {ctx.backend})" if ctx.world_size > 1 else str(device)
        print(
            f"run {run_dir}: {params['total'] / 1e6:.2f}M parameters, {cfg.train.steps} steps of "
            f"{rows}x{cfg.train.seq_len} tokens on {where}"
        )
    result, fields = fit_logged(trainer, run_dir, resume=resume)
    final_eval = result.final_eval or _last_logged_eval(run_dir, result.steps)
    if fields["final_train_loss"] is None:  # resumed at the last step: nothing was trained in this process
        fields["final_train_loss"] = _last_logged(run_dir, "train", result.steps).get("loss")
    summary.update(
        fields,
        flops=flops_tok * result.tokens,
        final_val_loss=final_eval.get("val_loss"),
        final_val_ppl=final_eval.get("val_ppl"),
    )
    sample_model = _sampling_model(trainer, cfg, ctx) if not result.diverged else None
    if main:
        _write_summary(run_dir, summary)
        from lmlab.train.plots import plot_loss

        plot_loss(run_dir, entropy)
        if sample_model is not None:
            write_samples(sample_model, tokenizer, cfg, run_dir, device)
    if not quiet:
        print_report(run_dir, summary)
    ctx.barrier()
    return summary


def _last_logged(run_dir: Path, kind: str, step: int) -> dict[str, Any]:
    """The ``kind`` record of ``metrics.jsonl`` at ``step`` (empty if absent)."""
    from lmlab.train.metrics import read_metrics

    found = [r for r in read_metrics(run_dir) if r.get("kind") == kind and r.get("step") == step]
    return found[-1] if found else {}


def _last_logged_eval(run_dir: Path, step: int) -> dict[str, float]:
    rec = _last_logged(run_dir, "eval", step)
    return {k: v for k, v in rec.items() if k not in ("kind", "step", "tokens")}


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


def _sampling_model(trainer: Trainer, cfg: RunConfig, ctx: DistContext) -> torch.nn.Module | None:
    """A plain copy of the trained weights on rank 0 for generation (collective under FSDP); the trained
    module itself when it is plain (no FSDP, compile or activation checkpointing); None on other ranks."""
    from lmlab.models.decoder import Decoder

    plain = ctx.strategy != "fsdp" and not cfg.train.compile and cfg.distributed.activation_checkpointing == "none"
    if plain:
        return trainer.model if ctx.is_main else None
    weights = full_state_dict(trainer.model, ctx)
    if not ctx.is_main:
        return None
    model = Decoder(cfg.model)
    model.load_state_dict(weights)
    return model.to(ctx.device)


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(run_dir / "summary.json")


@torch.no_grad()
def write_samples(model: torch.nn.Module, tokenizer, cfg: RunConfig, run_dir: Path, device: torch.device) -> Path:
    """Generate one continuation per configured prompt into ``samples.txt``.

    Prompts are prefixed with EOS, the document separator the model saw in training,
    so a prompt is read as the start of a new document.
    """
    from lmlab.models.generation import generate

    s = cfg.sample
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    model.eval()
    blocks = []
    for prompt in s.prompts:
        ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
        new = generate(
            model,
            ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=tokenizer.eos_id,
            generator=gen,
        )
        blocks.append(prompt + tokenizer.decode(new, skip_special_tokens=True))
    path = run_dir / "samples.txt"
    path.write_text("\n\n---\n\n".join(blocks) + "\n")
    return path


def print_report(run_dir: Path, summary: dict[str, Any]) -> None:
    val, ent = summary.get("final_val_loss"), summary.get("unigram_entropy")
    print(
        f"\nfinished {summary['steps']} steps, {summary.get('tokens', 0):,} tokens in {summary.get('wall_time_s', 0):.0f}s"
    )
    if val is not None:
        line = f"final validation loss {val:.4f} nats/token (perplexity {math.exp(val):.2f})"
        if ent:
            line += f"; corpus unigram entropy {ent:.4f} -> {100 * (1 - val / ent):.1f}% below it"
        print(line)
    samples = run_dir / "samples.txt"
    if samples.exists():
        print("\nsamples:\n")
        print(samples.read_text())
    print(f"run directory: {run_dir}")
