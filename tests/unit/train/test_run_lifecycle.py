"""The run directory's life (issue 9 items 6 and 8): one writer, what a new run may reuse, continuing from a
chosen checkpoint, leftovers of killed processes, OS errors while checkpointing, links out of the directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import save_config
from lmlab.errors import CheckpointError, UserError
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train import checkpoint as ck
from lmlab.train.lock import RunLock, RunLockedError
from lmlab.train.metrics import read_metrics

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[3]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    """Another process holds the directory: the second ``lmlab train`` exits at once with its PID and host."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lmlab.train.lock import RunLock; import time; RunLock({str(run)!r}).acquire(); "
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        save_config(tiny_config(), tmp_path / "c.yaml")
        start = time.monotonic()
        code = main(["train", str(tmp_path / "c.yaml"), "--out", str(run), "--quiet"])
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert code == 1 and time.monotonic() - start < 10
    assert f"is in use by another lmlab process (PID {holder.pid} on host {os.uname().nodename}" in err
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h1", "since": "yesterday"}))
    summary = run_pretraining(tiny_config("train.steps=2"), run)
    assert summary["status"] == "finished"
    assert f"taking over the lock of {run} left by PID {int(dead.stdout)} on host h1" in capsys.readouterr().out


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released at the end of the block


# --------------------------------------------------------------------------- reusing --out


def test_out_holding_something_else_is_refused_unless_overwrite(tmp_path, capsys):
    save_config(tiny_config("train.steps=2"), tmp_path / "c.yaml")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"]) == 1
    assert "is not empty (notes.txt) and holds no run to continue" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and ck.latest_checkpoint(out) is not None


