"""Which numbers of a run's ``metrics.jsonl`` are curves: every numeric key of every record kind, grouped by prefix.

Discovery is generic rather than a list of names, so a new objective's metric (DPO rewards, goldfish drop rate,
distillation KD), a new record kind (``task_eval``, ``diagnostic``) or a new data source gets its curve without a
change here. Step and token counters and wall-clock stamps are axes or bookkeeping, not curves. Keys sharing the part
before the first ``/`` (``val_loss/<source>``, ``rewards/chosen``, ``<task>/<metric>``) form one group: one figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BOOKKEEPING = frozenset({"kind", "step", "tokens", "time", "eval_seconds"})

#: Record kinds drawn first, in this order; any other kind follows in the order it was first logged.
KIND_ORDER = ("train", "eval", "task_eval")


@dataclass
class Series:
    """One metric over a run: the step (and token count, when logged) of each record that holds it."""

    key: str
    steps: list[float] = field(default_factory=list)
    tokens: list[float | None] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def x(self, axis: str) -> list[float]:
        return list(self.steps) if axis == "step" else [math.nan if t is None else t for t in self.tokens]

    @property
    def has_tokens(self) -> bool:
        return all(t is not None for t in self.tokens)


def number(value: object) -> float | None:
    """``value`` as a float when it is a number (booleans are not), non-finite values as NaN (a gap in the curve)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else math.nan


def series_by_kind(records: list[dict]) -> dict[str, dict[str, Series]]:
    """``{kind: {key: Series}}`` for every numeric non-bookkeeping key; kinds in :data:`KIND_ORDER` come first."""
    found: dict[str, dict[str, Series]] = {}
    for record in records:
        step = number(record.get("step"))
        if step is None:
            continue
        tokens = number(record.get("tokens"))
        per_key = found.setdefault(str(record.get("kind", "?")), {})
        for key, value in record.items():
            y = number(value)
            if key in BOOKKEEPING or y is None:
                continue
            s = per_key.setdefault(key, Series(key))
            s.steps.append(step)
            s.tokens.append(tokens)
            s.values.append(y)
    order = [k for k in KIND_ORDER if k in found] + [k for k in found if k not in KIND_ORDER]
    return {k: found[k] for k in order if found[k]}


def group_of(key: str) -> str:
    return key.split("/", 1)[0]


def groups(series: dict[str, Series]) -> dict[str, list[Series]]:
    """Series grouped by the part of their key before the first ``/``, in first-logged order."""
    out: dict[str, list[Series]] = {}
    for key, s in series.items():
        out.setdefault(group_of(key), []).append(s)
    return out


def last_record(records: list[dict], kind: str) -> dict | None:
    matching = [r for r in records if r.get("kind") == kind]
    return matching[-1] if matching else None
