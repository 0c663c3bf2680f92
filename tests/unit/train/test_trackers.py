"""Experiment trackers: what a run sends to W&B and MLflow (the resolved config, every metrics record, the summary),
checked with the real packages in their offline modes (a W&B offline run directory, an MLflow file store) and, for
W&B, whose offline files are binary, with a recording stand-in for the exact calls."""

from __future__ import annotations

import json
import sys
import types

import pytest

from lmlab.config import to_dict
from lmlab.errors import ConfigError
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics
from lmlab.train.trackers import flatten, scalars

from helpers import tiny_config


def test_scalars_and_flatten_by_hand():
    record = {"kind": "eval", "step": 7, "val_loss": 2.5, "n": 3, "ok": True, "name": "x", "bad": float("nan")}
    assert scalars(record) == {"eval/val_loss": 2.5, "eval/n": 3.0}
    assert flatten({"train": {"lr": 1e-3, "evals": [1]}, "name": None}) == {
        "train.lr": 1e-3,
        "train.evals": "[1]",
        "name": "null",
    }


class FakeWandb(types.ModuleType):
    """Records ``wandb.init`` / ``run.log`` / ``run.summary`` / ``run.finish`` as a run makes them."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.summary, self.finished = [], [], {}, 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            summary = fake.summary

            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_the_config_every_record_and_the_summary(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = tiny_config("train.trackers=[wandb]", "train.tracker_project=studies")
    summary = run_pretraining(cfg, tmp_path / "run", quiet=True)
    (init,) = fake.inits
    assert init["project"] == "studies" and init["name"] == "run" and init["resume"] == "allow"
    assert init["id"] == json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert init["config"]["train"]["steps"] == cfg.train.steps and init["config"]["model"]["d_model"] == 32
    records = [r for r in read_metrics(tmp_path / "run") if scalars(r)]
    assert fake.logged == [(r["step"], scalars(r)) for r in records]  # every record, at its step
    assert fake.summary["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    assert fake.finished == 1


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    """The real package in offline mode: one offline run under RUN_DIR/wandb, named by the lmlab run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_pretraining(tiny_config("train.trackers=[wandb]", "train.steps=2"), tmp_path / "run", quiet=True)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert offline.name.endswith(run_id)


def test_mlflow_file_store_holds_params_metrics_and_artifacts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = tiny_config("train.trackers=[mlflow]", "train.tracker_project=studies")
    run_pretraining(cfg, tmp_path / "run", quiet=True)
    mlflow.set_tracking_uri(uri)
    (found,) = mlflow.search_runs(experiment_names=["studies"], output_format="list")
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["train.steps"] == str(cfg.train.steps)
    assert found.data.params["model.d_model"] == "32"
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(found.info.run_id, "train/loss")
    logged = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], pytest.approx(r["loss"])) for r in logged
    ]
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"config.json", "summary.json"}
    config = mlflow.artifacts.load_dict(f"{found.info.artifact_uri}/config.json")
    assert config == to_dict(load_resolved(tmp_path / "run"))


def load_resolved(run_dir):
    from lmlab.config import load_config

    return load_config(run_dir / "config.yaml")


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # an import of it fails
    with pytest.raises(ConfigError, match=r"needs the mlflow package: pip install 'lmlab\[mlflow\]'"):
        run_pretraining(tiny_config("train.trackers=[mlflow]"), tmp_path / "run", quiet=True)


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="train.trackers"):
        tiny_config("train.trackers=[neptune]")
