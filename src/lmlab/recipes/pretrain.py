"""Pretraining (``lmlab train``): next-token prediction on a token corpus — a synthetic world, local files,
prepared shards or a mixture — with the configured LM objective (goldfish, NEFTune, z-loss, label
smoothing, distillation from a teacher). With ``init_from`` it continues pretraining an existing model
(its architecture and tokenizer)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmlab.config import RunConfig
from lmlab.data.mixture import (
    MixtureBatches,
    MixtureSampler,
    build_mixture,
    prepare_mixture_data,
    upweighted_loss,
)
from lmlab.data.pipeline import prepare_run_data
from lmlab.data.prepare import VAL_DOC_NLL
from lmlab.data.replay import replay_data_dir
from lmlab.data.sampler import WindowSampler, eval_batches
from lmlab.data.shards import TokenShards, load_manifest
from lmlab.errors import ConfigError
from lmlab.eval.perplexity import document_floor, evaluate_lm, evaluate_sources
from lmlab.eval.samples import write_samples
from lmlab.objectives.lm_objective import attach_objective_hooks, build_lm_loss
from lmlab.recipes.distill import load_teacher
from lmlab.recipes.launch import run_command
from lmlab.train.engine import Job, Plan, execute, print_report
from lmlab.train.pretrained import fit_vocabulary, inherit_from_init, run_directory


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


class PretrainRecipe:
    name = "pretrain"

    def setup(self, job: Job) -> Plan:
        cfg = inherit_from_init(job.requested)  # continued pretraining: the parent's architecture and tokenizer
        if cfg.objective.coverage_n > 1:  # DCO scores whole answers; pretraining windows cut documents anywhere
            raise ConfigError(
                f"objective.coverage_n={cfg.objective.coverage_n} is a loss on whole answers and runs under lmlab sft; "
                "lmlab train samples windows that cut documents anywhere (set objective.coverage_n=1)"
            )
        data_dir, tokenizer = job.ctx.main_first(lambda: prepare_run_data(cfg))
        cfg = fit_vocabulary(cfg, tokenizer)
        model = job.start_model(cfg)
        attach_objective_hooks(model, cfg.objective, pad_id=None)
        batches, eval_fn, entropy = self._data(cfg, data_dir, job, tokenizer)
        teacher = None
        if cfg.objective.distill.teacher:
            if cfg.objective.distill.topk_cache > 0:
                raise ConfigError(
                    "objective.distill.topk_cache needs a fixed dataset (lmlab sft); lmlab train samples random windows"
                )
            teacher = load_teacher(cfg.objective.distill.teacher, tokenizer, cfg.model.vocab_size, job.device)
        self.cfg, self.tokenizer = cfg, tokenizer
        loss_fn = build_lm_loss(cfg.objective, teacher)
        if cfg.data.source == "mixture" and cfg.data.mixture_balance == "upweight":
            loss_fn = upweighted_loss(loss_fn)  # rows drawn by size, each source's loss weighted p_i/q_i
        t, world = cfg.train, job.ctx.world_size
        where = f"{world} processes ({job.ctx.strategy}, {job.ctx.backend})" if world > 1 else str(job.device)
        headline = (
            f"run {job.run.path}: {model.num_params() / 1e6:.2f}M parameters, {t.steps} steps of "
            f"{t.micro_batch_size * t.grad_accum * world}x{t.seq_len} tokens on {where}"
        )
        splits = data_splits(cfg, data_dir)
        if splits:
            headline += "\n" + splits
        return Plan(
            cfg,
            model,
            batches,
            loss_fn,
            tokenizer,
            eval_fn=eval_fn,
            summary={"unigram_entropy": entropy, "data_dir": str(data_dir)},
            headline=headline,
        )

    def _data(self, cfg: RunConfig, data_dir, job: Job, tokenizer):
        """``(batches, eval_fn, unigram entropy)`` of a single corpus (with replay of the parent's data when
        ``data.replay_fraction`` is set) or a mixture."""
        t, ctx, device = cfg.train, job.ctx, job.device
        seed = cfg.data.seed + cfg.train.seed
        if cfg.data.source == "mixture":
            dirs, _ = prepare_mixture_data(cfg)  # cached by prepare_run_data: opens, does not rebuild
            batches, val, ratios = build_mixture(cfg, dirs, seed=seed, rank=ctx.rank, world_size=ctx.world_size)

            def mixture_eval(m: torch.nn.Module) -> dict[str, float]:
                return evaluate_sources(
                    m, val, ratios, seq_len=t.seq_len, batch_size=t.micro_batch_size, budget_tokens=t.eval_tokens,
                    device=device,
                )  # fmt: skip

            return batches, mixture_eval, None
        train, val = TokenShards.open(data_dir, "train"), TokenShards.open(data_dir, "val")
        sampler = WindowSampler(train, t.seq_len, seed, rank=ctx.rank, world_size=ctx.world_size)
        batch_source: Any = LMBatches(sampler)
        parent_val = None
        fraction = cfg.data.replay_fraction
        if fraction is not None:
            parent = run_directory(cfg.init_from, "init_from run directory") if cfg.init_from else None
            replay_dir = replay_data_dir(cfg, tokenizer, parent)
            parent_val = TokenShards.open(replay_dir, "val")
            if fraction > 0:
                samplers = {
                    "new": WindowSampler(train, t.seq_len, seed),
                    "parent": WindowSampler(TokenShards.open(replay_dir, "train"), t.seq_len, seed + 7919),
                }
                ratios = {"new": 1.0 - fraction, "parent": fraction}
                batch_source = MixtureBatches(
                    MixtureSampler(samplers, ratios, rank=ctx.rank, world_size=ctx.world_size)
                )
        manifest = load_manifest(data_dir)
        eos, floor = None, None
        if (data_dir / VAL_DOC_NLL).is_file():  # a generator with an exact entropy floor (zipf_facts)
            eos = int(manifest["eos_id"])
            doc_nll = np.load(data_dir / VAL_DOC_NLL)
            floor = document_floor(val, doc_nll, seq_len=t.seq_len, budget_tokens=t.eval_tokens, eos_id=eos)

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            batches = eval_batches(val, t.seq_len, t.micro_batch_size, t.eval_tokens)
            out = evaluate_lm(m, batches, device, eos_id=eos)
            if floor is not None:
                out["val_floor"] = floor
            if parent_val is not None:  # the old domain's loss: forgetting and the stability gap
                parent = eval_batches(parent_val, t.seq_len, t.micro_batch_size, t.eval_tokens)
                out["val_loss/parent"] = evaluate_lm(m, parent, device)["val_loss"]
            return out

        entropy = manifest.get("splits", {}).get("train", {}).get("unigram_entropy")
        return batch_source, eval_fn, entropy

    def finish(self, job: Job, trainer, result) -> None:
        model = job.plain_model(trainer)
        if model is not None:
            write_samples(model, self.tokenizer, self.cfg, job.run.path)

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        print_report(job.run.path, summary)


def data_splits(cfg: RunConfig, data_dir) -> str | None:
    """One line naming the train and validation splits and their sizes (None for a mixture)."""
    if cfg.data.source == "mixture":
        return None
    splits = load_manifest(data_dir).get("splits", {})
    d = cfg.data
    if d.source == "files" and d.val_files:
        origin = f"data.val_files: {', '.join(d.val_files)}"
    else:
        origin = f"{d.val_fraction:.0%} of the documents (data.val_fraction)"

    def size(name: str) -> str:
        info = splits.get(name, {})
        return f"{info.get('documents', 0):,} documents, {info.get('tokens', 0):,} tokens"

    return f"data: train {size('train')}; validation {size('val')} from {origin}"


def run_pretraining(cfg: RunConfig, run_dir, **options) -> dict[str, Any]:
    """Pretrain per ``cfg`` into ``run_dir`` (options as ``lmlab.train.engine.execute``); returns the summary."""
    return execute(PretrainRecipe(), cfg, run_dir, **options)


def train_main(argv: list[str]) -> int:
    return run_command(
        PretrainRecipe(),
        ["train"],
        argv,
        "Pretrain a decoder from a YAML config. Overrides: dotted key=value after the config "
        "(e.g. optim.lr=3e-4 train.steps=200). Several processes: --nproc N, or run under torchrun "
        "(torchrun --nproc_per_node N -m lmlab train CONFIG ...); see docs/distributed.md.",
    )
