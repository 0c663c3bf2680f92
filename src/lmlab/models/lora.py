"""Low-rank adapters on linear layers: LoRA (Hu et al. 2021, arXiv 2106.09685) and DoRA (Liu et al. 2024,
arXiv 2402.09353), with rsLoRA's scaling (Kalajdzievski 2023, arXiv 2312.03732), in PEFT's weight layout.

A wrapped ``nn.Linear`` W (frozen) with rank r, ``alpha`` and input dropout computes

- LoRA: y = W x + b + s·B A drop(x), with s = alpha / r (rsLoRA: alpha / √r). A [r, in] starts Kaiming-uniform
  and B [out, r] at zero, so an adapted model starts equal to its base.
- DoRA: the direction W' = W + s·B A is renormalised per output row and scaled by a learned magnitude m [out]
  (initialised to ‖W‖ row-wise): y = (m / ‖W'‖) ⊙ (W x + s·B A drop(x)) + b, with ‖W'‖ treated as a constant in
  the backward pass (the paper's §4.3, as PEFT does).

A CorDA start (``init: corda_ipm | corda_kpm``, ``lmlab.models.corda``) keeps the adapter's starting value (A₀, B₀)
as buffers and subtracts it: y = W x + b + s·(B A − B₀A₀) x, so the layer starts equal to its base and the base
weight is never rewritten.

``merged_weight`` folds an adapter into its base weight (W + s·B A, or (m / ‖W'‖) ⊙ W'). Parameter names are
PEFT's (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``), so ``lmlab.models.peft_io`` writes and
reads adapters that ``peft.PeftModel`` loads. This module is single-device model code: which parameters train is
decided by the caller (``adapter_parameters``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from lmlab.errors import ConfigError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    """Which linear layers get an adapter and its shape (``kind: none``, the default, trains every weight).
    ``targets``: module-name patterns, each matched against the last part of a module's name (``q_proj``) or
    its whole dotted name (``layers.0.attn.*``)."""

    kind: Literal["none", "lora", "dora"] = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # how the adapters start: B = 0 (LoRA's), or CorDA's decomposition (lmlab.models.corda) from context data
    init: Literal["lora", "corda_ipm", "corda_kpm"] = "lora"
    corda_file: str | None = None  # context data for CorDA (default: the run's own training batches)
    corda_samples: int = 64  # sequences of context data CorDA's covariances are collected on
    quantize: Literal["none", "nf4"] = "none"  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self, key: str = "adapter") -> None:
        if not self.enabled:
            if self.init != "lora" or self.quantize != "none":
                raise ConfigError(f"{key}.init and {key}.quantize shape adapters: set {key}.kind=lora as well")
            return
        if self.rank < 1:
            raise ConfigError(f"{key}.rank={self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"{key}.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ConfigError(f"{key}.targets is empty: name the linear layers to adapt (e.g. q_proj, v_proj)")
        if self.init != "lora" and self.kind == "dora":
            raise ConfigError(f"{key}.init={self.init} initialises LoRA adapters; use {key}.kind=lora with it")
        if self.corda_samples < 1:
            raise ConfigError(f"{key}.corda_samples={self.corda_samples} must be >= 1")
        if self.quantize != "none" and self.init != "lora":
            raise ConfigError(
                f"{key}.init={self.init} decomposes full-precision weights; use it with {key}.quantize=none"
            )
        if self.quantize != "none" and self.kind == "dora":
            raise ConfigError(f"{key}.quantize={self.quantize} (QLoRA) trains LoRA adapters; use {key}.kind=lora")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA or DoRA adapter (module docstring)."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base
        self.kind, self.scaling = cfg.kind, cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, cfg.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # True: the layer computes its base only (``adapters_disabled``)
        # CorDA: the adapter's starting value (A₀, B₀), subtracted so that the layer starts equal to its base
        corda = cfg.init != "lora"
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A.weight) if corda else None)
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B.weight) if corda else None)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if cfg.kind == "dora":
            self.lora_magnitude_vector = nn.Parameter(base.weight.detach().norm(dim=1).clone())

    def delta(self) -> torch.Tensor:
        """s·B A [out, in] (s·(B A − B₀A₀) for a CorDA start)."""
        product = self.lora_B.weight @ self.lora_A.weight
        if self.lora_A0 is not None:
            product = product - self.lora_B0 @ self.lora_A0
        return self.scaling * product

    @torch.no_grad()
    def set_initial(self) -> None:
        """Record the adapter's current value as its start (A₀, B₀): the layer computes its base again."""
        self.lora_A0.copy_(self.lora_A.weight)
        self.lora_B0.copy_(self.lora_B.weight)

    def _dora_scale(self) -> torch.Tensor:
        """m / ‖W + s·B A‖ per output row, the norm detached."""
        norm = (self.base_layer.weight + self.delta()).norm(dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        low_rank = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        if self.lora_A0 is not None:
            low_rank = low_rank - F.linear(F.linear(x, self.lora_A0), self.lora_B0) * self.scaling
        if self.lora_magnitude_vector is None:
            return self.base_layer(x) + low_rank
        bias = self.base_layer.bias
        return self._dora_scale() * (F.linear(x, self.base_layer.weight) + low_rank) + (0 if bias is None else bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        merged = self.base_layer.weight + self.delta()
        if self.lora_magnitude_vector is not None:
            merged = (self.lora_magnitude_vector / merged.norm(dim=1))[:, None] * merged
        return merged


def _matches(name: str, patterns: list[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(last, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose name matches ``cfg.targets`` (the output head excepted) in a
    ``LoRALinear``; returns the wrapped modules' names. A pattern that matches nothing is a ``ConfigError``."""
    if not cfg.enabled:
        raise ConfigError("adapter.kind is none: choose lora or dora")
    cfg.validate()
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name != "lm_head"
        and ".lora_" not in f".{name}" and _matches(name, cfg.targets)
    ]  # fmt: skip
    unused = [p for p in cfg.targets if not any(_matches(n, [p]) for n in chosen)]
    if unused:
        raise ConfigError(f"adapter.targets {unused} match no linear layer of the model")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg))
    return chosen


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (what trains; everything else stays frozen)."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in f".{n}"}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state_keys(model: nn.Module) -> set[str]:
    """What an adapter run's checkpoint holds: the adapters' parameters and every parameter outside the adapted
    decoder (a reward model's ``head``), which trains whole."""
    own = {n for n in model.state_dict() if ".lora_" in f".{n}"}  # parameters and CorDA's starting values
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.Module):
        return own
    inside = {id(p) for p in decoder.parameters()}
    return own | {n for n, p in model.named_parameters() if id(p) not in inside}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes as its base (every adapter off): the implicit reference of a
    preference run, with no second model in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


class BaseView(nn.Module):
    """``model`` with its adapters disabled, usable where a frozen reference module is expected (held-out
    evaluation, reference tables, samples). Shares every weight with ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: the view owns no parameters

    def forward(self, *args, **kwargs):
        model = self._model[0]
        with adapters_disabled(model):
            return model(*args, **kwargs)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` holding its merged weight (in place; returns ``model``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base_layer
            base.weight.copy_(module.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model
