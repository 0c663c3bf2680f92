"""Refusal tokens in SFT data (docs/science.md §28; Jain et al. 2024, arXiv 2412.06748): which control token
starts each reply.

With ``sft.refusal_tokens=single`` every assistant reply of a record labelled ``refuse: true`` starts with
``[refuse]`` and every other reply with ``[respond]``; with ``category`` a refusal starts with its category's own
token instead (``[weapons]``, ``[incomplete]``, ...: ``category_token``). The model so learns to emit the token
first, and at inference the token's probability can be read and steered (``lmlab.eval.refusal_steering``).
Category tokens are special tokens: a tokenizer lmlab trains for the run gets them added; a loaded one must
already have them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from lmlab.data.chat import SFTRecord
from lmlab.data.tokenizer import REFUSAL_TOKENS, TextTokenizer
from lmlab.errors import DataError

REFUSE, RESPOND = REFUSAL_TOKENS
MODES = ("none", "single", "category")
_CATEGORY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ -]*$")
_CONTROL = re.compile(r"^\[([A-Za-z0-9_][A-Za-z0-9_ -]*)\]$")


def category_token(category: str) -> str:
    """The control token of a refusal category: ``[category]``."""
    return f"[{category}]"


def control_token(record: SFTRecord, mode: str) -> str:
    """The token ``record``'s replies start with under ``mode`` (``single`` or ``category``); a record without
    the labels the mode needs is a ``DataError`` naming it."""
    if record.refuse is None:
        raise DataError(
            f"{record.where}: sft.refusal_tokens={mode} needs a boolean 'refuse' field on every record "
            "(true when the reply is a refusal)"
        )
    if not record.refuse:
        return RESPOND
    if mode == "single":
        return REFUSE
    if record.category is None or not _CATEGORY.match(record.category):
        raise DataError(
            f"{record.where}: sft.refusal_tokens=category needs a 'category' (letters, digits, _, - or spaces) on "
            f"every refusal record, got {record.category!r}"
        )
    if category_token(record.category) in REFUSAL_TOKENS:
        raise DataError(f"{record.where}: category {record.category!r} collides with the token {REFUSE}/{RESPOND}")
    return category_token(record.category)


def tagged_reply(reply: str, refuses: bool, category: str | None, mode: str) -> str:
    """``reply`` started with the control token a run trained with ``sft.refusal_tokens=mode`` would give it: for
    data built outside SFT (preference pairs, latent adversarial training) that must match the SFT data."""
    if mode == "none":
        return reply
    if not refuses:
        return RESPOND + reply
    return (REFUSE if mode == "single" else category_token(category or "")) + reply


def with_control_tokens(records: Sequence[SFTRecord], mode: str) -> list[SFTRecord]:
    """``records`` with each assistant reply prefixed by the record's control token (``mode="none"``: unchanged).
    Plain-text records have no reply and are an error."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return list(records)
    out = []
    for r in records:
        if r.text is not None:
            raise DataError(f"{r.where}: sft.refusal_tokens={mode} needs conversations, not plain 'text' documents")
        token = control_token(r, mode)
        messages = tuple({**m, "content": token + m["content"]} if m["role"] == "assistant" else m for m in r.messages)
        out.append(dataclasses.replace(r, messages=messages))
    return out


def needed_tokens(records: Sequence[SFTRecord], mode: str) -> list[str]:
    """The control tokens ``records`` use under ``mode``, sorted (``[respond]`` and ``[refuse]`` or categories)."""
    if mode == "none":
        return []
    return sorted({control_token(r, mode) for r in records})


def missing_tokens(tokenizer: TextTokenizer, tokens: Sequence[str]) -> list[str]:
    """The ``tokens`` that are not single tokens of ``tokenizer``'s vocabulary."""
    return [t for t in tokens if tokenizer.token_to_id(t) is None]


def require_tokens(tokenizer: TextTokenizer, tokens: Sequence[str], what: str) -> None:
    """A ``DataError`` naming the missing control tokens, where the tokenizer came from and what needs them."""
    missing = missing_tokens(tokenizer, tokens)
    if missing:
        raise DataError(
            f"tokenizer {tokenizer.source} has no token {', '.join(missing)}, which {what} needs; use a tokenizer "
            "trained by the run (no tokenizer.path / init_from) or one that has these special tokens"
        )


def add_control_tokens(tokenizer: TextTokenizer, tokens: Sequence[str]) -> TextTokenizer:
    """``tokenizer`` with the missing ``tokens`` added as special tokens (ids after the current vocabulary)."""
    missing = missing_tokens(tokenizer, tokens)
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    return tokenizer


def category_tokens(tokenizer: TextTokenizer) -> dict[str, int]:
    """The refusal-category tokens of a tokenizer (its special tokens shaped ``[name]`` other than ``[refuse]``
    and ``[respond]``): category name -> id."""
    out = {}
    for tid, added in tokenizer.backend.get_added_tokens_decoder().items():
        m = _CONTROL.match(added.content)
        if m and added.special and added.content not in REFUSAL_TOKENS:
            out[m.group(1)] = tid
    return dict(sorted(out.items()))
