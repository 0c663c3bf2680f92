"""``lmlab.train.dcp_safe``: DCP checkpoints load through the allow-list reader; planted pickles do not run."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmlab.errors import CheckpointError
from lmlab.train.dcp_safe import (
    METADATA_FILE,
    METADATA_GLOBALS,
    SafeFileSystemReader,
    read_metadata_safely,
    safe_reader,
)


@pytest.fixture(autouse=True)
def _quiet_single_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and an AdamW that has taken one step (so it has exp_avg/exp_avg_sq/step state)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1), betas=(0.8, 0.95))
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    return model, opt


def _save(path, model, opt) -> None:
    """Save the way lmlab's sharded checkpoints do: model and optimizer state dicts from ``get_state_dict``."""
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=True)


class _Marker:
    """Unpickling this opens (creates) the file ``path``: a stand-in for any code a pickle could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _FakeMetadata:
    """Pickles as if it were DCP's Metadata but carries the marker payload."""

    def __init__(self, marker):
        self.payload = _Marker(marker)


def test_real_checkpoint_loads_through_the_safe_reader(tmp_path):
    model, opt = _trained(0)
    _save(tmp_path / "dcp", model, opt)
    fresh, fresh_opt = _trained(1)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=safe_reader(tmp_path / "dcp"), no_dist=True)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"][0]["lr"] == pytest.approx(1e-3) and tuple(got["param_groups"][0]["betas"]) == (0.8, 0.95)
    for index, slots in want["state"].items():
        for key, value in slots.items():
            assert torch.equal(got["state"][index][key], value), (index, key)
    metadata = read_metadata_safely(tmp_path / "dcp")
    assert "model.0.weight" in metadata.state_dict_metadata


def test_every_global_of_real_metadata_is_allowed_and_nothing_else_is_needed(tmp_path):
    model, opt = _trained(0)
    _save(tmp_path / "dcp", model, opt)
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / "dcp" / METADATA_FILE, "rb") as f:
        Recorder(f).load()
    assert seen and seen <= set(METADATA_GLOBALS)
    assert all(module.startswith(("torch", "pathlib")) for module, _ in METADATA_GLOBALS)


def test_planted_metadata_pickle_is_refused_and_does_not_run(tmp_path):
    model, opt = _trained(0)
    _save(tmp_path / "dcp", model, opt)
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(pickle.dumps(_FakeMetadata(marker)))
    message = r"dcp/\.metadata: refused to unpickle .*_FakeMetadata \(not part of DCP metadata\); the checkpoint may be"
    with pytest.raises(CheckpointError, match=message):
        safe_reader(tmp_path / "dcp")
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(CheckpointError, match=r"refused to unpickle (builtins|io)\.open \(not part of DCP metadata\)"):
        read_metadata_safely(tmp_path / "dcp")
    fresh, fresh_opt = _trained(1)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    reader = SafeFileSystemReader(tmp_path / "dcp")  # not checked eagerly: DCP's own metadata read is safe too
    with pytest.raises(CheckpointException, match="refused to unpickle"):
        dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=reader, no_dist=True)
    assert not marker.exists()
    pickle.loads((tmp_path / "dcp" / METADATA_FILE).read_bytes()).close()  # control: plain pickle runs the payload
    assert marker.exists()


def test_planted_pickle_in_a_non_tensor_entry_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    dcp.save({"extra": _Marker(marker), "w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert not marker.exists()  # saving pickles the object; only loading would run it
    state = {"extra": None, "w": torch.zeros(3)}
    with pytest.raises(CheckpointException, match=r"refused to unpickle (builtins|io)\.open in entry 'extra'"):
        dcp.load(state, storage_reader=safe_reader(tmp_path / "dcp"), no_dist=True)
    assert not marker.exists()


def test_data_files_outside_the_checkpoint_and_junk_are_refused(tmp_path):
    model, opt = _trained(0)
    _save(tmp_path / "dcp", model, opt)
    metadata = read_metadata_safely(tmp_path / "dcp")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../elsewhere.distcp"
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"data file '\.\./elsewhere\.distcp' is not a relative path inside"):
        safe_reader(tmp_path / "dcp")
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable DCP metadata"):
        safe_reader(tmp_path / "dcp")
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"holds a dict, not DCP Metadata"):
        safe_reader(tmp_path / "dcp")
    with pytest.raises(CheckpointError, match="not a torch.distributed.checkpoint directory"):
        safe_reader(tmp_path / "nothing")
