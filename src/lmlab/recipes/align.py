"""Preference optimisation (``lmlab align``): DPO, IPO, SimPO, LN-DPO, ORPO from an lmlab run.

The policy starts from ``init_from`` (an lmlab run directory, e.g. an SFT run or an imported HF
model); the reference is ``align.reference`` (default: the same weights), frozen in eval mode.
Methods that need a reference (``PREFERENCE_METHODS[...].needs_reference``) score each batch with it
under ``no_grad``, once per batch; with ``align.precompute_reference`` its log-probs are computed in
one pass before training and cached next to the data in the run directory (``reference_logps.pt``,
keyed by the data files' SHA-256), so training holds one model. The losses are the pure functions of
``lmlab.objectives.preference`` (docs/science.md §7, parity-tested against TRL, §7.1).

Logged per step (means over pairs): ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}`` (policy), ``ref_logps/{chosen,rejected}``, ``length/{chosen,rejected}``
(completion tokens). Every ``align.diagnostics_every`` steps a ``kind: "diagnostic"`` record holds the
gradient-entanglement probe (Yuan et al. 2024, "A common pitfall of margin-based language model alignment:
gradient entanglement", arXiv 2410.13828; docs/science.md §7.3): on a fixed probe batch of held-out pairs,
the cosine between ∇θ Σ log πθ(y_w|x) and ∇θ Σ log πθ(y_l|x), their norms, and the probe's chosen/rejected
log-probs and margin (single-process runs only: the probe needs whole gradients). Evaluation reports
held-out preference accuracy; at the end, answers sampled at temperature 1 from held-out prompts go to
``samples.jsonl`` with their policy and reference log-probs, and their mean difference is the Monte-Carlo
estimate of KL(πθ ‖ πref).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.config import AlignConfig, RunConfig
from lmlab.data.preference import (
    PreferenceBatches,
    PreferenceData,
    collate_pairs,
    iterate_batches,
    load_preference_file,
    pad_id_of,
)
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import ConfigError
from lmlab.models.generation import generate
from lmlab.models.lora import BaseView, adapters_disabled
from lmlab.objectives.base import LossOutput
from lmlab.objectives.preference import PREFERENCE_METHODS, PairLogps, preference_losses, preference_objective
from lmlab.recipes.launch import run_command
from lmlab.safe_io import write_bytes_atomic, write_text_atomic
from lmlab.train.callbacks import Callback
from lmlab.train.engine import Job, Plan, execute
from lmlab.train.pretrained import inherit_from_init, load_frozen, require_init_from

REF_CACHE = "reference_logps.pt"
PROBE_PAIRS = 8

# --------------------------------------------------------------------------- log-probs and the loss


def completion_logps(
    model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each row [N] and their counts [N].

    Token j is scored by the logits at position j−1 (``log softmax`` in fp32, as TRL's
    ``selective_log_softmax``); non-completion positions contribute zero.
    """
    logits = model(input_ids)[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)`` of a pair batch, each [B]."""
    logps, lengths = completion_logps(model, batch["input_ids"], batch["completion_mask"])
    b = batch["pair_index"].numel()
    return logps[:b], logps[b:], lengths[:b], lengths[b:]


def check_align_config(cfg: RunConfig) -> None:
    """The ``align`` rules that need the resolved model and a training file."""
    if cfg.align.max_len > cfg.model.max_seq_len:
        raise ConfigError(f"align.max_len={cfg.align.max_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    if not cfg.align.train_file:
        raise ConfigError("align.train_file is required (a preference JSONL with prompt, chosen, rejected)")


def build_align_loss(a: AlignConfig, reference: nn.Module | None, *, implicit: bool = False):
    """``loss_fn(model, batch) -> LossOutput`` for the loop; the reference runs under ``no_grad``, once.
    ``implicit``: the reference is the policy itself with its adapters disabled (an adapter run's frozen base)."""
    needs_ref = PREFERENCE_METHODS[a.loss].needs_reference

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, batch)
        ref_chosen, ref_rejected = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
        if ref_chosen is None and implicit and needs_ref:
            with torch.no_grad(), adapters_disabled(model):
                ref_chosen, ref_rejected, _, _ = pair_logps(model, batch)
        elif ref_chosen is None and reference is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = pair_logps(reference, batch)
        if needs_ref and ref_chosen is None:
            raise RuntimeError(f"align.loss={a.loss} needs reference log-probs")  # a bug: the recipe provides them
        logps = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
        out = preference_objective(preference_losses(a, logps))
        out.metrics.update(
            {
                "logps/chosen": chosen.detach().sum(),
                "logps/rejected": rejected.detach().sum(),
                "length/chosen": chosen_len.sum(),
                "length/rejected": rejected_len.sum(),
            }
        )
        if ref_chosen is not None:
            out.metrics["ref_logps/chosen"] = ref_chosen.detach().sum()
            out.metrics["ref_logps/rejected"] = ref_rejected.detach().sum()
        return out

    return loss_fn


