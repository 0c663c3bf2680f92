"""Optional TensorBoard mirror of metrics.jsonl, and bf16 autocast through the pretraining path on CPU."""

import math

import pytest

from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics

from helpers import tiny_config


def test_tensorboard_event_files_mirror_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    run_pretraining(tiny_config("train.tensorboard=true"), run, quiet=True)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    assert losses == pytest.approx(logged, rel=1e-6)
    assert "eval/val_loss" in acc.Tags()["scalars"]


def test_bf16_autocast_run_is_close_to_fp32(tmp_path):
    fp32 = run_pretraining(tiny_config(), tmp_path / "fp32", quiet=True)
    bf16 = run_pretraining(tiny_config("train.precision=bf16"), tmp_path / "bf16", quiet=True)
    assert math.isfinite(bf16["final_val_loss"])
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], abs=0.05)
