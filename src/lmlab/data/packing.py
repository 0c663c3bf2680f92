"""Packing tokenized examples into fixed-length rows, and the batch source that serves them.

Each example is ``(ids, target_mask)`` (``lmlab.data.chat``). Inside a row an example of n tokens
contributes n inputs and the labels ``ids[t+1]`` where ``target_mask[t+1]``; its last position has
no label (the next token belongs to another example). Packed rows carry ``doc_ids`` (one id per
example, another for the padding tail) and ``position_ids`` that restart at 0 for every example, so
with the decoder's block-diagonal causal mask an example sees exactly what it would see alone: the
per-example loss of a packed batch equals the unpacked loss (tests/unit/sft/test_sft_packing.py).

Rows are filled by best-fit decreasing: examples sorted by length (longest first) each go into the
open row whose free space is smallest but still enough, or a new row. Examples longer than the row
are truncated (their first ``seq_len`` tokens) or dropped, per config; both are counted.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lmlab.objectives.lm import IGNORE_INDEX

Example = tuple[Sequence[int], Sequence[bool]]


@dataclass
class Row:
    """One training row before padding: the examples it holds, concatenated."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    n_docs: int = 0
    sources: list[int] = field(default_factory=list)  # each example's index in the list given to build_rows

    def add(self, ids: Sequence[int], mask: Sequence[bool], source: int = -1) -> None:
        """Append one example with its shifted, masked labels; ``source`` is its index in the input (-1: unknown)."""
        n = len(ids)
        self.input_ids += list(ids)
        self.labels += [int(ids[t + 1]) if mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        self.doc_ids += [self.n_docs] * n
        self.n_docs += 1
        self.sources.append(source)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackStats:
    """What happened to the examples: counts reported in the run's log and summary."""

    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in all rows
    target_tokens: int = 0

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def fit_examples(
    examples: Sequence[Example], seq_len: int, overlong: Literal["truncate", "drop"] = "truncate"
) -> tuple[list[Example], list[int], PackStats]:
    """Apply the over-long policy; drop examples that are left with no target token. Returns the kept examples,
    their indices in ``examples`` and the counts."""
    stats = PackStats(examples=len(examples))
    kept: list[Example] = []
    kept_index: list[int] = []
    for i, (ids, mask) in enumerate(examples):
        if len(ids) > seq_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats.truncated += 1
        if not any(mask[1:]):
            stats.dropped_no_target += 1
            continue
        kept.append((list(ids), list(mask)))
        kept_index.append(i)
    return kept, kept_index, stats


def pack_best_fit(examples: Sequence[Example], seq_len: int, sources: Sequence[int] | None = None) -> list[Row]:
    """Best-fit decreasing bin packing of examples (each at most ``seq_len`` tokens) into rows.

    Deterministic: ties in length keep the input order, ties in free space pick the oldest row. ``sources``
    (default: each example's index) is what ``Row.sources`` records for each example.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index) of rows that can take more
    for i in order:
        ids, mask = examples[i]
        n = len(ids)
        if n > seq_len:
            raise ValueError(f"example of {n} tokens does not fit a row of {seq_len}; apply fit_examples first")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, r = free.pop(pos)
        else:
            rows.append(Row())
            space, r = seq_len, len(rows) - 1
        rows[r].add(ids, mask, i if sources is None else sources[i])
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def single_rows(examples: Sequence[Example], sources: Sequence[int] | None = None) -> list[Row]:
    """One example per row (the unpacked baseline), in input order; ``sources`` as in ``pack_best_fit``."""
    rows = []
    for i, (ids, mask) in enumerate(examples):
        row = Row()
        row.add(ids, mask, i if sources is None else sources[i])
        rows.append(row)
    return rows


def build_rows(
    examples: Sequence[Example],
    seq_len: int,
    *,
    packing: bool = True,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[Row], PackStats]:
    """Over-long policy, then packed or single rows, with the counts. ``Row.sources`` index ``examples``."""
    kept, kept_index, stats = fit_examples(examples, seq_len, overlong)
    rows = pack_best_fit(kept, seq_len, kept_index) if packing else single_rows(kept, kept_index)
    stats.rows = len(rows)
    stats.tokens = sum(len(r) for r in rows)
    stats.target_tokens = sum(sum(1 for y in r.labels if y != IGNORE_INDEX) for r in rows)
    return rows, stats


def collate(
    rows: Sequence[Row], pad_id: int, pad_to: int | None = None, with_docs: bool = True
) -> dict[str, torch.Tensor]:
    """Stack rows into a batch padded on the right to ``pad_to`` (default: the longest row).

    Padding has label ``IGNORE_INDEX`` and its own doc id, so no real token attends to it and it
    attends to nothing real. ``with_docs`` adds ``doc_ids`` and ``position_ids`` (needed whenever a
    row may hold more than one example).
    """
    length = max(pad_to or 0, max(len(r) for r in rows))
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((batch, length), dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        docs = torch.tensor(row.doc_ids)
        doc_ids[b, :n] = docs
        doc_ids[b, n:] = row.n_docs
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = docs[1:] != docs[:-1]
        index = torch.arange(n)
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
        position_ids[b, :n] = index - first
        position_ids[b, n:] = torch.arange(length - n)
    out = {"input_ids": input_ids, "labels": labels}
    if with_docs:
        out.update(doc_ids=doc_ids, position_ids=position_ids)
    return out


class RowBatches:
    """The loop's ``BatchSource`` over a fixed list of rows: shuffled per epoch, deterministic, resumable.

    Epoch e visits the rows in ``randperm(len(rows))`` of a generator seeded ``seed + e``; a batch may
    span two epochs. ``extras`` maps batch keys to per-row tensors [N_rows, ...] (e.g. a teacher's
    cached top-k log-probs, padded to ``pad_to``) that are gathered for the served rows. With several
    ranks, each global micro-batch of ``batch_size · world_size`` rows is drawn in the same order as
    one process would and rank r keeps the r-th contiguous slice.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        *,
        pad_id: int,
        seed: int = 0,
        pad_to: int | None = None,
        with_docs: bool = True,
        extras: dict[str, torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not rows:
            raise ValueError("RowBatches needs at least one row")
        self.rows = list(rows)
        self.pad_id = pad_id
        self.seed = seed
        self.pad_to = pad_to
        self.with_docs = with_docs
        self.extras = extras or {}
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order = self.epoch_order(0)

    def epoch_order(self, epoch: int) -> list[int]:
        """The row indices in the order epoch ``epoch`` serves them."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.rows), generator=gen).tolist()

    def next_indices(self, batch_size: int) -> list[int]:
        picked = []
        while len(picked) < batch_size:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self.epoch_order(self.epoch)
            picked.append(self._order[self.cursor])
            self.cursor += 1
        return picked

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = self.next_indices(batch_size * self.world_size)[self.rank * batch_size : (self.rank + 1) * batch_size]
        batch = collate([self.rows[i] for i in idx], self.pad_id, self.pad_to, self.with_docs)
        for key, table in self.extras.items():
            batch[key] = table[idx, : batch["input_ids"].shape[1]]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self.epoch_order(self.epoch)


def iterate_batches(
    rows: Sequence[Row], batch_size: int, pad_id: int, pad_to: int | None = None, with_docs: bool = True
):
    """All rows once, in order, as batches (evaluation)."""
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start : start + batch_size], pad_id, pad_to, with_docs)
