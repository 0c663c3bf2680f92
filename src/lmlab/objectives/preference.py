"""Pairwise preference-optimisation losses: DPO, IPO, SimPO, LN-DPO, ORPO (docs/science.md §7).

Every loss is a pure function of per-example *summed* completion log-probs (policy, and reference
where the method uses one) and completion token counts where the method normalises by length.
Each returns a ``PreferenceLoss`` of per-example losses and the implied chosen/rejected rewards
(the quantities TRL logs as ``rewards/chosen`` and ``rewards/rejected``); ``preference_objective``
turns one into the loop's ``LossOutput``. Log-probs come from the trainer (reference under
``no_grad``, computed once). ``PREFERENCE_METHODS`` registers each loss with one signature and says
whether it needs a reference model; a new method is a function plus a row there (and its name in
``AlignConfig.loss``).

Notation (docs/science.md §7): ``s(y) = log πθ(y|x) − log πref(y|x)`` summed over completion tokens,
``|y|`` the number of completion tokens, σ the logistic function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmlab.config import AlignConfig
from lmlab.objectives.base import LossOutput


@dataclass
class PreferenceLoss:
    """Per-example losses [N] and implied rewards [N] (detached); ``metrics`` are extra per-example terms."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _lengths(lengths: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Completion lengths as a float tensor, clamped to >= 1 as in TRL (an empty completion divides by 1)."""
    return torch.as_tensor(lengths, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1 − ε)·log σ(x) − ε·log σ(−x)``: the logistic loss with conservative label smoothing ε."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7; docs/science.md §7):

        loss = −log σ(β·(s(y_w) − s(y_l)))

    With ``label_smoothing`` ε > 0, conservative DPO (cDPO; Mitchell 2023, "A note on DPO with
    noisy preferences"): ``−(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``, the labels flipped with
    probability ε (the form TRL's CPO trainer uses; TRL 1.16's DPO ``"sigmoid"`` has no smoothing).
    Rewards are ``β·s(y_w)`` and ``β·s(y_l)``. TRL ``loss_type="sigmoid"``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = _sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return PreferenceLoss(losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach())


def _length_normalised_margin(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """``s(y_w)/|y_w| − s(y_l)/|y_l|``: the per-token log-ratio margin IPO (TRL form) and LN-DPO share."""
    return chosen_logratios / _lengths(chosen_lengths, chosen_logratios) - rejected_logratios / _lengths(
        rejected_lengths, rejected_logratios
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; docs/science.md §7), in TRL's length-averaged form:

        h = s(y_w)/|y_w| − s(y_l)/|y_l|,    loss = (h − 1/(2τ))²,    τ = ``beta``

    The paper writes h with sequence log-ratios; TRL (``loss_type="ipo"``) divides each log-ratio
    by its completion length first, which the IPO authors confirmed is what their results use. The
    target margin is 1/(2τ) = 5 at the default τ = 0.1. Rewards are the unnormalised
    ``β·s(y_w)``, ``β·s(y_l)`` (as TRL logs them).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = _length_normalised_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach())


def ln_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """Length-normalised DPO (Ahrabian et al., arXiv 2407.15229; docs/science.md §7):

        loss = −log σ(β·(s(y_w)/|y_w| − s(y_l)/|y_l|))

    TRL ``loss_type="sigmoid_norm"``; also "DPO w/ LN" in SimPO App. I. Normalised ratios are
    small, so useful β are much larger than DPO's (the recommended value is *unverified*,
    docs/science.md §11). Rewards are the unnormalised ``β·s(y_w)``, ``β·s(y_l)`` (as TRL logs them).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = _length_normalised_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * delta)
    return PreferenceLoss(losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734, the SimPO objective; docs/science.md §7), reference-free:

        loss = −log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ)

    Defaults are the official β = 2.0, γ = 0.5 (γ/β = 0.25). ``label_smoothing`` ε mixes in the
    flipped label as in TRL's CPO trainer (``loss_type="simpo"``, which computes
    ``β·((avg_w − avg_l) − γ/β)``, the same number). Rewards are ``β·avg log-prob`` (as TRL logs them).
    """
    avg_chosen = policy_chosen_logps / _lengths(chosen_lengths, policy_chosen_logps)
    avg_rejected = policy_rejected_logps / _lengths(rejected_lengths, policy_rejected_logps)
    losses = _sigmoid_loss(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)
    return PreferenceLoss(losses, (beta * avg_chosen).detach(), (beta * avg_rejected).detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLoss:
    """ORPO (Hong, Lee, Thorne 2024, arXiv 2403.07691, Eqs. 4 and 7; docs/science.md §7), reference-free:

        P(y|x) = exp(log πθ(y|x)/|y|)                      (length-normalised likelihood)
        log odds(y|x) = log P − log(1 − P)
        L_OR = −log σ(log odds(y_w|x) − log odds(y_l|x))
        loss = L_SFT + λ·L_OR

    Takes summed completion log-probs and lengths (it averages them itself). ``L_SFT`` is the
    chosen answer's per-token NLL, ``−log πθ(y_w|x)/|y_w|``, unless ``chosen_nll`` [N] is given (TRL's
    ORPO trainer uses one batch-mean NLL over the chosen prompt + answer tokens; pass that to match
    it). λ = ``lam`` (TRL's ORPOConfig ``beta``, default 0.1). Rewards are ``λ·avg log-prob``
    (as TRL logs them). Metrics: ``nll``, ``or_loss`` (L_OR) and ``log_odds`` per example.
    """
    avg_chosen = policy_chosen_logps / _lengths(chosen_lengths, policy_chosen_logps)
    avg_rejected = policy_rejected_logps / _lengths(rejected_lengths, policy_rejected_logps)
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    or_loss = -F.logsigmoid(log_odds)
    nll = -avg_chosen if chosen_nll is None else chosen_nll
    losses = nll + lam * or_loss
    metrics = {"nll": nll.detach(), "or_loss": or_loss.detach(), "log_odds": log_odds.detach()}
    return PreferenceLoss(losses, (lam * avg_chosen).detach(), (lam * avg_rejected).detach(), metrics)


def sft_term(
    chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    *,
    weight: float = 1.0,
) -> torch.Tensor:
    """Weighted NLL of the chosen answer per example, ``weight·(−log πθ(y_w|x))``, to add to a preference loss.

    With ``chosen_lengths`` it is the per-token NLL ``−log πθ(y_w|x)/|y_w|`` (the usual "SFT / RPO /
    CPO BC term" scale); without, the summed NLL of the completion.
    """
    nll = -chosen_logps
    if chosen_lengths is not None:
        nll = nll / _lengths(chosen_lengths, chosen_logps)
    return weight * nll


def preference_objective(result: PreferenceLoss) -> LossOutput:
    """The loop's ``LossOutput`` for a batch of pairs: sums over pairs, ``count`` = number of pairs.

    Metrics (sums over pairs, divided by ``count`` when logged): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward > rejected),
    plus the sums of ``result.metrics``.
    """
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    metrics = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
    }
    metrics.update({name: value.detach().sum() for name, value in result.metrics.items()})
    count = torch.tensor(result.losses.numel(), device=result.losses.device)
    return LossOutput(loss_sum=result.losses.sum(), count=count, metrics=metrics)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class PairLogps:
    """Per-pair summed completion log-probs [N] of the policy (and the reference, when a method uses one)
    and completion token counts [N]: everything a preference loss reads."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


@dataclass(frozen=True)
class PreferenceMethod:
    """A registered preference loss: one signature ``compute(logps, align_cfg)`` and whether it needs a
    frozen reference model (the trainer then provides ``ref_chosen`` / ``ref_rejected``)."""

    compute: Callable[[PairLogps, AlignConfig], PreferenceLoss]
    needs_reference: bool


def _dpo(x: PairLogps, a: AlignConfig) -> PreferenceLoss:
    return dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, beta=a.beta, label_smoothing=a.label_smoothing)


def _ipo(x: PairLogps, a: AlignConfig) -> PreferenceLoss:
    lengths = (x.chosen_lengths, x.rejected_lengths)
    return ipo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, *lengths, beta=a.beta)


def _ln_dpo(x: PairLogps, a: AlignConfig) -> PreferenceLoss:
    lengths = (x.chosen_lengths, x.rejected_lengths)
    return ln_dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, *lengths, beta=a.beta)


def _simpo(x: PairLogps, a: AlignConfig) -> PreferenceLoss:
    lengths = (x.chosen_lengths, x.rejected_lengths)
    return simpo_loss(x.chosen, x.rejected, *lengths, beta=a.beta, gamma=a.gamma, label_smoothing=a.label_smoothing)


def _orpo(x: PairLogps, a: AlignConfig) -> PreferenceLoss:
    return orpo_loss(x.chosen, x.rejected, x.chosen_lengths, x.rejected_lengths, lam=a.orpo_lambda)


PREFERENCE_METHODS: dict[str, PreferenceMethod] = {
    "dpo": PreferenceMethod(_dpo, needs_reference=True),
    "ipo": PreferenceMethod(_ipo, needs_reference=True),
    "ln_dpo": PreferenceMethod(_ln_dpo, needs_reference=True),
    "simpo": PreferenceMethod(_simpo, needs_reference=False),
    "orpo": PreferenceMethod(_orpo, needs_reference=False),
}


def preference_losses(a: AlignConfig, logps: PairLogps) -> PreferenceLoss:
    """The ``align.loss`` method's per-pair losses, plus the optional SFT term (``align.sft_weight``)."""
    out = PREFERENCE_METHODS[a.loss].compute(logps, a)
    if a.sft_weight > 0:
        sft = sft_term(logps.chosen, logps.chosen_lengths, weight=a.sft_weight)
        out.losses = out.losses + sft
        out.metrics = {**out.metrics, "sft": sft.detach()}
    return out
