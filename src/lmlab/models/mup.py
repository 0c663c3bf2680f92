"""The maximal update parametrization (μP) of the decoder: its config section and the width-dependent factors.

μP (Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer",
arXiv 2203.03466; docs/science.md §25) scales the init, the Adam learning rate and a few forward multipliers with
the width multiplier m_d = d_model / d_base, so that every activation and every update stays of the same size as
the model widens, and the hyperparameters tuned at width d_base transfer to wider models:

- hidden matrices (q, k, v, o, gate, up, down): init variance σ²/m_d (residual writes σ²/(2L·m_d)), Adam LR η/m_d;
- token embedding: init σ², LR η, output × α_in; output head (untied or tied): init σ², LR η, logits × α_out/m_d;
- norm gains and biases: LR η;
- attention logits q·k/d_head instead of q·k/√d_head.

The init and attention scale are applied by the components (``lmlab.models.component``, ``attention``), the
multipliers by the decoder and the learning rates by ``lmlab.train.optim``. Under the standard parametrization
every factor here is the identity (None or 1), so standard models compute exactly what they did before.

This module imports nothing from lmlab but the errors, so component modules can depend on it without a cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class MuPConfig:
    """``model.mup``: read only with ``model.parametrization: mup``.

    ``base_width`` is d_base, the width whose tuned hyperparameters (LR, init std, multipliers) transfer: at
    d_model = base_width a μP model has the standard init and learning rates. ``input_mult`` (α_in) multiplies
    the token embeddings, ``output_mult`` (α_out) the logits (together with 1/m_d); both are tunable at d_base.
    ``scale_eps`` divides Adam's ε by m_d on the hidden matrices, whose per-entry gradients shrink as 1/m_d under
    μP, so that ε keeps the same weight against them at every width (off by default, as in Tensor Programs V).
    """

    base_width: int | None = None
    input_mult: float = 1.0
    output_mult: float = 1.0
    scale_eps: bool = False

    def validate(self, model: ModelConfig, key: str) -> None:
        if self.base_width is None or self.base_width <= 0:
            raise ConfigError(
                f"{key}.base_width={self.base_width}: model.parametrization=mup needs the base width d_base "
                "(> 0), the width whose tuned learning rate transfers (e.g. the smallest model of a sweep)"
            )
        for name in ("input_mult", "output_mult"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key}.{name}={value} must be > 0")
        unsupported = [
            (model.ffn.kind == "moe", "model.ffn.kind=moe (the router and experts have no μP rule here)"),
            (model.recurrence.enabled, "model.recurrence (the recurrence adapter has no μP rule here)"),
            (model.abacus.enabled, "model.abacus (the digit-place embeddings have no μP rule here)"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ConfigError(f"model.parametrization=mup supports dense SwiGLU decoders only, not {what}")

    def width_mult(self, d_model: int) -> float:
        """m_d = d_model / d_base."""
        return d_model / self.base_width


def is_mup(model: ModelConfig) -> bool:
    return model.parametrization == "mup"


def mup_width_mult(model: ModelConfig) -> float | None:
    """m_d for the optimizer's per-layer learning rates under μP; None under the standard parametrization."""
    return model.width_mult if is_mup(model) else None


def attention_scale(model: ModelConfig) -> float | None:
    """The attention-logit scale: 1/d_head under μP, None (SDPA's 1/√d_head) under the standard parametrization.

    With d_head fixed and width grown by adding heads this is a constant factor 1/√d_head; it matters when d_head
    grows, where q·k of correlated q and k grows like d_head (TP5)."""
    return 1.0 / model.head_dim if is_mup(model) else None


def input_mult(model: ModelConfig) -> float | None:
    """α_in on the token embeddings under μP; None under the standard parametrization (no multiply)."""
    return model.mup.input_mult if is_mup(model) else None


def logit_mult(model: ModelConfig) -> float | None:
    """α_out/m_d on the logits under μP (the readout's 1/width); None under the standard parametrization."""
    return model.mup.output_mult / model.width_mult if is_mup(model) else None


def fold_multipliers(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A μP model's weights (lmlab names) with its multipliers folded in, for a format without them (Hugging
    Face Llama): the same logits from a standard-parametrised model. Standard models come back unchanged.

    - α_in into the token embedding;
    - α_out/m_d into the output head, written as its own ``lm_head.weight`` (a tied model comes back untied,
      since the embedding carries α_in and the head α_out/m_d);
    - 1/d_head vs the format's 1/√d_head into q by 1/√d_head: into q_proj (and its bias), or into the qk-norm
      gain when q is normalised after the projection (RoPE is linear, so scaling q before it is the same).
    """
    if not is_mup(model):
        return state
    out = dict(state)
    embedding = state["tok_embeddings.weight"]
    head = state.get("lm_head.weight", embedding)
    out["lm_head.weight"] = head * logit_mult(model)
    out["tok_embeddings.weight"] = embedding * input_mult(model)
    q_factor = model.head_dim**-0.5
    qk_norm = getattr(model.attention, "qk_norm", False)
    q_parts = ("attn.q_norm.weight",) if qk_norm else ("attn.q_proj.weight", "attn.q_proj.bias")
    for name, tensor in state.items():
        if name.startswith("layers.") and name.endswith(q_parts):
            out[name] = tensor * q_factor
    return out


def exports_untied(model: ModelConfig) -> bool:
    """Whether the exported model has its own output head although ``model`` ties it (μP: see ``fold_multipliers``)."""
    return is_mup(model) and model.tie_embeddings
