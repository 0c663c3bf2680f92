"""Recurrent depth: a core block iterated a variable number of times (Geiping et al. 2025, "Scaling up
Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach", arXiv 2502.05171).

The decoder's blocks split into a *prelude* (the first ``prelude_layers``), a *core* (the middle ones) and a
*coda* (the last ``coda_layers``). The prelude embeds the input into ``e``; the core is applied r times to a
latent state, each time with the input injected: ``s_i = core(A·[s_{i−1}; e])``, ``A`` a linear adapter
2d -> d and ``s_0`` Gaussian noise in training (zero in evaluation, so it is deterministic); the coda maps
``s_r`` to the output. Training samples r per step from the paper's Poisson-lognormal
(``τ ~ N(log r̄ − σ²/2, σ)``, ``r = Poisson(e^τ) + 1``, mean ``r̄``) and backpropagates through the last
``backprop_depth`` iterations only (the earlier ones run without gradients). At inference r is free
(``recurrence_iterations``); more iterations are more test-time compute. With a KV cache every iteration of
every core block keeps its own keys and values, so one generation must use one r throughout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.component import NOT_IN_WEIGHTS, module_setting

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class RecurrenceConfig:
    """Prelude / core / coda split of ``model.n_layers`` and the iteration schedule (``enabled`` to use it)."""

    enabled: bool = False
    prelude_layers: int = 1
    coda_layers: int = 1  # the core is the blocks in between
    mean_iterations: float = field(default=4.0, metadata=NOT_IN_WEIGHTS)  # r̄ of the training distribution
    sigma: float = field(default=0.5, metadata=NOT_IN_WEIGHTS)  # σ of the log-normal rate
    backprop_depth: int = field(default=8, metadata=NOT_IN_WEIGHTS)  # gradients through the last k iterations
    eval_iterations: int | None = field(default=None, metadata=NOT_IN_WEIGHTS)  # None: round(mean_iterations)
    state_std: float = field(default=0.02, metadata=NOT_IN_WEIGHTS)  # std of the initial state in training

    def core_layers(self, model: ModelConfig) -> int:
        return model.n_layers - self.prelude_layers - self.coda_layers

    def default_iterations(self) -> int:
        return self.eval_iterations or max(1, round(self.mean_iterations))

    def validate(self, model: ModelConfig, key: str) -> None:
        if not self.enabled:
            return
        if self.prelude_layers < 0 or self.coda_layers < 0 or self.core_layers(model) < 1:
            raise ConfigError(
                f"{key}: prelude_layers={self.prelude_layers} + coda_layers={self.coda_layers} must leave at least "
                f"one core block of model.n_layers={model.n_layers}"
            )
        if self.mean_iterations < 1 or self.sigma < 0 or self.backprop_depth < 1 or self.state_std < 0:
            raise ConfigError(f"{key}: mean_iterations >= 1, sigma >= 0, backprop_depth >= 1 and state_std >= 0")
        if self.eval_iterations is not None and self.eval_iterations < 1:
            raise ConfigError(f"{key}.eval_iterations={self.eval_iterations} must be >= 1 (or null)")


def sample_iterations(mean: float, sigma: float) -> int:
    """r ~ Poisson(exp(τ)) + 1 with τ ~ N(log(mean) − σ²/2, σ) (torch's global generator, so seeds and
    resumed runs repeat it); E[r] = mean + 1 (the +1 keeps r >= 1, as in the paper)."""
    tau = torch.normal(math.log(mean) - sigma**2 / 2, sigma, size=(1,))
    return int(torch.poisson(tau.exp()).item()) + 1


class Recurrence(nn.Module):
    """The adapter ``A`` (2d -> d) and the iteration count of the next forwards (None: the config's)."""

    def __init__(self, cfg: RecurrenceConfig, d_model: int, init_std: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.init_std = init_std
        self.adapter = nn.Linear(2 * d_model, d_model, bias=False)
        self.iterations: int | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.adapter.weight, mean=0.0, std=self.init_std)

    def schedule(self) -> tuple[int, int]:
        """(iterations, how many of the last ones take gradients) for the next forward."""
        if self.iterations is not None:
            r = self.iterations
        elif self.training:
            r = sample_iterations(self.cfg.mean_iterations, self.cfg.sigma)
        else:
            r = self.cfg.default_iterations()
        return r, (min(r, self.cfg.backprop_depth) if self.training else r)

    def initial_state(self, injected: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.state_std > 0:
            return torch.randn_like(injected) * self.cfg.state_std
        return torch.zeros_like(injected)


@contextmanager
def recurrence_iterations(model: nn.Module, iterations: int | None) -> Iterator[None]:
    """Within the block, a recurrent-depth model iterates its core ``iterations`` times (None: unchanged)."""
    if iterations is not None and iterations < 1:
        raise ValueError(f"recurrent depth needs at least 1 iteration, got {iterations}")
    with module_setting(model, Recurrence, "iterations", iterations):
        yield
