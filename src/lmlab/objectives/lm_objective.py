"""Builds the loop's ``loss_fn`` for token-level LM training from ``ObjectiveConfig``.

Composes the pure objectives: cross-entropy with label smoothing and PaLM z-loss
(docs/science.md §10), the goldfish keep-mask (§5), NEFTune embedding noise (§6, as a
training-only hook on the model) and knowledge distillation from a teacher (Hinton et al.
2015; GKD, Agarwal et al. 2024): ``total = alpha·τ²·D(p_T, p_S) + (1 − alpha)·LM`` where LM is
the configured token loss (plain CE unless smoothing / z-loss are on) and D is forward KL,
reverse KL or JSD(β) (``lmlab.objectives.distill``). All switches combine: the goldfish mask
removes a token from both terms. Packed batches may carry ``doc_ids`` and ``position_ids``;
they are passed to the model (and the teacher) unchanged. ``coverage_n > 1`` replaces the token loss by
Direct Coverage Optimization over whole sequences (§20, ``lmlab.objectives.coverage``; a sequence is a row
or, in packed rows, one ``doc_ids`` document), which ``ObjectiveConfig`` keeps apart from the token-level
switches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmlab.config import ObjectiveConfig
from lmlab.errors import ConfigError
from lmlab.objectives.base import LossOutput
from lmlab.objectives.coverage import coverage_loss, sequence_logps
from lmlab.objectives.distill import distillation_loss, topk_distillation_loss
from lmlab.objectives.goldfish import goldfish_mask
from lmlab.objectives.lm import IGNORE_INDEX, causal_lm_loss
from lmlab.objectives.neftune import attach_neftune

MODEL_KWARGS = ("doc_ids", "position_ids")
TOPK_KEYS = ("teacher_topk_logprobs", "teacher_topk_indices")

TeacherFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optional packing inputs present in ``batch``."""
    return {k: batch[k] for k in MODEL_KWARGS if k in batch}


def build_lm_loss(obj: ObjectiveConfig, teacher: TeacherFn | None = None, *, topk_cached: bool = False):
    """``loss_fn(model, batch) -> LossOutput`` for next-token prediction with the configured switches.

    Distillation (``obj.distill.teacher`` set) needs either ``teacher`` (a callable batch -> logits
    [B, T, V] run under ``no_grad``, e.g. ``lmlab.recipes.distill.Teacher``) or ``topk_cached=True``,
    meaning every batch carries the teacher's cached top-k (``TOPK_KEYS``). Metrics (sums): ``ce``,
    plus ``kd`` (τ²·D) and ``lm_loss`` (the LM term) when distilling, ``goldfish_dropped`` with
    goldfish, ``smoothed`` / ``z_loss`` when enabled; with ``coverage_n > 1`` (count = sequences) ``ce`` (the
    token cross-entropy sum), ``seq_nll`` and ``coverage_weight`` (Σ F, the share of CE's gradient kept).
    """
    gf, kd_cfg = obj.goldfish, obj.distill
    distilling = kd_cfg.teacher is not None
    if distilling and teacher is None and not topk_cached:
        raise ConfigError(
            f"objective.distill.teacher={kd_cfg.teacher!r} is set but no teacher model was loaded for this run; "
            "distillation runs under lmlab sft (or unset objective.distill.teacher)"
        )
    kd_options = {"divergence": kd_cfg.kind, "beta": kd_cfg.beta, "temperature": kd_cfg.temperature, "alpha": 1.0}

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"]
        if obj.coverage_n > 1:
            return coverage_objective(model(batch["input_ids"], **model_inputs(batch)), batch, obj.coverage_n)
        keep = None
        if gf.enabled:
            keep = goldfish_mask(labels, k=gf.k, strategy=gf.strategy, context_width=gf.context_width, start=gf.start)
        logits = model(batch["input_ids"], **model_inputs(batch))
        out = causal_lm_loss(logits, labels, label_smoothing=obj.label_smoothing, z_loss=obj.z_loss, loss_mask=keep)
        if keep is not None:
            supervised = labels != IGNORE_INDEX
            out.metrics["goldfish_dropped"] = (supervised & ~keep).sum().to(out.loss_sum.dtype) * 1.0
        if not distilling:
            return out
        if TOPK_KEYS[0] in batch:
            kd = topk_distillation_loss(
                logits, batch[TOPK_KEYS[0]], batch[TOPK_KEYS[1]], labels, loss_mask=keep, **kd_options
            )
        else:
            if teacher is None:
                raise ValueError("the batch has no cached teacher top-k and no teacher was given")
            with torch.no_grad():
                teacher_logits = teacher(batch)
            kd = distillation_loss(logits, teacher_logits, labels, loss_mask=keep, **kd_options)
        alpha = kd_cfg.alpha
        metrics = {**out.metrics, "kd": kd.metrics["kd"], "lm_loss": out.loss_sum.detach()}
        return LossOutput(alpha * kd.loss_sum + (1.0 - alpha) * out.loss_sum, out.count, metrics)

    return loss_fn


def coverage_objective(logits: torch.Tensor, batch: dict[str, torch.Tensor], n: int) -> LossOutput:
    """DCO over the batch's sequences (rows, or ``doc_ids`` documents of packed rows), with the token CE as ``ce``."""
    logps, counts = sequence_logps(logits, batch["labels"], batch.get("doc_ids"))
    out = coverage_loss(logps, n, mask=counts > 0)
    out.metrics["ce"] = -logps.detach().sum()  # the token CE sum (the trainer logs its per-sequence twin seq_nll)
    return out


def attach_objective_hooks(model: nn.Module, obj: ObjectiveConfig, pad_id: int | None = None) -> list:
    """Model hooks the objective needs (NEFTune); returns their handles."""
    handles = []
    if obj.neftune_alpha > 0:
        handles.append(attach_neftune(model, obj.neftune_alpha, pad_id=pad_id))
    return handles
