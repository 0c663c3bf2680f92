"""``TokenShards.open`` checks every shard: size, token ids below the vocabulary, checksum, recorded maximum."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab.data import shards as shards_module
from lmlab.data.prepare import Document, prepare_shards
from lmlab.data.shards import TokenShards
from lmlab.errors import DataError


def _prepared(tmp_path, tokenizer, texts, **kwargs):
    out = tmp_path / "p"
    prepare_shards([Document(t, "mem", i) for i, t in enumerate(texts)], tokenizer, out, val_fraction=0.0, **kwargs)
    return out


def _poke(path, position: int, value: int, dtype=np.uint16) -> None:
    """Overwrite token ``position`` of a shard file in place (same size, new bytes)."""
    data = np.fromfile(path, dtype=dtype)
    data[position] = value
    data.tofile(path)


def test_manifest_records_checksum_and_largest_id(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b", "c a"], shard_tokens=4)
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert [s["max_token_id"] for s in shards] == [3, 1]  # [1, 2, 0, 3] and [1, 0]
    assert all(len(s["sha256"]) == 64 for s in shards)


def test_token_id_beyond_the_vocabulary_is_refused(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b c a b c"])
    _poke(out / "train_0000.bin", 5, 70000 % 65536)  # 4464: fits uint16, far above the 4-token vocabulary
    message = (
        rf"^{out}/train_0000\.bin: token id 4464 at position 5 is >= the vocabulary size 4; "
        "the shard is corrupted or from another tokenizer"
    )
    with pytest.raises(DataError, match=message):
        TokenShards.open(out)


def test_beyond_vocabulary_is_found_in_a_later_chunk_without_recorded_fields(abc, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "VERIFY_CHUNK_BYTES", 8)  # 4 tokens per chunk
    out = _prepared(tmp_path, abc, ["a b c a b c a b c"])
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["sha256"], shard["max_token_id"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    _poke(out / "train_0000.bin", 9, 9)
    with pytest.raises(DataError, match=r"train_0000\.bin: token id 9 at position 9 is >= the vocabulary size 4"):
        TokenShards.open(out)


def test_changed_bytes_fail_the_checksum(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b c a b c"])
    _poke(out / "train_0000.bin", 0, 3)  # still a valid id: only the checksum can tell
    with pytest.raises(DataError, match=rf"^{out}/train_0000\.bin: SHA-256 \w{{12}} differs from the manifest's"):
        TokenShards.open(out)


def test_a_manifest_whose_largest_id_disagrees_is_refused(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b"])
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    del shard["sha256"]
    shard["max_token_id"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train_0000\.bin: largest token id 2 differs from the manifest's 1"):
        TokenShards.open(out)
    shard["max_token_id"] = 7
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"the manifest says its largest token id is 7, >= the vocabulary size 4"):
        TokenShards.open(out)


def test_old_manifest_without_the_new_fields_still_opens(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b", "c"])
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["sha256"], shard["max_token_id"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert TokenShards.open(out).read(0, 5).tolist() == [1, 2, 0, 3, 0]


def test_shard_names_and_dtype_from_the_manifest_are_checked(abc, tmp_path):
    out = _prepared(tmp_path, abc, ["a b"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../elsewhere.bin"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard name '\.\./elsewhere\.bin' is not a file name in"):
        TokenShards.open(out)
    manifest["splits"]["train"]["shards"][0]["file"] = "train_0000.bin"
    manifest["dtype"] = "object"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"dtype 'object' is not one of uint16, uint32"):
        TokenShards.open(out)


def test_each_shard_is_scanned_once_per_process(abc, tmp_path, monkeypatch):
    out = _prepared(tmp_path, abc, ["a b", "c"])
    scans = []
    real = shards_module._scan
    monkeypatch.setattr(shards_module, "_scan", lambda *a: scans.append(a[0]) or real(*a))
    TokenShards.open(out)
    TokenShards.open(out)
    assert scans == [out / "train_0000.bin"]
