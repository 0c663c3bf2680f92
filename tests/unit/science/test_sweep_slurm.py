"""The Slurm launcher without a cluster: its options, its bad inputs, and the checkpoint-and-requeue of a run.

The real cluster runs are in tests/integration/test_sweep_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.science.slurm import SlurmRunTask, child_exited, executor_parameters
from lmlab.science.sweep import TRAIN_CMD_ENV, SlurmOptions, load_sweep, run_action, train_command

FAKE = Path(__file__).with_name("fake_trainer.py")
BASE = "name: t\noptim: {lr: 1.0e-3}\ntrain: {steps: 10}\n"


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text(BASE)
    monkeypatch.setenv(TRAIN_CMD_ENV, f"{sys.executable} {FAKE}")
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(tmp_path / "calls.jsonl"))
    return tmp_path


def _sweep(root: Path, body: str) -> Path:
    path = root / "sweep.yaml"
    path.write_text("base: base.yaml\n" + body)
    return path


def test_slurm_section_is_read_and_checked(sweep_dir):
    path = _sweep(
        sweep_dir, "grid: {optim.lr: [1.0e-3]}\nslurm: {partition: gpu, time: 30, mem: 16G, sbatch: {account: lab}}\n"
    )
    assert load_sweep(path).slurm == SlurmOptions(partition="gpu", time=30, mem="16G", sbatch={"account": "lab"})
    assert load_sweep(_sweep(sweep_dir, "runs: [{}]\n")).slurm == SlurmOptions()
    for body, words in (
        ("slurm: {partiton: gpu}\n", ("partiton", "valid: partition")),
        ("slurm: {time: 0}\n", ("slurm.time", ">= 1")),
        ("slurm: {mem: lots}\n", ("slurm.mem", "16G")),
        ("slurm: {sbatch: {time: 10}}\n", ("slurm.sbatch.time", "use slurm.time")),
        ("slurm: {sbatch: {array: 0-3}}\n", ("slurm.sbatch.array", "lmlab sets it")),
    ):
        with pytest.raises(ConfigError) as err:
            load_sweep(_sweep(sweep_dir, "runs: [{}]\n" + body))
        assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_slurm_key_is_one_clear_error(sweep_dir, capsys):
    path = _sweep(sweep_dir, "runs: [{}]\nslurm: {gpus_per_node: 1}\n")
    assert main(["sweep", str(path), "--out", str(sweep_dir / "out"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown slurm key(s) gpus_per_node" in err and "sweep.yaml" in err


def test_slurm_options_with_local_launcher_are_refused(sweep_dir, capsys):
    path = _sweep(sweep_dir, "runs: [{}]\n")
    out = sweep_dir / "out"
    assert main(["sweep", str(path), "--out", str(out), "--slurm-time", "30", "--slurm-opt", "qos=high"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--slurm-time, --slurm-opt only apply with --launcher slurm" in err and err.count("\n") == 0
    assert not out.exists()
    assert main(["sweep", str(path), "--out", str(out), "--launcher", "slurm", "--jobs", "4"]) == 2
    assert "--jobs is for --launcher local" in capsys.readouterr().err


def test_slurm_launcher_without_submitit_says_what_to_install(sweep_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an environment without the package gives
    path = _sweep(sweep_dir, "runs: [{}]\n")
    assert main(["sweep", str(path), "--out", str(sweep_dir / "out"), "--launcher", "slurm"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "lmlab sweep: error: --launcher slurm needs submitit: pip install 'lmlab[slurm]'"


def test_cli_options_override_the_file_key_by_key(sweep_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "lmlab.science.commands.slurm_launcher", lambda options, folder, name: seen.update(o=options, f=folder, n=name)
    )
    path = _sweep(sweep_dir, "runs: [{}]\nslurm: {partition: a, time: 30, gpus: 1, sbatch: {account: lab, qos: low}}\n")
    argv = ["sweep", str(path), "--out", str(sweep_dir / "out"), "--launcher", "slurm", "--dry-run"]
    argv += ["--slurm-time", "90", "--slurm-mem", "8G", "--slurm-opt", "qos=high", "--slurm-opt", "requeue"]
    assert main(argv) == 0
    assert seen["o"] == SlurmOptions(
        partition="a", time=90, gpus=1, mem="8G", sbatch={"account": "lab", "qos": "high", "requeue": True}
    )
    assert seen["f"] == sweep_dir / "out" / "slurm" and seen["n"] == "lmlab-sweep"
    params = executor_parameters(seen["o"], seen["n"])
    assert params == {
        "job_name": "lmlab-sweep",
        "time": 90,
        "cpus_per_task": 1,
        "array_parallelism": 256,
        "additional_parameters": {"account": "lab", "qos": "high", "requeue": True},
        "partition": "a",
        "gpus_per_node": 1,
        "mem": "8G",
    }


def test_checkpoint_stops_the_trainer_and_requeues_a_resume(sweep_dir, tmp_path):
    """What submitit does on Slurm's USR2, minus Slurm: checkpoint() on the running task, then the requeued task."""
    submitit = pytest.importorskip("submitit")
    spec = load_sweep(_sweep(sweep_dir, "runs: [{fake.wait_for_stop: true}]\n"))
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    run_dir = out / spec.runs[0].name
    task = SlurmRunTask(spec, spec.runs[0], out, train_command())
    codes = []
    worker = threading.Thread(target=lambda: codes.append(task()))
    worker.start()
    deadline = time.monotonic() + 30
    while not (run_dir / "started").exists():
        assert time.monotonic() < deadline and worker.is_alive(), "the fake trainer did not start"
        time.sleep(0.05)
    pid = task.child.pid
    os.kill(pid, signal.SIGUSR2)  # Slurm signals every process of the step: the trainer must not die of it
    time.sleep(0.5)
    assert not child_exited(pid)

    delayed = task.checkpoint()
    worker.join(30)
    assert codes == [75]  # the trainer got SIGTERM, checkpointed and exited "try again later"
    assert run_action(run_dir) == "resume"
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is task

    delayed.dump(tmp_path / "requeued.pkl")  # what submitit writes for the requeued job, then loads on its node
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    assert requeued.result() == 0
    calls = [json.loads(line) for line in (sweep_dir / "calls.jsonl").read_text().splitlines()]
    assert calls[-1] == ["--resume", str(run_dir), "--quiet"] and len(calls) == 2
    assert run_action(run_dir) == "skip"
    log = (out / "logs" / f"{spec.runs[0].name}.log").read_text()
    assert " start: " in log and " resume: " in log
