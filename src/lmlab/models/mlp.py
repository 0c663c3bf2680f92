"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202).

``down(silu(gate(x)) · up(x))``: three bias-free projections. With a hidden width of
8/3·d the block has the parameter count of a 4·d GELU MLP (3·d·f = 8·d²); we round the
width up to a multiple of ``multiple_of`` (as Llama does) for efficient matmuls.

``SwiGLUConfig`` is the FFN slot's first variant (``model.ffn: {kind: swiglu, ...}``; the slot
contract is ``lmlab.models.component``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.component import ComponentCount, hidden_std, residual_std

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class SwiGLUConfig:
    """Gated feed-forward of width ``hidden`` (None: 8/3·d_model rounded up to ``multiple_of``)."""

    kind: Literal["swiglu"] = "swiglu"
    hidden: int | None = None
    multiple_of: int = 64

    def hidden_size(self, d_model: int) -> int:
        if self.hidden:
            return self.hidden
        multiple = max(1, self.multiple_of)
        return multiple * math.ceil(8 * d_model / 3 / multiple)

    def validate(self, model: ModelConfig, key: str) -> None:
        if self.hidden is not None and self.hidden <= 0:
            raise ConfigError(f"{key}.hidden={self.hidden} must be > 0 (or null for 8/3·d_model)")
        if self.multiple_of <= 0:
            raise ConfigError(f"{key}.multiple_of={self.multiple_of} must be > 0")

    def build(self, model: ModelConfig, layer: int) -> SwiGLU:
        return SwiGLU(
            model.d_model, self.hidden_size(model.d_model), init_std=hidden_std(model), out_std=residual_std(model)
        )

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        matmul = 3 * model.d_model * self.hidden_size(model.d_model)  # gate, up, down
        return ComponentCount(matmul, matmul)


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """The SwiGLU width of ``cfg`` (``cfg.ffn`` must be a SwiGLU FFN)."""
    return cfg.ffn.hidden_size(cfg.d_model)


class SwiGLU(nn.Module):
    """Gated feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d_model: int, hidden: int, *, init_std: float = 0.02, out_std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.init_std = init_std
        self.out_std = out_std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for gate and up, normal(0, out_std) for down (a residual-stream write)."""
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=self.init_std)
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=self.init_std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
