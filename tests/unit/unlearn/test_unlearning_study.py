"""The analysis of examples/unlearning/run_study.py on hand-made runs (no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _study():
    path = ROOT / "examples/unlearning/run_study.py"
    spec = importlib.util.spec_from_file_location("unlearning_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(fq: float, utilities: list[float], retain_p: float = 0.9, forget_p: float = 0.1) -> dict:
    curve = [
        {
            "step": 10 * i,
            "forget_quality": 1e-3,
            "model_utility": u,
            "retain/probability": 1.0,
            "forget/probability": 1.0,
        }
        for i, u in enumerate(utilities)
    ]
    start = {"forget_quality": 1e-20, "model_utility": utilities[0], "privleak": -100.0}
    start |= {"retain/probability": 1.0, "retain/nll": 0.0, "forget/probability": 1.0}
    report = {
        "forget_quality": fq,
        "model_utility": utilities[-1],
        "privleak": -50.0,
        "retain": {"probability": retain_p, "nll": 0.1},
        "forget": {"probability": forget_p},
    }
    return {"report": report, "curve": curve, "start": start}


def test_analysis_reports_every_split_and_claim(tmp_path):
    study = _study()
    methods, splits, seeds = ["ga", "npo", "grad_diff", "flat", "uld"], ["forget01", "forget05"], [0, 1]
    runs = {}
    for split in splits:
        for seed in seeds:
            runs[f"ga-{split}-s{seed}"] = _run(0.5, [0.5, 0.4, 0.2])  # halves at step 20
            runs[f"npo-{split}-s{seed}"] = _run(0.3, [0.5, 0.45, 0.4])  # never halves
            for m in ("grad_diff", "flat", "uld"):
                runs[f"{m}-{split}-s{seed}"] = _run(0.1 * (seed + 1), [0.5, 0.5, 0.5])
    results, markdown = study.analyse(runs, methods, splits, seeds, tmp_path)
    assert results["forget05"]["b_collapse_steps"] == {"ga": [20, 20], "npo": [None, None]}
    # grad_diff's FQ is 0.1 and 0.2 over the two seeds: mean 0.15, half-width t(0.975, 1) * sd / sqrt(2) = 0.635
    fq_mean, fq_half = results["table"]["grad_diff"]["forget01"]["forget_quality"]
    assert abs(fq_mean - 0.15) < 1e-12 and abs(fq_half - 12.7062 * 0.0707107 / 2**0.5) < 1e-3
    assert results["forget01"]["c_retain"]["uld"]["retain_probability_ratio"] == [0.9, 0.9]
    assert results["forget05"]["e_privleak"]["flat"] == [-50.0, -50.0]
    assert "### forget01" in markdown and "### forget05" in markdown and "| uld |" in markdown
    assert (tmp_path / "curves_forget01.png").is_file() and (tmp_path / "curves_forget05.png").is_file()
