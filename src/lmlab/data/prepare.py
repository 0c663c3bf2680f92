"""Tokenize documents into flat memmap shards with a manifest.

Reading (``read_documents``) streams documents from ``.txt``, ``.jsonl`` (one JSON object per line) and
``.parquet`` files. A ``.txt`` file is cut into documents per ``TextSplit``: at blank lines (``paragraphs``, the
default: one file may hold a whole corpus, and the validation split then samples the whole of it rather than
holding out whole files), at a separator line, into chunks of about N characters (cut at a line break), or kept
whole (``file``); every malformed input, bytes that are not UTF-8
included, is a ``DataError`` naming the file (and line). Writing (``prepare_shards``) tokenizes in a
process pool over chunks of documents (results are consumed in order, so the output is identical for
any ``num_workers``; a very long document is encoded in exact pieces, see ``lmlab.data.tokenizer``),
appends EOS after every document, routes each document to ``train`` or ``val`` by a hash of
``(seed, document index)`` (stable when the corpus grows), and writes ``train_NNNN.bin`` /
``val_NNNN.bin`` (uint16 when the vocabulary fits, else uint32), ``tokenizer.json`` and
``manifest.json`` into a temporary directory that is renamed into place, so a half-written
directory is never visible under the final name; the temporary directories of killed runs are
removed when the next preparation starts (``lmlab.data.tempdirs``). Each shard's entry records its
SHA-256 and largest token id, which ``TokenShards.open`` checks.

The manifest records the train split's unigram entropy H = -Σ_v p(v) log p(v) (nats/token), the
loss of the best model that ignores context; a trained model's validation loss is compared to it. When every
document of a split carries its −log-probability under its generator (``Document.nll``; the ``zipf_facts``
world), the split also records ``entropy_floor`` = Σ nll / Σ tokens, the Bayes-optimal loss, and the
validation documents' values are saved in ``val_doc_nll.npy`` (``lmlab.eval.perplexity`` uses them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmlab.data import tempdirs
from lmlab.data.rows import is_saved_dataset, open_parquet, read_rows, source_exists, source_sha256
from lmlab.data.textio import iter_lines, json_lines, read_text
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 64 * 2**20
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
MANIFEST = "manifest.json"
VAL_DOC_NLL = "val_doc_nll.npy"  # per validation document −log p, when the generator knows it
IfExists = Literal["refuse", "replace", "keep"]


TxtDocuments = Literal["paragraphs", "separator", "chunks", "file"]


@dataclass(frozen=True)
class TextSplit:
    """How a ``.txt`` file becomes documents (module docstring); ``line`` of a document is where it starts."""

    mode: TxtDocuments = "paragraphs"
    separator: str = ""  # ``separator``: a line equal to this (stripped) ends a document
    chunk_chars: int = 4096  # ``chunks``: documents of about this many characters, cut at a line break

    def documents(self, text: str) -> Iterator[tuple[int, str]]:
        """``(first line, text)`` of each non-blank document of ``text``."""
        if self.mode == "file":
            if text.strip():
                yield 1, text
            return
        start, piece, size = 1, [], 0
        for number, line in enumerate(text.splitlines(keepends=True), 1):
            ends_here = (self.mode == "paragraphs" and not line.strip()) or (
                self.mode == "separator" and line.strip() == self.separator
            )
            if ends_here or (self.mode == "chunks" and piece and size + len(line) > self.chunk_chars):
                yield from _document(start, piece)
                piece, size = [], 0
                if ends_here:
                    continue
            if not piece:
                start = number
            piece.append(line)
            size += len(line)
        yield from _document(start, piece)


def _document(start: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    text = "".join(lines).strip("\n")
    if text.strip():
        yield start, text


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (``line`` is 1-based for JSONL, the row for parquet)."""

    text: str
    source: str
    line: int | None = None
    split: Literal["train", "val"] | None = None  # forced (a validation file), else by hash of the index
    nll: float | None = None  # −log p(document) in nats under its generator (a synthetic world that knows it)


