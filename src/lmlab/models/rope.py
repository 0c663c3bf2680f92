"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864).

Pairs of channels of q and k are rotated by an angle ``position · theta^(-2i/d)``, so the
dot product <q_m, k_n> depends on positions only through m − n. We use the *rotate-half*
layout of Hugging Face Llama: channel i is paired with channel i + d/2 (not 2i with
2i+1), so HF checkpoints load without permuting the q/k projection rows.

``RopeScalingConfig(kind="llama3")`` is the frequency scaling Llama 3.1 and 3.2 ship with (Meta's
"Llama 3 herd of models", Dubey et al. 2024, arXiv 2407.21783; ``rope_type: llama3`` in Hugging Face
configs): with L the original context, a frequency whose wavelength 2π/f is shorter than
L/high_freq_factor is kept, one longer than L/low_freq_factor is divided by ``factor``, and those in
between are interpolated, s = (L/wavelength − low)/(high − low), f' = (1 − s)·f/factor + s·f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for long contexts: ``none``, or Llama 3.1's ``llama3`` (module docstring)."""

    kind: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # the context the model was pretrained with before scaling

    def validate(self, model: ModelConfig, key: str) -> None:
        if self.kind == "none":
            return
        if not self.factor >= 1.0:
            raise ConfigError(f"{key}.factor={self.factor} must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                f"{key}.low_freq_factor={self.low_freq_factor} must be > 0 and below "
                f"{key}.high_freq_factor={self.high_freq_factor}"
            )
        if self.original_max_seq_len <= 0:
            raise ConfigError(f"{key}.original_max_seq_len={self.original_max_seq_len} must be > 0")

    def scale(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The scaled frequencies (fp32 [D/2]); unchanged for ``kind: none``."""
        if self.kind == "none":
            return inv_freq
        wavelength = 2 * math.pi / inv_freq
        context = float(self.original_max_seq_len)
        smooth = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        low = wavelength > context / self.low_freq_factor  # long wavelengths: slowed down by the factor
        high = wavelength < context / self.high_freq_factor  # short ones: kept
        return torch.where(low, inv_freq / self.factor, torch.where(high, inv_freq, interpolated))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension split in two halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the angles whose cos/sin are given as [B, T, D]."""
    cos = cos.unsqueeze(1).to(x.dtype)  # [B, 1, T, D], broadcast over heads
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, looked up by ``position_ids``.

    The table is built lazily (on first use, on the device of the positions) up to
    ``max_seq_len`` and rebuilt longer when a position beyond it is requested, so the
    module holds no state that checkpoints or meta-device initialisation must handle.
    Angles are computed in fp32. Disabled (``enabled=False``: NoPE, ``model.position: none``), it returns the
    identity rotation (cos 1, sin 0), so q and k carry no position and every attention path stays the same.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float = 10000.0,
        enabled: bool = True,
        scaling: RopeScalingConfig | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.enabled = enabled
        self.scaling = scaling or RopeScalingConfig()
        self._cos: torch.Tensor | None = None  # [L, D] fp32
        self._sin: torch.Tensor | None = None

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """theta^(-2i/d) for i = 0 .. d/2 − 1, fp32 [D/2], after the configured scaling."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return self.scaling.scale(1.0 / (self.theta**exponents))

    def _build(self, length: int, device: torch.device) -> None:
        positions = torch.arange(length, dtype=torch.int64, device=device).float()  # [L]
        freqs = torch.outer(positions, self.inv_freq(device))  # [L, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [L, D]: rotate-half layout
        self._cos, self._sin = angles.cos(), angles.sin()

    def forward(self, position_ids: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [B, T] (int) -> (cos, sin), each fp32 [B, T, D].

        ``max_position`` is an upper bound on the positions when the caller knows one; it
        avoids reading the largest position back from the device (a sync on GPU).
        """
        if not self.enabled:
            cos = torch.ones((*position_ids.shape, self.head_dim), device=position_ids.device)
            return cos, torch.zeros_like(cos)
        if max_position is None:
            max_position = int(position_ids.max().item()) if position_ids.numel() else 0
        needed = max_position + 1
        cache = self._cos
        if cache is None or cache.device != position_ids.device or cache.shape[0] < needed:
            self._build(max(needed, self.max_seq_len, 0 if cache is None else cache.shape[0]), position_ids.device)
        return self._cos[position_ids], self._sin[position_ids]

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"head_dim={self.head_dim}, enabled=False (NoPE)"
        scaled = "" if self.scaling.kind == "none" else f", scaling={self.scaling.kind}"
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}{scaled}"
