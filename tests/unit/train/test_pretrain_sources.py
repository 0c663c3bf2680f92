"""Pretraining on a mixture, resuming a finished run, and distilling from a teacher run."""

import json

import pytest

from lmlab.errors import ConfigError
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics

from helpers import tiny_config

MIXTURE = (
    "data.source=mixture",
    "data.mixture=[{name: norra, weight: 3, synthetic: {world: languages, subset: norra, n_docs: 200}},"
    " {name: qazan, weight: 1, synthetic: {world: languages, subset: qazan, n_docs: 200}}]",
)


def test_mixture_run_logs_per_source_validation(tmp_path):
    summary = run_pretraining(tiny_config(*MIXTURE), tmp_path / "m", quiet=True)
    ev = [r for r in read_metrics(tmp_path / "m") if r["kind"] == "eval"][-1]
    assert {"val_loss/norra", "val_loss/qazan"} <= set(ev)
    assert ev["val_loss"] == pytest.approx(0.75 * ev["val_loss/norra"] + 0.25 * ev["val_loss/qazan"])
    assert summary["final_val_loss"] == ev["val_loss"]


def test_mixture_resume_is_bitwise(tmp_path, monkeypatch):
    from lmlab.train.loop import Trainer

    full = tmp_path / "full"
    run_pretraining(tiny_config(*MIXTURE), full, quiet=True)
    real = Trainer.train_step

    def crash(self, *args, **kwargs):
        if self.step == 4:
            raise RuntimeError("crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError):
        run_pretraining(tiny_config(*MIXTURE), tmp_path / "b", quiet=True)
    monkeypatch.setattr(Trainer, "train_step", real)
    run_pretraining(tiny_config(*MIXTURE), tmp_path / "b", resume=True, quiet=True)
    a = [r["loss"] for r in read_metrics(full) if r["kind"] == "train"]
    b = [r["loss"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert a == b


def test_resuming_a_finished_run_keeps_its_final_numbers(tmp_path):
    first = run_pretraining(tiny_config(), tmp_path / "r", quiet=True)
    again = run_pretraining(tiny_config(), tmp_path / "r", resume=True, quiet=True)
    assert again["final_val_loss"] == first["final_val_loss"] is not None
    assert again["final_train_loss"] == first["final_train_loss"] is not None
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "finished"


def test_distillation_from_a_teacher_run(tmp_path):
    teacher = tmp_path / "teacher"
    run_pretraining(tiny_config(), teacher, quiet=True)
    cfg = tiny_config(f"objective.distill.teacher={teacher}", "objective.distill.alpha=0.5")
    run_pretraining(cfg, tmp_path / "student", quiet=True)
    rec = [r for r in read_metrics(tmp_path / "student") if r["kind"] == "train"][0]
    assert any(k.startswith("kd") or "distill" in k for k in rec), rec
    with pytest.raises(ConfigError, match="topk_cache needs a fixed dataset"):
        run_pretraining(
            tiny_config(f"objective.distill.teacher={teacher}", "objective.distill.topk_cache=8"),
            tmp_path / "s2",
            quiet=True,
        )
