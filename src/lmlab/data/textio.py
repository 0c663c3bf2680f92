"""Reading users' text files as UTF-8, where bad bytes are one ``DataError`` naming the file and line.

Files are read as bytes and decoded one line at a time, so an error can say which line holds the
bad bytes (``bad.jsonl:3: not valid UTF-8 (invalid continuation byte at byte 17 of the line)``)
instead of letting a ``UnicodeDecodeError`` escape. Byte positions are 1-based, like JSON columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmlab.errors import DataError

_FIX = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def utf8_error(path: str | Path, lineno: int, offset: int, reason: str) -> DataError:
    """The error for bad bytes at 0-based ``offset`` within line ``lineno`` of ``path``."""
    return DataError(f"{path}:{lineno}: not valid UTF-8 ({reason} at byte {offset + 1} of the line); {_FIX}")


def decode_line(raw: bytes, path: str | Path, lineno: int) -> str:
    """``raw`` as text without its line ending (``\\n`` or ``\\r\\n``)."""
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise utf8_error(path, lineno, err.start, err.reason) from None


def lines_of(stream: BinaryIO, path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a binary stream, numbered from 1."""
    for lineno, raw in enumerate(stream, start=1):
        yield lineno, decode_line(raw, path, lineno)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of the file ``path``, streamed."""
    with open(path, "rb") as f:
        yield from lines_of(f, path)


def lines_of_bytes(data: bytes, path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``data``, the bytes of the file ``path``."""
    return lines_of(io.BytesIO(data), path)


def json_lines(lines: Iterable[tuple[int, str]], path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a JSONL file; a line that is not JSON is one
    ``DataError`` naming ``path:line`` and the column."""
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def decode_text(data: bytes, path: str | Path) -> str:
    """The whole of ``data`` (the bytes of ``path``) as text; the error names the line of the bad bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise utf8_error(path, lineno, err.start - line_start, err.reason) from None


def read_text(path: str | Path) -> str:
    """The file ``path`` as UTF-8 text (line endings kept as they are)."""
    return decode_text(Path(path).read_bytes(), path)
