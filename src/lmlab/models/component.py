"""The contract of a model component slot (attention, FFN): a typed config that builds, counts and checks
its module.

A slot's variants are small dataclasses, one per kind, registered in ``lmlab.config`` (``ATTENTION_KINDS``,
``FFN_KINDS``) and chosen in YAML by ``kind`` (``model.ffn: {kind: swiglu, hidden: 1024}``). Each variant
knows how to build its module for one layer, how many parameters and forward FLOPs per token that module has,
and which settings are impossible; the decoder, the counters and the checkpoint checks ask the variant
instead of knowing every kind. Modules built this way initialise their own weights (``init_weights``).

This module imports nothing from lmlab, so component modules can depend on it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from lmlab.config import ModelConfig


# Field metadata of settings that do not change what the weights mean (a loss weight, an init scale): a run
# continuing from a checkpoint may change them (``lmlab.config.model_config_diff`` skips them).
NOT_IN_WEIGHTS = {"weights": False}


@dataclass(frozen=True)
class ComponentCount:
    """One layer's share of a component: its parameters and its forward FLOPs per token.

    ``matmul_params`` are the weights every token multiplies (for a sparse component, only the active
    ones), costing 2 FLOPs each per token; ``context_flops`` are the FLOPs per token that grow with the
    context (attention scores and the weighted sum), already multiplied out for the given context length.
    """

    params: int
    matmul_params: int
    context_flops: int = 0
    active_params: int | None = None  # parameters a token uses (None: all of them; a mixture of experts: fewer)

    @property
    def forward_flops(self) -> int:
        return 2 * self.matmul_params + self.context_flops

    @property
    def active(self) -> int:
        return self.params if self.active_params is None else self.active_params


@runtime_checkable
class ComponentConfig(Protocol):
    """What every variant of a slot provides (see the module docstring)."""

    kind: str

    def validate(self, model: ModelConfig, key: str) -> None:
        """Raise ``ConfigError`` naming ``key`` (e.g. ``model.ffn``) for an impossible setting."""
        ...

    def build(self, model: ModelConfig, layer: int) -> nn.Module:
        """The module of layer ``layer`` (0-based), with freshly initialised weights."""
        ...

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        """Parameters and forward FLOPs per token of layer ``layer``'s module at context ``seq_len``."""
        ...


def hidden_std(model: ModelConfig) -> float:
    """Init std of the hidden matrices (q, k, v, gate, up): ``init_std``, divided by sqrt(m_d) under μP
    (variance σ²/m_d with m_d = ``model.width_mult``, 1 under the standard parametrization; lmlab.models.mup)."""
    return model.init_std if model.width_mult == 1.0 else model.init_std / model.width_mult**0.5


def residual_std(model: ModelConfig) -> float:
    """Init std of projections that write into the residual stream: ``init_std / sqrt(2·n_layers·m_d)``
    (GPT-2, Radford et al. 2019: two residual writes per block keep the stream's variance bounded; m_d as in
    ``hidden_std``)."""
    return model.init_std / (2 * model.n_layers * model.width_mult) ** 0.5


@contextmanager
def module_setting(model: nn.Module, kind: type, name: str, value: Any) -> Iterator[None]:
    """Within the block, attribute ``name`` of every submodule of type ``kind`` is ``value``; restored after
    (inference-time switches such as top-k attention or a recurrent model's iteration count)."""
    modules = [m for m in model.modules() if isinstance(m, kind)]
    before = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            setattr(m, name, old)
