"""``prepare_run_data``: synthetic / files / prepared sources, the cache and the tokenizer checks."""

from __future__ import annotations

import json
import os

import pytest

from lmlab.config import load_config
from lmlab.data import cache, pipeline
from lmlab.data.prepare import prepare_shards, read_documents
from lmlab.data.shards import TokenShards
from lmlab.errors import ConfigError, DataError

TINY = ["data.synthetic.n_docs=60", "tokenizer.vocab_size=300", "tokenizer.train_docs=30", "data.num_workers=1"]


def _cfg(*overrides):
    return load_config(None, [*TINY, *overrides])


def test_synthetic_prepares_caches_and_reuses(tmp_path, monkeypatch):
    data_dir, tok = pipeline.prepare_run_data(_cfg(), tmp_path / "run1")
    assert data_dir.parent == tmp_path / "cache" / "data" and data_dir.name.startswith("stories-")
    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["tokenizer_hash"] == tok.hash and tok.vocab_size == 300
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 60
    assert m["synthetic"] == {"world": "stories", "n_docs": 60, "seed": 0}
    assert (tmp_path / "run1" / "tokenizer.json").read_text() == (data_dir / "tokenizer.json").read_text()
    assert len(TokenShards.open(data_dir, "val")) > 0

    mtime = os.stat(data_dir / "train_0000.bin").st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(cache, "prepare_shards", boom)
    monkeypatch.setattr(cache.TextTokenizer, "train_bpe", boom)
    again, tok2 = pipeline.prepare_run_data(_cfg(), tmp_path / "run2")
    assert again == data_dir and tok2.hash == tok.hash
    assert os.stat(data_dir / "train_0000.bin").st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="not reused"):  # other settings, other entry
        pipeline.prepare_run_data(_cfg("data.synthetic.seed=1"), tmp_path / "run3")


def test_cache_key_covers_the_settings():
    base = {"world": "stories", "n_docs": 10, "tokenizer": {"vocab_size": 300}}
    assert cache.cache_key(base) == cache.cache_key(dict(reversed(list(base.items()))))
    assert cache.cache_key(base) != cache.cache_key({**base, "n_docs": 11})
    assert cache.cache_key(base) != cache.cache_key({**base, "tokenizer": {"vocab_size": 301}})


def test_half_written_cache_entry_is_never_used(tmp_path, monkeypatch):
    calls = []
    real = cache.prepare_shards

    def interrupted(docs, tok, out, **kw):
        calls.append(out)

        # a crash mid-way leaves only the temporary directory behind
        def failing():
            yield from list(docs)[:5]
            raise KeyboardInterrupt

        real(failing(), tok, out, **kw)

    monkeypatch.setattr(cache, "prepare_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare_run_data(_cfg(), tmp_path / "run")
    assert not calls[0].exists()
    calls[0].mkdir(parents=True)  # a directory without a manifest under the entry's name is not trusted
    (calls[0] / "train_0000.bin").write_bytes(b"junk")
    monkeypatch.setattr(cache, "prepare_shards", real)
    data_dir, _ = pipeline.prepare_run_data(_cfg(), tmp_path / "run")
    assert data_dir == calls[0]
    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 60


def test_given_tokenizer_path(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok" / "tokenizer.json")
    data_dir, tok = pipeline.prepare_run_data(_cfg(f"tokenizer.path={path}"), tmp_path / "run")
    assert tok.hash == bpe.hash == json.loads((data_dir / "manifest.json").read_text())["tokenizer_hash"]


def test_files_source(tmp_path, story_docs):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in story_docs[:30]))
    cfg = _cfg("data.source=files", f"data.files=[{src}]", "data.text_field=body", "data.val_fraction=0.1")
    data_dir, tok = pipeline.prepare_run_data(cfg, tmp_path / "run")
    m = json.loads((data_dir / "manifest.json").read_text())
    assert data_dir.name.startswith("files-") and m["sources"][0]["path"] == str(src)
    assert len(m["sources"][0]["sha256"]) == 64 and m["sources"][0]["documents"] == 30
    assert pipeline.prepare_run_data(cfg, tmp_path / "run")[0] == data_dir  # cached
    src.write_text(src.read_text() + json.dumps({"body": "one more story"}) + "\n")
    assert pipeline.prepare_run_data(cfg, tmp_path / "run")[0] != data_dir  # new file hash, new entry
    missing = _cfg("data.source=files", f"data.files=[{tmp_path / 'nope.txt'}]")
    with pytest.raises(DataError, match="data file not found"):
        pipeline.prepare_run_data(missing, tmp_path / "run")


def test_prepared_source_and_tokenizer_mismatch(bpe, abc, tmp_path):
    prepared = tmp_path / "prepared"
    prepare_shards(read_documents_from(tmp_path), bpe, prepared, val_fraction=0.0)
    data_dir, tok = pipeline.prepare_run_data(
        _cfg("data.source=prepared", f"data.prepared_dir={prepared}"), tmp_path / "run"
    )
    assert data_dir == prepared and tok.hash == bpe.hash
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    other = abc.save(tmp_path / "other")
    cfg = _cfg("data.source=prepared", f"data.prepared_dir={prepared}", f"tokenizer.path={other}")
    with pytest.raises(DataError, match=f"shards in {prepared} were tokenized with tokenizer {bpe.hash[:8]}"):
        pipeline.prepare_run_data(cfg, tmp_path / "run")
    cfg = _cfg("data.source=prepared", f"data.prepared_dir={tmp_path / 'nothing'}")
    with pytest.raises(DataError, match="prepared data directory not found"):
        pipeline.prepare_run_data(cfg, tmp_path / "run")


def read_documents_from(tmp_path):
    (tmp_path / "a.txt").write_text("The red kite.")
    (tmp_path / "b.txt").write_text("The blue ball.")
    return read_documents([tmp_path / "a.txt", tmp_path / "b.txt"])


def test_unknown_world_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="registered worlds: .*stories"):
        pipeline.prepare_run_data(_cfg("data.synthetic.world=nope"), tmp_path / "run")
