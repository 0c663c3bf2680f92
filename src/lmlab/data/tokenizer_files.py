"""The files that travel beside a ``tokenizer.json``: what its special tokens are and how chats are written.

Hugging Face keeps these in three files next to ``tokenizer.json``, and lmlab run directories keep the
same files in the same format, so a run's tokenizer is described exactly as the model it came from:

- ``tokenizer_config.json``: the declared ``bos_token``, ``eos_token`` and ``pad_token`` (a string, or an
  ``AddedToken`` object whose ``content`` is the string) and, in older files, the ``chat_template``;
- ``chat_template.jinja``: the chat template as transformers 5 saves it (it wins over the config's);
- ``generation_config.json``: ``eos_token_id``, one id or a list: every token that ends a generation
  (an instruct model's end-of-turn token besides its end-of-text token).

``read_declared`` reads them; ``TextTokenizer.load`` uses the result instead of guessing tokens by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.textio import read_text
from lmlab.errors import DataError

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
ROLES = ("bos", "eos", "pad")


@dataclass(frozen=True)
class Declared:
    """Special tokens and chat template declared by the files beside a tokenizer (``None``: not declared)."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    stop_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id(s)
    chat_template: str | None = None
    template_origin: str | None = None  # the file the template came from


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def token_text(value: Any, where: str) -> str | None:
    """A declared special token as a string: ``"</s>"`` or ``{"content": "</s>", ...}``; ``None`` stays None."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: a special token must be a non-empty string or an object with 'content'")
    return value


def token_ids(value: Any, where: str) -> tuple[int, ...]:
    """``eos_token_id`` of a config: an int, a list of ints or null."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DataError(f"{where}: eos_token_id must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


def chat_template_of(config: dict[str, Any], where: str) -> str | None:
    """The ``chat_template`` of a tokenizer config: a string, or the ``default`` of HF's named list."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{where}: chat_template must be a string")
    return template or None


def read_declared(folder: Path) -> Declared:
    """What ``tokenizer_config.json``, ``chat_template.jinja`` and ``generation_config.json`` in ``folder`` declare."""
    config_path = folder / TOKENIZER_CONFIG
    config = _json_file(config_path) if config_path.is_file() else {}
    where = str(config_path)
    tokens = {role: token_text(config.get(f"{role}_token"), f"{where} {role}_token") for role in ROLES}
    template, origin = chat_template_of(config, where), where
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        template, origin = read_text(jinja) or None, str(jinja)
    generation = folder / GENERATION_CONFIG
    stop: tuple[int, ...] = ()
    if generation.is_file():
        stop = token_ids(_json_file(generation).get("eos_token_id"), f"{generation} eos_token_id")
    return Declared(**tokens, stop_ids=stop, chat_template=template, template_origin=origin if template else None)
