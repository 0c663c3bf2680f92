"""A one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd from Debian's ``munge`` and
``slurm-wlm`` packages, with their config, key, state, spool and logs in one directory.

``missing_slurm()`` says why no cluster can start here (None when one can). ``SlurmCluster(root).start()``
writes ``slurm.conf`` (this machine's CPUs and memory as reported by ``slurmd -C``, free ports, no cgroups, no
accounting, ``SlurmUser=root``, a requeued job eligible again after 6 s instead of 2 minutes), a fresh munge key, starts the three daemons in the foreground as children of
the test process (no systemd needed), points ``SLURM_CONF`` at the config so that sbatch, squeue and friends
talk to this cluster, and waits until the node is idle. ``stop()`` cancels what is left in the queue and stops
the daemons it started. A daemon that does not come up is an error with the tail of its log, not a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 30.0


def missing_slurm() -> str | None:
    """Why a test cluster cannot start on this machine, or None."""
    for daemon in DAEMONS:
        if shutil.which(daemon) is None and not Path("/usr/sbin", daemon).exists():
            return f"{daemon} not installed: apt-get install slurm-wlm munge"
    for client in ("sbatch", "squeue", "scontrol", "scancel", "srun"):
        if shutil.which(client) is None:
            return f"{client} not on PATH: apt-get install slurm-wlm"
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd starts jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """The daemons of a one-node cluster rooted at ``root``; ``partition`` is its one (default) partition."""

    partition = "debug"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.processes: dict[str, subprocess.Popen] = {}
        self._previous_conf = os.environ.get("SLURM_CONF")

    def start(self) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            ["--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}"]
            + [f"--{name}-file={self.root / 'munge' / ('munged.' + name)}" for name in ("log", "pid", "seed")],
        )
        self._wait(lambda: socket_path.exists(), "munged to open its socket")
        self.conf.write_text(self._config(socket_path))
        os.environ["SLURM_CONF"] = str(self.conf)
        self._spawn("slurmctld", ["-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, f"node {self.node} to be idle in sinfo")
        return self

    def stop(self) -> None:
        if "slurmctld" in self.processes:
            subprocess.run(["scancel", "--user=root"], capture_output=True, timeout=30)
            deadline = time.monotonic() + 15
            while self.queue() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf

    def queue(self) -> list[str]:
        """``JOBID STATE REASON`` for each job in the queue (array tasks one per line)."""
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def _config(self, munge_socket: Path) -> str:
        hardware = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node_line = next(line for line in hardware.splitlines() if line.startswith("NodeName="))
        node_fields = [f for f in node_line.split()[1:] if not f.startswith("RealMemory=")]
        memory_mb = int(node_line.split("RealMemory=")[1].split()[0])
        root = self.root
        return "\n".join(
            [
                "ClusterName=lmlabtest",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # A requeued job waits for its old credential to expire (120 s by default) before it starts again.
                f"AuthInfo=socket={munge_socket},cred_expire=5",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                # No cgroups (containers rarely delegate them) and no accounting database.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "SwitchType=switch/none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",  # memory is not a consumable: jobs without --mem share the node
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "KillWait=5",
                "SchedulerParameters=sched_interval=1,bf_interval=1",  # and then starts within a second
                "InactiveLimit=0",
                "MinJobAge=300",
                f"NodeName={self.node} NodeAddr=127.0.0.1 {' '.join(node_fields)} "
                f"RealMemory={max(256, memory_mb * 3 // 4)} State=UNKNOWN",
                f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self.processes[name] = subprocess.Popen(
            [_binary(name), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [name for name, proc in self.processes.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"timed out after {START_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"test Slurm cluster: waiting for {what}: {problem}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)
