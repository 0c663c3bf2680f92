"""Extending the training loop without subclassing it: callbacks called at fixed points of ``Trainer.fit``.

A callback overrides any of the hooks below; ``trainer.emit(record)`` adds a record to
``metrics.jsonl`` (rank 0) and to the trackers. Hooks run on every rank, so a callback that runs a
forward pass under FSDP stays collective. Examples: the gradient-entanglement probe of alignment
runs (``lmlab.recipes.align``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from lmlab.train.loop import Trainer, TrainResult


class Callback:
    """Base class with no-op hooks."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (``trainer.step`` is 0 on a fresh run, else the resumed step)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After optimizer step ``trainer.step``; ``metrics`` may still be device tensors (read them sparingly)."""

    def on_evaluate(self, trainer: Trainer, results: dict[str, float]) -> None:
        """After an evaluation at ``trainer.step``."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After the checkpoint of ``trainer.step`` was written."""

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the loop ended: finished, diverged or interrupted."""
