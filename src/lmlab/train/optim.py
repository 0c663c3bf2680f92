"""AdamW with parameter groups: weight decay on matrices only.

Norm gains, biases and embeddings are not decayed by default (as in GPT-2/Llama
recipes); an untied output head is a matrix and is decayed.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into decayed and non-decayed groups."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        if p.ndim >= 2 and (not is_embedding or cfg.decay_embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA when ``cfg.fused`` is None (auto) or True."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg), **kwargs)
