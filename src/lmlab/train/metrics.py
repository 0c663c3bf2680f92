"""Run metrics: ``metrics.jsonl`` (always), mirrored to experiment trackers (optional), console progress bar."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.safe_io import open_append, refuse_symlink, write_text_atomic
from lmlab.train.trackers import Tracker, scalars


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors its numbers to the run's trackers
    (``lmlab.train.trackers``, started and finished by the run)."""

    def __init__(self, run_dir: Path, *, trackers: Sequence[Tracker] = (), resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        refuse_symlink(self.path)  # neither read nor written through a link out of the run directory
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open_append(self.path)
        self.trackers = list(trackers)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint so the log has no duplicate steps."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", -1) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(x + "\n" for x in kept))

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        values = scalars(record) if self.trackers else {}
        for tracker in self.trackers if values else ():
            tracker.log(int(record.get("step", 0)), values)

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
