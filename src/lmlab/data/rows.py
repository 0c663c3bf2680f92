"""Rows of a dataset in any of the forms datasets are kept in, each with where it came from.

``read_rows(source)`` yields ``(where, row)``: ``where`` names the file and line (``data.jsonl:7``) or row
(``data.parquet:row 7``), so every error about a row can say exactly which one. Sources:

- ``.jsonl`` (and any name not listed here): one JSON object per line (blank lines skipped);
- ``.json``: an array of objects (or JSON lines, which some tools save as ``.json``);
- ``.csv``: a header line, then one row per record (all values are text);
- ``.parquet``: one row per record (pyarrow; the ``[data]`` extra);
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or the ``split`` of a ``DatasetDict``);
- anything else ``datasets.load_dataset`` reads (a Hub dataset id, or a local dataset folder), streamed, so a
  large corpus is never loaded whole; Hub ids honour ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and the cache.

``columns`` renames columns (``{"conv": "messages"}``: the dataset's ``conv`` is read as ``messages``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmlab.data.textio import decode_text, iter_lines, json_lines
from lmlab.errors import DataError

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def source_exists(source: str | Path) -> bool:
    """A file or folder here, or something ``datasets`` resolves by name (an ``org/name`` id whose first part is
    no local folder)."""
    return Path(source).exists() or is_hub_id(source)


def is_hub_id(source: str | Path) -> bool:
    """``org/name`` that is no local path (its first part is no folder here): a Hugging Face Hub id."""
    path = Path(source)
    return not path.exists() and bool(_HUB_ID.match(str(source))) and not path.parent.is_dir()


def source_sha256(source: str | Path) -> str:
    """SHA-256 identifying a source's content: a file's bytes, a folder's files (names and bytes), or the id of
    a dataset that ``datasets`` resolves."""
    path = Path(source)
    digest = hashlib.sha256()
    if path.is_file():
        _update(digest, path)
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode() + b"\0")
            _update(digest, f)
    else:
        digest.update(str(source).encode())
    return digest.hexdigest()


def _update(digest, path: Path) -> None:
    """Hash a file in 1 MiB blocks (a corpus file need not fit in memory)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def read_rows(
    source: str | Path, *, columns: Mapping[str, str] | None = None, split: str = "train", what: str = "data file"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of every record of ``source`` (module docstring), columns renamed per ``columns``; a
    source that does not exist is a ``DataError`` naming it as ``what``."""
    path = Path(source)
    if not source_exists(source):
        raise DataError(f"{what} not found: {path}")
    if path.is_file():
        rows = _file_rows(path)
    elif is_saved_dataset(path):
        rows = _saved_rows(path, split)
    else:  # a local dataset folder or a Hub id
        rows = _loaded_rows(str(source), split)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, _renamed(row, columns, where) if columns else row


def _renamed(row: dict[str, Any], columns: Mapping[str, str], where: str) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in columns}
    for theirs, ours in columns.items():
        if theirs not in row:
            raise DataError(
                f"{where}: no column {theirs!r} to read as {ours!r} (columns present: {', '.join(map(str, row))})"
            )
        out[ours] = row[theirs]
    return out


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix
    if suffix == ".jsonl":
        for lineno, obj in json_lines(iter_lines(path), path):
            yield f"{path}:{lineno}", obj
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:  # any other name is read as JSON lines, as it always was (a .gz, say, then fails as not UTF-8)
        for lineno, obj in json_lines(iter_lines(path), path):
            yield f"{path}:{lineno}", obj


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = decode_text(path.read_bytes(), path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        for index, obj in enumerate(rows, 1):
            yield f"{path}:row {index}", obj
    else:  # JSON lines saved as .json
        for lineno, obj in json_lines(enumerate(text.splitlines(), 1), path):
            yield f"{path}:{lineno}", obj


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(decode_text(path.read_bytes(), path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (no header line)")
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:  # more values than header columns
            raise DataError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
        yield where, row


def open_parquet(path: Path):
    """A ``pyarrow.parquet.ParquetFile`` (``DataError`` without pyarrow or for an unreadable file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'lmlab[data]')") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    table = open_parquet(path)
    index = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:row {index}", row


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a datasets folder or id needs the datasets package (pip install 'lmlab[data]')"
        ) from None
    return datasets


def _saved_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError … for a broken folder
        raise DataError(f"{path}: not a readable save_to_disk folder ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    for index, row in enumerate(loaded, 1):
        yield f"{path}:row {index}", row


def _loaded_rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    datasets = _datasets()
    try:
        stream = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as err:  # offline and not cached, no such dataset or split …
        raise DataError(
            f"{source}: could not be read with datasets.load_dataset ({str(err).splitlines()[0]})"
        ) from None
    for index, row in enumerate(stream, 1):
        yield f"{source}:row {index}", row
