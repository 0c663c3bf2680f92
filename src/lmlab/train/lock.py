"""One writer per run directory: an advisory lock held for the whole run.

``RunLock`` takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` and writes the holder's PID, host
and start time into it. A second ``lmlab`` process on the same directory fails at once with one
message naming the holder. The kernel releases the lock when its process dies, so a lock file left by
a killed run is simply taken over (with a warning naming the dead holder). ``flock`` locks are local
to one machine: two hosts sharing a network filesystem are not protected from each other.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from lmlab.errors import UserError

LOCK_FILE = ".lock"


class RunLockedError(UserError):
    """Another process holds the run directory."""


class RunLock:
    """Exclusive advisory lock on a run directory (``acquire`` / ``release``; a context manager too)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, quiet: bool = False) -> RunLock:
        if self.path.is_symlink():
            raise UserError(f"{self.path} is a symbolic link; remove it (lmlab does not write through links)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another lmlab process ({holder}); wait for it to finish, "
                "stop it, or choose another --out"
            ) from None
        previous = _read_holder(fd)
        if previous and not quiet:
            print(
                f"warning: taking over the lock of {self.path.parent} left by {_describe(previous)} (no longer running)"
            )
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        holder["command"] = " ".join(sys.argv[:4])
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock and clear the holder record (the file stays: removing it would race a waiting writer)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "PID unknown"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
