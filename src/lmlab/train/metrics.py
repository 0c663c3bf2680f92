"""Run metrics: ``metrics.jsonl`` (always), TensorBoard (optional), console progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.safe_io import open_append, refuse_symlink, write_text_atomic


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        refuse_symlink(self.path)  # neither read nor written through a link out of the run directory
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open_append(self.path)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "train.tensorboard=true needs the tensorboard package: pip install 'lmlab[tensorboard]'"
                ) from err
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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
        if self._tb is not None:
            step = record.get("step", 0)
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
