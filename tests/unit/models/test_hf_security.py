"""``load_hf_state_dict`` opens no file outside the model directory, whatever the index names."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from lmlab.errors import CheckpointError
from lmlab.models import hf


@pytest.fixture
def opened(monkeypatch):
    """The paths ``safetensors.torch.load_file`` is asked to open."""
    calls: list[str] = []
    real = safetensors.torch.load_file

    def recording(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", recording)
    return calls


def _model_dir(root, weight_map: dict[str, str]):
    """A model directory holding one real shard and an index with ``weight_map``."""
    model = root / "model"
    model.mkdir()
    save_file({"inside": torch.zeros(2)}, str(model / "model-00001-of-00001.safetensors"))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def test_index_entry_outside_the_directory_is_refused_and_not_read(tmp_path, opened):
    save_file({"secret": torch.ones(2)}, str(tmp_path / "x.safetensors"))  # readable, so only the check stops it
    model = _model_dir(tmp_path, {"inside": "model-00001-of-00001.safetensors", "secret": "../x.safetensors"})
    index = model / "model.safetensors.index.json"
    with pytest.raises(CheckpointError, match=rf"{index}: weight file '\.\./x\.safetensors' is not a relative path"):
        hf.load_hf_state_dict(model)
    assert opened == []


def test_absolute_index_entry_is_refused(tmp_path, opened):
    save_file({"secret": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    model = _model_dir(tmp_path, {"secret": str(tmp_path / "x.safetensors")})
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight file '/.*x\.safetensors'"):
        hf.load_hf_state_dict(model)
    assert opened == []


def test_symlinked_shard_pointing_outside_is_refused(tmp_path, opened):
    save_file({"secret": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    model = _model_dir(tmp_path, {"secret": "linked.safetensors"})
    (model / "linked.safetensors").symlink_to(tmp_path / "x.safetensors")
    with pytest.raises(
        CheckpointError, match=r"weight file 'linked\.safetensors' resolves to .*x\.safetensors, outside"
    ):
        hf.load_hf_state_dict(model)
    (model / "model.safetensors").symlink_to(tmp_path / "x.safetensors")  # the single-file layout too
    with pytest.raises(CheckpointError, match=r"weight file 'model\.safetensors' resolves to .*, outside"):
        hf.load_hf_state_dict(model)
    assert opened == []


def test_shards_inside_and_hub_cache_snapshots_still_load(tmp_path, opened):
    model = _model_dir(tmp_path, {"inside": "model-00001-of-00001.safetensors"})
    assert set(hf.load_hf_state_dict(model)) == {"inside"}
    # the Hugging Face hub cache: REPO/snapshots/REV/FILE -> ../../blobs/HASH
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(repo / "blobs" / "deadbeef"))
    (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to("../../blobs/deadbeef")
    state = hf.load_hf_state_dict(repo / "snapshots" / "abc123")
    assert torch.equal(state["w"], torch.ones(3))


def test_malformed_index_is_one_error(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    index = model / "model.safetensors.index.json"
    index.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        hf.load_hf_state_dict(model)
    index.write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(CheckpointError, match="weight_map is not an object"):
        hf.load_hf_state_dict(model)
    index.write_text(json.dumps({"weight_map": {"w": 3}}))
    with pytest.raises(CheckpointError, match="weight file 3 is not a relative path"):
        hf.load_hf_state_dict(model)
