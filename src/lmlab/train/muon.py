"""Muon and NorMuon for the hidden matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") replaces a
hidden weight matrix's momentum by its nearest semi-orthogonal matrix, found with five steps of a
quintic Newton–Schulz iteration, so every direction of the update gets a similar magnitude. Embeddings,
the output head, norm gains and biases keep AdamW (docs/science.md §22). Per hidden matrix W (A×B):

    M ← μ·M + (1 − μ)·G                 U = (1 − μ)·G + μ·M  (Nesterov)  or  U = M
    O = NS₅(U)                          W ← W·(1 − η·λ) − η_adj·O

with η_adj from the LR convention: ``original`` (Jordan): η·√max(1, A/B); ``match_rms_adamw``
(Liu et al. 2025, "Muon is Scalable for LLM Training"): 0.2·η·√max(A, B), which gives the update
AdamW's RMS so AdamW's learning rate and weight decay carry over. Weight decay uses the unadjusted η.

NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable") then normalises each
output row of O by a running root-mean-square (β₂ EMA of the row's mean square, no bias correction)
and rescales the whole update back to ‖O‖_F before the LR adjustment.

Data parallelism: under DDP every rank holds the whole averaged gradient, so the update is computed
as on one process. Under FSDP2 a parameter and its momentum are sharded by rows (DTensors); the
orthogonalisation needs the whole matrix, so each rank gathers the momentum-updated matrix, runs
Newton–Schulz on it, and keeps its own rows of the result ("gather per matrix"): every rank repeats
the same small computation, and the result is the one-process update exactly. Matrices of equal shape
(a block's q/k/v/o, every gate and up projection) are orthogonalised together as one batched stack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# The quintic's coefficients: φ(σ) = aσ + bσ³ + cσ⁵ pushes every singular value in (0, 1] towards
# [0.7, 1.2] in five steps (Jordan et al. 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
AdjustLR = Literal["original", "match_rms_adamw"]
# Newton–Schulz stacks equal-shaped matrices up to this many numbers (64 MiB in float32, before the iteration's
# temporaries): few enough to bound what FSDP2 gathers at once, enough to batch every block matrix of a small model.
NS_STACK_ELEMENTS = 1 << 24


def newton_schulz(
    update: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise a matrix ``update`` [A, B], or a stack of them [K, A, B] each on its own:
    ``U·V^T`` of its SVD, singular values ≈ 0.7–1.2.

    Runs in ``dtype`` (bfloat16 as Muon's authors do on GPUs; float32 where bfloat16 matrix products are
    emulated, as on most CPUs), on the wide orientation (the Gram matrix X·X^T is min(A, B) square), after
    scaling every matrix to unit Frobenius norm so each singular value starts in (0, 1]. A stack runs as
    batched products: one kernel per product for all K matrices (``MuonWithAdamW`` stacks the block matrices
    of equal shape; for small matrices one batched product costs less than K separate ones).
    """
    if update.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix [A, B] or a stack [K, A, B], got shape {tuple(update.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm, addmm = (torch.mm, torch.addmm) if x.ndim == 2 else (torch.bmm, torch.baddbmm)
    for _ in range(steps):
        gram = mm(x, x.mT)  # [..., m, m], m = min(A, B)
        poly = addmm(gram, gram, gram, beta=b, alpha=c)  # b·S + c·S²
        x = addmm(x, poly, x, beta=a)  # a·X + (b·S + c·S²)·X
    return x.mT if tall else x


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], convention: AdjustLR) -> float:
    """The learning rate applied to the orthogonalised update of a matrix of ``shape`` (out, in)."""
    rows, cols = shape[0], shape[1]
    if convention == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if convention == "match_rms_adamw":
        return 0.2 * lr * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown Muon LR convention {convention!r}: use 'original' or 'match_rms_adamw'")


def normuon_normalise(ortho: torch.Tensor, row_ms: torch.Tensor, beta2: float, eps: float = 1e-10) -> torch.Tensor:
    """NorMuon's row normalisation of ``ortho`` [A, B]; updates the running row mean squares ``row_ms`` [A] in place."""
    o = ortho.float()
    row_ms.mul_(beta2).add_(o.square().mean(dim=1), alpha=1.0 - beta2)
    normalised = o / (row_ms.sqrt()[:, None] + eps)
    return normalised * (o.norm() / normalised.norm().clamp(min=eps))


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules: groups with ``use_muon`` get Muon (or NorMuon), the rest AdamW.

    One state dict, one set of ``param_groups`` for the LR schedule (a group's ``lr_scale`` multiplies
    the scheduled LR, so Muon can run at its own peak), and the sharded-checkpoint path of
    ``torch.distributed.checkpoint`` sees an ordinary optimizer.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: AdjustLR = "match_rms_adamw",
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = dict(
            lr=lr, lr_scale=1.0, weight_decay=0.0, use_muon=False, betas=tuple(betas), eps=eps,
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr, normuon=normuon,
            normuon_beta2=normuon_beta2, ns_dtype=ns_dtype,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        """Momentum for every matrix, then Newton–Schulz on stacks of equal-shaped matrices (one batched product
        per iteration instead of one per matrix; a stack holds at most ``NS_STACK_ELEMENTS`` numbers, so under
        FSDP2 only that much is gathered at once), then the (Nor)Muon update."""
        mu = group["momentum"]
        by_shape: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
                if group["normuon"]:
                    state["row_mean_square"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1.0 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            by_shape.setdefault((tuple(p.shape), p.dtype), []).append((p, update))
        for same_shape in by_shape.values():
            per_stack = max(1, NS_STACK_ELEMENTS // same_shape[0][0].numel())
            for start in range(0, len(same_shape), per_stack):
                stack = same_shape[start : start + per_stack]
                # FSDP2: gather each whole matrix (every rank then computes the same orthogonalisation)
                wholes = [u.full_tensor() if isinstance(u, DTensor) else u for _, u in stack]
                batch = torch.stack(wholes) if len(wholes) > 1 else wholes[0][None]  # a lone matrix: a view, no copy
                orthos = newton_schulz(batch, group["ns_steps"], dtype=group["ns_dtype"])
                for (p, _), ortho in zip(stack, orthos.unbind(0)):
                    self._apply_muon(p, ortho, group)

    def _apply_muon(self, p: torch.Tensor, ortho: torch.Tensor, group: dict[str, Any]) -> None:
        """Weight decay, then ``p -= η_adj · O`` (NorMuon-normalised first when enabled)."""
        lr, wd = group["lr"], group["weight_decay"]
        if group["normuon"]:
            ortho = normuon_normalise(ortho, self.state[p]["row_mean_square"], group["normuon_beta2"])
        ortho = ortho.to(p.dtype)
        if isinstance(p, DTensor):  # keep this rank's rows; every rank computed the same matrix
            ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(ortho, alpha=-adjusted_lr(lr, p.shape, group["adjust_lr"]))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        """AdamW (Loshchilov & Hutter 2019) with bias correction, as ``torch.optim.AdamW``."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            if wd:
                p.mul_(1.0 - lr * wd)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
