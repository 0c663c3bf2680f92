"""Builds the loop's ``loss_fn`` for token-level LM training from ``ObjectiveConfig``.

Composes the pure objectives: cross-entropy with label smoothing and PaLM z-loss
(SCIENCE.md §10), the goldfish keep-mask (§5) and NEFTune embedding noise (§6, as a
training-only hook on the model). Packed batches may carry ``doc_ids`` and
``position_ids``; they are passed to the model unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import ObjectiveConfig
from lmlab.objectives.base import LossOutput
from lmlab.objectives.goldfish import goldfish_mask
from lmlab.objectives.lm import IGNORE_INDEX, causal_lm_loss
from lmlab.objectives.neftune import attach_neftune

MODEL_KWARGS = ("doc_ids", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optional packing inputs present in ``batch``."""
    return {k: batch[k] for k in MODEL_KWARGS if k in batch}


def build_lm_loss(obj: ObjectiveConfig):
    """``loss_fn(model, batch) -> LossOutput`` for next-token prediction with the configured switches."""
    gf = obj.goldfish

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"]
        keep = None
        if gf.enabled:
            keep = goldfish_mask(labels, k=gf.k, strategy=gf.strategy, context_width=gf.context_width, start=gf.start)
        logits = model(batch["input_ids"], **model_inputs(batch))
        out = causal_lm_loss(logits, labels, label_smoothing=obj.label_smoothing, z_loss=obj.z_loss, loss_mask=keep)
        if keep is not None:
            supervised = labels != IGNORE_INDEX
            out.metrics["goldfish_dropped"] = (supervised & ~keep).sum().to(out.loss_sum.dtype) * 1.0
        return out

    return loss_fn


def attach_objective_hooks(model: nn.Module, obj: ObjectiveConfig, pad_id: int | None = None) -> list:
    """Model hooks the objective needs (NEFTune); returns their handles."""
    handles = []
    if obj.neftune_alpha > 0:
        handles.append(attach_neftune(model, obj.neftune_alpha, pad_id=pad_id))
    return handles
