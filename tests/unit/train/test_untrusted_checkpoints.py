"""Untrusted run directories stay untrusted (issue 9 item 7): a pickle planted as a sharded checkpoint's DCP
``.metadata`` (with meta.json's checksum updated, as an attacker who controls the directory would) is refused
by every command that reads checkpoints, and its payload never runs; files meta.json does not list are refused;
run names cannot place a run outside ``runs/``."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import sanitize_run_name, save_config
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train import checkpoint as ck

from helpers import tiny_config


class Payload:
    """Unpickling this writes ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def plant_metadata(ckpt: Path, marker: Path) -> None:
    target = ckpt / ck.DCP_DIR / ".metadata"
    target.write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((ckpt / ck.META_FILE).read_text())
    meta["sha256"][f"{ck.DCP_DIR}/.metadata"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (ckpt / ck.META_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    run = root / "sharded"
    run_pretraining(tiny_config("distributed.strategy=fsdp", "train.steps=2"), run, quiet=True)
    assert ck.is_sharded(ck.latest_checkpoint(run))
    return run


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "2"],
        ["eval", "perplexity", "{run}"],
        ["export", "{run}", "--out", "{tmp}/out.safetensors"],
        ["export-hf", "{run}", "{tmp}/hf"],
        ["train", "--resume", "{run}", "train.steps=3", "--quiet"],
        ["train", "{tmp}/c.yaml", "--out", "{tmp}/child", "init_from={run}", "--quiet"],
    ],
    ids=["generate", "eval", "export", "export-hf", "resume", "init_from"],
)
def test_planted_dcp_pickle_is_refused_and_never_runs(sharded_run, tmp_path, command, capsys):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    marker = tmp_path / "marker"
    plant_metadata(ck.latest_checkpoint(run), marker)
    save_config(tiny_config("train.steps=2"), tmp_path / "c.yaml")
    argv = [a.format(run=run, tmp=tmp_path) for a in command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "refused to unpickle builtins.exec" in err and "may be malicious" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()
    if command[0] == "train" and command[1] == "--resume":  # refused before the run directory was rewritten
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_file_not_listed_in_meta_json_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run_pretraining(tiny_config("train.steps=2"), run, quiet=True)
    planted = ck.latest_checkpoint(run) / "extra.pt"
    planted.write_bytes(b"anything")
    assert main(["generate", str(run), "--prompt", "hi"]) == 1
    assert f"{planted}: not listed in meta.json" in capsys.readouterr().err


def test_a_listed_name_outside_the_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    run_pretraining(tiny_config("train.steps=2"), run, quiet=True)
    ckpt = ck.latest_checkpoint(run)
    meta = json.loads((ckpt / ck.META_FILE).read_text())
    meta["sha256"]["../../config.yaml"] = "0" * 64
    (ckpt / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match="a path outside the checkpoint"):
        ck.verify_checkpoint(ckpt)


def test_run_names_are_sanitised(tmp_path, monkeypatch):
    assert sanitize_run_name("../../x") == "x"
    assert sanitize_run_name("🚀/../../../escape") == "escape"
    assert sanitize_run_name("my run/v2") == "my-run-v2"
    assert sanitize_run_name("...") == "run"
    monkeypatch.chdir(tmp_path)
    save_config(tiny_config("train.steps=2"), tmp_path / "c.yaml")
    assert main(["train", "c.yaml", "name=../../escape", "--quiet"]) == 0
    made = [p for p in tmp_path.rglob("config.yaml") if p.parent != tmp_path]
    assert len(made) == 1 and made[0].parent.parent == tmp_path / "runs"
    assert made[0].parent.name.startswith("escape-")
