"""Fused linear cross-entropy: the output projection and the token loss in one pass, without the [N, V] logits.

For a large vocabulary the logits are the biggest tensor of a step: N·V numbers for N = B·T tokens (8·2048
tokens × 128k words is 2·10⁹), held once in the compute dtype, again in float32 for the softmax and once more
as their gradient. Wijmans et al. 2024 (*Cut Your Losses in Large-Vocabulary Language Models*, arXiv
2411.09009) observe that the cross-entropy needs only log Z and the target logit of each token, and its
gradient only the softmax, so the logits never need to exist all at once (their kernel recomputes blocks of
logits in the backward pass). This module is the plain-PyTorch, chunked form of that idea that computes the
gradient early instead: the N tokens are processed ``chunk_size`` at a time, and for every chunk the *forward*
pass computes the logits, the loss sums and the chunk's gradients with respect to the hidden states and the
head weight. ``backward`` then only scales the stored gradients by the upstream gradient. The three head
matmuls per chunk (logits, ∂h, ∂W) are those of any forward and backward; none is redone (activation
checkpointing of the head, ``chunked_causal_lm_loss``, recomputes the logits), and only one chunk's logits,
float32 softmax and gradient exist at a time: O(chunk·V) memory instead of O(N·V), plus the [N, d] hidden
gradient and a float32 [V, d] weight gradient held from forward to backward.

Per counted token, with logits x ∈ R^V (computed in the input dtype: bf16 under autocast), p = softmax(x)
and log Z = logsumexp(x) in float32, target y, label smoothing ε and z-loss coefficient c, the loss is that of
``lmlab.objectives.lm._token_loss_sums``:

    ℓ = (1 − ε)·(log Z − x_y) + ε·(log Z − mean_v x_v) + c·(log Z)²

and, since ∂log Z/∂x = p,

    ∂ℓ/∂x = p·(1 + 2c·log Z) − (1 − ε)·onehot(y) − ε/V

(zero for tokens that do not count). With x = h·Wᵀ: ∂ℓ/∂h = (∂ℓ/∂x)·W and ∂ℓ/∂W = (∂ℓ/∂x)ᵀ·h, the latter
summed over chunks in float32. A tied head (W = the embedding matrix) needs nothing special: autograd adds
this gradient to the embedding lookup's.
"""

from __future__ import annotations

import torch

from lmlab.objectives.base import LossOutput
from lmlab.objectives.lm import IGNORE_INDEX, check_loss_options, counted_tokens, token_loss_output


