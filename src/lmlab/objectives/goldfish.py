"""Goldfish loss masks (Hans et al. 2024, *Be like a Goldfish, Don't Memorize!*; docs/science.md §5).

The goldfish objective drops a pseudo-random 1/k of the target tokens from the loss (the forward
pass still sees them), so a model cannot learn any training sequence verbatim. This module only
builds the keep-mask; the loss itself is ``causal_lm_loss(logits, labels, loss_mask=mask)``,
``−(1/|G|) Σ_i G_i log P(x_i | x_<i)``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from lmlab.objectives.lm import IGNORE_INDEX

GOLDFISH_TABLE_SIZE = 1_000_003
"""Entries in the global hash table (a prime), as in the reference implementation."""

GOLDFISH_TABLE_SEED = 2971215073
"""Seed of the ``torch.Generator`` that fills the table (reference implementation)."""


@functools.lru_cache(maxsize=1)
def _cpu_hash_table() -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(GOLDFISH_TABLE_SEED)
    return torch.rand(GOLDFISH_TABLE_SIZE, generator=generator)


@functools.lru_cache(maxsize=8)
def _hash_table_on(device: str) -> torch.Tensor:
    return _cpu_hash_table().to(device)


def goldfish_hash_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The global table of ``1_000_003`` uniform(0, 1) floats, seeded 2971215073 (docs/science.md §5).

    Always generated on CPU and then copied, so the values (and hence every goldfish decision)
    are the same on every device, rank and run. Built once per process and cached per device.
    """
    return _hash_table_on(str(torch.device(device)))


def goldfish_mask(
    targets: torch.Tensor,
    *,
    k: int = 4,
    strategy: Literal["hash", "static"] = "hash",
    context_width: int = 13,
    start: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Keep-mask (bool [B, T]) of the goldfish loss for next-token ``targets`` [B, T] (docs/science.md §5).

    True where a target counts in the loss; False where goldfish drops it or where the target
    is ``ignore_index`` already. The masked loss is ``causal_lm_loss(logits, targets, loss_mask=mask)``.

    Strategies:

    - ``"static"`` (the paper's k-GL): drop targets ``start, start + k, start + 2k, ...`` of
      every row.
    - ``"hash"`` (the paper's recommended hashed mask; the reference's ``"hash-table"``): for the
      target at position s take the window of the h = ``context_width`` targets
      ``targets[s − h + 1 .. s]``, key = (product of the window, int64 arithmetic that wraps on
      overflow) mod 1_000_003, and drop the target iff ``goldfish_hash_table()[key] < 1/k``. The
      first h − 1 positions of each row have no full window and are never dropped. The decision
      depends only on the window's ids, so the same text gets the same mask wherever it occurs
      (any row, offset, epoch or rank).

    Convention: like the reference implementation (``apply_goldfish``, ``targets.unfold(1, h, 1)``),
    the window is over the *targets* and so **includes the predicted token**; the paper's text
    instead hashes the h preceding tokens, ``hash(x_{i−h}, …, x_{i−1}) < 1/k``. The product hash is
    order-invariant and is 0 whenever an id in the window is 0. Ignored targets (``ignore_index``,
    e.g. a masked prompt) enter the product with their stored value, as in the reference.

    Expected drop rate: 1/k of the targets (hash) or ``ceil((T − start)/k)/T`` (static).
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T], got shape {tuple(targets.shape)}")
    if k < 1:
        raise ValueError(f"goldfish k must be >= 1, got {k}")
    batch, seq_len = targets.shape
    keep = torch.ones(batch, seq_len, dtype=torch.bool, device=targets.device)

    if strategy == "static":
        if start < 0:
            raise ValueError(f"goldfish start must be >= 0, got {start}")
        keep[:, start::k] = False
    elif strategy == "hash":
        if context_width < 1:
            raise ValueError(f"goldfish context_width must be >= 1, got {context_width}")
        if seq_len >= context_width:
            windows = targets.long().unfold(1, context_width, 1)  # [B, T - h + 1, h]
            keys = windows.prod(dim=-1) % GOLDFISH_TABLE_SIZE  # [B, T - h + 1], in [0, table size)
            table = goldfish_hash_table(targets.device)
            drop = table[keys] < 1.0 / k  # [B, T - h + 1]
            keep[:, context_width - 1 :] = ~drop
    else:
        raise ValueError(f"unknown goldfish strategy {strategy!r}; choose 'hash' or 'static'")

    return keep & (targets != ignore_index)


def apply_goldfish(
    targets: torch.Tensor,
    *,
    k: int = 4,
    strategy: Literal["hash", "static"] = "hash",
    context_width: int = 13,
    start: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``targets`` with the goldfish-dropped positions set to ``ignore_index`` (same mask as ``goldfish_mask``)."""
    keep = goldfish_mask(
        targets, k=k, strategy=strategy, context_width=context_width, start=start, ignore_index=ignore_index
    )
    return targets.masked_fill(~keep, ignore_index)
