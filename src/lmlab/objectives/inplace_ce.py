"""Token cross-entropy whose gradient is written over the logits it was given: one [N, V] buffer instead of three.

Autograd's cross-entropy on logits x [N, V] keeps x, allocates log-softmax(x) in the forward, and in the backward a
zero-filled gradient of the NLL and then the gradient of the log-softmax: three [N, V] float32 buffers, each a fresh
allocation. On a CPU a buffer above glibc's mmap threshold (at most 32 MB) is mapped anew every time and its pages
are faulted in one by one (2048 tokens × an 8k vocabulary is 64 MB: ~16k page faults per buffer per step). Yet the
gradient, ∂ℓ/∂x = p·(1 + 2c·log Z) − (1 − ε)·onehot(y) − ε/V (``fused_linear_ce``'s formula, with the same label
smoothing ε and z-loss c), needs nothing but x and log Z. When the logits are a temporary that only the loss reads
(the ``standard`` head of ``lm_objective.token_loss_head``) the forward can compute the loss sums and then the
gradient in place, row block by row block, and the backward only scales it.

Same loss and gradient as ``causal_lm_loss`` up to float rounding; under autocast the logits are bf16, the softmax
is computed in float32 per row block and the gradient rounded once to bf16, as autograd's cast would. The caller
hands the logits over: after the forward (with autograd on) they hold the gradient, and the graph supports one
backward pass.
"""

from __future__ import annotations

import torch

from lmlab.objectives.base import LossOutput
from lmlab.objectives.fused_linear_ce import chunk_sums_and_grad
from lmlab.objectives.lm import IGNORE_INDEX, causal_lm_loss, check_loss_options, counted_tokens, token_loss_output

# Rows per block: on a CPU at most 2**22 float32 numbers (16 MB, under glibc's mmap threshold) for the block's
# float32 copy (bf16 logits) and logsumexp's temporaries; on a GPU 2**26 (256 MB), so a step launches few kernels.
BLOCK_NUMBERS = 1 << 22
GPU_BLOCK_NUMBERS = 1 << 26


class _InPlaceCrossEntropy(torch.autograd.Function):
    """[ce, smoothed, z] sums of ``logits`` [N, V]; the gradient of ``smoothed + z`` replaces the logits in forward."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        valid: torch.Tensor,
        label_smoothing: float,
        z_loss: float,
    ):
        with_grad = ctx.needs_input_grad[0]
        budget = BLOCK_NUMBERS if logits.device.type == "cpu" else GPU_BLOCK_NUMBERS
        rows = max(1, budget // logits.size(1))
        sums = torch.zeros(3, dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, logits.size(0), rows):
                block = logits[start : start + rows]
                block_fp32 = block.float()  # a view of the logits when they are float32
                part, grad = chunk_sums_and_grad(
                    block_fp32, targets[start : start + rows], valid[start : start + rows], label_smoothing, z_loss,
                    with_grad,
                )  # fmt: skip
                sums = sums + part
                if grad is not None and grad.data_ptr() != block.data_ptr():
                    block.copy_(grad)  # bf16 logits: the float32 gradient rounded once
        ctx.grad_buffer = logits if with_grad else None
        ctx.mark_non_differentiable(sums)
        return sums[1] + sums[2], sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sums: torch.Tensor):  # noqa: ANN205
        grad = ctx.grad_buffer
        if grad is None:
            raise RuntimeError(
                "this cross-entropy wrote its gradient over the logits and supports one backward pass "
                "(retain_graph is not supported); use objective.loss_impl=chunked or fused to backpropagate twice"
            )
        ctx.grad_buffer = None
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None


def inplace_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """``causal_lm_loss`` for ``logits`` [B, T, V] that nothing else reads: under autograd their buffer becomes the
    gradient (see the module doc). Returns the same ``LossOutput`` (sums ``ce``, ``smoothed``, ``z_loss``).

    float16 logits take ``causal_lm_loss``: an fp16 gradient computed before the loss scaler multiplies it would
    flush the small softmax entries to zero."""
    check_loss_options(label_smoothing, z_loss)
    if logits.dtype == torch.float16:
        options = {"label_smoothing": label_smoothing, "z_loss": z_loss, "loss_mask": loss_mask}
        return causal_lm_loss(logits, labels, ignore_index=ignore_index, **options)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    flat_logits = logits.reshape(-1, logits.size(-1))  # [N, V]: a view of contiguous logits
    flat_labels = labels.reshape(-1)
    valid = counted_tokens(labels, ignore_index, loss_mask)
    loss_sum, sums = _InPlaceCrossEntropy.apply(flat_logits, flat_labels, valid, float(label_smoothing), float(z_loss))
    return token_loss_output(loss_sum, sums, valid, label_smoothing, z_loss)
