"""Mixture-of-experts feed-forward: top-k token-choice routing over SwiGLU experts, dropless.

Each token's router logits ``z = W_r·x`` ([E] for E experts) pick k experts; the token's output is the
gate-weighted sum of those experts' outputs (plus always-on *shared* experts, DeepSeekMoE, Dai et al. 2024).
Every token reaches all k of its experts: tokens are sorted by expert and each expert runs once on its rows
(no capacity, nothing dropped). Routers (``router``):

- ``softmax``: gates = softmax(z), the k largest kept; ``renormalize`` rescales them to sum to 1, which is
  exactly softmax over the k selected logits ("top-k then softmax", Mixtral). Without it the gates keep their
  full-softmax mass (OLMoE). Qwen3-MoE: ``renormalize: true``.
- ``sparsemixer``: GRIN's SparseMixer-v2 (Liu et al. 2024, arXiv 2409.12136; docs/science.md §9.4): in training
  the expert is *sampled* from the softmax of the logits within a relative margin 2·ε of the best one, and the
  gate's gradient reaches the routing decision through a Heun-style estimate; the k choices are made one after
  another, each excluding the experts already chosen.

Balancing (docs/science.md §9.3):

- load-balancing loss (Switch Transformer, Fedus et al. 2022, eq. 4): ``E · Σ_e f_e · P_e`` with ``f_e`` the
  share of the N·k assignments that go to expert e and ``P_e`` the mean router probability of e; 1 at perfect
  balance. (Hugging Face's Mixtral sums ``f`` over the k choices, which is k times this.)
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(z)²``;
- auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2): a per-expert bias ``b`` is added to
  the logits for *choosing* experts only (the gates use the unbiased logits); after every optimizer step
  ``b_e += γ·sign(mean load − load_e)`` (``balance_experts``, called by the trainer).

The weighted auxiliary losses of a forward are left on the module (``aux_loss``) with detached routing
statistics (``stats``); ``auxiliary_losses(model)`` gathers them, and the trainer adds them to the objective.

``MoEConfig`` is an FFN slot variant (``model.ffn: {kind: moe, experts: 8, top_k: 2}``); ``layers`` makes any
subset of the blocks sparse, the others keeping a dense SwiGLU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.component import NOT_IN_WEIGHTS, ComponentCount, residual_std
from lmlab.models.mlp import SwiGLU, SwiGLUConfig

if TYPE_CHECKING:
    from lmlab.config import ModelConfig

# Routing statistics each MoE forward reports (means over the MoE layers; see ``MoE.stats``), besides each
# expert's load relative to the mean (``moe_load/e0``, ...).
STAT_NAMES = ("moe_balance", "moe_max_load", "moe_overflow", "moe_router_z")


@dataclass
class MoEConfig:
    """Top-k routed SwiGLU experts (``hidden`` wide each; None: the dense SwiGLU width) on ``layers``."""

    kind: Literal["moe"] = "moe"
    experts: int = 8
    top_k: int = 2
    hidden: int | None = None  # each expert's SwiGLU width (None: 8/3·d_model rounded up to multiple_of)
    multiple_of: int = 64
    shared_experts: int = 0  # always-on experts of the same width, as one SwiGLU (DeepSeekMoE)
    router: Literal["softmax", "sparsemixer"] = "softmax"
    renormalize: bool = True  # softmax router: the k gates sum to 1 (= softmax over the top-k logits)
    # Settings that do not change what the weights mean (a run continuing from a checkpoint may change them):
    jitter_eps: float = field(default=0.01, metadata=NOT_IN_WEIGHTS)  # sparsemixer's candidate margin 2·eps
    load_balance_coef: float = field(default=0.01, metadata=NOT_IN_WEIGHTS)  # Switch balancing loss (0: off)
    z_loss_coef: float = field(default=0.001, metadata=NOT_IN_WEIGHTS)  # ST-MoE router z-loss (0: off)
    bias_update_rate: float = field(default=0.0, metadata=NOT_IN_WEIGHTS)  # DeepSeek-V3 γ (0: off; paper 0.001)
    layers: list[int] | None = None  # 0-based blocks that are MoE (None: every block); the rest are dense
    dense_hidden: int | None = None  # SwiGLU width of the dense blocks (None: 8/3·d_model rounded)

    def expert_hidden(self, d_model: int) -> int:
        return SwiGLUConfig(hidden=self.hidden, multiple_of=self.multiple_of).hidden_size(d_model)

    def dense(self) -> SwiGLUConfig:
        return SwiGLUConfig(hidden=self.dense_hidden, multiple_of=self.multiple_of)

    def is_sparse(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def validate(self, model: ModelConfig, key: str) -> None:
        if self.experts < 2:
            raise ConfigError(f"{key}.experts={self.experts} must be >= 2")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"{key}.top_k={self.top_k} must be between 1 and {key}.experts={self.experts}")
        for name in ("hidden", "dense_hidden"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}.{name}={value} must be > 0 (or null for 8/3·d_model)")
        if self.multiple_of <= 0:
            raise ConfigError(f"{key}.multiple_of={self.multiple_of} must be > 0")
        if self.shared_experts < 0:
            raise ConfigError(f"{key}.shared_experts={self.shared_experts} must be >= 0")
        for name in ("jitter_eps", "load_balance_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if self.router == "sparsemixer" and self.bias_update_rate > 0:
            raise ConfigError(
                f"{key}.bias_update_rate needs router=softmax: sparsemixer samples its experts, a selection bias "
                "has no fixed meaning there"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < model.n_layers]
            if bad or not self.layers or len(set(self.layers)) != len(self.layers):
                raise ConfigError(
                    f"{key}.layers={self.layers} must be distinct block indices in 0..{model.n_layers - 1} "
                    "(or null for every block)"
                )

    def build(self, model: ModelConfig, layer: int) -> nn.Module:
        if not self.is_sparse(layer):
            return self.dense().build(model, layer)
        return MoE(
            model.d_model, self.expert_hidden(model.d_model), self, init_std=model.init_std, out_std=residual_std(model)
        )

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        """Router, experts and shared experts; the matmul FLOPs count the router, k experts and the shared ones."""
        if not self.is_sparse(layer):
            return self.dense().count(model, seq_len)
        d = model.d_model
        expert = 3 * d * self.expert_hidden(d)
        router, shared = d * self.experts, self.shared_experts * expert
        active = router + self.top_k * expert + shared
        return ComponentCount(router + self.experts * expert + shared, active, active_params=active)


# --------------------------------------------------------------------------- routing


class _SparseMixerGate(torch.autograd.Function):
    """Forward: the gate π_sel times the Heun multiplier r; backward: g·π_sel·(onehot(sel) − π) to the logits.

    The gradient is that of π_sel alone (r is a forward-only correction; GRIN §3), so the routing decision
    gets the gradient of the chosen expert's probability."""

    @staticmethod
    def forward(ctx, logits, gate, selected, probs, multiplier):  # noqa: ANN001, ANN205
        ctx.save_for_backward(gate, selected, probs)
        return gate * multiplier

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        gate, selected, probs = ctx.saved_tensors
        scaled = grad_out * gate  # [N, 1]
        grad = (-probs * scaled).scatter_add(-1, selected, scaled)
        return grad, None, None, None, None


