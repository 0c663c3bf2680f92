"""The unlearning methods: one typed option section per method, each turning scored answers into the loss.

A method is a row of ``UNLEARNING_METHODS`` (``unlearn.method.kind``), never a branch in the recipe. Its
dataclass holds its options (so the options of another method are an unknown key), says which answers a batch
must carry (``parts``: the forget answers, the paired retain answers, refusal answers to the forget questions)
and whether they are scored by the frozen reference too, and computes the ``LossOutput`` from ``Scored``
tensors. The forward passes are the recipe's (``lmlab.recipes.unlearn``); everything here is tensors in,
tensors out. Formulas and defaults: docs/science.md §7 and §14.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.contrast import LogitDifference
from lmlab.objectives.base import LossOutput
from lmlab.objectives.unlearning import (
    FLAT_DIVERGENCES,
    flat_loss,
    gradient_ascent_loss,
    idk_dpo_loss,
    mean_token_probability,
    npo_loss,
    retain_kl,
    rmu_direction,
    rmu_loss,
    simnpo_loss,
    uniform_kl,
    unlearning_objective,
)

Part = Literal["forget", "retain", "idk"]
RetainLoss = Literal["none", "nll", "kl"]


@dataclass
class Scored:
    """One part of a batch (N answers) under one model: summed answer log-probs and lengths [N], per-token
    log-probs and the answer mask [N, T], and, when the method asks, logits [N, T, V] and the hidden state of
    its layer [N, T, d] (aligned with the mask)."""

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def nll(self) -> torch.Tensor:
        """Per-example mean-token NLL [N]."""
        return -self.logps / self.lengths.clamp_min(1)


Terms = dict[str, Scored]  # part -> scored answers


def _retain_term(kind: RetainLoss, policy: Terms, reference: Terms | None) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "nll":
        return policy["retain"].nll
    ours, theirs = policy["retain"], reference["retain"]  # the recipe scores retain under the reference for kl
    return retain_kl(ours.logits, theirs.logits, ours.mask)


def _coeffs(key: str, forget: float, retain: float) -> None:
    for name, value in (("forget_coeff", forget), ("retain_coeff", retain)):
        if not value >= 0:
            raise ConfigError(f"{key}.{name}={value} must be >= 0")


class _Method:
    """What the recipe asks every method: the parts it scores, under the policy and under the reference, whether
    it needs logits, the block whose output it reads, and which parameters train."""

    parts: ClassVar[tuple[Part, ...]] = ()
    ref_parts: ClassVar[tuple[Part, ...]] = ()
    needs_logits: ClassVar[bool] = False
    forget_answers: ClassVar[tuple[str, ...]] = ("answer",)  # the item fields a forget row is made of
    retain_with_perturbed: ClassVar[bool] = False  # the forget questions' wrong answers join the retain rows
    needs_adapters: ClassVar[bool] = False  # trains adapters on the starting model (adapter.kind)

    def hidden_block(self, n_layers: int) -> int | None:
        return None

    def trainable(self, name: str, n_layers: int) -> bool:
        return True

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The unlearned model as it is evaluated (itself, but for ULD's logit difference)."""
        return model


class _WithRetain(_Method):
    """Shared by the methods with a retain term: which parts it needs and what the reference must score."""

    retain: RetainLoss
    forget_coeff: float
    retain_coeff: float

    own_parts: ClassVar[tuple[Part, ...]] = ("forget",)  # what the forget term scores
    own_ref_parts: ClassVar[tuple[Part, ...]] = ()  # ... and needs from the reference

    @property
    def parts(self) -> tuple[Part, ...]:
        return (*self.own_parts, *(("retain",) if self.retain != "none" else ()))

    @property
    def ref_parts(self) -> tuple[Part, ...]:
        return (*self.own_ref_parts, *(("retain",) if self.retain == "kl" else ()))

    @property
    def needs_logits(self) -> bool:
        return self.retain == "kl"

    def _out(self, forget: torch.Tensor, policy: Terms, reference: Terms | None, **metrics) -> LossOutput:
        retain = _retain_term(self.retain, policy, reference)
        return unlearning_objective(
            forget, retain, forget_coeff=self.forget_coeff, retain_coeff=self.retain_coeff, metrics=metrics
        )

    def validate(self, key: str) -> None:
        _coeffs(key, self.forget_coeff, self.retain_coeff)
        beta = getattr(self, "beta", None)
        if beta is not None and not beta > 0:
            raise ConfigError(f"{key}.beta={beta} must be > 0")


