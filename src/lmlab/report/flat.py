"""Nested dicts as flat key paths, so a table shows ``final_eval.val_loss → 0.52`` instead of a Python dict."""

from __future__ import annotations

import json
from typing import Any


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": 1, "c": "[1, 2]"}``: dicts become dotted keys, lists JSON text.

    An empty dict stays one row (``{}``) so that a section that exists but holds nothing is still visible.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        elif isinstance(value, dict | list | tuple):
            out[path] = json.dumps(value, default=str)
        else:
            out[path] = value
    return out