# --------------------------------------------------------------------------- reading


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Sources to read, in order: a file as given, a ``save_to_disk`` folder or a datasets id (``org/name``) as
    one source, another directory as its supported files (recursive, sorted)."""
    out: list[Path] = []
    given = [Path(p) for p in paths]
    if not given:
        raise DataError("no data files given")
    for p in given:
        if is_saved_dataset(p):  # a datasets save_to_disk folder is one source
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"directory {p} has no {'/'.join(SUPPORTED_SUFFIXES)} files")
            out.extend(found)
        elif p.is_file():
            if p.suffix not in SUPPORTED_SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})")
            out.append(p)
        elif source_exists(p):  # a datasets id (org/name), streamed by datasets.load_dataset
            out.append(p)
        else:
            raise DataError(f"data file not found: {p}")
    return out


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a source: a file's bytes, a folder's files, a datasets id's name (``rows.source_sha256``)."""
    return source_sha256(path)


def read_documents(
    paths: Iterable[str | Path],
    text_field: str = "text",
    txt: TextSplit | None = None,
    split: Literal["train", "val"] | None = None,
) -> Iterator[Document]:
    """Stream the documents of ``paths`` (``.txt`` files cut per ``txt``; every document put in ``split`` when
    given). Paths are checked now; file contents as they are read."""
    files = expand_paths(paths)
    cutter = txt or TextSplit()

    def generate() -> Iterator[Document]:
        for f in files:
            n = 0
            if f.suffix == ".txt":
                docs = _read_txt(f, cutter)
            elif f.suffix in (".jsonl", ".parquet"):
                docs = {".jsonl": _read_jsonl, ".parquet": _read_parquet}[f.suffix](f, text_field)
            else:  # .json, .csv, a save_to_disk folder
                docs = _read_rows(f, text_field)
            for doc in docs:
                n += 1
                yield doc if split is None else dataclasses.replace(doc, split=split)
            if n == 0:
                raise DataError(f"{f}: empty file (no documents)")

    return generate()


def _read_txt(path: Path, split: TextSplit) -> Iterator[Document]:
    for line, text in split.documents(read_text(path)):
        yield Document(text, str(path), line if split.mode != "file" else None)


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    for lineno, obj in json_lines(iter_lines(path), path):
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(map(str, obj)) or "none"
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (keys present: {keys})")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
        yield Document(text, str(path), lineno)


def _read_rows(path: Path, text_field: str) -> Iterator[Document]:
    for index, (where, row) in enumerate(read_rows(path), 1):
        if text_field not in row:
            raise DataError(f"{where}: no field {text_field!r} (fields present: {', '.join(map(str, row)) or 'none'})")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        yield Document(text, str(path), index)


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns present: {', '.join(names) or 'none'})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column {text_field!r} must hold strings")
            yield Document(text, str(path), row)


# --------------------------------------------------------------------------- splitting and statistics


def is_val_doc(seed: int, index: int, val_fraction: float) -> bool:
    """True when document ``index`` belongs to the validation split: u(seed, index) < val_fraction,
    with u uniform in [0, 1) from a BLAKE2b hash (independent of the corpus size and of other docs)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def unigram_entropy(counts: np.ndarray) -> float:
    """-Σ p log p in nats over the token frequencies ``counts`` (0 for an empty count)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].astype(np.float64) / float(total)
    return float(-(p * np.log(p)).sum())


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to ``{split}_{k:04d}.bin`` files of at most ``shard_tokens`` tokens, keeping
    each shard's SHA-256 and largest token id for the manifest."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, vocab_size: int):
        self.dir, self.split, self.dtype, self.cap = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.documents = 0
        self._fh = None
        self._sha = hashlib.sha256()
        self._in_shard = 0
        self._pending: list[np.ndarray] = []  # tokens not yet in ``counts`` (counted in batches)
        self._pending_len = 0
        self.doc_nll: list[float] | None = []  # each document's −log p while every one has it, else None

    def _count(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.concatenate(self._pending), minlength=len(self.counts))
            self._pending, self._pending_len = [], 0

    def write(self, tokens: np.ndarray, nll: float | None = None) -> None:
        self.documents += 1
        if nll is None:
            self.doc_nll = None
        elif self.doc_nll is not None:
            self.doc_nll.append(float(nll))
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        if self._pending_len >= 1 << 20:
            self._count()
        pos = 0
        while pos < len(tokens):
            if self._fh is None or self._in_shard == self.cap:
                self._open_next()
            take = min(self.cap - self._in_shard, len(tokens) - pos)
            piece = tokens[pos : pos + take].astype(self.dtype)
            piece.tofile(self._fh)
            self._sha.update(piece)
            self._in_shard += take
            shard = self.shards[-1]
            shard["tokens"] += take
            shard["max_token_id"] = max(shard["max_token_id"], int(piece.max()))
            pos += take

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._fh = open(self.dir / name, "wb")
        self._sha = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": "", "max_token_id": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self.shards[-1]["sha256"] = self._sha.hexdigest()

    def summary(self) -> dict:
        self._count()
        tokens = int(sum(s["tokens"] for s in self.shards))
        out = {
            "shards": self.shards,
            "tokens": tokens,
            "documents": self.documents,
            "unigram_entropy": unigram_entropy(self.counts),
        }
        if self.doc_nll and tokens:
            # The Bayes-optimal model's loss on this split's documents, each seen from its start (EOS included).
            out["entropy_floor"] = math.fsum(self.doc_nll) / tokens
        return out