@dataclass
class GradientAscentConfig(_Method):
    """Gradient ascent on the forget answers' mean-token NLL (no retain term)."""

    kind: Literal["ga"] = "ga"
    forget_coeff: float = 1.0
    parts: ClassVar[tuple[Part, ...]] = ("forget",)

    def validate(self, key: str) -> None:
        _coeffs(key, self.forget_coeff, 0.0)

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f = policy["forget"]
        return unlearning_objective(gradient_ascent_loss(f.logps, f.lengths), forget_coeff=self.forget_coeff)


@dataclass
class GradDiffConfig(_WithRetain):
    """Gradient difference: gradient ascent on forget plus a retain NLL (default) or KL to the reference."""

    kind: Literal["grad_diff"] = "grad_diff"
    retain: Literal["nll", "kl"] = "nll"
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f = policy["forget"]
        return self._out(gradient_ascent_loss(f.logps, f.lengths), policy, reference)


@dataclass
class NPOConfig(_WithRetain):
    """NPO (β = 0.1), with a retain NLL (NPO+RT, default, as open-unlearning), a KL (NPO+KL) or none."""

    kind: Literal["npo"] = "npo"
    beta: float = 0.1
    retain: RetainLoss = "nll"
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0

    own_ref_parts: ClassVar[tuple[Part, ...]] = ("forget",)

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        forget = npo_loss(policy["forget"].logps, reference["forget"].logps, beta=self.beta)
        return self._out(forget, policy, reference)


@dataclass
class SimNPOConfig(_WithRetain):
    """SimNPO, reference-free and length-normalised; defaults of open-unlearning's SimNPO config (β = 4.5,
    δ = 0, forget weight 0.125, retain NLL weight 1)."""

    kind: Literal["simnpo"] = "simnpo"
    beta: float = 4.5
    delta: float = 0.0  # the authors' code δ; the paper's margin γ = β·δ
    retain: RetainLoss = "nll"
    forget_coeff: float = 0.125
    retain_coeff: float = 1.0

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f = policy["forget"]
        return self._out(simnpo_loss(f.logps, f.lengths, beta=self.beta, delta=self.delta), policy, reference)


@dataclass
class IdkDPOConfig(_WithRetain):
    """IdkDPO: DPO preferring a refusal to the forget answer, plus a retain NLL (open-unlearning's settings:
    β = 0.1, the NPO-style 2/β scale); ``scale: dpo`` is the original TOFU loss."""

    kind: Literal["idk_dpo"] = "idk_dpo"
    beta: float = 0.1
    scale: Literal["npo", "dpo"] = "npo"
    retain: RetainLoss = "nll"
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0

    own_parts: ClassVar[tuple[Part, ...]] = ("forget", "idk")
    own_ref_parts: ClassVar[tuple[Part, ...]] = ("forget", "idk")

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        forget = idk_dpo_loss(
            policy["idk"].logps, policy["forget"].logps, reference["idk"].logps, reference["forget"].logps,
            beta=self.beta, scale=self.scale,
        )  # fmt: skip
        return self._out(forget, policy, reference)


@dataclass
class IdkNLLConfig(_WithRetain):
    """IdkNLL: learn refusals to the forget questions (mean-token NLL) plus a retain NLL."""

    kind: Literal["idk_nll"] = "idk_nll"
    retain: RetainLoss = "nll"
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0

    own_parts: ClassVar[tuple[Part, ...]] = ("idk",)

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        return self._out(policy["idk"].nll, policy, reference)


@dataclass
class FLATConfig(_Method):
    """FLAT: the forget answers against refusal templates only (no retain data, no reference); TV by default."""

    kind: Literal["flat"] = "flat"
    divergence: Literal["tv", "kl", "js", "pearson"] = "tv"
    parts: ClassVar[tuple[Part, ...]] = ("forget", "idk")

    def validate(self, key: str) -> None:
        if self.divergence not in FLAT_DIVERGENCES:
            raise ConfigError(f"{key}.divergence={self.divergence!r}; choose from {', '.join(FLAT_DIVERGENCES)}")

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f, e = policy["forget"], policy["idk"]
        p_f = mean_token_probability(f.token_logps, f.mask)
        p_e = mean_token_probability(e.token_logps, e.mask)
        forget = flat_loss(p_e, p_f, divergence=self.divergence).reshape(1)
        return unlearning_objective(forget, metrics={"p_forget": p_f.detach(), "p_idk": p_e.detach()})


