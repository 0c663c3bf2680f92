"""The Slurm launcher of ``lmlab sweep --launcher slurm``: the unfinished runs of a sweep as one submitit job array.

Each array task runs one :class:`~lmlab.science.sweep.RunTask` on a compute node: the same train or resume
command, logged to the same ``OUT/logs/<run>.log``, as the local launcher; submitit's own logs and pickles go
to ``OUT/slurm/``. The launcher waits for the array and hands back one exit code per run, so the sweep's
results and failures are collected exactly as for local runs. The job environment is this process's
(sbatch's default ``--export=ALL``), so the nodes run the same Python with the same ``PYTHONPATH``.

Preemption and time limits: submitit asks for ``--signal=USR2@90`` and, when the signal comes, calls the
task's ``checkpoint()``. :class:`SlurmRunTask` then sends SIGTERM to the trainer, which finishes its step,
writes a checkpoint and exits (:mod:`lmlab.train.signals`), and returns itself for submitit to requeue; the
requeued task finds the checkpoint and resumes. Slurm signals every process of the job step, so the trainer
is started with USR2 ignored (its default action would kill it) and stops only through SIGTERM. A run that
reaches its time limit is requeued at most ``MAX_TIMEOUTS`` times; preemptions do not count. A SIGTERM from
Slurm itself (a preemption without the user signal, ``scancel``) reaches the trainer directly: it checkpoints
and exits 75, which is the run's exit code, as for a local run; the next ``lmlab sweep`` resumes it.

submitit is an optional dependency (``pip install 'lmlab[slurm]'``), imported only here.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmlab.errors import UserError
from lmlab.science.sweep import Launcher, RunTask, SlurmOptions

#: submitit sends its signal 90 s before the time limit; the trainer gets this long to checkpoint and exit.
STOP_GRACE_S = 75.0
#: How many times a run that reaches its time limit is requeued (submitit's ``max_num_timeout``).
MAX_TIMEOUTS = 3


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'lmlab[slurm]'") from None
    return submitit


def _preemption_signal() -> signal.Signals:
    """The signal submitit requeues on (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default)."""
    return signal.Signals["SIG" + _submitit().JobEnvironment.USR_SIG]


def child_exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it: its ``Popen`` (perhaps blocked in ``wait()`` in the frame
    this signal handler interrupted) still collects the exit code."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


@dataclass
class SlurmRunTask(RunTask):
    """A run that submitit can checkpoint: ``checkpoint()`` stops the trainer cleanly and hands the task back to
    be requeued (it resumes, since the trainer left a checkpoint)."""

    child: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)  # the trainer

    def spawn(self, argv: list[str], log: IO[str]) -> subprocess.Popen:
        ignore = functools.partial(signal.signal, _preemption_signal(), signal.SIG_IGN)
        self.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=ignore)
        return self.child

    def checkpoint(self) -> Any:
        """SIGTERM to the trainer, up to ``STOP_GRACE_S`` for it to checkpoint and exit; then this task, to rerun."""
        child = self.child
        if child is not None and not child_exited(child.pid):
            os.kill(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while not child_exited(child.pid):
                if time.monotonic() > deadline:
                    os.kill(child.pid, signal.SIGKILL)  # the requeued run resumes from its last periodic checkpoint
                    break
                time.sleep(0.2)
        return _submitit().helpers.DelayedSubmission(self)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "child"}  # a process does not travel


def executor_parameters(options: SlurmOptions, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for one array task per run."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": options.time,
        "cpus_per_task": options.cpus,
        "array_parallelism": options.array_parallelism,
        "additional_parameters": dict(options.sbatch),
    }
    if options.partition:
        params["partition"] = options.partition
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.mem:
        params["mem"] = options.mem
    return params


def slurm_launcher(options: SlurmOptions, folder: Path, job_name: str) -> Launcher:
    """Submit the tasks as one job array, print its id, wait for every task and return their exit codes."""
    submitit = _submitit()

    def launch(tasks: list[RunTask]) -> list[int]:
        if not tasks:
            return []
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
        except RuntimeError as err:  # no srun on this machine
            raise UserError(f"--launcher slurm: no Slurm client here ({err})") from None
        executor.update_parameters(**executor_parameters(options, job_name))
        try:
            with executor.batch():
                jobs = [executor.submit(SlurmRunTask(t.spec, t.run, t.out, t.cmd)) for t in tasks]
        except submitit.core.utils.FailedJobError as err:
            raise UserError(f"sbatch refused the sweep's job array: {str(err).strip()}") from None
        array_id = jobs[0].job_id.split("_")[0]
        print(f"submitted {len(jobs)} runs as Slurm job {array_id} (squeue -j {array_id}); submitit logs in {folder}")
        sys.stdout.flush()
        try:
            wait_for_jobs(jobs, array_id)
        except KeyboardInterrupt:
            subprocess.run(["scancel", array_id], check=False)
            print(f"cancelled Slurm job {array_id}; its runs checkpoint on SIGTERM: rerun to resume", file=sys.stderr)
            raise
        return [_exit_code(job, task.run.name) for job, task in zip(jobs, tasks)]

    return launch


#: Seconds between looks at Slurm's queue while waiting (result files are looked at every second).
QUEUE_POLL_S = 15.0


def wait_for_jobs(jobs: list[Any], array_id: str) -> None:
    """Return once every job has written its final result or has left Slurm's queue without one (twice in a row, so
    a result file still on its way through a shared file system is not missed).

    The queue, not submitit's ``sacct`` polling, tells a job that died (cancelled, killed at its time limit, its
    node lost) from one still pending or requeued: it works on clusters without an accounting database too. A
    failed result is final only once its task has left the queue: submitit requeues a preempted task with
    ``scontrol requeue``, and the SIGTERM that the requeue sends to the job's processes can kill that very
    ``scontrol`` first, leaving a failed result behind a task that was requeued and will write a new one.
    """
    pending = list(jobs)
    missing: set[str] = set()
    last_look = time.monotonic()
    while pending:
        pending = [job for job in pending if not _succeeded(job)]
        if pending and time.monotonic() - last_look >= QUEUE_POLL_S:
            last_look = time.monotonic()
            queued = _queued(array_id)
            if queued is not None:
                gone = {job.job_id for job in pending if job.job_id not in queued}
                pending = [job for job in pending if job.job_id not in gone & missing]
                missing = gone
        if pending:
            time.sleep(1.0)


def _succeeded(job: Any) -> bool:
    """Whether the job's result file holds a success (a failure, or a file half written, is not final yet)."""
    if not job.paths.result_pickle.exists():
        return False
    try:
        outcome, _ = _submitit().core.utils.pickle_load(job.paths.result_pickle)
    except Exception:  # noqa: BLE001 - a result being written: look again in a second
        return False
    return outcome == "success"


def _queued(array_id: str) -> set[str] | None:
    """Ids of the array's tasks still in the queue (pending, running, requeued); None if squeue failed."""
    cmd = ["squeue", "--noheader", "--array", "--format=%i", f"--jobs={array_id}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses an id it no longer knows; that is an empty queue, not a failure.
        return set() if "Invalid job id" in out.stderr else None
    return set(out.stdout.split())


def _exit_code(job: Any, name: str) -> int:
    """The trainer's exit code, or 1 (with the reason on stderr) when the task failed or left no result."""
    if not job.paths.result_pickle.exists():
        print(
            f"lmlab sweep: {name}: Slurm job {job.job_id} left the queue without a result (cancelled, killed at "
            f"its time limit or its node failed; see {job.paths.stderr})",
            file=sys.stderr,
        )
        return 1
    try:
        return int(job.result())
    except _submitit().core.utils.FailedJobError as err:
        reason = next((line for line in reversed(str(err).splitlines()) if line.strip()), "no traceback")
        print(f"lmlab sweep: {name}: Slurm job {job.job_id} failed: {reason} ({job.paths.stderr})", file=sys.stderr)
        return 1
