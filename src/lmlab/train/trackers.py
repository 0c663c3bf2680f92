"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each an optional extra imported only when chosen.

``train.trackers: [tensorboard, wandb, mlflow]`` mirrors what the run writes to ``metrics.jsonl``: every record's
numbers as ``<kind>/<name>`` at its step (``train/loss``, ``eval/val_loss`` …), the resolved config when the run
starts and ``summary.json`` when it ends. ``metrics.jsonl`` stays the record of truth; a tracker is a view of it.
Each tool is configured the way its users already do it, through its own environment variables:

- TensorBoard writes event files under ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``);
- W&B logs to ``train.tracker_project`` (``WANDB_PROJECT`` wins), the run named after the run directory and
  identified by the lmlab run id, so a resumed run continues the same W&B run; ``WANDB_MODE=offline`` keeps it
  on disk (``RUN_DIR/wandb``) for ``wandb sync`` later;
- MLflow logs to ``MLFLOW_TRACKING_URI`` (a server, or ``file:DIR``; default ``./mlruns``) in the experiment
  ``train.tracker_project`` (``MLFLOW_EXPERIMENT_NAME`` wins); the config is flattened into parameters and kept
  whole as the artifact ``config.json``, the summary as ``summary.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from lmlab.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /]")  # MLflow metric names: letters, digits, _ - . space /
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any] | None) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record as ``<kind>/<name>`` (booleans and texts left out)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value == value and abs(value) != float("inf"):  # NaN and inf stay in metrics.jsonl only (as null)
            out[f"{kind}/{key}"] = float(value)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and None as their JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def _require(name: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"train.trackers includes {name}, which needs the {_EXTRA[name]} package: pip install 'lmlab[{name}]'"
        ) from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, project: str, run_name: str, run_id: str, config: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))})
        self.run.finish()


class MLflowTracker:
    def __init__(self, project: str, run_name: str, run_id: str, config: dict[str, Any]) -> None:
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or project)
        found = mlflow.search_runs(filter_string=f"tags.lmlab_run_id = '{run_id}'", output_format="list")
        if found:  # a resumed run continues its MLflow run
            self.active = mlflow.start_run(run_id=found[0].info.run_id)
        else:
            self.active = mlflow.start_run(run_name=run_name, tags={"lmlab_run_id": run_id})
            params = {k: str(v)[:500] for k, v in flatten(config).items()}  # MLflow caps a value at 500 chars
            mlflow.log_params(params)
            mlflow.log_dict(config, "config.json")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({_MLFLOW_UNSAFE.sub("_", k): v for k, v in values.items()}, step=step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.mlflow.log_dict(summary, "summary.json")
        self.mlflow.end_run()


def start_trackers(
    names: Iterable[str], run_dir: Path, *, project: str, run_name: str, run_id: str, config: dict[str, Any]
) -> list[Tracker]:
    """The chosen trackers, started (a missing package is a ``ConfigError`` naming the extra to install)."""
    out: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            out.append(TensorBoardTracker(run_dir))
        elif name == "wandb":
            out.append(WandbTracker(run_dir, project, run_name, run_id, config))
        elif name == "mlflow":
            out.append(MLflowTracker(project, run_name, run_id, config))
        else:
            raise ConfigError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    return out