def test_auto_resume_continues_this_run_only(tmp_path, capsys):
    save_config(tiny_config("train.steps=4", "train.ckpt_every=2"), tmp_path / "c.yaml")
    out = tmp_path / "run"
    cmd = ["train", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"]
    assert main([*cmd, "train.steps=2"]) == 0
    assert main([*cmd[:-1], "train.steps=2", "--auto-resume"]) == 0  # the same run again: continued (finished)
    assert "holds this run (same kind and config): continuing from step_0000002" in capsys.readouterr().out
    assert main([*cmd, "--auto-resume"]) == 1  # another config (4 steps): refused, nothing touched
    assert "already holds checkpoints of another run" in capsys.readouterr().err
    assert main([*cmd, "train.steps=2"]) == 1  # without --auto-resume the same run is not continued silently
    assert "already holds checkpoints of this run; resume it with --resume" in capsys.readouterr().err


def test_kind_mismatch_on_resume_names_the_right_command(tmp_path, capsys):
    run_pretraining(tiny_config("train.steps=2"), tmp_path / "run", quiet=True)
    assert main(["sft", "--resume", str(tmp_path / "run")]) == 1
    assert f"is a pretrain run; continue it with: lmlab train --resume {tmp_path / 'run'}" in capsys.readouterr().err


# --------------------------------------------------------------------------- continuing from a chosen checkpoint


def test_corrupted_latest_checkpoint_then_resume_from_an_earlier_one(tmp_path, capsys):
    same = ["train.ckpt_every=2", "train.keep_last=4", "train.eval_every=100", "schedule.name=constant"]
    run_pretraining(tiny_config("train.steps=8", *same), tmp_path / "full", quiet=True)
    run = tmp_path / "run"
    run_pretraining(tiny_config("train.steps=6", *same), run, quiet=True)
    latest = ck.latest_checkpoint(run)
    with open(latest / ck.MODEL_FILE, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    assert main(["train", "--resume", str(run), "train.steps=8", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "corrupted (checksum mismatch)" in err and f"--resume {run / 'checkpoints' / 'step_0000004'}" in err
    assert main(["train", "--resume", str(run / "checkpoints" / "step_0000004"), "train.steps=8", "--quiet"]) == 0
    assert losses(run) == losses(tmp_path / "full")  # continued from step 4 on the uninterrupted trajectory
    discarded = list((run / "checkpoints").glob("discarded-*/step_0000006"))
    assert len(discarded) == 1  # the later checkpoint was set aside, not deleted


def test_leftovers_of_a_killed_process_are_removed_on_the_next_start(tmp_path):
    cfg = tiny_config("train.steps=2")
    run = tmp_path / "run"
    run_pretraining(cfg, run, quiet=True)
    partial = run / "checkpoints" / ".tmp_step_0000003_99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (run / ".summary.json.tmp-99999").write_text("{")
    run_pretraining(tiny_config("train.steps=3"), run, resume=True, quiet=True)
    assert not partial.exists() and not (run / ".summary.json.tmp-99999").exists()


def test_pruning_keeps_checkpoints_of_another_run(tmp_path):
    run = tmp_path / "run"
    run_pretraining(tiny_config("train.steps=2", "train.ckpt_every=1", "train.keep_last=1"), run, quiet=True)
    foreign = run / "checkpoints" / "step_0000001"
    shutil.copytree(ck.latest_checkpoint(run), foreign)
    meta = json.loads((foreign / ck.META_FILE).read_text())
    (foreign / ck.META_FILE).write_text(json.dumps({**meta, "step": 1, "run_id": "someone-else"}))
    run_pretraining(tiny_config("train.steps=5", "train.ckpt_every=1", "train.keep_last=1"), run, resume=True,
                    quiet=True)  # fmt: skip
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_0000001", "step_0000005"]


# --------------------------------------------------------------------------- OS errors and links


def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = ck.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    cfg = tiny_config("train.steps=6", "train.ckpt_every=2", "train.keep_last=3")
    with pytest.raises(CheckpointError) as err:
        run_pretraining(cfg, run, quiet=True)
    message = str(err.value)
    assert "No space left on device" in message and "the partial checkpoint was removed" in message
    assert f"the latest intact checkpoint is {run / 'checkpoints' / 'step_0000002'}" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # no partial directory left
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    monkeypatch.setattr(ck, "save_file", real_save)
    assert run_pretraining(cfg, run, resume=True, quiet=True)["status"] == "finished"


def test_out_that_is_a_file_or_unwritable_is_one_message(tmp_path, monkeypatch, capsys):
    save_config(tiny_config("train.steps=2"), tmp_path / "c.yaml")
    (tmp_path / "afile").write_text("x")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "afile")]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "ro-run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "ro-run")]) == 1
    assert f"cannot create the run directory {tmp_path / 'ro-run'}: Read-only file system" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["env.json", "summary.json", "metrics.jsonl", "config.yaml"])
def test_a_symlink_in_the_run_directory_is_never_written_through(tmp_path, name):
    run = tmp_path / "run"
    run_pretraining(tiny_config("train.steps=2"), run, quiet=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / name).unlink()
    (run / name).symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        run_pretraining(tiny_config("train.steps=3"), run, resume=True, quiet=True)
    assert victim.read_text() == "precious"


def test_a_failed_new_run_leaves_no_directory_behind(tmp_path):
    with pytest.raises(UserError):
        run_pretraining(tiny_config("data.source=files", "data.files=[missing.jsonl]"), tmp_path / "new", quiet=True)
    assert not (tmp_path / "new").exists()


def test_reward_training_resumes(tmp_path):
    from lmlab.config import load_config
    from lmlab.data.synthetic.preference_world import PreferenceWorld

    run_pretraining(tiny_config("train.steps=2", "model.max_seq_len=96"), tmp_path / "base", quiet=True)
    pairs = PreferenceWorld().write_pairs(tmp_path / "pairs.jsonl", 0, 24, "train")
    overrides = [f"init_from={tmp_path / 'base'}", f"align.train_file={pairs}", "align.max_len=64",
                 "align.max_prompt_len=32", "train.steps=4", "train.ckpt_every=2", "train.progress=false",
                 "train.log_every=1", "schedule.name=constant"]  # fmt: skip
    save_config(load_config(None, overrides), tmp_path / "rm.yaml")
    full = tmp_path / "rm_full"
    assert main(["reward", "train", str(tmp_path / "rm.yaml"), "--out", str(full), "--quiet"]) == 0
    run = tmp_path / "rm"
    assert main(["reward", "train", str(tmp_path / "rm.yaml"), "--out", str(run), "train.steps=2", "--quiet"]) == 0
    assert main(["reward", "train", "--resume", str(run), "train.steps=4", "--quiet"]) == 0
    assert losses(run) == losses(full)
    assert json.loads((run / "summary.json").read_text())["kind"] == "reward"
