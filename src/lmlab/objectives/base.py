"""The contract every objective follows.

An objective is a pure function of model outputs and a batch. It returns the *sum*
of per-token (or per-example) losses and the count they are normalised by, so the
training loop can accumulate micro-batches and divide once by the total count: k
micro-batches then give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """``loss_sum / count`` is the mean loss; ``metrics`` are summed the same way."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums, normalised by ``count``
