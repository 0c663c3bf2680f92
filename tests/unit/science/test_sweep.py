"""The sweep runner with a fake trainer: grid expansion, skip finished, resume interrupted, dry run, results."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.science.sweep import TRAIN_CMD_ENV, estimate, load_sweep, run_action

FAKE = Path(__file__).with_name("fake_trainer.py")

BASE = """
name: t
model: {d_model: 64, n_layers: 2, n_heads: 2, max_seq_len: 32}
tokenizer: {vocab_size: 512}
optim: {lr: 1.0e-3}
schedule: {name: cosine}
train: {steps: 10, micro_batch_size: 2, seq_len: 32, seed: 0}
"""


@pytest.fixture
def sweep_file(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "base: base.yaml\noverrides: [train.steps=20]\ngrid:\n  optim.lr: [1.0e-3, 3.0e-3]\n  train.seed: [0, 1]\n"
    )
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv(TRAIN_CMD_ENV, f"{sys.executable} {FAKE}")
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(log))
    return path


def _calls(sweep_file: Path) -> list[list[str]]:
    log = sweep_file.parent / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_grid_expansion(sweep_file):
    spec = load_sweep(sweep_file)
    assert [r.overrides for r in spec.runs] == [
        ["optim.lr=0.001", "train.seed=0"],
        ["optim.lr=0.001", "train.seed=1"],
        ["optim.lr=0.003", "train.seed=0"],
        ["optim.lr=0.003", "train.seed=1"],
    ]
    assert spec.runs[0].name == "000_lr-0.001_seed-0"
    assert spec.overrides == ["train.steps=20"]
    assert len({r.name for r in spec.runs}) == 4


def test_runs_list_times_grid(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "s.yaml"
    path.write_text(
        "base: base.yaml\nruns:\n  - {train.steps: 5}\n  - {train.steps: 7}\ngrid: {optim.lr: [0.1, 0.2]}\n"
    )
    spec = load_sweep(path)
    assert [r.overrides for r in spec.runs] == [
        ["train.steps=5", "optim.lr=0.1"],
        ["train.steps=5", "optim.lr=0.2"],
        ["train.steps=7", "optim.lr=0.1"],
        ["train.steps=7", "optim.lr=0.2"],
    ]


def test_bad_sweep_files(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base.yaml\ngird: {optim.lr: [1]}\n")
    with pytest.raises(ConfigError, match="gird"):
        load_sweep(bad)
    bad.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base config not found"):
        load_sweep(bad)


def test_run_skip_and_resume(sweep_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--jobs", "2"]) == 0
    assert len(_calls(sweep_file)) == 4
    by_dir = {c[2]: c for c in _calls(sweep_file)}  # --jobs 2: the calls may come in any order
    first = by_dir[str(out / "000_lr-0.001_seed-0")]
    assert first[0].endswith("base.yaml") and first[1] == "--out"
    assert first[3:] == ["--quiet", "train.steps=20", "optim.lr=0.001", "train.seed=0"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert rows[0]["lr"] == "0.001" and rows[0]["val_loss/stories"]

    # Interrupt one run: a checkpoint but a "running" summary -> it is resumed; the others are skipped.
    victim = out / "002_lr-0.003_seed-0"
    (victim / "checkpoints" / "step_0000010").mkdir(parents=True)
    summary = json.loads((victim / "summary.json").read_text())
    (victim / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    assert run_action(victim) == "resume"
    assert main(["sweep", str(sweep_file), "--out", str(out)]) == 0
    calls = _calls(sweep_file)
    assert len(calls) == 5
    assert calls[-1] == ["--resume", str(victim), "--quiet"]
    assert "1 resumed, 3 skipped" in capsys.readouterr().out


def test_dry_run_prints_plan_without_training(sweep_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--dry-run", "--tokens-per-s", "1000"]) == 0
    text = capsys.readouterr().out
    assert not _calls(sweep_file)
    assert "000_lr-0.001_seed-0" in text and "start" in text
    # 20 steps x 2 sequences x 32 tokens = 1,280 tokens; 1.28 s at 1000 tokens/s.
    assert "1,280" in text
    assert "4 runs" in text


def test_ladder_picks_size_per_budget(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "ladder.yaml"
    path.write_text(
        "base: base.yaml\nladder: {compute: [1.0e13, 1.0e15, 1.0e16], sizes: [nano, micro, tiny], tokens_per_param: 20}\n"
    )
    spec = load_sweep(path)
    assert [r.name for r in spec.runs] == ["000_C-1e13_size-nano", "001_C-1e15_size-micro", "002_C-1e16_size-tiny"]
    for run, budget in zip(spec.runs, (1e13, 1e15, 1e16)):
        est = estimate(spec, run)
        assert est["flops"] == pytest.approx(budget, rel=1e-3)  # steps chosen so that FLOPs match the budget
        assert (
            "model.d_model=" + {"nano": "128", "micro": "192", "tiny": "256"}[run.name.split("-")[-1]] in run.overrides
        )
    iso = tmp_path / "iso.yaml"
    iso.write_text("base: base.yaml\nladder: {compute: [1.0e12, 1.0e13], sizes: [nano, micro], isoflop: true}\n")
    assert len(load_sweep(iso).runs) == 4


def test_sweep_results_command_names_diverged(sweep_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "base.yaml").write_text(BASE)
    sweep_file.write_text("base: base.yaml\nruns:\n  - {optim.lr: 1.0e-3}\n  - {fake.diverge: true}\n")
    out = tmp_path / "out2"
    main(["sweep", str(sweep_file), "--out", str(out)])
    (out / "results.csv").unlink()
    assert main(["sweep", "results", str(out)]) == 0
    assert "1 diverged, 1 finished" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["finished", "diverged"]
