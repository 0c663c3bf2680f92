"""``lmlab report SWEEP``: results and curves of its runs, and each fit with its intervals, warnings and band."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.report.fits import fit_points, fit_section, frontier_band
from lmlab.science.chinchilla import PRESETS, ChinchillaParams, compute_optimal


def captions(text: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r'<figure class="figure">.*?<figcaption>(.*?)</figcaption>', text)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, run_writer):
    """Eight runs on a Chinchilla law, a diverged run, and a Chinchilla fit of them with bootstrap intervals."""

    root = tmp_path_factory.mktemp("sweep") / "sweep"
    rng = np.random.default_rng(0)
    rows = []
    for i, (n, d) in enumerate(zip(np.geomspace(1e7, 1e9, 8), np.geomspace(1e9, 1e8, 8))):
        loss = float(PRESETS["epoch"].loss(n, d)) * math.exp(0.002 * rng.standard_normal())
        run_writer(root / f"r{i}", loss=loss)
        rows.append({"params": n, "tokens": d, "loss": loss})
    run_writer(root / "nan-run", loss=float("nan"), status="diverged")
    csv_path = root.parent / "points.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["params", "tokens", "loss"])
        w.writeheader()
        w.writerows(rows)
    fit = ["fit", "chinchilla", str(csv_path), "--grid", "small", "--out", str(root / "fit-chinchilla")]
    assert main([*fit, "--bootstrap", "20"]) == 0
    return root


def test_sweep_report(sweep):
    assert main(["report", str(sweep)]) == 0
    text = (sweep / "report.html").read_text()
    assert "Results (9 runs: 1 diverged, 8 finished)" in text
    assert '<tr class="bad">' in text and '<table class="sortable">' in text
    assert "chinchilla fit" in text and "fit-chinchilla" in text
    # Every parameter of the fit stands beside its bootstrap interval.
    intervals = json.loads((sweep / "fit-chinchilla" / "fit.json").read_text())["intervals"]
    assert set(intervals) == {"E", "A", "B", "alpha", "beta", "a_opt"}
    for name, (lo, hi) in intervals.items():
        interval = html.escape(f"{lo:.5g} – {hi:.5g}")
        assert re.search(rf"<td class=text>{name}</td><td[^>]*>[^<]+</td><td class=text>{interval}</td>", text)
    assert "no confidence intervals" not in text
    # the fit's errors on runs it did not see stand beside the trivial baseline's
    assert "<h4>Errors on unseen runs</h4>" in text and "<td class=text>leave-one-out</td>" in text
    assert "baseline_mean_rel_error" in text
    caps = captions(text)
    assert caps[0] == "final validation loss against training FLOPs (finished runs)"
    assert caps[-1] == "chinchilla fit: fit.png"
    assert "train: loss (nan-run, r0, r1, r2, r3, r4, r5, r6, r7)" in caps


def test_fit_warnings_and_missing_intervals_are_prominent(sweep, tmp_path):
    fit_dir = tmp_path / "fit-point"
    shutil.copytree(sweep / "fit-chinchilla", fit_dir)
    fit = json.loads((fit_dir / "fit.json").read_text())
    fit.update(intervals={}, warnings=["alpha is at the edge of the grid"])
    (fit_dir / "fit.json").write_text(json.dumps(fit))
    text = fit_section(fit_dir, tmp_path)
    boxes = [html.unescape(b) for b in re.findall(r'<p class="warning">(.*?)</p>', text)]
    assert boxes[0] == "Warning: alpha is at the edge of the grid"
    assert boxes[1].startswith("Warning: no confidence intervals")
    # The boxes come before the parameter table, so they are read first.
    assert text.index('class="warning"') < text.index("<table")


def test_fit_band_from_bootstrap_draws(sweep, tmp_path):
    fit_dir = tmp_path / "fit-band"
    shutil.copytree(sweep / "fit-chinchilla", fit_dir)
    fit = json.loads((fit_dir / "fit.json").read_text())
    params = ChinchillaParams.from_dict(fit["params"])
    rng = np.random.default_rng(1)
    draws = [{k: v * (1 + 0.02 * rng.standard_normal()) for k, v in params.to_dict().items()} for _ in range(40)]
    fit["bootstrap_params"] = draws
    (fit_dir / "fit.json").write_text(json.dumps(fit))
    text = fit_section(fit_dir, tmp_path)
    assert captions(text) == [
        "chinchilla fit: fitted compute-optimal loss with its 95% bootstrap band",
        "chinchilla fit: fit.png",
    ]
    assert len(fit_points(fit, fit_dir)) == 8  # the runs the fit read, from its input CSV
    c = np.geomspace(1e15, 1e22, 30)
    centre, lo, hi = frontier_band(params, [ChinchillaParams.from_dict(d) for d in draws], c)
    assert np.all(lo <= centre) and np.all(centre <= hi) and np.all(hi - lo > 0)
    # A band of identical draws has no width; the centre is the law at the compute-optimal allocation.
    same, lo, hi = frontier_band(params, [params, params], c)
    assert np.allclose(lo, hi) and np.allclose(same, params.loss(*compute_optimal(c, params)))