@dataclass
class RMUConfig(_Method):
    """RMU: push the forget tokens' hidden state at ``layer`` towards ``steering_coeff``·u (a fixed random unit
    vector), keep the retain tokens' at the frozen model's; by default only the MLP down-projections of layers
    ``layer−2..layer`` train, as in the WMDP paper (open-unlearning's TOFU config trains all: ``train: all``)."""

    kind: Literal["rmu"] = "rmu"
    layer: int | None = None  # the decoder block whose output is steered; None: the middle block
    steering_coeff: float = 6.5
    retain_coeff: float = 1.0
    train: Literal["mlp_down", "all"] = "mlp_down"
    direction_seed: int = 0
    parts: ClassVar[tuple[Part, ...]] = ("forget", "retain")
    ref_parts: ClassVar[tuple[Part, ...]] = ("retain",)

    def hidden_block(self, n_layers: int) -> int:
        return n_layers // 2 if self.layer is None else self.layer

    def trainable(self, name: str, n_layers: int) -> bool:
        """``train: mlp_down``: the MLP down-projections of blocks ``layer−2..layer`` (``layers.i.mlp.down_proj``)."""
        if self.train == "all":
            return True
        block = self.hidden_block(n_layers)
        return any(name.startswith(f"layers.{i}.mlp.down_proj.") for i in range(max(0, block - 2), block + 1))

    def validate(self, key: str) -> None:
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"{key}.layer={self.layer} must be >= 0")
        if not self.steering_coeff > 0:
            raise ConfigError(f"{key}.steering_coeff={self.steering_coeff} must be > 0")
        _coeffs(key, 1.0, self.retain_coeff)

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f, r, r0 = policy["forget"], policy["retain"], reference["retain"]
        u = rmu_direction(f.hidden.shape[-1], self.direction_seed).to(f.hidden.device)
        forget = rmu_loss(f.hidden, f.mask, self.steering_coeff * u)
        retain = rmu_loss(r.hidden, r.mask, u, frozen_hidden=r0.hidden)
        return unlearning_objective(forget, retain, retain_coeff=self.retain_coeff)


@dataclass
class ULDConfig(_Method):
    """ULD: train an assistant to *remember* the forget set (NLL on the forget answers and their paraphrases) and
    to be uniform on retain answers and on the forget questions' wrong answers (KL(U ‖ p), weight 5); the
    unlearned model is ``target − α·assistant`` on the target's plausible tokens (``lmlab.models.contrast``).
    lmlab's assistant is the starting model with LoRA adapters (``adapter.kind: lora``; the paper: rank 16, α 32,
    dropout 0.05) on all its blocks, where the paper's uses its first 8 blocks."""

    kind: Literal["uld"] = "uld"
    alpha: float = 0.8  # the assistant's weight in the logit difference (authors' TOFU evaluation)
    rho: float = 1e-2  # the relative-top threshold of the target's plausible tokens
    uniform_coeff: float = 5.0
    parts: ClassVar[tuple[Part, ...]] = ("forget", "retain")
    needs_logits: ClassVar[bool] = True
    forget_answers: ClassVar[tuple[str, ...]] = ("answer", "paraphrased_answer")
    retain_with_perturbed: ClassVar[bool] = True
    needs_adapters: ClassVar[bool] = True

    def validate(self, key: str) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"{key}.alpha={self.alpha} must be > 0")
        if not 0 < self.rho < 1:
            raise ConfigError(f"{key}.rho={self.rho} must be in (0, 1)")
        _coeffs(key, 1.0, self.uniform_coeff)

    def loss(self, policy: Terms, reference: Terms | None) -> LossOutput:
        f, r = policy["forget"], policy["retain"]
        return unlearning_objective(f.nll, uniform_kl(r.logits, r.mask), retain_coeff=self.uniform_coeff)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return LogitDifference(model, alpha=self.alpha, rho=self.rho)


UnlearningMethod = (
    GradientAscentConfig
    | GradDiffConfig
    | NPOConfig
    | SimNPOConfig
    | IdkDPOConfig
    | IdkNLLConfig
    | FLATConfig
    | RMUConfig
    | ULDConfig
)
UNLEARNING_METHODS: dict[str, type] = {
    "npo": NPOConfig,
    "ga": GradientAscentConfig,
    "grad_diff": GradDiffConfig,
    "simnpo": SimNPOConfig,
    "idk_dpo": IdkDPOConfig,
    "idk_nll": IdkNLLConfig,
    "flat": FLATConfig,
    "rmu": RMUConfig,
    "uld": ULDConfig,
}
