"""NEFTune: uniform noise on the input embeddings during fine-tuning (Jain et al. 2023; docs/science.md §6).

``X_emb' = X_emb + (alpha / sqrt(L·d))·eps``, ``eps ~ Uniform(−1, 1)``, in training only. The
noise is a pure function of the embeddings (``neftune_noise``); ``attach_neftune`` wires it into a
model as a forward hook on ``model.tok_embeddings`` that is silent in eval mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def neftune_noise(
    embeddings: torch.Tensor,
    *,
    alpha: float,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    padded: bool = False,
) -> torch.Tensor:
    """``embeddings`` [B, T, d] plus NEFTune noise (arXiv 2310.05914; docs/science.md §6).

    Default (``padded=False``): the paper's experiment code (neelsjain/NEFTune
    ``experiment_code/train.py``). Each sequence b uses its unpadded length
    ``len_b = attention_mask[b].sum()``, ``mag_b = alpha / sqrt(len_b·d)``, and pads (mask 0) get
    exactly zero noise; the noise norm per sequence is then about ``alpha/sqrt(3)`` whatever the
    padding. Without ``attention_mask`` every position is a real token (len_b = T).

    ``padded=True``: the README / transformers ``neftune_post_forward_hook`` variant,
    ``mag = alpha / sqrt(T·d)`` with the padded length T and noise on every position (the
    attention mask is ignored).

    Noise is drawn in float32 from ``generator`` (on its device) and added in the embeddings' dtype.
    """
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be [B, T, d], got shape {tuple(embeddings.shape)}")
    batch, seq_len, dim = embeddings.shape
    noise_device = generator.device if generator is not None else embeddings.device
    eps = torch.rand(batch, seq_len, dim, generator=generator, device=noise_device, dtype=torch.float32)
    eps = (eps * 2.0 - 1.0).to(embeddings.device)  # Uniform(-1, 1), [B, T, d]

    if padded or attention_mask is None:
        noise = eps * (alpha / math.sqrt(seq_len * dim))
    else:
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must be [B, T] = {(batch, seq_len)} of the embeddings"
            )
        real = attention_mask.to(device=embeddings.device, dtype=torch.float32)  # [B, T]
        lengths = real.sum(dim=1).clamp(min=1.0)  # [B]
        mag = alpha / torch.sqrt(lengths * dim)  # [B]
        noise = eps * mag[:, None, None] * real[:, :, None]
    return embeddings + noise.to(embeddings.dtype)


def attach_neftune(
    model: nn.Module,
    alpha: float,
    *,
    pad_id: int | None = None,
    padded: bool = False,
    generator: torch.Generator | None = None,
) -> RemovableHandle:
    """Register NEFTune on ``model.tok_embeddings``; returns the handle (``handle.remove()`` detaches it).

    The hook adds ``neftune_noise`` to the embedding output only while ``model.training`` is True,
    so evaluation and generation see bit-identical embeddings. With ``pad_id`` the unpadded
    variant treats tokens equal to ``pad_id`` as pads (zero noise, not counted in len_b);
    without it every position counts as a real token. ``padded=True`` selects the
    transformers variant (see ``neftune_noise``).
    """
    embedding = getattr(model, "tok_embeddings", None)
    if not isinstance(embedding, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `tok_embeddings` module to attach NEFTune to")
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not model.training:
            return None
        mask = None
        if pad_id is not None and not padded:
            mask = args[0] != pad_id  # [B, T]
        return neftune_noise(output, alpha=alpha, attention_mask=mask, generator=generator, padded=padded)

    return embedding.register_forward_hook(hook)
