"""A lost rank ends the job, it does not hang it; restarting resumes from the last complete checkpoint
(issue 6 item 6). Runs the real CLI: ``lmlab train --nproc 2`` (torchrun, 2 gloo ranks, DDP), kills
rank 1 with SIGKILL once a checkpoint exists, then ``lmlab train --resume RUN --nproc 2``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lmlab.config import save_config
from lmlab.train import checkpoint as ck
from lmlab.train.metrics import read_metrics

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[3]


def find_rank(marker: str, rank: int) -> int | None:
    """The pid of the training process with ``RANK=rank`` among the processes carrying ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_killed_rank_stops_job_and_restart_resumes(tmp_path):
    save_config(tiny_config("train.progress=false"), tmp_path / "c.yaml")
    run = tmp_path / "run"
    marker = f"LMLAB_TEST_JOB={uuid.uuid4().hex}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LMLAB_DIST_TIMEOUT_S": "30",
        marker.split("=")[0]: marker.split("=")[1],
    }
    cmd = [sys.executable, "-m", "lmlab", "train", str(tmp_path / "c.yaml"), "--out", str(run), "--nproc", "2"]
    args = ["train.steps=100000", "train.ckpt_every=4", "train.eval_every=100000", "distributed.strategy=ddp"]
    job = subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while ck.latest_checkpoint(run) is None:
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        pid = find_rank(marker, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=90)  # no hang: the job ends on its own
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 90
    assert "lmlab train: error: a training process failed: rank 1 was killed by SIGKILL" in err
    assert "Traceback" not in err  # one clear line per process, no stack dumps
    assert f"continue with: lmlab train --resume {run} --nproc 2" in err

    last = int(ck.latest_checkpoint(run).name.split("_")[1])
    target = last + 3
    resumed = subprocess.run(
        [sys.executable, "-m", "lmlab", "train", "--resume", str(run), "--nproc", "2", f"train.steps={target}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{last:07d}'} (step {last})" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == list(range(1, target + 1))  # records after the checkpoint were replaced, none lost
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == target and summary["world_size"] == 2
