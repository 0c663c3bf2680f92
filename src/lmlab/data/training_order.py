"""The training-order log of an SFT run: each training record with the draws at which training served it.

An SFT run writes ``training_order.jsonl`` into its run directory (unless ``sft.training_order=false``: the log
copies every record), one JSON object per training record, in the order of the training file:

- ``index`` (0-based, in the file), ``where`` (its origin, ``file:line``) and the record itself: ``text``, or
  ``messages`` and ``n_context`` (the leading messages that are never learned);
- ``position``: the global draw (0-based; one draw is one row of one micro-batch, counted over all ranks) at
  which training first served the row holding the record, its place in epoch 0's row order;
- ``step``: the optimizer step (0-based) of that draw;
- ``last_position``: the draw at which training last served it (``position`` in a run of one epoch or less).

The three are ``null`` for a record training never served (dropped by ``sft.overlong`` or ``train.steps``
ended first). Records packed in one row share their draws. The draws are replayed from the batch source's
seeded row orders (``RowBatches.epoch_order``), so writing the log does not touch the training stream. This is
the transcript of palimpsestic membership inference (Kuditipudi et al. 2025, arXiv 2510.19796; docs/science.md
§16): ``lmlab eval provenance`` correlates a suspect model's loss on each record with its place in the order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmlab.data.chat import SFTRecord, validate_messages
from lmlab.data.packing import Row
from lmlab.data.textio import iter_lines, json_lines
from lmlab.errors import DataError

TRAINING_ORDER_FILE = "training_order.jsonl"


@dataclass(frozen=True)
class TrainedRecord:
    """A record of the log with its first and last draw (None: never served)."""

    record: SFTRecord
    position: int | None
    last_position: int | None


def served_draws(
    rows: Sequence[Row], epoch_order: Callable[[int], Sequence[int]], total_draws: int
) -> tuple[dict[int, int], dict[int, int]]:
    """The first and last global draw that serves each source (``Row.sources``) of ``rows``, when a run draws
    ``total_draws`` rows in the orders ``epoch_order(0)``, ``epoch_order(1)`` ... (each a permutation)."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    epoch = 0
    while epoch * len(rows) < total_draws:
        served = min(len(rows), total_draws - epoch * len(rows))
        for offset, r in enumerate(epoch_order(epoch)[:served]):
            draw = epoch * len(rows) + offset
            for source in rows[r].sources:
                first.setdefault(source, draw)
                last[source] = draw
        epoch += 1
    return first, last


def training_order_jsonl(
    records: Sequence[SFTRecord],
    rows: Sequence[Row],
    epoch_order: Callable[[int], Sequence[int]],
    *,
    rows_per_step: int,
    steps: int,
) -> str:
    """The text of ``training_order.jsonl`` for ``records`` packed into ``rows`` (``Row.sources`` index
    ``records``), served ``rows_per_step`` rows per optimizer step for ``steps`` steps."""
    first, last = served_draws(rows, epoch_order, rows_per_step * steps)
    lines = []
    for i, record in enumerate(records):
        content = (
            {"text": record.text}
            if record.text is not None
            else {"messages": list(record.messages), "n_context": record.n_context}
        )
        position = first.get(i)
        lines.append(
            json.dumps(
                {
                    "index": i,
                    "where": record.where,
                    **content,
                    "position": position,
                    "step": None if position is None else position // rows_per_step,
                    "last_position": last.get(i),
                }
            )
        )
    return "".join(line + "\n" for line in lines)


def read_training_order(path: str | Path) -> list[TrainedRecord]:
    """The records of a ``training_order.jsonl`` (errors name ``file:line``)."""
    out = []
    for lineno, obj in json_lines(iter_lines(path), path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or not isinstance(obj.get("where"), str):
            raise DataError(f"{where}: expected a training-order object with 'where' (see lmlab.data.training_order)")
        if isinstance(obj.get("text"), str):
            record = SFTRecord(obj["where"], text=obj["text"])
        elif "messages" in obj:
            messages = tuple(validate_messages(obj["messages"], where))
            record = SFTRecord(obj["where"], messages, n_context=int(obj.get("n_context", 0)))
        else:
            raise DataError(f"{where}: the record has neither 'text' nor 'messages'")
        draws = [obj.get(key) for key in ("position", "last_position")]
        if any(d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0) for d in draws):
            raise DataError(f"{where}: 'position' and 'last_position' must be integers >= 0 or null, got {draws}")
        out.append(TrainedRecord(record, *draws))
    return out
