"""Deterministic, resumable batches of fixed-length token windows.

The training split is cut into non-overlapping windows of ``seq_len + 1`` tokens
(inputs and shifted labels). Each epoch visits every window once in a permutation
drawn from ``(seed, epoch)``; the sampler's whole state is ``(epoch, cursor)``, so a
resumed run reads exactly the windows the uninterrupted run would have read.
Windows are consumed as a stream, so k micro-batches of B/k rows see the same rows
as one batch of B. With several ranks, each global micro-batch of ``B·world`` rows
is split into contiguous per-rank slices (disjoint data, same global order).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.shards import TokenShards
from lmlab.errors import DataError


class WindowSampler:
    """Shuffled windows over a token stream; ``next_batch(b)`` returns inputs and labels [b, seq_len]."""

    def __init__(self, tokens: TokenShards, seq_len: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                f"train.seq_len={seq_len} + 1; use more data or a shorter seq_len"
            )
        self.epoch = 0
        self.cursor = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_windows, generator=gen)
        return self._order

    def _next_window_ids(self, n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            order = self._epoch_order()
            take = min(n - len(ids), self.num_windows - self.cursor)
            ids.extend(order[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_windows:
                self.epoch += 1
                self.cursor = 0
                self._order = None
        return ids

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global micro-batch of ``batch_size · world_size`` rows."""
        ids = self._next_window_ids(batch_size * self.world_size)
        mine = ids[self.rank * batch_size : (self.rank + 1) * batch_size]
        rows = np.stack([self.tokens.read(w * self.seq_len, self.seq_len + 1) for w in mine])  # [b, T+1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_windows"]) != self.num_windows or int(state["seed"]) != self.seed:
            raise DataError(
                f"the checkpoint's data position does not fit this data: it was saved with "
                f"{state['num_windows']} windows (seed {state['seed']}), the data now has {self.num_windows} "
                f"(seed {self.seed}); resume with the same data and train.seq_len"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = None


def eval_batches(tokens: TokenShards, seq_len: int, batch_size: int, budget_tokens: int):
    """Fixed evaluation set: the first ``budget_tokens`` of the split in consecutive windows."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, budget_tokens // seq_len))
    if n_windows < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len} + 1")
    for start in range(0, n_windows, batch_size):
        ws = range(start, min(n_windows, start + batch_size))
        rows = torch.from_numpy(np.stack([tokens.read(w * seq_len, seq_len + 1) for w in ws]))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
