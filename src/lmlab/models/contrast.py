"""Unlearning from logit difference (ULD; Ji et al. 2024, arXiv 2406.08607): a model whose logits are a target's
minus an assistant's, on the target's plausible tokens.

The assistant of an lmlab ULD run is the target itself with LoRA adapters (trained to *remember* the forget set
and to be uniform elsewhere), so one module computes both: the target with the adapters off, the assistant with
them on. ``LogitDifference`` wraps that module with the decoder's interface (``forward(ids, kv_cache=...)``,
``new_kv_cache()``, ``cfg``), so evaluation and generation use it like any model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.lora import adapters_disabled


def uld_logits(
    target_logits: torch.Tensor, assistant_logits: torch.Tensor, *, alpha: float = 0.8, rho: float = 1e-2
) -> torch.Tensor:
    """``l = l_target − α·l_assistant``, the assistant's logits zeroed outside the target's relative-top set: the
    tokens with ``log p_t ≥ min(log p of the ⌊ρV⌋-th best token, log p_max + log ρ)``. α = 0.8 and ρ = 1e-2 as in
    the authors' TOFU evaluation (their config's α = 1, ρ = 0.1)."""
    log_p = F.log_softmax(target_logits.float(), -1)
    k = max(1, int(rho * target_logits.shape[-1]))
    kth = log_p.topk(k, dim=-1).values[..., -1:]
    threshold = torch.minimum(kth, log_p.max(-1, keepdim=True).values + math.log(rho))
    keep = log_p >= threshold
    return target_logits.float() - alpha * torch.where(keep, assistant_logits.float(), torch.zeros_like(log_p))


class PairedCache:
    """The target's and the assistant's KV caches, advanced together; the key mask is shared."""

    def __init__(self, target, assistant) -> None:
        self.target, self.assistant = target, assistant

    @property
    def length(self) -> int:
        return self.target.length

    @property
    def key_mask(self) -> torch.Tensor | None:
        return self.target.key_mask

    @key_mask.setter
    def key_mask(self, mask: torch.Tensor | None) -> None:
        self.target.key_mask = self.assistant.key_mask = mask


class LogitDifference(nn.Module):
    """ULD's unlearned model from one adapter model: ``uld_logits(model without adapters, model with them)``."""

    def __init__(self, model: nn.Module, *, alpha: float = 0.8, rho: float = 1e-2) -> None:
        super().__init__()
        self.model, self.alpha, self.rho = model, alpha, rho

    @property
    def cfg(self):
        return self.model.cfg

    def new_kv_cache(self, max_len: int | None = None, *, prune: bool = False) -> PairedCache:
        if max_len is not None or prune:
            raise ValueError("a logit-difference model decodes with the growing KV cache only")
        return PairedCache(self.model.new_kv_cache(), self.model.new_kv_cache())

    def forward(self, input_ids: torch.Tensor, *, kv_cache: PairedCache | None = None, **kwargs) -> torch.Tensor:
        target_cache = kv_cache.target if kv_cache is not None else None
        assistant_cache = kv_cache.assistant if kv_cache is not None else None
        with adapters_disabled(self.model):
            target = self.model(input_ids, kv_cache=target_cache, **kwargs)
        assistant = self.model(input_ids, kv_cache=assistant_cache, **kwargs)
        return uld_logits(target, assistant, alpha=self.alpha, rho=self.rho)
