"""Stopping a run cleanly on a signal: finish the step, write a checkpoint, exit with a known code.

Schedulers warn before they take a job away: Slurm and Kubernetes send SIGTERM (Slurm can be told to
send SIGUSR1 some time ahead with ``--signal``), a user presses Ctrl-C (SIGINT). While a run is
training, these only set a flag; the loop sees it after the current optimizer step, writes a
checkpoint (collectively when there are several ranks: the flag is summed over ranks with the step's
metrics, so every rank stops after the same step), marks the summary ``"interrupted"`` and the
command exits with ``EXIT_INTERRUPTED``. ``--resume`` then continues exactly where it stopped.

A second SIGINT in a single interactive process stops at once (the usual "press Ctrl-C twice");
processes started by torchrun ignore repeats, because torchrun forwards the signal it receives to
every worker on top of the one the terminal already sent them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later" — resume the run
EXIT_DIVERGED = 3


class StopRequest:
    """The flag the signal handlers set; ``signal_name`` says which signal asked, if any."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str) -> None:
        """Ask the loop to stop after the current step (what a handler does; also usable from code)."""
        if self.signal_name is None:
            self.signal_name = name

    def _handler(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT" and "LOCAL_RANK" not in os.environ:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.request(name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the stop signals while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
