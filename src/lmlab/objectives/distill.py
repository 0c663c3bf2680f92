"""Knowledge-distillation losses on student and teacher next-token distributions.

Token-level divergences between the teacher's and the student's softened distributions (Hinton,
Vinyals, Dean 2015, arXiv 1503.02531), mixed with the student's cross-entropy on the labels:

    total = alpha·τ²·D(p_T^τ, p_S^τ) + (1 − alpha)·CE(student, labels)

with D one of forward KL ``KL(p_T‖p_S)``, reverse KL ``KL(p_S‖p_T)`` or the generalized
Jensen-Shannon divergence JSD(β) of GKD (Agarwal et al. 2024, arXiv 2306.13649, Eq. 1). A second
entry point takes the teacher's cached top-k log-probs instead of its full logits. The teacher
forward belongs to the trainer (under ``no_grad``); these functions are pure.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lmlab.objectives.base import LossOutput
from lmlab.objectives.lm import IGNORE_INDEX

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis, from log-probs; 0·log 0 = 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


def token_divergence(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between two normalised distributions given as log-probs [..., V].

    - ``"forward_kl"``: KL(p_T‖p_S) (mass-covering; the Hinton et al. 2015 distillation loss).
    - ``"reverse_kl"``: KL(p_S‖p_T) (mode-seeking).
    - ``"jsd"``: the generalized JSD of GKD (Agarwal et al. 2024, Eq. 1), with the GKD/TRL
      convention ``M = β·p_T + (1 − β)·p_S`` and
      ``JSD(β) = β·KL(p_T‖M) + (1 − β)·KL(p_S‖M)``, 0 < β < 1. β = 0.5 is the symmetric
      Jensen-Shannon divergence. Limits: JSD(β)/β → KL(p_T‖p_S) as β → 0 and
      JSD(β)/(1 − β) → KL(p_S‖p_T) as β → 1 (JSD(β) itself tends to 0 at both ends; TRL's GKD
      trainer special-cases β = 0 and β = 1 as forward and reverse KL, use those kinds here).
    """
    if divergence == "forward_kl":
        return _kl(teacher_logprobs, student_logprobs)
    if divergence == "reverse_kl":
        return _kl(student_logprobs, teacher_logprobs)
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD beta must be in (0, 1), got {beta}; use forward_kl / reverse_kl for the limits")
        mixture = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))
        return beta * _kl(teacher_logprobs, mixture) + (1.0 - beta) * _kl(student_logprobs, mixture)
    raise ValueError(f"unknown divergence {divergence!r}; choose 'forward_kl', 'reverse_kl' or 'jsd'")


def _valid_positions(labels: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None) -> torch.Tensor:
    valid = labels != ignore_index  # [B, T]
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the shape of labels {tuple(labels.shape)}")
        valid = valid & loss_mask.to(torch.bool)
    return valid


def _mix(
    kd_per_token: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> LossOutput:
    """alpha·τ²·KD + (1 − alpha)·CE summed over the (already selected) valid tokens."""
    kd_sum = (temperature**2) * kd_per_token.sum()
    if alpha < 1.0:
        ce_sum = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    else:
        ce_sum = torch.zeros((), dtype=kd_sum.dtype, device=kd_sum.device)
    loss_sum = alpha * kd_sum + (1.0 - alpha) * ce_sum
    count = torch.tensor(labels.numel(), device=labels.device)
    return LossOutput(loss_sum=loss_sum, count=count, metrics={"kd": kd_sum.detach(), "ce": ce_sum.detach()})


def _check_mix_args(temperature: float, alpha: float) -> None:
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """Distillation loss of ``student_logits`` against ``teacher_logits`` (both [B, T, V]) and ``labels`` [B, T].

    Per counted token (``labels != ignore_index`` and ``loss_mask``):

        alpha·τ²·D(softmax(z_T/τ), softmax(z_S/τ)) + (1 − alpha)·CE(softmax(z_S), label)

    D is ``token_divergence(divergence, beta)``; the τ² factor keeps the gradient scale of the
    soft targets independent of τ (Hinton et al. 2015, §2). The cross-entropy uses the student at
    temperature 1. Metrics (sums over counted tokens): ``kd`` (τ²·D) and ``ce``;
    ``loss_sum = alpha·kd + (1 − alpha)·ce``.
    """
    _check_mix_args(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    valid = _valid_positions(labels, ignore_index, loss_mask)
    student = student_logits[valid].float()  # [N, V]
    teacher = teacher_logits[valid].float()  # [N, V]
    kd = token_divergence(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        divergence=divergence,
        beta=beta,
    )
    return _mix(kd, student, labels[valid], temperature, alpha)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """``distillation_loss`` with the teacher given by cached top-k log-probs [B, T, K] and vocabulary indices [B, T, K].

    Both distributions are restricted to the teacher's top-k support S and renormalised there:
    ``q_T = softmax_S(teacher_topk_logprobs/τ)`` and ``q_S = softmax_S(z_S[S]/τ)``, and D is taken
    between ``q_T`` and ``q_S``. Renormalising both keeps every divergence (including reverse KL
    and JSD, which need the student's mass where the teacher is unknown) well defined and ≥ 0;
    the price is that the student's mass outside S is not penalised by the KD term. Since a
    per-position constant cancels in the renormalisation, the cached values may be the teacher's
    log-probs or its raw logits. With K = V this equals ``distillation_loss`` exactly.
    """
    _check_mix_args(temperature, alpha)
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"top-k values {tuple(teacher_topk_logprobs.shape)} and indices {tuple(teacher_topk_indices.shape)} differ"
        )
    if teacher_topk_indices.shape[:-1] != labels.shape:
        raise ValueError(
            f"top-k [B, T] {tuple(teacher_topk_indices.shape[:-1])} must match labels {tuple(labels.shape)}"
        )
    valid = _valid_positions(labels, ignore_index, loss_mask)
    student = student_logits[valid].float()  # [N, V]
    indices = teacher_topk_indices[valid].long()  # [N, K]
    teacher_values = teacher_topk_logprobs[valid].float()  # [N, K]
    student_on_support = student.gather(-1, indices)  # [N, K]
    kd = token_divergence(
        F.log_softmax(student_on_support / temperature, dim=-1),
        F.log_softmax(teacher_values / temperature, dim=-1),
        divergence=divergence,
        beta=beta,
    )
    return _mix(kd, student, labels[valid], temperature, alpha)
