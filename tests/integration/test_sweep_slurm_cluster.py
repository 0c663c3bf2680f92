"""``lmlab sweep --launcher slurm`` against a real one-node Slurm cluster started on localhost (``slurm_cluster.py``).

The runs use the fake trainer of tests/unit/science (``LMLAB_SWEEP_TRAIN_CMD``), which records each call in a file
named by ``FAKE_TRAINER_LOG``: that the calls arrive at all shows the job environment is this process's.
"""

from __future__ import annotations

import csv
import functools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.science.sweep import TRAIN_CMD_ENV, run_action

from helpers import TINY_OVERRIDES

pytest.importorskip("submitit", reason="submitit not installed: pip install 'lmlab[slurm]'")

FAKE = Path(__file__).parents[1] / "unit" / "science" / "fake_trainer.py"
BASE = "name: t\noptim: {lr: 1.0e-3}\ntrain: {steps: 10}\n"
TIMEOUT_S = 150.0  # generous: two CI workers share two cores with slurmctld and slurmd


@pytest.fixture(autouse=True)
def often_look_at_the_queue(monkeypatch):
    """Look at squeue every half second (not 15 s), so every test also checks that a pending, running or requeued
    task is never taken for one that left the queue."""
    monkeypatch.setattr("lmlab.science.slurm.QUEUE_POLL_S", 0.5)


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch, slurm_cluster):
    (tmp_path / "base.yaml").write_text(BASE)
    monkeypatch.setenv(TRAIN_CMD_ENV, f"{sys.executable} {FAKE}")
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(tmp_path / "calls.jsonl"))
    return tmp_path


def _calls(root: Path) -> list[list[str]]:
    log = root / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_four_run_sweep_on_slurm_then_skip_finished(sweep_dir, slurm_cluster, capsys):
    sweep = sweep_dir / "sweep.yaml"
    sweep.write_text("base: base.yaml\ngrid:\n  optim.lr: [1.0e-3, 3.0e-3]\n  train.seed: [0, 1]\nslurm: {time: 5}\n")
    out = sweep_dir / "out"
    argv = ["sweep", str(sweep), "--out", str(out), "--launcher", "slurm", "--slurm-partition", slurm_cluster.partition]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "submitted 4 runs as Slurm job" in printed and "4 started, 0 resumed, 0 skipped" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["run"] for r in rows) == sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    assert [r["status"] for r in rows] == ["finished"] * 4 and {r["lr"] for r in rows} == {"0.001", "0.003"}
    assert len(_calls(sweep_dir)) == 4
    assert all(" start: " in log.read_text() for log in (out / "logs").glob("*.log"))
    assert list((out / "slurm").glob("*_log.out"))  # submitit's own logs

    assert main(argv) == 0  # everything finished: nothing is submitted
    assert "0 started, 0 resumed, 4 skipped" in capsys.readouterr().out
    assert len(_calls(sweep_dir)) == 4


def test_preempted_run_is_checkpointed_requeued_and_resumed(sweep_dir, slurm_cluster, capsys):
    """submitit's preemption signal reaches a running array task: its trainer checkpoints, the task is requeued,
    and the requeued task resumes the run; the other run of the array is not disturbed."""
    sweep = sweep_dir / "sweep.yaml"
    sweep.write_text("base: base.yaml\nruns: [{optim.lr: 1.0e-3}, {fake.wait_for_stop: true}]\n")
    out = sweep_dir / "out"
    codes = []
    argv = ["sweep", str(sweep), "--out", str(out), "--launcher", "slurm", "--slurm-time", "5"]
    driver = threading.Thread(target=lambda: codes.append(main(argv)))
    driver.start()
    victim = out / "001_wait_for_stop-true"
    _wait(lambda: (victim / "started").exists(), "the run to start on the cluster", slurm_cluster)
    task = next(line.split()[0] for line in slurm_cluster.queue() if line.split()[0].endswith("_1"))

    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)  # what Slurm sends before a deadline
    driver.join(TIMEOUT_S)
    assert not driver.is_alive(), f"the sweep did not finish\n{slurm_cluster.logs()}"

    assert codes == [0], capsys.readouterr().err
    assert "2 started, 0 resumed, 0 skipped (finished), 0 failed" in capsys.readouterr().out
    assert [c[0] for c in _calls(sweep_dir)].count("--resume") == 1
    assert _calls(sweep_dir)[-1] == ["--resume", str(victim), "--quiet"]
    assert json.loads((victim / "summary.json").read_text())["status"] == "finished"
    log = (out / "logs" / f"{victim.name}.log").read_text()
    assert " start: " in log and " resume: " in log
    assert "Requeued job" in (out / "slurm" / f"{task}_0_log.out").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["finished", "finished"]


