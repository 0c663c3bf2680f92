"""A run's resolved ``config.yaml`` against the defaults: only the settings that differ, each with both values.

Every kind of run (pretrain, sft, align, reward, distill) is configured by the one ``RunConfig`` tree and starts from
its defaults (``lmlab.config.load_config(None)``), so those defaults are the baseline for all of them; a recipe's
choices (a vocabulary size fitted to the tokenizer, an architecture inherited from ``init_from``) show up as
differences, which is what a reader wants to see.
"""

from __future__ import annotations

import json
from typing import Any

from lmlab.config import RunConfig, to_dict
from lmlab.report.flat import flatten

ABSENT = "(absent)"


def default_config() -> dict:
    """The defaults of every kind of run, as the nested dict ``config.yaml`` holds."""
    return to_dict(RunConfig())


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:  # YAML may hand back "1e-05" as text, a tuple may have become a list
        return float(a) == float(b)
    except (TypeError, ValueError):
        return json.dumps(a, default=str) == json.dumps(b, default=str)


def _yaml(value: Any) -> Any:
    """``None`` and booleans spelled as in ``config.yaml`` (an empty cell would hide a ``null``)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else value


def config_diff(run: dict, defaults: dict | None = None) -> list[dict]:
    """Rows ``{key, default, run}`` for every flattened setting whose run value differs from the default.

    A key only one side has (a run written by another lmlab version) is shown with ``(absent)`` on the other side.
    """
    ours = flatten(run)
    base = flatten(default_config() if defaults is None else defaults)
    rows = []
    for key in list(base) + [k for k in ours if k not in base]:
        value, default = ours.get(key, ABSENT), base.get(key, ABSENT)
        if not _same(value, default):
            rows.append({"key": key, "default": _yaml(default), "run": _yaml(value)})
    return rows
