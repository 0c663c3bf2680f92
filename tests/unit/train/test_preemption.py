"""Preemption (issue 9 item 5): SIGTERM, SIGINT and SIGUSR1 finish the current step, write a checkpoint, mark the
summary ``"interrupted"`` and exit with ``EXIT_INTERRUPTED``; ``--resume`` then continues with no step lost, on
the trajectory of an uninterrupted run (bitwise on CPU fp32). Divergence stops at the first non-finite step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import save_config
from lmlab.recipes.pretrain import PretrainRecipe, run_pretraining
from lmlab.train import checkpoint as ck
from lmlab.train.callbacks import Callback
from lmlab.train.engine import execute
from lmlab.train.metrics import read_metrics
from lmlab.train.signals import EXIT_INTERRUPTED

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[3]


class SignalAt(Callback):
    """Sends ``sig`` to this process right after step ``step`` (as a scheduler would, mid-run)."""

    def __init__(self, step: int, sig: signal.Signals):
        self.step, self.sig = step, sig

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.sig)


class SignalledPretrain(PretrainRecipe):
    def __init__(self, step: int, sig: signal.Signals):
        self.callback = SignalAt(step, sig)

    def setup(self, job):
        plan = super().setup(job)
        plan.callbacks.append(self.callback)
        return plan


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_and_resume_is_bitwise(tmp_path, sig):
    cfg = tiny_config("train.steps=8", "train.ckpt_every=100", "train.eval_every=100")
    full = run_pretraining(cfg, tmp_path / "full", quiet=True)
    run = tmp_path / "run"
    before = signal.getsignal(sig)  # SIG_IGN for SIGINT when pytest runs in a background job, else the default
    stopped = execute(SignalledPretrain(3, sig), cfg, run, quiet=True)
    assert stopped["status"] == "interrupted" and stopped["stopped_by"] == sig.name and stopped["steps"] == 3
    assert ck.latest_checkpoint(run).name == "step_0000003"  # written although ckpt_every is 100
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(sig) == before  # handlers restored
    resumed = run_pretraining(cfg, run, resume=True, quiet=True)
    assert resumed["status"] == "finished" and resumed["steps"] == 8
    assert train_losses(run) == train_losses(tmp_path / "full")  # bitwise: no step lost or repeated
    assert resumed["final_val_loss"] == full["final_val_loss"]


def _wait_for_step(run: Path, job: subprocess.Popen, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("kind") == "train" and r["step"] >= step for r in read_metrics(run)):
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab", *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "sig"),
    [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGINT)],
    ids=["1rank-SIGTERM", "2ranks-SIGTERM", "2ranks-SIGINT"],
)
def test_signal_to_the_cli_then_resume(tmp_path, nproc, sig):
    """The real command, a real signal at an unknown step; with ``--nproc 2`` the signal goes to torchrun's
    agent, which forwards it: both ranks stop after the same step and write one sharded checkpoint."""
    overrides = ["schedule.name=constant", "schedule.warmup_steps=0", "train.ckpt_every=1000", "train.threads=1"]
    if nproc == 2:
        overrides += ["distributed.strategy=ddp", "train.micro_batch_size=2"]
    save_config(tiny_config(*overrides), tmp_path / "c.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_DIST_TIMEOUT_S": "60"}
    run = tmp_path / "run"
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, "-m", "lmlab", "train", str(tmp_path / "c.yaml"), "--out", str(run), *launch]
    job = subprocess.Popen([*cmd, "train.steps=100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_step(run, job, 3)
        job.send_signal(sig)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == EXIT_INTERRUPTED, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["status"] == "interrupted" and summary["stopped_by"] == sig.name
    assert f"lmlab train: stopped by {sig.name} after step {stopped}" in err and "Traceback" not in err
    assert ck.latest_checkpoint(run).name == f"step_{stopped:07d}"
    if nproc == 2:
        assert ck.is_sharded(ck.latest_checkpoint(run))
    target = stopped + 3
    resumed = _cli("train", "--resume", str(run), *launch, f"train.steps={target}", "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _cli("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "ref"), *launch,
                     f"train.steps={target}", "--quiet", env=env)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, want = train_losses(run), train_losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, target + 1))
    assert got == want  # bitwise on CPU fp32: the stop lost no step and repeated none


def test_divergence_stops_at_the_first_bad_step_without_checkpointing_it(tmp_path, capsys):
    save_config(tiny_config("train.steps=30", "train.ckpt_every=1", "train.log_every=10"), tmp_path / "c.yaml")
    run = tmp_path / "run"
    code = main(["train", str(tmp_path / "c.yaml"), "--out", str(run), "optim.lr=1e30", "optim.grad_clip=0", "--quiet"])
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    bad = summary["diverged_at"]
    assert code == 3 and summary["status"] == "diverged" and bad is not None and bad <= 3
    assert f"lmlab train: diverged at step {bad}: the loss or gradient norm became nan/inf" in err
    assert all(int(p.name.split("_")[1]) < bad for p in ck.list_checkpoints(run))  # nothing diverged was saved
    assert max(train_losses(run)) == bad  # the bad step is logged, then the run stops
