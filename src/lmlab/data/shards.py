"""Reading prepared data directories (written by ``lmlab.data.prepare``).

``TokenShards`` memory-maps a split's ``.bin`` shards and presents them as one flat token array:
``read(start, length)`` may cross shard boundaries. ``check_tokenizer`` refuses to train on
shards tokenized with a different vocabulary (compared by ``TextTokenizer.hash``).

Opening a split checks every shard once per process (``verify_shard``): its size, that no token
id reaches the manifest's ``vocab_size`` (an out-of-range id would index past the embedding table),
and, when the manifest records them (manifests written before did not), its SHA-256 and largest
token id. One pass over the file in ``VERIFY_CHUNK_BYTES`` chunks computes both.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmlab.data.prepare import FORMAT_VERSION, MANIFEST
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError

_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "eos_id", "tokenizer_hash", "splits")
_DTYPES = ("uint16", "uint32")
VERIFY_CHUNK_BYTES = 16 * 2**20
_BROKEN = "the shard is corrupted or from another tokenizer; prepare the data again"
_verified: set[tuple] = set()  # shards already checked in this process, keyed by file identity and manifest entry


def load_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory; a missing, corrupt or newer-format one is a ``DataError``."""
    d = Path(directory)
    path = d / MANIFEST
    if not d.is_dir():
        raise DataError(f"prepared data directory not found: {d}")
    if not path.is_file():
        raise DataError(f"{d} is not a prepared data directory: {MANIFEST} is missing (run 'lmlab data prepare')")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED_KEYS):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
        raise DataError(f"{path}: corrupt manifest (missing {', '.join(missing)})")
    if manifest["format_version"] > FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {manifest['format_version']} is newer than this lmlab reads ({FORMAT_VERSION})"
        )
    return manifest


def check_tokenizer(manifest: dict, tokenizer: TextTokenizer, directory: str | Path = "") -> None:
    """``DataError`` unless ``tokenizer`` is the one the shards were tokenized with."""
    want = manifest["tokenizer_hash"]
    if tokenizer.hash != want:
        where = f" in {directory}" if directory else ""
        raise DataError(
            f"shards{where} were tokenized with tokenizer {want[:8]}, but the run uses {tokenizer.hash[:8]}"
        )


def _scan(path: Path, dtype: np.dtype, vocab_size: int) -> tuple[str, int]:
    """SHA-256 and largest token id of the shard ``path``; an id >= ``vocab_size`` is a ``DataError``."""
    sha, largest, offset = hashlib.sha256(), 0, 0
    buffer = bytearray(VERIFY_CHUNK_BYTES - VERIFY_CHUNK_BYTES % dtype.itemsize)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            chunk = np.frombuffer(buffer, dtype=dtype, count=n // dtype.itemsize)
            sha.update(memoryview(buffer)[:n])
            top = int(chunk.max())
            if top >= vocab_size:
                pos = int(np.argmax(chunk >= vocab_size))
                raise DataError(
                    f"{path}: token id {int(chunk[pos])} at position {offset + pos} is >= the vocabulary size "
                    f"{vocab_size}; {_BROKEN}"
                )
            largest, offset = max(largest, top), offset + len(chunk)
    return sha.hexdigest(), largest


def verify_shard(path: Path, shard: dict, dtype: np.dtype, vocab_size: int) -> None:
    """``DataError`` unless the shard has the manifest's size, only ids below ``vocab_size``, and the
    recorded SHA-256 and largest id (when there are any); each file is checked once per process."""
    st = path.stat()
    expected = shard["tokens"] * dtype.itemsize
    if st.st_size != expected:
        raise DataError(f"{path}: {st.st_size} bytes, the manifest says {shard['tokens']} tokens ({expected} bytes)")
    recorded_max, recorded_sha = shard.get("max_token_id"), shard.get("sha256")
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, recorded_sha, recorded_max)
    if key in _verified:
        return
    if recorded_max is not None and recorded_max >= vocab_size:
        raise DataError(
            f"{path}: the manifest says its largest token id is {recorded_max}, >= the vocabulary size "
            f"{vocab_size}; {_BROKEN}"
        )
    sha, largest = _scan(path, dtype, vocab_size)
    if recorded_sha is not None and sha != recorded_sha:
        raise DataError(
            f"{path}: SHA-256 {sha[:12]} differs from the manifest's {recorded_sha[:12]}; the shard was changed "
            "after it was written; prepare the data again"
        )
    if recorded_max is not None and largest != recorded_max:
        raise DataError(f"{path}: largest token id {largest} differs from the manifest's {recorded_max}; {_BROKEN}")
    _verified.add(key)


class TokenShards:
    """One split of a prepared directory as a flat, read-only token sequence."""

    def __init__(self, directory: Path, split: str, manifest: dict, arrays: list[np.memmap]):
        self.directory = directory
        self.split = split
        self.manifest = manifest
        self._arrays = arrays
        sizes = np.array([len(a) for a in arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k covers [starts[k], starts[k+1])
        self._len = int(self._starts[-1])

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> TokenShards:
        d = Path(directory)
        manifest = load_manifest(d)
        info = manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{d}: no split {split!r} (splits: {', '.join(manifest['splits'])})")
        if manifest["dtype"] not in _DTYPES:
            raise DataError(f"{d / MANIFEST}: dtype {manifest['dtype']!r} is not one of {', '.join(_DTYPES)}")
        dtype = np.dtype(manifest["dtype"])
        arrays = []
        for shard in info["shards"]:
            if Path(shard["file"]).name != shard["file"] or shard["file"] in ("", ".", ".."):
                raise DataError(f"{d / MANIFEST}: shard name {shard['file']!r} is not a file name in {d}")
            path = d / shard["file"]
            if not path.is_file():
                raise DataError(f"{d}: shard {shard['file']} is missing")
            verify_shard(path, shard, dtype, int(manifest["vocab_size"]))
            if shard["tokens"]:
                arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        if not arrays:
            raise DataError(f"{d}: the {split} split has no tokens")
        return cls(d, split, manifest, arrays)

    def __len__(self) -> int:
        return self._len

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start+length)`` as int64, across shard boundaries."""
        if start < 0 or length < 0 or start + length > self._len:
            raise IndexError(f"read({start}, {length}) is outside [0, {self._len}) of {self.directory}/{self.split}")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            local = start + pos - int(self._starts[k])
            take = min(len(self._arrays[k]) - local, length - pos)
            out[pos : pos + take] = self._arrays[k][local : local + take]
            pos += take
            k += 1
        return out
