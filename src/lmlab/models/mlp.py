"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202).

``down(silu(gate(x)) · up(x))``: three bias-free projections. With a hidden width of
8/3·d the block has the parameter count of a 4·d GELU MLP (3·d·f = 8·d²); we round the
width up to a multiple of ``ffn_multiple_of`` (as Llama does) for efficient matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """``cfg.ffn_hidden`` if set, else 8/3·d_model rounded up to ``cfg.ffn_multiple_of``."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    multiple = max(1, cfg.ffn_multiple_of)
    return multiple * math.ceil(8 * cfg.d_model / 3 / multiple)


class SwiGLU(nn.Module):
    """Gated feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