def chunk_sums_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[ce, smoothed, z] sums of one chunk's float32 ``logits`` [n, V] and, if ``with_grad``, ∂(smoothed + z)/∂logits.

    The gradient is written over ``logits`` in place (its buffer is the chunk's only [n, V] float32 tensor).
    """
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    log_z = torch.logsumexp(logits, dim=-1)  # [n]
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))  # [n]; ignored rows read column 0
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # [n]
    ce = torch.where(valid, log_z - target_logit, zero).sum()
    if label_smoothing > 0.0:
        uniform_ce = torch.where(valid, log_z - logits.mean(dim=-1), zero).sum()
        smoothed = (1.0 - label_smoothing) * ce + label_smoothing * uniform_ce
    else:
        smoothed = ce
    z_term = z_loss * torch.where(valid, log_z.square(), zero).sum() if z_loss > 0.0 else zero
    sums = torch.stack([ce, smoothed, z_term])
    if not with_grad:
        return sums, None
    counted = valid.to(logits.dtype)  # [n]: 1 for counted tokens, 0 otherwise
    grad = logits.sub_(log_z[:, None]).exp_()  # softmax p, in place
    scale = counted * (1.0 + 2.0 * z_loss * log_z) if z_loss > 0.0 else counted  # [n]
    grad.mul_(scale[:, None])
    grad.scatter_add_(1, safe_targets[:, None], (-(1.0 - label_smoothing) * counted)[:, None])
    if label_smoothing > 0.0:
        grad.sub_((label_smoothing / logits.size(-1)) * counted[:, None])
    return sums, grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss sums of ``hidden @ weight.T`` over chunks; the gradients are computed in ``forward`` (see module doc)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, d]
        weight: torch.Tensor,  # [V, d]
        labels: torch.Tensor,  # [N]
        valid: torch.Tensor,  # [N] bool
        chunk_size: int,
        label_smoothing: float,
        z_loss: float,
        compute_dtype: torch.dtype,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens = hidden.size(0)
        # float16 would flush the small softmax entries of an unscaled gradient to zero (the loss scaler only
        # scales what reaches backward), so its gradient matmuls run in float32; bf16 has float32's range.
        grad_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            w = weight.to(compute_dtype)  # [V, d]
            w_grad = w if grad_dtype == compute_dtype else weight.to(grad_dtype)  # [V, d]
            sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None  # [N, d]
            grad_weight = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_needed else None
            )  # [V, d]
            with_grad = grad_hidden_needed or grad_weight_needed
            for start in range(0, n_tokens, chunk_size):
                end = min(start + chunk_size, n_tokens)
                h = hidden[start:end].to(compute_dtype)  # [n, d]
                logits = (h @ w.t()).float()  # [n, V] float32: the chunk's only copy
                part, grad = chunk_sums_and_grad(
                    logits, labels[start:end], valid[start:end], label_smoothing, z_loss, with_grad
                )
                sums = sums + part
                if grad is None:
                    continue
                grad = grad.to(grad_dtype)  # [n, V] (the same tensor in float32)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad @ w_grad).to(hidden.dtype)
                if grad_weight is not None:
                    if grad_dtype == torch.float32:
                        grad_weight.addmm_(grad.t(), h.to(grad_dtype))
                    else:  # bf16 matmul (as autocast's backward would), float32 accumulation
                        grad_weight.add_(grad.t() @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        loss_sum = sums[1] + sums[2]  # smoothed + z
        ctx.mark_non_differentiable(sums)
        return loss_sum, sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sums: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        d_hidden = d_weight = None
        if ctx.needs_input_grad[0] and grad_hidden is not None:
            d_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1] and grad_weight is not None:
            d_weight = (grad_weight * grad_loss.float()).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """``causal_lm_loss(F.linear(hidden, weight), labels, ...)`` with the gradient computed chunk by chunk in the forward.

    ``hidden`` [..., d] are the final-normed hidden states, ``weight`` [V, d] the output projection (the
    ``lm_head`` weight, or the tied embedding matrix) and ``labels`` [...] the targets (already shifted);
    ``loss_mask`` (bool, labels' shape) turns tokens off as in ``causal_lm_loss``. The flattened tokens are
    processed ``chunk_size`` at a time. Under autocast the logits are computed in the autocast dtype (bf16),
    like the unfused ``F.linear``; log Z, the softmax and the sums are float32, the weight gradient is
    accumulated in float32.

    Returns the ``LossOutput`` of ``causal_lm_loss``: ``loss_sum`` (= ``smoothed + z_loss``), ``count`` and the
    sums ``ce``, ``smoothed`` (ε > 0), ``z_loss`` (c > 0). Only ``loss_sum`` carries a gradient, and only a
    first-order one. Without autograd (``no_grad``, or inputs that need no gradient) no gradient is computed.
    """
    check_loss_options(label_smoothing, z_loss)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the token shape")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, d] with d = {hidden.size(-1)} (hidden's last dim)")
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # [N, d]
    flat_labels = labels.reshape(-1)  # [N]
    valid = counted_tokens(labels, ignore_index, loss_mask)  # [N]

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    loss_sum, sums = _FusedLinearCrossEntropy.apply(
        flat_hidden,
        weight,
        flat_labels,
        valid,
        chunk_size,
        float(label_smoothing),
        float(z_loss),
        compute_dtype,
        grad_on and flat_hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    return token_loss_output(loss_sum, sums, valid, label_smoothing, z_loss)