# --------------------------------------------------------------------------- tokenizing in a pool

_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = TextTokenizer(Tokenizer.from_str(tokenizer_json), source="<worker>")


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_batch(texts)


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def _serial_tokenizers_in_children() -> Iterator[None]:
    """Start workers with ``TOKENIZERS_PARALLELISM=false`` (one process per core is our parallelism, and
    it silences the library's fork warning); the parent's setting is restored once they have started."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _encoded(
    docs: Iterable[Document], tokenizer: TextTokenizer, num_workers: int, chunk_docs: int
) -> Iterator[tuple[Document, list[int]]]:
    """(document, ids) in input order. With workers, a bounded window of chunks is in flight at a time."""
    chunks = _chunks(docs, chunk_docs)
    if num_workers <= 1:
        for chunk in chunks:
            yield from zip(chunk, tokenizer.encode_batch([d.text for d in chunk]))
        return
    # fork: workers start fast and need no importable __main__; they only run the Rust tokenizer on a
    # fresh Tokenizer object (tokenizers turns its own thread pool off in forked children).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _serial_tokenizers_in_children():
        pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer.to_json(),))
    with pool:
        while True:
            window = [c for _, c in zip(range(2 * num_workers), chunks)]
            if not window:
                break
            results = pool.map(_encode_chunk, [[d.text for d in c] for c in window], chunksize=1)
            for chunk, ids in zip(window, results):
                yield from zip(chunk, ids)


# --------------------------------------------------------------------------- writing


def prepare_shards(
    documents: Iterable[Document],
    tokenizer: TextTokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int = 1,
    chunk_docs: int = 256,
    source_hashes: dict[str, str | None] | None = None,
    if_exists: IfExists = "refuse",
    extra: dict | None = None,
) -> dict:
    """Tokenize ``documents`` into ``out_dir`` and return the manifest (see the module docstring).

    ``source_hashes`` maps a document's ``source`` to the SHA-256 of its file (None for generated
    text). ``if_exists`` says what happens to an ``out_dir`` that already holds prepared data: a
    ``DataError`` before any work (``refuse``), an atomic replacement (``replace``), or, for caches
    where another process may finish the same entry first, the existing one is kept and its
    manifest returned (``keep``). ``extra`` is stored in the manifest as is.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens} must be > 0")
    out = Path(out_dir)
    _check_target(out, if_exists)
    out.parent.mkdir(parents=True, exist_ok=True)
    tempdirs.remove_stale(out.parent)
    tmp = tempdirs.work_dir(out)
    tmp.mkdir()
    try:
        manifest = _write(
            documents, tokenizer, tmp, val_fraction, seed, shard_tokens, num_workers, chunk_docs, source_hashes
        )
        manifest.update(extra or {})
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return _publish(tmp, out, if_exists) or manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write(
    documents: Iterable[Document],
    tokenizer: TextTokenizer,
    tmp: Path,
    val_fraction: float,
    seed: int,
    shard_tokens: int,
    num_workers: int,
    chunk_docs: int,
    source_hashes: dict[str, str | None] | None,
) -> dict:
    vocab = tokenizer.vocab_size
    dtype = token_dtype(vocab)
    eos = tokenizer.eos_id
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens, vocab) for s in ("train", "val")}
    sources: dict[str, dict] = {}
    held: tuple[np.ndarray, float | None] | None = None  # the latest train document, written one step late
    n_docs = 0
    for index, (doc, ids) in enumerate(_encoded(documents, tokenizer, num_workers, chunk_docs)):
        n_docs += 1
        tokens = np.empty(len(ids) + 1, dtype=np.int64)
        tokens[:-1] = ids
        tokens[-1] = eos
        src = sources.setdefault(doc.source, {"path": doc.source, "documents": 0, "tokens": 0})
        src["documents"] += 1
        src["tokens"] += len(tokens)
        if doc.split == "val" or (doc.split is None and is_val_doc(seed, index, val_fraction)):
            writers["val"].write(tokens, doc.nll)
        else:
            if held is not None:
                writers["train"].write(*held)
            held = (tokens, doc.nll)
    if n_docs == 0:
        raise DataError("no documents to prepare (the input is empty)")
    # At least one validation document when one is asked for: the last train document moves to val.
    if val_fraction > 0 and writers["val"].documents == 0:
        if writers["train"].documents == 0:
            raise DataError(
                f"only {n_docs} document(s): need at least 2 to make train and val splits (a .txt file is cut at "
                "blank lines by default; data.txt_documents=chunks cuts one without them)"
            )
        writers["val"].write(*held)
    elif held is not None:
        writers["train"].write(*held)
    for w in writers.values():
        w.close()
    if writers["train"].documents == 0:
        raise DataError(f"all {n_docs} documents went to the validation split; lower val_fraction")
    splits = {s: w.summary() for s, w in writers.items()}
    if "entropy_floor" in splits["val"]:  # per-document values, for the loss floor of any evaluation window
        np.save(tmp / VAL_DOC_NLL, np.asarray(writers["val"].doc_nll, dtype=np.float64))
    for src in sources.values():
        src["sha256"] = (source_hashes or {}).get(src["path"])
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_id": eos,
        "bos_id": tokenizer.bos_id,
        "tokenizer_hash": tokenizer.hash,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "sources": list(sources.values()),
        "splits": splits,
        "unigram_entropy": splits["train"]["unigram_entropy"],
    }