def test_task_that_dies_without_a_result_is_a_failed_run(sweep_dir, slurm_cluster, capsys, monkeypatch):
    """An array task that dies without writing its result (its process killed, as by the OOM killer) fails its run
    with exit 1, as a crashed local run would, instead of being waited for: the queue says it is gone."""
    sweep = sweep_dir / "sweep.yaml"
    sweep.write_text("base: base.yaml\nruns: [{optim.lr: 1.0e-3}, {fake.kill_parent: true}]\n")
    out = sweep_dir / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--launcher", "slurm"]) == 1
    captured = capsys.readouterr()
    victim = "001_kill_parent-true"
    assert "2 started, 0 resumed, 0 skipped (finished), 1 failed" in captured.out
    assert f"failed: {victim} (exit 1;" in captured.out
    assert f"{victim}: Slurm job " in captured.err and "left the queue without a result" in captured.err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["finished", "missing"]  # the dead run never wrote a summary


def test_ctrl_c_cancels_the_array_and_the_same_command_resumes(sweep_dir, slurm_cluster):
    """Ctrl-C in ``lmlab sweep`` (a separate process here) cancels its job array; the trainer checkpoints on the
    SIGTERM that scancel sends, and running the same command again resumes the run."""
    sweep = sweep_dir / "sweep.yaml"
    sweep.write_text("base: base.yaml\nruns: [{fake.wait_for_stop: true}]\n")
    out = sweep_dir / "out"
    argv = ["sweep", str(sweep), "--out", str(out), "--launcher", "slurm"]
    # Ctrl-C's default action restored: a test session started in the background inherits SIGINT ignored
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    driver = subprocess.Popen(
        [sys.executable, "-m", "lmlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=restore
    )
    victim = out / "000_wait_for_stop-true"
    _wait(lambda: (victim / "started").exists(), "the run to start on the cluster", slurm_cluster)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=TIMEOUT_S)
    assert driver.returncode == 130, err.decode()
    assert "cancelled Slurm job" in err.decode() and "rerun to resume" in err.decode()
    _wait(lambda: not slurm_cluster.queue(), "the cancelled job to leave the queue", slurm_cluster)
    assert run_action(victim) == "resume"

    assert main(argv) == 0
    assert _calls(sweep_dir)[-1] == ["--resume", str(victim), "--quiet"]
    assert json.loads((victim / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_real_trainer_preempted_on_slurm_resumes_with_no_step_lost(tmp_path, slurm_cluster, capsys, monkeypatch):
    """The same requeue with ``lmlab train`` itself: the engine ignores USR2, checkpoints on the SIGTERM the task
    forwards, and the requeued task resumes it; every logged step appears exactly once."""
    monkeypatch.delenv(TRAIN_CMD_ENV, raising=False)
    overrides = [*TINY_OVERRIDES, "train.steps=300", "train.log_every=10", "train.eval_every=300"]
    (tmp_path / "sweep.yaml").write_text("base: base.yaml\noverrides: [" + ", ".join(overrides) + "]\nruns: [{}]\n")
    (tmp_path / "base.yaml").write_text("name: tiny\n")
    out = tmp_path / "out"
    codes = []
    argv = ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out), "--launcher", "slurm", "--slurm-time", "5"]
    driver = threading.Thread(target=lambda: codes.append(main(argv)))
    driver.start()
    run = out / "000"
    _wait(lambda: any(s >= 30 for s in _train_steps(run)), "the run to train 30 steps", slurm_cluster)
    job = slurm_cluster.queue()[0].split()[0]
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    driver.join(TIMEOUT_S)
    assert not driver.is_alive(), f"the sweep did not finish\n{slurm_cluster.logs()}"

    assert codes == [0], capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 300
    assert _train_steps(run) == list(range(10, 301, 10))
    log = (out / "logs" / "000.log").read_text()
    assert " start: " in log and " resume: " in log


def _train_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line the trainer is still writing
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def _wait(ready, what: str, cluster) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; queue: {cluster.queue()}\n{cluster.logs()}")
        time.sleep(0.2)