def sparsemixer_route(logits: torch.Tensor, k: int, jitter_eps: float, training: bool):
    """GRIN's SparseMixer-v2 for router logits [N, E]: (gates [N, k], experts [N, k]); docs/science.md §9.4.

    For each of the k choices: candidates are experts with ``(max − z_i) / max(|z_i|, max) <= 2·eps`` (the max
    over experts not yet chosen; |z| of the original logits); in training one is sampled from the softmax of
    the candidates' logits (Gumbel-max), in evaluation the best is taken; the gate is that softmax at the
    choice, times r = 1 if the choice is the candidates' argmax or with probability 1/4 anyway, else 1/3."""
    remaining = logits
    gates, chosen = [], []
    for _ in range(k):
        with torch.no_grad():
            best, best_index = remaining.max(dim=-1, keepdim=True)
            far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
        masked = remaining.masked_fill(far, float("-inf"))
        if training:
            gumbel = -torch.empty_like(masked).exponential_().log()
            selected = (masked + gumbel).argmax(dim=-1, keepdim=True)
        else:
            selected = best_index
        probs = masked.softmax(dim=-1)
        gate = probs.gather(-1, selected)
        if training:
            keep_full = (selected == best_index) | (torch.rand_like(gate) > 0.75)
            multiplier = torch.where(keep_full, 1.0, 1.0 / 3.0).to(gate.dtype)
            gate = _SparseMixerGate.apply(logits, gate.detach(), selected, probs.detach(), multiplier)
        gates.append(gate)
        chosen.append(selected)
        remaining = remaining.scatter(-1, selected, float("-inf"))
    return torch.cat(gates, dim=-1), torch.cat(chosen, dim=-1)


def softmax_route(logits: torch.Tensor, k: int, renormalize: bool, bias: torch.Tensor | None = None):
    """Top-k of softmax(logits) [N, E] -> (gates [N, k], experts [N, k]); ``bias`` [E] shifts the choice only."""
    probs = logits.float().softmax(dim=-1)
    choice = probs if bias is None else logits.float() + bias
    experts = choice.topk(k, dim=-1).indices
    gates = probs.gather(-1, experts)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates, experts


