"""A perturbation δ of the residual stream after one decoder block, and the projected gradient descent that finds
the δ eliciting a behaviour (targeted latent adversarial training, Sheshadri et al. 2024, arXiv 2407.15549;
docs/science.md §29.4).

``perturbed(model, layer, delta, mask)`` adds δ [B, T, d] to the output of ``model.layers[layer]`` at the
positions where ``mask`` [B, T] is True (the prompt), for every forward inside the ``with``. The ball is per
token: each position's ‖δ_t‖₂ ≤ ε, so the budget does not grow with the prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def check_layer(model, layer: int) -> None:
    """A block index must name one of the model's blocks (negative counts from the end)."""
    n = len(model.layers)
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range for a model with {n} blocks (0..{n - 1})")


@contextmanager
def perturbed(model, layer: int, delta: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Inside the ``with``, block ``layer``'s output gets ``delta * mask`` added ([B, T, d] and [B, T])."""
    check_layer(model, layer)

    def add(module, args, out):
        return out + delta * mask[..., None].to(delta.dtype)

    handle = model.layers[layer].register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def project_per_token(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """δ [..., d] with every vector of norm above ε scaled back onto the ε-sphere."""
    norms = delta.norm(dim=-1, keepdim=True)
    return delta * torch.clamp(epsilon / norms.clamp_min(1e-12), max=1.0)


def completion_loss(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens where ``loss_mask`` [B, T] is True, each predicted from the position
    before it (``ids`` [B, T], ``logits`` [B, T, V])."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # [B, T-1]
    m = loss_mask[:, 1:].to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def pgd_delta(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    delta: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
) -> torch.Tensor:
    """Minimise ``loss_fn(delta)`` (the loss with ``delta`` in place, e.g. inside ``perturbed``) over the per-token
    ε-ball by ``steps`` normalised-gradient steps of length ``step_size`` each followed by the projection; returns
    δ detached. ``delta`` is the start (zeros, or a random point of the ball)."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    delta = project_per_token(delta.detach(), epsilon)
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(delta), delta)
        with torch.no_grad():
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project_per_token(delta - step_size * step, epsilon)
    return delta.detach()
