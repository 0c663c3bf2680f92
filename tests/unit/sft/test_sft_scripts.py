"""Smoke runs of the goldfish study script and the SFT throughput benchmark (tiny settings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _load(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goldfish_study_quick(tmp_path):
    study = _load("examples/goldfish_memorization/run_study.py")
    assert study.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--d-model", "32", "--layers", "1"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["standard", "goldfish"]
    assert "| goldfish |" in (tmp_path / "results.md").read_text()


def test_mean_ci_is_the_student_t_interval():
    study = _load("examples/goldfish_memorization/run_study.py")
    mean, half = study.mean_ci([1.0, 2.0, 3.0])
    # sd = 1, n = 3, t(0.975, 2) = 4.302653
    assert mean == 2.0 and abs(half - 4.302653 / 3**0.5) < 1e-5
    assert study.mean_ci([5.0]) == (5.0, 0.0)


def test_sft_throughput_benchmark_lmlab_part(tmp_path):
    bench = _load("benchmarks/sft_throughput.py")
    args = ["--no-trl", "--examples", "40", "--steps", "2", "--warmup", "1", "--vocab", "400", "--d-model", "32"]
    args += ["--layers", "1", "--heads", "2", "--seq-len", "128", "--batch", "2", "--out", str(tmp_path / "r.json")]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    packed, unpacked = report["results"]["lmlab_packed"], report["results"]["lmlab_unpacked"]
    assert packed["rows"] < unpacked["rows"] == 40 - unpacked["dropped"]  # over-long completions cut away: dropped
    assert report["ratios"]["lmlab_packed_over_unpacked"] > 0
