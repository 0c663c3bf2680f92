"""Unlearning losses: NPO and gradient ascent on a forget set, optionally with a retain NLL (docs/science.md §7).

Pure functions of per-example summed log-probs of forget examples under the policy (and, for NPO,
the frozen reference), plus per-example retain NLLs; the reference forward belongs to the trainer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lmlab.objectives.base import LossOutput


def npo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimization per forget example (Zhang, Lin, Bai, Mei 2024, arXiv 2404.05868; docs/science.md §7):

        L = −(2/β)·log σ(−β·s),   s = log πθ(y|x) − log πref(y|x)   (summed over the answer)
          = (2/β)·log(1 + (πθ/πref)^β)

    ``dL/ds = 2·σ(β·s)``: 1 at s = 0, as for gradient ascent, and vanishing once the forget answer
    has become unlikely (s → −∞), which is what keeps NPO from collapsing. As β → 0 the gradient
    tends to gradient ascent's. Default β = 0.1 (official TOFU config).
    """
    if beta <= 0:
        raise ValueError(f"NPO beta must be > 0, got {beta}")
    s = policy_logps - ref_logps
    return -(2.0 / beta) * F.logsigmoid(-beta * s)


def gradient_ascent_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set per example: the negated NLL, ``log πθ(y|x)`` (minimised).

    Minimising it maximises the forget answer's NLL; unbounded below, hence the usual collapse
    that NPO avoids (Zhang et al. 2024, §2).
    """
    return policy_logps


def unlearning_objective(
    policy_forget_logps: torch.Tensor,
    ref_forget_logps: torch.Tensor | None = None,
    *,
    method: Literal["npo", "gradient_ascent"] = "npo",
    beta: float = 0.1,
    retain_nll: torch.Tensor | None = None,
    forget_coeff: float = 1.0,
    retain_coeff: float = 1.0,
) -> LossOutput:
    """The loop's ``LossOutput`` for a batch of N forget examples, with an optional retain term.

    ``loss_sum = forget_coeff·Σ forget_loss + retain_coeff·Σ retain_nll``, ``count = N``, so the mean
    is ``forget_coeff·mean(forget) + retain_coeff·mean(retain)`` as in the official NPO code
    (``npo_coeff = grad_diff_coeff = 1.0``). ``method="npo"`` with ``retain_nll`` is NPO+RT and
    ``"gradient_ascent"`` with it is gradient difference. ``retain_nll`` [N] is the per-example
    NLL of the paired retain batch (one retain example per forget example, as in TOFU), in the
    same normalisation the caller wants for the retain term (e.g. the mean token NLL).
    Metrics (sums): ``forget`` and, with a retain term, ``retain``.
    """
    if method == "npo":
        if ref_forget_logps is None:
            raise ValueError("NPO needs the reference model's forget log-probs (ref_forget_logps)")
        forget = npo_loss(policy_forget_logps, ref_forget_logps, beta=beta)
    elif method == "gradient_ascent":
        forget = gradient_ascent_loss(policy_forget_logps)
    else:
        raise ValueError(f"unknown unlearning method {method!r}; choose 'npo' or 'gradient_ascent'")
    forget_sum = forget.sum()
    loss_sum = forget_coeff * forget_sum
    metrics = {"forget": forget_sum.detach()}
    if retain_nll is not None:
        if retain_nll.shape != forget.shape:
            raise ValueError(
                f"retain_nll {tuple(retain_nll.shape)} must pair one-to-one with the forget batch {tuple(forget.shape)}"
            )
        retain_sum = retain_nll.sum()
        loss_sum = loss_sum + retain_coeff * retain_sum
        metrics["retain"] = retain_sum.detach()
    count = torch.tensor(forget.numel(), device=forget.device)
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)