# --------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_table(reference: nn.Module, data: PreferenceData, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] summed reference log-probs of every pair's chosen and rejected completion (one pass)."""
    reference.eval()
    table = torch.zeros(len(data), 2, dtype=torch.float32)
    for batch in iterate_batches(data, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected, _, _ = pair_logps(reference, batch)
        table[batch["pair_index"].cpu(), 0] = chosen.float().cpu()
        table[batch["pair_index"].cpu(), 1] = rejected.float().cpu()
    return table


def cached_reference(
    run_dir: Path,
    reference_path: str,
    splits: dict[str, PreferenceData],
    load_reference,
    pad_id: int,
    batch_size,
    device,
) -> dict[str, torch.Tensor]:
    """Reference log-probs per split, read from ``run_dir/reference_logps.pt`` when it matches the data.

    The cache is keyed by each data file's SHA-256, the pairs' count and the reference's path; anything
    else recomputes (loading the reference once for all splits) and rewrites the cache.
    """
    path = Path(run_dir) / REF_CACHE
    key = {name: [d.sha256, len(d)] for name, d in splits.items()}
    if path.is_file():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("key") == key and cache.get("reference") == str(reference_path):
            return cache["tables"]
    reference = load_reference()
    tables = {name: reference_table(reference, d, pad_id, batch_size, device) for name, d in splits.items()}
    del reference
    buffer = io.BytesIO()
    torch.save({"key": key, "reference": str(reference_path), "tables": tables}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return tables


def load_reference_model(path: str | Path, tokenizer, device) -> nn.Module:
    """The frozen reference; refused (``ModelMismatchError``) when its tokenizer differs from the policy's."""
    return load_frozen(path, device, role="reference", tokenizer=tokenizer, key="align.reference").model


# --------------------------------------------------------------------------- diagnostics


def entanglement_probe(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient entanglement on a probe batch (Yuan et al. 2024, arXiv 2410.13828; docs/science.md §7.3).

    g_w = ∇θ Σ_i log πθ(y_w,i|x_i) and g_l = ∇θ Σ_i log πθ(y_l,i|x_i) over the probe pairs; returns
    ``grad_cos`` = ⟨g_w, g_l⟩/(‖g_w‖‖g_l‖), ``grad_dot``, ``grad_norm_chosen``, ``grad_norm_rejected``
    and the probe's mean ``probe_logps/chosen``, ``probe_logps/rejected`` and ``probe_margin`` (their
    difference). Uses ``torch.autograd.grad``, so the parameters' ``.grad`` buffers are untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    chosen, rejected, _, _ = pair_logps(model, batch)
    g_w = torch.autograd.grad(chosen.sum(), params, retain_graph=True, allow_unused=True)
    g_l = torch.autograd.grad(rejected.sum(), params, allow_unused=True)
    dot = norm_w = norm_l = 0.0
    for a, b in zip(g_w, g_l):
        if a is None or b is None:
            continue
        a, b = a.double(), b.double()
        dot += float((a * b).sum())
        norm_w += float((a * a).sum())
        norm_l += float((b * b).sum())
    norm_w, norm_l = math.sqrt(norm_w), math.sqrt(norm_l)
    n = chosen.numel()
    chosen, rejected = chosen.detach().double(), rejected.detach().double()  # the margin is their exact difference
    return {
        "grad_cos": dot / max(norm_w * norm_l, 1e-30),
        "grad_dot": dot,
        "grad_norm_chosen": norm_w,
        "grad_norm_rejected": norm_l,
        "probe_logps/chosen": float(chosen.sum()) / n,
        "probe_logps/rejected": float(rejected.sum()) / n,
        "probe_margin": float((chosen - rejected).sum()) / n,
    }


def probe_batch(data: PreferenceData, pad_id: int, device) -> dict[str, torch.Tensor]:
    """The fixed probe of the entanglement diagnostic: the first ``PROBE_PAIRS`` pairs of ``data``."""
    index = list(range(min(PROBE_PAIRS, len(data))))
    return {k: v.to(device) for k, v in collate_pairs([data.pairs[i] for i in index], pad_id, index).items()}


class EntanglementProbe(Callback):
    """Logs ``entanglement_probe`` before the first step and every ``every`` steps (and at the last)."""

    def __init__(self, batch: dict[str, torch.Tensor], every: int):
        self.batch, self.every = batch, every

    def _emit(self, trainer) -> None:
        if trainer.dist.world_size > 1 or trainer.dist.strategy == "fsdp":
            return  # the probe's per-parameter gradients are of the local model only; single process
        trainer.emit({"kind": "diagnostic", "step": trainer.step, **entanglement_probe(trainer.model, self.batch)})

    def on_fit_start(self, trainer) -> None:
        if trainer.step == 0:
            self._emit(trainer)

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.steps:
            self._emit(trainer)


# --------------------------------------------------------------------------- evaluation and samples


@torch.no_grad()
def evaluate_pairs(model, loss_fn, data: PreferenceData, pad_id: int, batch_size: int, device, reference=None):
    """Held-out preference metrics: ``val_loss``, ``val_accuracy`` (chosen reward > rejected), margins, log-probs."""
    sums: dict[str, float] = {}
    count = 0.0
    for batch in iterate_batches(data, pad_id, batch_size):
        if reference is not None:
            ref = reference[batch["pair_index"]]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        batch = {k: v.to(device) for k, v in batch.items()}
        out = loss_fn(model, batch)
        sums["val_loss"] = sums.get("val_loss", 0.0) + float(out.loss_sum)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += float(out.count)
    means = {k: v / max(count, 1.0) for k, v in sums.items()}
    result = {"val_loss": means.pop("val_loss")}
    result["val_accuracy"] = means.pop("rewards/accuracies")
    result["val_margin"] = means.pop("rewards/margins")
    result.update({f"val_{k}": v for k, v in means.items()})
    return result


@torch.no_grad()
def sample_and_score(
    model, reference, tokenizer, data: PreferenceData, *, n_prompts: int, max_new_tokens: int, max_seq_len: int,
    seed: int, device,
) -> list[dict[str, Any]]:  # fmt: skip
    """Sample one answer per held-out prompt at temperature 1 and score it under policy and reference.

    Temperature 1 without top-k/top-p makes the answers draws from πθ itself, so the mean of
    ``log πθ(y|x) − log πref(y|x)`` is an unbiased estimate of KL(πθ ‖ πref) per prompt.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    records = []
    for pair in data.pairs[:n_prompts]:
        prompt = list(pair.prompt_ids)
        budget = max(1, min(max_new_tokens, max_seq_len - len(prompt)))
        new = generate(model, prompt, max_new_tokens=budget, temperature=1.0, eos_id=tokenizer.eos_id, generator=gen)
        if not new:
            continue
        ids = torch.tensor([prompt + new], dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt) :] = True
        policy_lp, length = completion_logps(model, ids, mask)
        ref_lp, _ = completion_logps(reference, ids, mask)
        answer_ids = new[:-1] if new[-1] == tokenizer.eos_id else new
        records.append(
            {
                "prompt": pair.prompt,
                "completion": tokenizer.decode(answer_ids, skip_special_tokens=True),
                "tokens": int(length),
                "finished": new[-1] == tokenizer.eos_id,
                "policy_logp": float(policy_lp),
                "reference_logp": float(ref_lp),
            }
        )
    return records


# --------------------------------------------------------------------------- the recipe


class AlignRecipe:
    name = "align"

    def setup(self, job: Job) -> Plan:
        require_init_from(job.requested, "align")
        cfg = inherit_from_init(job.requested)
        check_align_config(cfg)
        # The saved config must reload (train.seq_len <= model.max_seq_len): record the longest pair instead.
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=cfg.align.max_len))
        a, ctx, device = cfg.align, job.ctx, job.device
        tokenizer = TextTokenizer.load(cfg.tokenizer.path)  # the init_from run's, unless tokenizer.path says
        ref_path = str(a.reference or cfg.init_from)
        needs_ref = PREFERENCE_METHODS[a.loss].needs_reference
        # An adapter run's reference is its own frozen base: the policy with the adapters off, no second model.
        implicit = cfg.adapter.enabled and not a.reference

        def load_ref() -> nn.Module:
            if implicit:  # for the reference table, computed after ``model`` is made below
                return BaseView(model)
            return load_reference_model(ref_path, tokenizer, device)

        load_args = dict(
            max_prompt_len=a.max_prompt_len, max_len=a.max_len, identical_pairs=a.identical_pairs, columns=a.columns
        )
        train = load_preference_file(a.train_file, tokenizer, **load_args)
        val = load_preference_file(a.val_file, tokenizer, **load_args) if a.val_file else None
        reference = load_ref() if needs_ref and not a.precompute_reference and not implicit else None
        if needs_ref and a.precompute_reference and a.reference:
            load_ref()  # refuse a foreign reference before any cache is used
        model = job.start_model(cfg)
        pad_id, mb = pad_id_of(tokenizer), cfg.train.micro_batch_size
        tables: dict[str, torch.Tensor] = {}
        if needs_ref and a.precompute_reference:
            splits = {"train": train, **({"val": val} if val is not None else {})}
            tables = ctx.main_first(
                lambda: cached_reference(job.run.path, ref_path, splits, load_ref, pad_id, mb, device)
            )
        batches = PreferenceBatches(
            train, pad_id, cfg.data.seed + cfg.train.seed, tables.get("train"), rank=ctx.rank, world_size=ctx.world_size
        )
        loss_fn = build_align_loss(a, reference, implicit=implicit)
        eval_fn = None
        if val is not None:

            def eval_fn(m: nn.Module) -> dict[str, float]:
                return evaluate_pairs(m, loss_fn, val, pad_id, mb, device, tables.get("val"))

        held_out = val if val is not None else train
        probe = probe_batch(held_out, pad_id, device)
        callbacks = [EntanglementProbe(probe, a.diagnostics_every)] if a.diagnostics_every > 0 else []
        self.cfg, self.tokenizer, self.held_out = cfg, tokenizer, held_out
        self.reference, self.load_ref, self.implicit = reference, load_ref, implicit
        pairs = mb * cfg.train.grad_accum * ctx.world_size
        return Plan(
            cfg,
            model,
            batches,
            loss_fn,
            tokenizer,
            eval_fn=eval_fn,
            callbacks=callbacks,
            summary={
                "loss": a.loss,
                "reference": ref_path if needs_ref else None,
                "reference_is_base_without_adapters": implicit and needs_ref,
                "train_data": train.summary(),
                "val_data": val.summary() if val is not None else None,
            },
            headline=(
                f"align {a.loss} on {len(train)} pairs ({train.identical} identical skipped, {train.truncated} "
                f"truncated): {model.num_params() / 1e6:.2f}M parameters, {cfg.train.steps} steps of {pairs} pairs"
            ),
        )

    def finish(self, job: Job, trainer, result) -> None:
        final = job.run.final_eval(result)
        job.summary.extra.update(final_val_accuracy=final.get("val_accuracy"), final_eval=final)
        model = job.plain_model(trainer)
        if model is None:
            return
        cfg = self.cfg
        if self.implicit:
            reference = BaseView(model)
        else:
            reference = self.reference if self.reference is not None else self.load_ref()
        samples = sample_and_score(
            model, reference, self.tokenizer, self.held_out, n_prompts=min(64, len(self.held_out)),
            max_new_tokens=cfg.sample.max_new_tokens, max_seq_len=cfg.model.max_seq_len, seed=cfg.train.seed,
            device=job.device,
        )  # fmt: skip
        write_text_atomic(job.run.path / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
        if samples:
            job.summary.extra.update(
                kl_to_reference=sum(r["policy_logp"] - r["reference_logp"] for r in samples) / len(samples),
                sample_tokens=sum(r["tokens"] for r in samples) / len(samples),
                samples=len(samples),
            )

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        acc, kl = summary.get("final_val_accuracy"), summary.get("kl_to_reference")
        print(
            f"finished {summary['steps']} steps; held-out accuracy {acc if acc is None else round(acc, 4)}, "
            f"KL to reference {kl if kl is None else round(kl, 4)} nats; run directory: {job.run.path}"
        )


def run_align(cfg: RunConfig, run_dir, **options) -> dict[str, Any]:
    """Preference-train ``cfg.init_from`` per ``cfg.align`` into ``run_dir``; returns the summary."""
    return execute(AlignRecipe(), cfg, run_dir, **options)


def align_main(argv: list[str]) -> int:
    return run_command(
        AlignRecipe(),
        ["align"],
        argv,
        "Preference optimisation (DPO, IPO, SimPO, LN-DPO, ORPO) of the model in init_from. "
        "Overrides: dotted key=value after the config (e.g. align.loss=ln_dpo align.beta=1.0).",
        aliases={"--reference": ("align.reference", "reference model run directory (default: the init_from run)")},
    )
