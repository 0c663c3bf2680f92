"""Weight attribution for unlearning (WAGLE; Jia et al. 2024, arXiv 2410.17509): which weights an unlearning
method may update.

WAGLE scores each weight by its influence on unlearning under a bi-level view (forget while retaining) and its
closed form with a diagonal Hessian ``μ·I``: ``S_i = |(θ_i − [∇ℓ_r]_i/μ)·[∇ℓ_f]_i|``, with ``∇ℓ_f`` the forget
loss's gradient and ``∇ℓ_r`` the retain loss's at the starting weights (the authors' code, μ = 1e-6). The
``keep`` fraction of weights with the highest scores (over the whole model) form the mask; the others' gradients
are zeroed, so any unlearning method becomes a sparse one. The authors' TOFU masks keep 95% of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lmlab.errors import ConfigError


@dataclass
class WeightMaskConfig:
    """``unlearn.weight_mask``: ``kind: wagle`` restricts the updates to the highest-attribution weights."""

    kind: Literal["none", "wagle"] = "none"
    keep: float = 0.95  # fraction of the trainable weights that may change
    mu: float = 1e-6  # the diagonal-Hessian constant of the attribution score
    max_items: int = 0  # forget (and as many retain) items whose gradients score the weights; 0: all

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def validate(self, key: str = "unlearn.weight_mask") -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"{key}.keep={self.keep} must be in (0, 1]")
        if not self.mu > 0:
            raise ConfigError(f"{key}.mu={self.mu} must be > 0")
        if self.max_items < 0:
            raise ConfigError(f"{key}.max_items={self.max_items} must be >= 0 (0: all)")


def wagle_scores(weight: torch.Tensor, forget_grad: torch.Tensor, retain_grad: torch.Tensor, mu: float) -> torch.Tensor:
    """``|(θ − ∇ℓ_r/μ) ⊙ ∇ℓ_f|`` elementwise, in fp32."""
    return ((weight.float() - retain_grad.float() / mu) * forget_grad.float()).abs()


def top_fraction_masks(scores: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the ``keep`` fraction of all entries with the highest scores (one threshold over
    every tensor, as WAGLE ranks the whole model); at least one entry is kept."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    n_keep = max(1, int(keep * flat.numel()))
    if n_keep >= flat.numel():
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    order = torch.argsort(flat, descending=True, stable=True)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:n_keep]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks
