"""The shard cache: one source (a synthetic world or local files) prepared once and reused.

Shards are cached under ``$LMLAB_CACHE`` (default ``~/.cache/lmlab``) in ``data/<name>-<key>``, where
the key hashes everything the shards depend on (world or file hashes, seeds, tokenizer settings or
hash, split, format version). The tokenizer is loaded (``tokenizer.path``) or trained on the first
``tokenizer.train_docs`` documents. An entry is published by an atomic rename (``prepare_shards``),
so an interrupted preparation leaves no entry that a later run could pick up, and a second run with
the same settings reuses the first's shards. Single runs (``lmlab.data.pipeline``) and mixtures
(``lmlab.data.mixture``) both prepare their sources here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmlab.config import RunConfig
from lmlab.data.prepare import (
    FORMAT_VERSION,
    MANIFEST,
    Document,
    TextSplit,
    expand_paths,
    file_sha256,
    prepare_shards,
    read_documents,
)
from lmlab.data.shards import check_tokenizer, load_manifest
from lmlab.data.synthetic import World, get_world
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError


def cache_root() -> Path:
    """``$LMLAB_CACHE`` or ``~/.cache/lmlab``."""
    env = os.environ.get("LMLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmlab"


def cache_key(parts: dict) -> str:
    """SHA-256 of the canonical JSON of ``parts`` (with the shard format version)."""
    blob = json.dumps({**parts, "format_version": FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def world_documents(world: World, seed: int, n_docs: int | None, subset: str | None = None) -> Iterator[str]:
    """A world's documents, or those of one of its subsets (``documents_for``) when ``subset`` is set."""
    if subset is None:
        return world.documents(seed, n_docs)
    if not hasattr(world, "documents_for"):
        raise DataError(f"world {world.name!r} has no subsets; remove data.synthetic.subset={subset!r}")
    return world.documents_for(subset, seed, n_docs)


def world_records(
    world: World, seed: int, n_docs: int | None, subset: str | None = None
) -> Iterator[tuple[str, float | None]]:
    """``(text, −log p)`` of a world's documents: the −log-probability when the world knows it
    (``documents_with_nll``, e.g. ``zipf_facts``), else None."""
    if subset is None and hasattr(world, "documents_with_nll"):
        return world.documents_with_nll(seed, n_docs)
    return ((text, None) for text in world_documents(world, seed, n_docs, subset))


def _tokenizer_settings(cfg: RunConfig) -> tuple[dict, TextTokenizer | None]:
    """The tokenizer's part of the cache key, and the tokenizer itself when it is loaded from a path."""
    t = cfg.tokenizer
    if t.path:
        tok = TextTokenizer.load(t.path)
        return {"tokenizer_hash": tok.hash}, tok
    settings = {"vocab_size": t.vocab_size, "min_frequency": t.min_frequency, "train_docs": t.train_docs}
    if t.split_digits:  # only when set, so the keys of existing cache entries stay valid
        settings["split_digits"] = True
    return settings, None


def _cached(entry: Path, given: TextTokenizer | None) -> tuple[Path, TextTokenizer] | None:
    """A finished cache entry and its tokenizer, or None when the entry does not exist yet.

    Entries are published whole by a rename, so a directory without a manifest is not ours to
    trust (e.g. a copy interrupted by hand): it is removed and prepared again."""
    if not (entry / MANIFEST).is_file():
        if entry.exists():
            shutil.rmtree(entry)
        return None
    manifest = load_manifest(entry)
    tok = given or TextTokenizer.load(entry / "tokenizer.json")
    check_tokenizer(manifest, tok, entry)
    return entry, tok


def prepare_synthetic(cfg: RunConfig) -> tuple[Path, TextTokenizer]:
    """The cached shards of the run's synthetic world (``data.synthetic``) and their tokenizer."""
    d, s = cfg.data, cfg.data.synthetic
    world = get_world(s.world)
    tok_key, tok = _tokenizer_settings(cfg)
    key = cache_key(
        {
            "source": "synthetic",
            "world": world.name,
            "world_version": getattr(world, "version", 0),  # a world bumps it when its text changes
            "n_docs": s.n_docs,
            "world_seed": s.seed,
            **({"subset": s.subset} if s.subset else {}),
            "split_seed": d.seed,
            "val_fraction": d.val_fraction,
            "tokenizer": tok_key,
        }
    )
    label = f"{world.name}-{s.subset}" if s.subset else world.name
    entry = cache_root() / "data" / f"{label}-{key[:16]}"
    hit = _cached(entry, tok)
    if hit:
        return hit
    if tok is None:
        n_train = min(cfg.tokenizer.train_docs, s.n_docs)
        tok = TextTokenizer.train_bpe(
            world_documents(world, s.seed, n_train, s.subset),
            cfg.tokenizer.vocab_size,
            cfg.tokenizer.min_frequency,
            split_digits=cfg.tokenizer.split_digits,
        )
    source = f"synthetic:{label}"
    docs = (
        Document(text, source, i, nll=nll)
        for i, (text, nll) in enumerate(world_records(world, s.seed, s.n_docs, s.subset))
    )
    prepare_shards(
        docs,
        tok,
        entry,
        val_fraction=d.val_fraction,
        seed=d.seed,
        num_workers=d.num_workers,
        source_hashes={source: None},
        if_exists="keep",
        extra={"synthetic": {"world": world.name, "n_docs": s.n_docs, "seed": s.seed}},
    )
    return _cached(entry, None if cfg.tokenizer.path is None else tok) or (entry, tok)


def prepare_files(cfg: RunConfig) -> tuple[Path, TextTokenizer]:
    """The cached shards of the run's local files (``data.files``) and their tokenizer."""
    d = cfg.data
    files = expand_paths(d.files)
    val_files = expand_paths(d.val_files) if d.val_files else []
    hashes = {str(f): file_sha256(f) for f in [*files, *val_files]}
    tok_key, tok = _tokenizer_settings(cfg)
    parts = {
        "source": "files",
        "files": sorted(hashes.items()),
        "text_field": d.text_field,
        "split_seed": d.seed,
        "val_fraction": d.val_fraction,
        "tokenizer": tok_key,
    }
    if any(f.suffix == ".txt" for f in [*files, *val_files]):
        parts["txt"] = [d.txt_documents, d.txt_separator, d.txt_chunk_chars]
    if val_files:
        parts["val_files"] = [str(f) for f in val_files]
    key = cache_key(parts)
    split = TextSplit(d.txt_documents, d.txt_separator, d.txt_chunk_chars)

    def documents():
        if not val_files:
            return read_documents(files, d.text_field, split)
        train = read_documents(files, d.text_field, split, split="train")
        return itertools.chain(train, read_documents(val_files, d.text_field, split, split="val"))

    entry = cache_root() / "data" / f"files-{key[:16]}"
    hit = _cached(entry, tok)
    if hit:
        return hit
    if tok is None:
        texts = (
            doc.text for doc in itertools.islice(read_documents(files, d.text_field, split), cfg.tokenizer.train_docs)
        )
        tok = TextTokenizer.train_bpe(
            texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, split_digits=cfg.tokenizer.split_digits
        )
    prepare_shards(
        documents(),
        tok,
        entry,
        val_fraction=0.0 if val_files else d.val_fraction,
        seed=d.seed,
        num_workers=d.num_workers,
        source_hashes=hashes,
        if_exists="keep",
    )
    return _cached(entry, None if cfg.tokenizer.path is None else tok) or (entry, tok)
