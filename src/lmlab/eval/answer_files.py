"""Prompts and ready-made answers for ``lmlab eval compare``: JSONL files read into ``PromptItem``s.

Prompts are text (``{"prompt": "..."}``) or chat (``{"messages": [...]}`` or a list-valued ``prompt``, a trailing
assistant turn dropped), the conventions of ``lmlab.data.preference``. A generations file has ``prompt`` with
``response`` (or ``completion``), or ``messages`` ending with the answer; the n-th answer to a repeated prompt
answers its n-th occurrence. Every error names ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.chat import validate_messages
from lmlab.data.textio import iter_lines, json_lines
from lmlab.errors import DataError, UserError

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class PromptItem:
    """A prompt, where it was read (file:line) and which occurrence of the same prompt in that file it is:
    the n-th answer to a repeated prompt in a generations file answers its n-th occurrence."""

    prompt: Prompt
    where: str
    occurrence: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False), self.occurrence

    @property
    def text(self) -> str:
        """The prompt as judges read it: the text itself, or the messages as ``role: content`` lines."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)


def numbered(prompts: Sequence[tuple[Prompt, str]]) -> list[PromptItem]:
    """``PromptItem``s of ``(prompt, where)`` in file order, repeated prompts numbered 0, 1, ..."""
    seen: dict[str, int] = {}
    items = []
    for prompt, where in prompts:
        item = PromptItem(prompt, where)
        n = seen.get(item.key[0], 0)
        seen[item.key[0]] = n + 1
        items.append(PromptItem(prompt, where, n))
    return items


# --------------------------------------------------------------------------- reading


def _parse_prompt(obj: Any, where: str) -> Prompt:
    """The prompt of a JSONL row: ``prompt`` (text or messages) or ``messages`` (a final assistant turn dropped)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    value = obj.get("prompt", obj.get("messages"))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = validate_messages(value, where, need_assistant=False)
        if "prompt" not in obj and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: the conversation has no turn before its assistant answer")
        return messages
    raise DataError(f"{where}: expected a 'prompt' (text or messages) or 'messages' field (keys: {', '.join(obj)})")


def _rows(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}")
    yield from json_lines(iter_lines(p), p)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """The prompts of a JSONL file, in order; every error names ``file:line``."""
    items = numbered([(_parse_prompt(obj, f"{path}:{n}"), f"{path}:{n}") for n, obj in _rows(path, "--prompts")])
    if not items:
        raise DataError(f"{path}: no prompts")
    return items


def read_generations(path: str | Path) -> tuple[list[PromptItem], dict[tuple[str, int], str]]:
    """``(prompts in file order, PromptItem.key -> answer)`` of a generations file: rows with ``prompt`` and
    ``response`` (or ``completion``), or ``messages`` ending with the assistant's answer."""
    rows: list[tuple[Prompt, str]] = []
    texts: list[str] = []
    for n, obj in _rows(path, "--generations"):
        where = f"{path}:{n}"
        if isinstance(obj, dict) and "prompt" not in obj and isinstance(obj.get("messages"), list):
            messages = validate_messages(obj["messages"], where)
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise DataError(f"{where}: 'messages' must end with the assistant's answer after a prompt")
            prompt: Prompt = messages[:-1]
            answer = messages[-1]["content"]
        else:
            prompt = _parse_prompt(obj, where)
            answer = obj.get("response", obj.get("completion"))
            if not isinstance(answer, str):
                raise DataError(f"{where}: expected a text 'response' (or 'completion') field")
        rows.append((prompt, where))
        texts.append(answer)
    if not rows:
        raise DataError(f"{path}: no generations")
    items = numbered(rows)
    return items, {item.key: text for item, text in zip(items, texts, strict=True)}


def shared_prompts(file_prompts: list[list[PromptItem]]) -> tuple[list[PromptItem], int]:
    """Prompts of the first generations file that every file answers, and how many were left out."""
    keys = [{item.key for item in items} for items in file_prompts]
    shared = [item for item in file_prompts[0] if all(item.key in k for k in keys)]
    if not shared:
        raise UserError("the --generations files have no prompt in common; pass --prompts FILE to name them")
    return shared, len({k for ks in keys for k in ks}) - len(shared)
