"""RMSNorm (Zhang & Sennrich 2019), the normalisation of every Llama-style block.

``y = x / sqrt(mean(x²) + eps) · weight``, computed in fp32 and cast back to the input
dtype before the gain is applied (the order Hugging Face Llama uses, so imported weights
give the same numbers in bf16 too).

Under autograd with a float32 gain (training) the backward pass is written out (``_RMSNormFunction``): it
saves ``x`` and the [..., 1] inverse RMS instead of autograd's ``x`` and normalised copy, and runs about half
the element-wise kernels. For a float32 input (the residual stream, also under autocast) the forward is the
same arithmetic, bit for bit; a bf16/fp16 input (qk-norm under autocast reads the projections' output) is
normalised in float32 and the gain applied before the one rounding, instead of Hugging Face's rounding of
the normalised value and then of the product (at most one unit in the last place apart).

``out_dtype`` writes the output in a lower precision directly: a block under autocast passes the autocast
dtype, so the projections that read the norm's output find it already cast (once, instead of once per
projection, each of which would also save its own copy for backward)."""

from __future__ import annotations

import torch
from torch import nn


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device, or None outside autocast."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm of ``x`` [..., d] with a float32 gain [d], computed in float32; output in ``out_dtype`` (None:
    float32, the dtype promotion of ``x`` and the gain), gradient of ``x`` in ``x``'s dtype.

    Backward, with n = x·r, r = 1/sqrt(mean(x²) + eps), g = ∂y·w:
    ∂w = Σ_rows ∂y·n and ∂x = r·(g − n·mean(g·n)), where mean(g·n) = (∂y·n)·w / d (one matrix-vector product).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None):  # noqa: ANN205
        x_fp32 = x.float()  # x itself when it is float32
        rstd = torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, rstd, weight)
        normed = x_fp32 * rstd
        if out_dtype is None or out_dtype == normed.dtype:
            return weight * normed
        out = torch.empty(normed.shape, dtype=out_dtype, device=normed.device)
        return torch.mul(weight, normed, out=out)  # computed in float32, rounded once on writing

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        x, rstd, weight = ctx.saved_tensors
        d = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            normed = x.float() * rstd  # recomputed: one kernel instead of holding the normalised copy until backward
            grad_out = grad_out.float()
            scaled = grad_out * normed  # float32 [..., d]
            grad_weight = scaled.reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                neg_mean = (scaled.reshape(-1, d) @ weight).reshape(rstd.shape).div_(-d)  # −mean(g·n) [..., 1]
                grad_x = torch.addcmul(grad_out * weight, normed, neg_mean).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None, None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension with a learned gain (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` [..., d] -> normalised [..., d], in ``out_dtype`` when given (else the usual promotion)."""
        if (
            x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and self.weight.dtype == torch.float32
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
        ):
            return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return out if out_dtype is None else out.to(out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
