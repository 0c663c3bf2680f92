"""CorDA: context-oriented decomposition of a linear layer to initialise its LoRA adapter (Yang et al. 2024,
"CorDA: Context-Oriented Decomposition Adaptation of Large Language Models", arXiv 2406.05223).

For a weight W [out, in] and the covariance C = Σ x xᵀ [in, in] of the layer's inputs on a few batches of
context data, the SVD W C = U Σ Vᵀ gives W = U Σ (Vᵀ C⁻¹): components ordered by how strongly the context
activates them. The adapter starts as r of them, s·B₀A₀ = U_r Σ_r (Vᵀ C⁻¹)_r (split as √Σ on each side):

- ``corda_ipm`` (instruction-previewed): the r *largest*, from the fine-tuning task's own data — the adapter
  starts on the directions the task uses most;
- ``corda_kpm`` (knowledge-preserved): the r *smallest*, from data of the knowledge to keep (e.g. QA the model
  answers) — the directions that knowledge uses stay in the frozen part.

lmlab never rewrites the base weights: the layer computes W x − s·B₀A₀ x + s·B A x, with (A₀, B₀) kept as
buffers, so it starts equal to its base, the base stays byte-identical to ``init_from``, and "adapters off" is
exactly the base. C is the *mean* over context sequences of each sequence's Σ x xᵀ (its scale sets how the
start splits between B₀ and A₀: scaling C by k scales B₀ by √k and A₀ by 1/√k), damped by ``damping`` × its
mean diagonal before inversion (C is singular when the context has fewer distinct inputs than ``in``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmlab.models.lora import LoRALinear

DAMPING = 0.01  # × the mean diagonal of C, added before inversion


@torch.no_grad()
def input_covariances(model: nn.Module, run_batch, batches: Iterable) -> tuple[dict[str, torch.Tensor], int]:
    """Σ x xᵀ (float64, [in, in]) of the inputs of every ``LoRALinear`` of ``model`` over ``batches``, and how many
    forward passes it sums (C is the mean over passes); ``run_batch(model, batch)`` runs one forward pass."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    covs = {name: torch.zeros(m.base_layer.in_features, m.base_layer.in_features, dtype=torch.float64)
            for name, m in layers.items()}  # fmt: skip
    hooks = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64).cpu()
            covs[name] += x.T @ x

        return hook

    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    passes = 0
    try:
        for batch in batches:
            run_batch(model, batch)
            passes += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return covs, passes


def decompose(weight: torch.Tensor, cov: torch.Tensor, rank: int, mode: str, damping: float = DAMPING):
    """``(B₀ [out, r], A₀ [r, in])`` with B₀A₀ = U_r Σ_r (Vᵀ C⁻¹)_r: the r largest (``corda_ipm``) or smallest
    (``corda_kpm``) components of W C (float64)."""
    w = weight.detach().to(torch.float64).cpu()
    c = cov.to(torch.float64)
    c = c + damping * c.diagonal().mean().clamp(min=1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    vh_cinv = torch.linalg.solve(c, vh.T).T  # Vᵀ C⁻¹ (C is symmetric)
    pick = slice(0, rank) if mode == "corda_ipm" else slice(s.numel() - rank, s.numel())
    root = s[pick].sqrt()
    return u[:, pick] * root, root[:, None] * vh_cinv[pick]


@torch.no_grad()
def corda_init(model: nn.Module, covs: dict[str, torch.Tensor], mode: str, damping: float = DAMPING) -> None:
    """Set every adapter of ``model`` (and its frozen initial copy) from CorDA's decomposition (module docstring)."""
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        rank = layer.lora_A.weight.shape[0]
        b0, a0 = decompose(layer.base_layer.weight, covs[name], rank, mode, damping)
        root_s = layer.scaling**0.5  # s·B·A = B₀A₀ with B = B₀/√s, A = A₀/√s
        dtype = layer.lora_A.weight.dtype
        layer.lora_A.weight.copy_((a0 / root_s).to(dtype))
        layer.lora_B.weight.copy_((b0 / root_s).to(dtype))
        layer.set_initial()