# --------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """Router + ``cfg.experts`` SwiGLU experts (+ one shared SwiGLU of ``shared_experts``·hidden), dropless.

    After each forward ``aux_loss`` holds the weighted balancing losses (a scalar with gradient) and ``stats``
    the detached routing statistics of ``STAT_NAMES``: the unweighted load-balancing value (1 = perfect),
    the busiest expert's load relative to the mean, the share of assignments a capacity-factor-1 router would
    have dropped, and the router z-loss value; and every expert's load relative to the mean (``moe_load/eN``)."""

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig, *, init_std: float, out_std: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.init_std = init_std
        self.router = nn.Linear(d_model, cfg.experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(d_model, hidden, init_std=init_std, out_std=out_std) for _ in range(cfg.experts)
        )
        self.shared = (
            SwiGLU(d_model, cfg.shared_experts * hidden, init_std=init_std, out_std=out_std)
            if cfg.shared_experts
            else None
        )
        # DeepSeek-V3 selection bias (persistent: checkpoints and resume keep it) and this step's expert loads.
        self.register_buffer("expert_bias", torch.zeros(cfg.experts), persistent=True)
        self.register_buffer("load_counts", torch.zeros(cfg.experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) router; experts initialise themselves; zero selection bias."""
        nn.init.normal_(self.router.weight, mean=0.0, std=self.init_std)
        for expert in self.experts:
            expert.init_weights()
        if self.shared is not None:
            self.shared.init_weights()
        self.expert_bias.zero_()
        self.load_counts.zero_()

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [N, E] -> (gates [N, k], experts [N, k])."""
        cfg = self.cfg
        if cfg.router == "sparsemixer":
            return sparsemixer_route(logits.float(), cfg.top_k, cfg.jitter_eps, self.training)
        bias = self.expert_bias if cfg.bias_update_rate > 0 else None
        return softmax_route(logits, cfg.top_k, cfg.renormalize, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [N, d]
        logits = self.router(tokens)  # [N, E]
        gates, experts = self.route(logits)  # [N, k] each
        out = dispatch(tokens, gates, experts, self.experts)
        if self.shared is not None:
            out = out + self.shared(tokens)
        self._balance_terms(logits, experts)
        return out.reshape(shape)

    def _balance_terms(self, logits: torch.Tensor, experts: torch.Tensor) -> None:
        cfg = self.cfg
        n_assign = experts.numel()
        load = torch.bincount(experts.flatten(), minlength=cfg.experts).to(torch.float32)  # [E]
        share = load / max(n_assign, 1)  # f_e, sums to 1
        probs = logits.float().softmax(dim=-1).mean(dim=0)  # P_e
        balance = cfg.experts * (share * probs).sum()
        z = logits.float().logsumexp(dim=-1).square().mean()
        self.aux_loss = cfg.load_balance_coef * balance + cfg.z_loss_coef * z
        mean_load = n_assign / cfg.experts
        relative = load / mean_load  # 1 = the mean load
        self.stats = {
            "moe_balance": balance.detach(),
            "moe_max_load": relative.max(),
            "moe_overflow": (load - mean_load).clamp(min=0).sum() / max(n_assign, 1),
            "moe_router_z": z.detach(),
            **{f"moe_load/e{e}": relative[e] for e in range(cfg.experts)},
        }
        if self.training and cfg.bias_update_rate > 0:
            self.load_counts += load


def dispatch(tokens: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, modules: nn.ModuleList) -> torch.Tensor:
    """Σ_j gates[n, j] · modules[experts[n, j]](tokens[n]) for every token n, each expert run once on its rows.

    Assignments are sorted by expert (stable), so expert e sees a contiguous block of rows; every expert is
    called, with zero rows if no token chose it, so all parameters take part in backward (DDP needs that)."""
    n_experts = len(modules)
    flat = experts.flatten()  # [N·k]
    order = flat.argsort(stable=True)
    token_of = order // experts.shape[1]  # the token of each sorted assignment
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows = tokens[token_of]  # [N·k, d]
    outputs = [module(chunk) for module, chunk in zip(modules, rows.split(counts))]
    weighted = torch.cat(outputs) * gates.flatten()[order, None].to(outputs[0].dtype)
    return torch.zeros_like(weighted[: tokens.shape[0]]).index_add_(0, token_of, weighted)


# --------------------------------------------------------------------------- what the trainer calls


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def auxiliary_losses(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The summed ``aux_loss`` of the last forward's MoE layers and their mean routing statistics, or None
    for a model without MoE layers (or before any forward)."""
    layers = [m for m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None
    loss = torch.stack([m.aux_loss for m in layers]).sum()
    names = [name for name in layers[0].stats if all(name in m.stats for m in layers)]
    stats = {name: torch.stack([m.stats[name] for m in layers]).mean() for name in names}
    return loss, stats


@torch.no_grad()
def balance_experts(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """DeepSeek-V3's bias update after an optimizer step: ``b_e += γ·sign(mean load − load_e)`` over the loads
    counted since the last update (``reduce`` sums them over ranks, so every rank moves the bias alike)."""
    for layer in moe_layers(model):
        rate = layer.cfg.bias_update_rate
        if rate <= 0:
            continue
        load = layer.load_counts if reduce is None else reduce(layer.load_counts.clone())
        if load.sum() > 0:
            layer.expert_bias += rate * torch.sign(load.mean() - load)
        layer.load_counts.zero_()
