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

``objective.loss_impl`` chooses how the output projection and the token loss run on an lmlab ``Decoder``:
``standard`` (the [B, T, V] logits, then ``inplace_causal_lm_loss``, which writes the gradient over them;
``causal_lm_loss`` when compiled), ``chunked`` (``chunked_causal_lm_loss``: chunks
of ``loss_chunk_tokens`` tokens, logits recomputed in backward) or ``fused``
(``lmlab.objectives.fused_linear_ce``: the gradient computed chunk by chunk in the forward, no [B, T, V]
logits at all). Each is passed to the model as its ``head_fn``, so it runs inside the module's forward
(DDP / FSDP2 hooks, and ``train.compile=full`` compiles the whole forward with the loss). Distillation and
DCO need the full logits and keep ``model(...) -> logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ObjectiveConfig
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.objectives.base import LossOutput
from lmlab.objectives.coverage import coverage_loss, sequence_logps
from lmlab.objectives.distill import distillation_loss, topk_distillation_loss
from lmlab.objectives.fused_linear_ce import fused_linear_cross_entropy
from lmlab.objectives.goldfish import goldfish_mask
from lmlab.objectives.inplace_ce import inplace_causal_lm_loss
from lmlab.objectives.lm import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss
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
    head_settings = (obj.loss_impl, obj.loss_chunk_tokens, obj.label_smoothing, obj.z_loss)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"]
        if obj.coverage_n > 1:
            return coverage_objective(model(batch["input_ids"], **model_inputs(batch)), batch, obj.coverage_n)
        keep = None
        if gf.enabled:
            keep = goldfish_mask(labels, k=gf.k, strategy=gf.strategy, context_width=gf.context_width, start=gf.start)
        if not distilling and takes_head_fn(model):  # the head and the loss inside the model's forward
            head_fn = partial(token_loss_head, *head_settings, labels, keep)
            loss_sum, count, metrics = model(batch["input_ids"], **model_inputs(batch), head_fn=head_fn)
            out = LossOutput(loss_sum, count, metrics)
        else:
            if obj.loss_impl != "standard":
                raise ConfigError(
                    f"objective.loss_impl={obj.loss_impl} needs an lmlab Decoder, but this run trains a "
                    f"{type(model).__name__}; use objective.loss_impl=standard"
                )
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


def takes_head_fn(model: nn.Module) -> bool:
    """True for an lmlab ``Decoder``, also inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while not isinstance(model, Decoder):
        inner = model._modules.get("module") or model._modules.get("_orig_mod")
        if inner is None:
            return False
        model = inner
    return True


def token_loss_head(
    impl: str,
    chunk_tokens: int,
    label_smoothing: float,
    z_loss: float,
    labels: torch.Tensor,
    keep: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The token loss from the final hidden states [B, T, d] and the head weight [V, d] (a ``Decoder`` ``head_fn``).

    ``impl``: ``standard`` forms the logits ``F.linear(hidden, weight)`` (the model's own output projection) and,
    in eager mode, writes the loss's gradient over them (``inplace_ce``: one [N, V] buffer instead of three);
    ``chunked`` and ``fused`` never hold all of them (``chunk_tokens`` tokens at a time). Returns the
    ``LossOutput`` fields as a tuple, which DDP, FSDP2 and ``torch.compile`` all trace through.
    """
    options = {"label_smoothing": label_smoothing, "z_loss": z_loss, "loss_mask": keep}
    if impl == "fused":
        out = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_tokens, **options)
    elif impl == "chunked":
        out = chunked_causal_lm_loss(hidden, lambda h: F.linear(h, weight), labels, chunk_size=chunk_tokens, **options)
    elif torch.compiler.is_compiling():  # traced: the compiler plans the buffers itself
        out = causal_lm_loss(F.linear(hidden, weight), labels, **options)
    else:  # the logits are this function's own temporary: their buffer can take the gradient
        out = inplace_causal_lm_loss(F.linear(hidden, weight), labels, **options)
    return out.loss_sum, out.count, out.metrics


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
