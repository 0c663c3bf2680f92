"""Pretraining a decoder on a token corpus: builds data, model and loop from a ``RunConfig``
and leaves a self-describing run directory (DESIGN.md principle 8)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig, save_config
from lmlab.data.shards import TokenShards, load_manifest
from lmlab.errors import CheckpointError, ConfigError, UserError
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.lm_objective import attach_objective_hooks, build_lm_loss
from lmlab.train.loop import Trainer, evaluate_lm
from lmlab.train.metrics import MetricsLogger
from lmlab.train.runtime import environment, resolve_device, seed_everything
from lmlab.train.sampler import WindowSampler, eval_batches


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


def run_pretraining(cfg: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; returns the summary also written to ``summary.json``."""
    from lmlab.data.pipeline import prepare_run_data
    from lmlab.models.counting import count_params, flops_per_token
    from lmlab.models.decoder import Decoder

    run_dir = prepare_run_dir(Path(run_dir), resume)
    device = resolve_device(cfg.train.device)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    data_dir, tokenizer = prepare_run_data(cfg, run_dir)
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    if resume:  # refuse a mismatched model before anything in the run directory is rewritten
        ckpt_io.verify_checkpoint(ckpt_io.resolve_checkpoint(run_dir), cfg.model)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1))
    manifest = load_manifest(data_dir)
    entropy = manifest.get("splits", {}).get("train", {}).get("unigram_entropy")

    seed_everything(cfg.train.seed)
    model = Decoder(cfg.model).to(device)
    train_tokens = TokenShards.open(data_dir, "train")
    val_tokens = TokenShards.open(data_dir, "val")
    batches = LMBatches(WindowSampler(train_tokens, cfg.train.seq_len, cfg.data.seed + cfg.train.seed))

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        t = cfg.train
        return evaluate_lm(m, eval_batches(val_tokens, t.seq_len, t.micro_batch_size, t.eval_tokens), device)

    attach_objective_hooks(model, cfg.objective, pad_id=None)
    loss_fn = build_lm_loss(cfg.objective)
    trainer = Trainer(cfg, run_dir, model, batches, loss_fn, device=device, eval_fn=eval_fn)
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
    }
    _write_summary(run_dir, summary)
    if not quiet:
        print(
            f"run {run_dir}: {params['total'] / 1e6:.2f}M parameters, {cfg.train.steps} steps of "
            f"{cfg.train.micro_batch_size * cfg.train.grad_accum}x{cfg.train.seq_len} tokens on {device}"
        )
    logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, resume_step=trainer.step if resume else None)
    start = time.perf_counter()
    try:
        result = trainer.fit(logger)
    finally:
        logger.close()
    final_val = result.final_eval.get("val_loss")
    summary.update(
        status="diverged" if result.diverged else "finished",
        steps=result.steps,
        tokens=result.tokens,
        flops=flops_tok * result.tokens,
        final_train_loss=result.final_train_loss,
        final_val_loss=final_val,
        final_val_ppl=result.final_eval.get("val_ppl"),
        wall_time_s=time.perf_counter() - start,
    )
    _write_summary(run_dir, summary)
    from lmlab.train.plots import plot_loss

    plot_loss(run_dir, entropy)
    if not result.diverged:
        write_samples(model, tokenizer, cfg, run_dir, device)
    if not quiet:
        print_report(run_dir, summary)
    return summary


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
    print(f"\nfinished {summary['steps']} steps, {summary.get('tokens', 0):,} tokens in {summary.get('wall_time_s', 0):.0f}s")
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
