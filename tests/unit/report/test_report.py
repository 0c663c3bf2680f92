"""``lmlab report`` on a run directory and on a sweep directory with a fit."""

from __future__ import annotations

import base64
import csv
import json
import math
import re

import numpy as np

from lmlab.cli import main
from lmlab.science.chinchilla import PRESETS


def make_run(path, loss=3.0, status="finished", extra_eval=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("name: r\noptim: {lr: 0.001}\nschedule: {name: cosine}\ntrain: {seed: 3}\n")
    with (path / "metrics.jsonl").open("w") as fh:
        for step in (10, 20):
            fh.write(
                json.dumps({"kind": "train", "step": step, "tokens": step * 100, "loss": loss + 1 / step, "lr": 1e-3})
                + "\n"
            )
        fh.write(
            json.dumps(
                {
                    "kind": "eval",
                    "step": 20,
                    "tokens": 2000,
                    "val_loss": loss,
                    "val_loss/<wiki>": loss + 0.1,
                    **(extra_eval or {}),
                }
            )
            + "\n"
        )
    (path / "summary.json").write_text(
        json.dumps(
            {
                "status": status,
                "steps": 20,
                "tokens": 2000,
                "params": 12345,
                "non_embedding_params": 1000,
                "flops": 1.5e11,
                "final_val_loss": loss if math.isfinite(loss) else None,
            }
        )
    )
    (path / "samples.txt").write_text("Once upon a time <b>bold</b>")


def test_run_report(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "12,345" in text and "finished" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text  # samples are escaped
    assert "&lt;wiki&gt;" in text  # per-source losses, escaped
    assert "schedule: {name: cosine}" in text  # the config
    # The loss plot is drawn from metrics.jsonl (there is no loss.png) and embedded as a real PNG.
    (data,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_report_with_fit(tmp_path):
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    rows = []
    for i, (n, d) in enumerate(zip(np.geomspace(1e7, 1e9, 8), np.geomspace(1e9, 1e8, 8))):
        loss = float(PRESETS["epoch"].loss(n, d)) * math.exp(0.002 * rng.standard_normal())
        make_run(sweep / f"r{i}", loss)
        rows.append({"params": n, "tokens": d, "loss": loss})
    make_run(sweep / "nan-run", float("nan"), status="diverged")
    csv_path = tmp_path / "points.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["params", "tokens", "loss"])
        w.writeheader()
        w.writerows(rows)
    assert (
        main(
            [
                "fit",
                "chinchilla",
                str(csv_path),
                "--out",
                str(sweep / "fit-chinchilla"),
                "--grid",
                "small",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    assert main(["report", str(sweep)]) == 0
    text = (sweep / "report.html").read_text()
    assert "Results (9 runs: 1 diverged, 8 finished)" in text
    assert '<tr class="bad">' in text
    assert "chinchilla fit" in text and "fit-chinchilla" in text and "alpha" in text
    assert len(re.findall(r"data:image/png;base64,", text)) == 2  # loss vs FLOPs, and the fit plot


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "neither a run directory nor a sweep directory" in capsys.readouterr().err