def _already_prepared(out: Path) -> DataError:
    return DataError(
        f"refusing to replace {out}: it already holds prepared data ({MANIFEST}); "
        "pass --overwrite to replace it, or choose another output directory"
    )


def _check_target(out: Path, if_exists: IfExists) -> None:
    """Refuse, before any work, an output that is a file, a directory of other files, under a file, or
    (``if_exists="refuse"``) already prepared."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"cannot create {out}: {blocking} is a file, not a directory")
    if not out.exists():
        return
    if (out / MANIFEST).is_file():
        if if_exists == "refuse":
            raise _already_prepared(out)
    elif not out.is_dir() or any(out.iterdir()):
        raise DataError(f"refusing to write into {out}: it exists and is not a prepared data directory")


def _publish(tmp: Path, out: Path, if_exists: IfExists) -> dict | None:
    """Rename ``tmp`` to ``out``. Returns the manifest kept instead when ``out`` was already prepared."""
    if out.is_dir() and (out / MANIFEST).is_file():
        if if_exists == "keep":
            return json.loads((out / MANIFEST).read_text())
        if if_exists == "refuse":  # another process published it while we were writing
            raise _already_prepared(out)
        old = tempdirs.work_dir(out, "old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return None
    if out.is_dir():
        out.rmdir()  # empty (checked by _check_target)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / MANIFEST).is_file():
            raise
        if if_exists == "refuse":  # another process published first
            raise _already_prepared(out) from None
        return _publish(tmp, out, if_exists)
    return None
