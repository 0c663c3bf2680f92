"""Smoke run of ``benchmarks/time_to_loss.py`` (issue 16 item 2) at its smallest settings, and the arithmetic it
reports: the crossing of a target loss interpolated between evaluations, and the Student-t interval. The
baseline and lmlab's AdamW train the same model on the same windows, so their curves nearly coincide (lmlab
leaves the tied embedding undecayed, nanoGPT decays it): the comparison is like for like."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import time_to_loss  # noqa: E402

TINY = ["--steps", "8", "--docs", "600", "--vocab", "320", "--d-model", "32", "--layers", "1", "--heads", "2",
        "--seq-len", "32", "--batch", "4", "--eval-every", "4", "--eval-tokens", "256", "--warmup", "2",
        "--threads", "1"]  # fmt: skip


def test_reach_interpolates_between_evaluations():
    curve = time_to_loss.Curve()
    curve.add(0, 0, 0.0, 5.0)
    curve.add(10, 1000, 2.0, 4.0)
    curve.add(20, 2000, 4.0, 3.0)
    assert curve.reach(3.5) == pytest.approx({"tokens": 1500, "seconds": 3.0})
    assert curve.reach(4.0) == pytest.approx({"tokens": 1000, "seconds": 2.0})
    assert curve.reach(2.9) is None


def test_mean_ci():
    mean, half = time_to_loss.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-6)  # t(0.975, 2) · s / √n
    assert time_to_loss.mean_ci([0.5]) == (0.5, 0.0)


def test_smoke_run_writes_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ttl.json"
    assert (
        time_to_loss.main([*TINY, "--seeds", "0,1", "--speed-reps", "2", "--speed-steps", "1", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert {k: len(v) for k, v in result["step_seconds"].items()} == dict.fromkeys(time_to_loss.VARIANTS, 2)
    base_ratio = result["summary"]["baseline"]
    assert base_ratio["time_ratio"][0] == pytest.approx(1.0) and base_ratio["raw_time_ratio"][0] == pytest.approx(1.0)
    assert set(result["summary"]) == set(time_to_loss.VARIANTS)
    base = result["curves"]["baseline"]["0"]
    assert [p["step"] for p in base] == [0, 4, 8]
    assert result["target"] == pytest.approx(max(result["curves"]["baseline"][s][-1]["val_loss"] for s in ("0", "1")))
    assert result["summary"]["baseline"]["token_ratio"][0] == pytest.approx(1.0)
    adamw = result["curves"]["lmlab_adamw"]["0"]
    assert [p["val_loss"] for p in adamw] == pytest.approx([p["val_loss"] for p in base], abs=2e-3)
    assert [p["step"] for p in result["curves"]["best"]["0"]][-1] == round(0.6 * 8)  # its own shorter horizon
    assert "tokens vs baseline" in capsys.readouterr().out
    again = tmp_path / "again.json"  # only the step timing, on the recorded curves
    assert time_to_loss.main([*TINY, "--from-json", str(out), "--speed-reps", "1", "--speed-steps", "1",
                              "--json", str(again)]) == 0  # fmt: skip
    redone = json.loads(again.read_text())
    assert redone["curves"] == result["curves"] and redone["target"] == result["target"]


def test_best_recipe_settings(tmp_path):
    """The best recipe's config: Muon, qk-norm, z-loss, WSD over its own horizon, bf16 autocast (or float32 with
    ``--best-precision fp32``) and the fused head + loss; the baseline settings stay float32 and standard."""
    args = time_to_loss.parse_args([*TINY, "--best-horizon", "0.5"])
    args.model_vocab = 0
    best = time_to_loss.run_config(args, 0, *time_to_loss.best_overrides(args))
    assert (best.optim.name, best.model.attention.qk_norm, best.objective.z_loss) == ("muon", True, 1e-4)
    assert (best.schedule.name, best.train.steps) == ("wsd", 4)
    assert (best.train.precision, best.objective.loss_impl) == ("bf16", "fused")
    args = time_to_loss.parse_args([*TINY, "--best-precision", "fp32"])
    args.model_vocab = 0
    assert time_to_loss.run_config(args, 0, *time_to_loss.best_overrides(args)).train.precision == "fp32"
    plain = time_to_loss.run_config(args, 0)
    assert (plain.train.precision, plain.objective.loss_impl, plain.optim.name) == ("fp32", "standard", "adamw")


def test_refuses_bad_arguments():
    with pytest.raises(time_to_loss.UserError, match="unknown variant"):
        time_to_loss.parse_args(["--variants", "sgd"])
    with pytest.raises(time_to_loss.UserError, match="best-horizon"):
        time_to_loss.parse_args(["--best-horizon", "0"])
