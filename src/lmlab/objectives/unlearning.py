"""Unlearning losses (docs/science.md §7, §14): pure functions of per-example log-probs, token probabilities,
hidden states or logits of forget, retain and refusal ("I don't know") answers.

Conventions shared by every function here:

- ``logps`` are log-probs of an answer **summed** over its tokens, ``lengths`` its token counts, both [N];
- a loss returned per example is averaged over examples by the recipe (so k micro-batches give the gradient of
  one batch). Open-unlearning's NLL is instead one token-weighted mean over the whole batch, which weighs long
  answers more; the two agree when answers have equal lengths.

The forward passes (policy, frozen reference, hidden states) belong to the recipe (``lmlab.recipes.unlearn``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lmlab.objectives.base import LossOutput

# --------------------------------------------------------------------------- forget terms


def gradient_ascent_loss(policy_logps: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient ascent on the forget answer per example: its negated NLL, ``log πθ(y|x)`` (minimised), divided
    by the answer length when ``lengths`` is given (the per-example mean-token form lmlab's recipe uses).

    Unbounded below, hence the collapse that NPO avoids (Zhang et al. 2024, arXiv 2404.05868, §2).
    """
    return policy_logps if lengths is None else policy_logps / lengths.clamp_min(1)


def npo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimization per forget example (Zhang, Lin, Bai, Mei 2024, arXiv 2404.05868):

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


def simnpo_loss(
    policy_logps: torch.Tensor, lengths: torch.Tensor, *, beta: float = 2.5, delta: float = 0.0
) -> torch.Tensor:
    """SimNPO per forget example (Fan et al. 2024, arXiv 2410.07163), reference-free and length-normalised.

    The authors' code form, which lmlab implements: ``x = NLL_sum/|y| − δ``, ``L = −(2/β)·log σ(β·x)``.
    The paper writes ``−(2/β)·log σ(−(β/|y|)·log πθ(y|x) − γ)``; the two agree with ``γ = β·δ``, so lmlab's
    ``delta`` is the code's δ, not the paper's γ. Their TOFU settings: β = 2.5 (forget05), 4.5 (forget10), δ = 0.
    """
    if beta <= 0:
        raise ValueError(f"SimNPO beta must be > 0, got {beta}")
    x = -policy_logps / lengths.clamp_min(1) - delta
    return -(2.0 / beta) * F.logsigmoid(beta * x)


def idk_dpo_loss(
    policy_idk: torch.Tensor,
    policy_forget: torch.Tensor,
    ref_idk: torch.Tensor,
    ref_forget: torch.Tensor,
    *,
    beta: float = 0.1,
    scale: Literal["npo", "dpo"] = "npo",
) -> torch.Tensor:
    """DPO with a refusal ("I don't know") as the chosen answer and the true forget answer as the rejected one
    (Maini et al. 2024, TOFU §5; Zhang et al. 2024 as IdkDPO). Margin ``m = (s_idk − s_forget)`` of summed
    log-ratios to the frozen reference.

    ``scale="npo"``: ``−(2/β)·log σ(β·m)``, open-unlearning's ``compute_dpo_loss`` (the NPO-style 2/β);
    ``scale="dpo"``: ``−log σ(β·m)``, the original TOFU ``dpo`` loss. At m = 0 and β = 0.1: 13.8629 vs 0.6931.
    """
    if beta <= 0:
        raise ValueError(f"IdkDPO beta must be > 0, got {beta}")
    margin = (policy_idk - ref_idk) - (policy_forget - ref_forget)
    loss = -F.logsigmoid(beta * margin)
    return loss * (2.0 / beta) if scale == "npo" else loss


