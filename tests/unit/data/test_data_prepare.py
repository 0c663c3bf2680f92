"""Reading documents, writing shards and the manifest, and reading shards back."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from lmlab.data.prepare import (
    Document,
    is_val_doc,
    prepare_shards,
    read_documents,
    token_dtype,
    unigram_entropy,
)
from lmlab.data.shards import TokenShards, check_tokenizer, load_manifest
from lmlab.errors import DataError

# ----------------------------------------------------------------------------- reading


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_txt_jsonl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("one whole file\nwith two lines")
    _jsonl(tmp_path / "b.jsonl", [{"text": "first", "id": 1}, {"text": "second"}])
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    docs = list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert [d.text for d in docs] == ["one whole file\nwith two lines", "first", "second"]
    assert docs[2].line == 2 and docs[2].source == str(tmp_path / "b.jsonl")
    docs = list(read_documents([tmp_path / "c.parquet"], text_field="body"))
    assert [d.text for d in docs] == ["p1", "p2", "p3"]
    with pytest.raises(DataError, match=r"c.parquet: no column 'text' \(columns present: body, n\)"):
        list(read_documents([tmp_path / "c.parquet"]))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet: empty file"):
        list(read_documents([tmp_path / "empty.parquet"]))


def test_directory_expands_to_supported_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "2.txt").write_text("two")
    (tmp_path / "d" / "1.txt").write_text("one")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert [d.text for d in read_documents([tmp_path / "d"])] == ["one", "two"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.md").write_text("a,b")
    with pytest.raises(DataError, match="directory .*e has no .txt/.jsonl/.json/.csv/.parquet files"):
        read_documents([tmp_path / "e"])


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        read_documents([tmp_path / "missing.jsonl"])  # checked eagerly, before iterating
    (tmp_path / "x.md").write_text("a")
    with pytest.raises(DataError, match=r"x.md: unsupported file type '.md'"):
        read_documents([tmp_path / "x.md"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        list(read_documents([tmp_path / "empty.txt"]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        list(read_documents([tmp_path / "empty.jsonl"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        list(read_documents([bad]))
    nofield = _jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x", "id": 2}])
    with pytest.raises(DataError, match=r"nofield.jsonl:2: no field 'text' \(keys present: body, id\)"):
        list(read_documents([nofield]))
    notstr = _jsonl(tmp_path / "notstr.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"notstr.jsonl:1: field 'text' must be a string"):
        list(read_documents([notstr]))


# ----------------------------------------------------------------------------- writing


def _docs(texts):
    return [Document(t, "mem", i) for i, t in enumerate(texts)]


def test_hand_computed_manifest_and_eos_placement(abc, tmp_path):
    out = tmp_path / "prep"
    m = prepare_shards(_docs(["a a b", "a", "c b"]), abc, out, val_fraction=0.0)
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["eos_id"] == 0 and m["vocab_size"] == 4
    assert m["tokenizer_hash"] == abc.hash
    train = TokenShards.open(out, "train")
    assert train.read(0, len(train)).tolist() == [1, 1, 2, 0, 1, 0, 3, 2, 0]
    assert train.read(0, 3).dtype == np.int64
    # counts: eos 3, a 3, b 2, c 1 over 9 tokens
    p = np.array([3, 3, 2, 1]) / 9
    assert m["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    # = (2/3) ln 3 + (2/9) ln 4.5 + (1/9) ln 9
    assert m["unigram_entropy"] == pytest.approx(1.3107837, abs=1e-6)
    sha = hashlib.sha256(np.array([1, 1, 2, 0, 1, 0, 3, 2, 0], dtype=np.uint16).tobytes()).hexdigest()
    assert m["splits"]["train"] == {
        "shards": [{"file": "train_0000.bin", "tokens": 9, "sha256": sha, "max_token_id": 3}],
        "tokens": 9,
        "documents": 3,
        "unigram_entropy": m["unigram_entropy"],
    }
    assert m["splits"]["val"]["tokens"] == 0 and m["splits"]["val"]["documents"] == 0
    assert m["sources"] == [{"path": "mem", "documents": 3, "tokens": 9, "sha256": None}]
    assert TextTokenizerHash(out) == abc.hash
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left
    with pytest.raises(DataError, match="val split has no tokens"):
        TokenShards.open(out, "val")


def TextTokenizerHash(directory):  # noqa: N802 - reads like a value
    from lmlab.data.tokenizer import TextTokenizer

    return TextTokenizer.load(directory / "tokenizer.json").hash


def test_round_trip_across_shard_boundaries(bpe, story_docs, tmp_path):
    out = tmp_path / "prep"
    m = prepare_shards(_docs(story_docs[:40]), bpe, out, val_fraction=0.2, shard_tokens=257, seed=1)
    expected = {"train": [], "val": []}
    for i, text in enumerate(story_docs[:40]):
        split = "val" if is_val_doc(1, i, 0.2) else "train"
        expected[split] += bpe.encode(text) + [bpe.eos_id]
    for split in ("train", "val"):
        shards = TokenShards.open(out, split)
        info = m["splits"][split]
        assert len(shards) == info["tokens"] == len(expected[split])
        assert len(info["shards"]) == math.ceil(info["tokens"] / 257)
        assert all(s["tokens"] == 257 for s in info["shards"][:-1])
        assert shards.read(0, len(shards)).tolist() == expected[split]
        # a window spanning three shards
        assert shards.read(200, 400).tolist() == expected[split][200:600]
        assert shards.read(len(shards), 0).tolist() == []
    with pytest.raises(IndexError):
        TokenShards.open(out, "train").read(len(shards) * 100, 1)
    # the documents partition: tokens per source add up, EOS count = documents
    assert sum(m["splits"][s]["tokens"] for s in ("train", "val")) == m["sources"][0]["tokens"]
    eos_total = sum(expected[s].count(bpe.eos_id) for s in expected)
    assert eos_total == 40 == m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]


def test_parallel_workers_give_identical_shards(bpe, story_docs, tmp_path):
    a = prepare_shards(_docs(story_docs[:60]), bpe, tmp_path / "a", val_fraction=0.1, chunk_docs=7)
    b = prepare_shards(_docs(story_docs[:60]), bpe, tmp_path / "b", val_fraction=0.1, num_workers=2, chunk_docs=7)
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        ta, tb = TokenShards.open(tmp_path / "a", split), TokenShards.open(tmp_path / "b", split)
        assert np.array_equal(ta.read(0, len(ta)), tb.read(0, len(tb)))


def test_deterministic_split_and_at_least_one_val_doc(abc, tmp_path):
    flags = [is_val_doc(0, i, 0.3) for i in range(2000)]
    assert flags == [is_val_doc(0, i, 0.3) for i in range(2000)]
    assert flags != [is_val_doc(1, i, 0.3) for i in range(2000)]
    assert 0.25 < sum(flags) / 2000 < 0.35
    assert not any(is_val_doc(0, i, 0.0) for i in range(100))
    # a tiny fraction on a tiny corpus would give no val document: the last train document moves there
    docs = _docs(["a", "b", "c", "a b"])
    assert not any(is_val_doc(0, i, 1e-9) for i in range(4))
    m = prepare_shards(docs, abc, tmp_path / "p", val_fraction=1e-9)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 3
    assert TokenShards.open(tmp_path / "p", "val").read(0, 3).tolist() == [1, 2, 0]
    with pytest.raises(DataError, match="need at least 2"):
        prepare_shards(_docs(["a"]), abc, tmp_path / "q", val_fraction=1e-9)
    with pytest.raises(DataError, match="no documents"):
        prepare_shards([], abc, tmp_path / "r")


def test_dtype_choice(word_level, tmp_path):
    assert token_dtype(300) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    big = word_level([f"w{i}" for i in range(70000)])
    m = prepare_shards(_docs(["w0 w69999", "w5"]), big, tmp_path / "big", val_fraction=0.0)
    assert m["dtype"] == "uint32"
    assert (tmp_path / "big" / "train_0000.bin").stat().st_size == 5 * 4
    assert TokenShards.open(tmp_path / "big").read(0, 5).tolist() == [1, 70000, 0, 6, 0]


def test_unigram_entropy_edge_cases():
    assert unigram_entropy(np.zeros(5, dtype=np.int64)) == 0.0
    assert unigram_entropy(np.array([7, 0, 0])) == 0.0
    assert unigram_entropy(np.array([1, 1, 1, 1])) == pytest.approx(math.log(4))


def test_output_dir_rules(abc, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="refusing to write into .*busy"):
        prepare_shards(_docs(["a", "b"]), abc, tmp_path / "busy", val_fraction=0.0)
    assert (tmp_path / "busy" / "keep.txt").exists()
    prepare_shards(_docs(["a", "b"]), abc, tmp_path / "p", val_fraction=0.0)
    with pytest.raises(DataError, match="refusing to replace .*p: it already holds prepared data.*--overwrite"):
        prepare_shards(_docs(["c c c"]), abc, tmp_path / "p", val_fraction=0.0)  # refused by default
    assert len(TokenShards.open(tmp_path / "p")) == 4
    m = prepare_shards(_docs(["c c c"]), abc, tmp_path / "p", val_fraction=0.0, if_exists="replace")
    assert m["splits"]["train"]["tokens"] == 4 == len(TokenShards.open(tmp_path / "p"))
    assert TokenShards.open(tmp_path / "p").read(0, 4).tolist() == [3, 3, 3, 0]
    kept = prepare_shards(_docs(["a"]), abc, tmp_path / "p", val_fraction=0.0, if_exists="keep")
    assert kept["splits"]["train"]["tokens"] == 4  # not overwritten: the existing manifest comes back
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work or old directory left
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot create .*file/sub: .*file is a file"):
        prepare_shards(_docs(["a"]), abc, tmp_path / "file" / "sub", val_fraction=0.0)


# ----------------------------------------------------------------------------- reading shards back


def test_manifest_and_tokenizer_checks(abc, word_level, tmp_path):
    with pytest.raises(DataError, match="prepared data directory not found"):
        load_manifest(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        TokenShards.open(tmp_path / "empty", "train")
    out = tmp_path / "p"
    prepare_shards(_docs(["a b", "c"]), abc, out, val_fraction=0.0)
    m = load_manifest(out)
    check_tokenizer(m, abc)
    other = word_level(["a", "b", "c", "d"])
    msg = f"shards in {out} were tokenized with tokenizer {abc.hash[:8]}, but the run uses {other.hash[:8]}"
    with pytest.raises(DataError, match=msg):
        check_tokenizer(m, other, out)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards.open(out, "test")
    (out / "train_0000.bin").write_bytes(b"\x00" * 3)
    with pytest.raises(DataError, match="3 bytes, the manifest says 5 tokens"):
        TokenShards.open(out, "train")
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="corrupt manifest"):
        load_manifest(out)
    (out / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(DataError, match="corrupt manifest \\(missing dtype"):
        load_manifest(out)
