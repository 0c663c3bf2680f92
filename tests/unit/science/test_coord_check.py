"""The μP coordinate check (``lmlab.science.coord_check``, docs/science.md §25): after a few Adam steps at a large
LR, activation sizes are flat across widths under μP and grow under the standard parametrization."""

from __future__ import annotations

import json
import math

import pytest

from lmlab.cli import main as cli_main
from lmlab.models.build import build_model
from lmlab.science.coord_check import (
    TrainSetup,
    WidthSetup,
    activation_probe,
    byte_tokens,
    coord_check,
    log_slope,
)

HIDDEN = ("layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp")


def test_log_slope_by_hand():
    assert log_slope([32, 64, 128], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert log_slope([32, 64, 128], [3.0, 3.0, 3.0]) == pytest.approx(0.0, abs=1e-12)
    assert log_slope([10, 1000], [5.0, 0.5]) == pytest.approx(-0.5)


def test_probe_names_every_activation():
    model = build_model(WidthSetup(head_dim=16).model_config(32, "mup"))
    with activation_probe(model) as sizes:
        model(byte_tokens(n_docs=2)[None, :16])
    assert list(sizes) == ["embedding", *HIDDEN, "logits"]
    assert all(math.isfinite(v) and v > 0 for v in sizes.values())


def test_mup_is_flat_and_standard_grows():
    """Widths 64-256 (d_head 32, 2 layers), 6 steps at lr 1e-2, 3 seeds averaged. Measured slopes at the last
    step: μP logits -0.02, hidden outputs -0.32..-0.02; standard logits +0.69, hidden +1.9..+3.2."""
    widths = [64, 128, 256]
    report = coord_check(
        widths,
        WidthSetup(head_dim=32, seq_len=32, base_width=64),
        TrainSetup(steps=6, lr=1e-2),
        seeds=(0, 1, 2),
        tokens=byte_tokens(n_docs=200),
    )
    mup, sp = report["results"]["mup"]["slopes"], report["results"]["standard"]["slopes"]
    assert abs(mup["logits"]) < 0.1
    assert abs(mup["embedding"]) < 0.1 and abs(sp["embedding"]) < 0.1  # same init and LR in both
    assert all(abs(mup[name]) < 0.5 for name in HIDDEN)  # finite-width noise at these small widths
    assert sp["logits"] > 0.4
    assert all(sp[name] > 1.0 for name in HIDDEN)
    # at initialisation (step 1): μP's hidden outputs are flat; its logits, a sum of d random terms of size
    # σ·O(1) times α_out/m_d, fall like sqrt(d)/d = d^-0.5; the standard model's rise like sqrt(d) or faster
    init = {p: {n: log_slope(widths, v[0]) for n, v in r["sizes"].items()} for p, r in report["results"].items()}
    assert all(abs(init["mup"][name]) < 0.1 for name in HIDDEN)
    assert init["mup"]["logits"] == pytest.approx(-0.5, abs=0.1)
    assert init["standard"]["logits"] == pytest.approx(0.5, abs=0.1)
    assert all(init["standard"][name] > 0.5 for name in HIDDEN)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cc"
    argv = ["coord-check", "--out", str(out), "--widths", "32", "64", "--head-dim", "16", "--steps", "2"]
    assert cli_main([*argv, "--seeds", "1", "--seq-len", "16"]) == 0
    report = json.loads((out / "coord_check.json").read_text())
    assert report["widths"] == [32, 64] and set(report["results"]) == {"standard", "mup"}
    assert len(report["results"]["mup"]["sizes"]["logits"]) == 2  # one row per step
    assert (out / "coord_check.png").stat().st_size > 0
    assert "mup: logits slope" in capsys.readouterr().out
    assert cli_main([*argv, "--seeds", "0"]) == 1  # a user error: one line, no traceback
    assert "--seeds must be >= 1" in capsys.readouterr().err