def rmu_loss(
    hidden: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, frozen_hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """Representation misdirection per example (Li et al. 2024, WMDP, arXiv 2403.03218):
    ``mean_t ‖h_t − target_t‖² / d`` over the example's masked tokens, ``hidden`` [N, T, d], ``mask`` [N, T].

    On forget data ``target = c·u`` (a fixed random unit vector scaled by the steering coefficient c); on retain
    data ``target`` is the frozen model's hidden state (pass it as ``frozen_hidden``). Dividing by d follows the
    code's ``mse_loss``; the paper writes the squared norm. With h = 0, d = 4, c = 6.5: c²/d = 10.5625.
    """
    goal = frozen_hidden if frozen_hidden is not None else target.expand_as(hidden)
    per_token = (hidden.float() - goal.float()).pow(2).mean(-1)  # [N, T]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp_min(1)


def rmu_direction(d_model: int, seed: int) -> torch.Tensor:
    """RMU's random unit vector ``u = r/‖r‖``, ``r ~ U[0, 1)^d`` drawn once (uniform, as in the authors' code;
    not a Gaussian), from its own generator so the direction depends only on ``seed``."""
    r = torch.rand(d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return r / r.norm()


# FLAT's divergences: (g, f*∘g), the variational form −g(P̄_e) + f*(g(P̄_f)) (Wang et al. 2025, Table 1).
FLAT_DIVERGENCES = {
    "tv": (lambda p: 0.5 * torch.tanh(p), lambda p: 0.5 * torch.tanh(p)),
    "kl": (lambda p: p, lambda p: torch.exp(p - 1.0)),
    "js": (
        lambda p: math.log(2.0) - F.softplus(-p),
        lambda p: p + F.softplus(-p) - math.log(2.0),
    ),
    "pearson": (lambda p: p, lambda p: p * p / 4.0 + p),
}


def flat_loss(
    idk_prob: torch.Tensor, forget_prob: torch.Tensor, *, divergence: Literal["tv", "kl", "js", "pearson"] = "tv"
) -> torch.Tensor:
    """FLAT, forget-data-only unlearning by loss adjustment (Wang et al., ICLR 2025, arXiv 2410.11143):
    minimise ``−g(P̄_e) + f*(g(P̄_f))``, the negated variational f-divergence between the template ("I don't
    know") answers' and the forget answers' mean per-token probabilities ``P̄_e`` and ``P̄_f`` (probabilities,
    not log-probs). Its gradients are ``−g′(P̄_e)·∇P̄_e + (f*∘g)′(P̄_f)·∇P̄_f``: the derivatives are the paper's
    importance weights. No retain data, no reference model. TV (the authors' default), KL, JS, Pearson.
    With P̄_e = 0.2, P̄_f = 0.7: TV 0.203496, KL 0.540818, JS 0.315031, Pearson 0.6225.
    """
    if divergence not in FLAT_DIVERGENCES:
        raise ValueError(f"unknown FLAT divergence {divergence!r}; choose from {', '.join(FLAT_DIVERGENCES)}")
    g, conjugate = FLAT_DIVERGENCES[divergence]
    return -g(idk_prob) + conjugate(forget_prob)


def mean_token_probability(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FLAT's P̄: the mean of ``exp(log p)`` over the masked (answer) tokens of the whole batch. FLAT's code
    counts padding positions as zeros in the mean, which makes P̄ depend on the padded length; lmlab averages
    over answer tokens only."""
    m = mask.to(token_logps.dtype)
    return (token_logps.exp() * m).sum() / m.sum().clamp_min(1)


# --------------------------------------------------------------------------- retain terms


def retain_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(πref ‖ πθ) per example, averaged over its masked positions (GradDiff / NPO with a KL retain term;
    Maini et al. 2024). Open-unlearning averages over all positions, prompt and padding included; lmlab over
    the positions in ``mask`` (the answer tokens' predicting positions)."""
    log_p = F.log_softmax(policy_logits.float(), -1)
    log_q = F.log_softmax(ref_logits.float(), -1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # [N, T]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp_min(1)


# --------------------------------------------------------------------------- ULD


def uniform_kl(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ p) per example, averaged over its masked positions: ``−log V − mean_v log p_v``. ULD trains its
    assistant to be uniform on retain data with it (Ji et al. 2024, arXiv 2406.08607, weight 5.0); the
    unlearned logits are ``lmlab.models.contrast.uld_logits``."""
    log_p = F.log_softmax(logits.float(), -1)
    per_token = -math.log(logits.shape[-1]) - log_p.mean(-1)  # [N, T]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp_min(1)


# --------------------------------------------------------------------------- the loop's output


def unlearning_objective(
    forget: torch.Tensor,
    retain: torch.Tensor | None = None,
    *,
    forget_coeff: float = 1.0,
    retain_coeff: float = 1.0,
    metrics: dict[str, torch.Tensor] | None = None,
) -> LossOutput:
    """The loop's ``LossOutput`` for N examples: per-example forget losses [N] and, optionally, the paired
    retain losses [N] (one retain example per forget example, as in TOFU).

    ``loss_sum = γ·Σ forget + α·Σ retain`` and ``count = N``, so the mean is ``γ·mean(forget) + α·mean(retain)``
    (open-unlearning's γ and α; the official NPO code's ``npo_coeff`` and ``grad_diff_coeff``). A batch-level
    forget term (FLAT) is passed as a [1] tensor and counts as one batch. Logged: ``forget``, ``retain``.
    """
    forget_sum = forget.sum()
    loss_sum = forget_coeff * forget_sum
    out = {"forget": forget_sum.detach(), **(metrics or {})}
    if retain is not None:
        if retain.shape != forget.shape:
            raise ValueError(f"retain losses {tuple(retain.shape)} must pair one-to-one with {tuple(forget.shape)}")
        retain_sum = retain.sum()
        loss_sum = loss_sum + retain_coeff * retain_sum
        out["retain"] = retain_sum.detach()
    count = torch.tensor(float(forget.numel()), device=forget.device)
    return LossOutput(loss_sum=loss_sum, count=count, metrics=out)
