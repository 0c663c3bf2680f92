"""Step Law (Li et al. 2025, arXiv 2503.04715): the published predictor's vectors, grid optima, the refit of its
constants from LR × batch grids, ``lmlab fit step-law`` and ``lmlab predict hparams``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from lmlab.cli import main
from lmlab.errors import UserError
from lmlab.science.results import run_row
from lmlab.science.step_law import (
    STEP_LAW,
    STEP_LAW_UNROUNDED,
    GridOptimum,
    fit_step_law,
    grid_optimum,
    step_law_leave_one_out,
    step_law_params,
)

from helpers import write_csv


@pytest.mark.parametrize(
    ("n", "d", "lr", "batch"),
    [(1e8, 2e9, 2.5367e-3, 1.1866e5), (1e9, 1e11, 1.6325e-3, 1.1077e6), (7e9, 1.4e12, 9.1656e-4, 4.9988e6)],
)
def test_published_predictor_matches_the_science_vectors(n, d, lr, batch):
    assert STEP_LAW.lr(n, d) == pytest.approx(lr, rel=1e-4)
    assert STEP_LAW.batch_tokens(n, d) == pytest.approx(batch, rel=1e-4)
    # the vectors use the rounded constants; the unrounded ones move η* by up to 2% at 7e9 parameters
    assert STEP_LAW_UNROUNDED.lr(n, d) == pytest.approx(lr, rel=0.025)
    assert STEP_LAW_UNROUNDED.batch_tokens(n, d) == pytest.approx(batch, rel=0.01)


def test_params_as_the_paper_counts_them():
    assert step_law_params(n_layers=2, d_model=4, d_ff=8) == 2 * (4 * 16 + 3 * 4 * 8)


def landscape(lr, batch, lr_opt, batch_opt, floor=2.0):
    """A convex bowl in (ln η, ln B) with a cross term, minimal at (lr_opt, batch_opt)."""
    x, y = math.log(lr / lr_opt), math.log(batch / batch_opt)
    return floor + 0.08 * x * x + 0.03 * y * y + 0.02 * x * y


LRS = [2.0**k * 1e-3 for k in range(-3, 4)]
BATCHES = [2.0**k * 3e4 for k in range(-2, 3)]


def grid_rows(n, d, law=STEP_LAW, noise=0.0, rng=None):
    lr_opt, batch_opt = float(law.lr(n, d)), float(law.batch_tokens(n, d))
    rows = []
    for lr in [lr_opt * f for f in (0.25, 0.5, 1 / 1.2, 1.3, 2.0, 4.0)]:
        for b in [batch_opt * f for f in (0.3, 0.7, 1.1, 2.5)]:
            loss = landscape(lr, b, lr_opt, batch_opt) + (noise * rng.standard_normal() if noise else 0.0)
            rows.append({"run": f"r{n:g}-{d:g}-{lr:.3g}-{b:.3g}", "non_embedding_params": n, "tokens": d, "lr": lr,
                         "batch_tokens": b, "loss": loss, "status": "finished"})  # fmt: skip
    return rows


def test_grid_optimum_is_the_vertex_of_a_convex_quadratic():
    rows = grid_rows(1e7, 1e9)
    opt = grid_optimum(1e7, 1e9, *([r[k] for r in rows] for k in ("lr", "batch_tokens", "loss")))
    assert opt.inside
    assert opt.lr_opt == pytest.approx(float(STEP_LAW.lr(1e7, 1e9)), rel=1e-9)
    assert opt.batch_opt == pytest.approx(float(STEP_LAW.batch_tokens(1e7, 1e9)), rel=1e-9)
    assert opt.loss_opt == pytest.approx(2.0, abs=1e-12)


def test_grid_optimum_is_local_to_the_best_run():
    """A diverged run far from the optimum (loss 10 at the highest LR and batch) leaves the vertex where the
    3 × 3 block around the best run puts it; a quadratic through the whole grid would move."""
    rows = grid_rows(1e7, 1e9)
    lrs, batches, losses = ([r[k] for r in rows] for k in ("lr", "batch_tokens", "loss"))
    far = max(range(len(rows)), key=lambda k: (lrs[k], batches[k]))
    losses[far] = 10.0
    opt = grid_optimum(1e7, 1e9, lrs, batches, losses)
    assert opt.inside and opt.lr_opt == pytest.approx(float(STEP_LAW.lr(1e7, 1e9)), rel=1e-9)
    assert opt.batch_opt == pytest.approx(float(STEP_LAW.batch_tokens(1e7, 1e9)), rel=1e-9)
    # the best run on the grid's edge: no block around it, so the best run itself
    edge = [landscape(lr, b, max(lrs), 3e4) for lr, b in zip(lrs, batches)]
    assert not grid_optimum(1e7, 1e9, lrs, batches, edge).inside


def test_grid_optimum_off_the_grid_falls_back_to_its_best_point():
    lrs, batches = np.meshgrid(LRS, BATCHES)
    losses = [landscape(lr, b, 1.0, 3e4) for lr, b in zip(lrs.ravel(), batches.ravel())]  # optimum LR far above
    opt = grid_optimum(1e7, 1e9, lrs.ravel(), batches.ravel(), losses)
    assert not opt.inside and opt.lr_opt == max(LRS)  # the grid's best point, on its edge
    with pytest.raises(UserError, match="at least 3 learning rates and 3 batch sizes"):
        grid_optimum(1e7, 1e9, [1e-3, 2e-3] * 3, BATCHES[:3] * 2, [1.0] * 6)


def test_fit_recovers_the_constants_from_grid_optima():
    optima = []
    for n in (1e6, 4e6, 1.6e7):
        for d in (1e8, 4e8, 1.6e9):
            rows = grid_rows(n, d)
            optima.append(grid_optimum(n, d, *([r[k] for r in rows] for k in ("lr", "batch_tokens", "loss"))))
    law = fit_step_law(optima)
    assert law.lr_n == pytest.approx(-0.713, abs=1e-9) and law.lr_d == pytest.approx(0.307, abs=1e-9)
    assert law.lr_coef == pytest.approx(1.79, rel=1e-8) and law.batch_d == pytest.approx(0.571, abs=1e-9)
    assert law.batch_coef == pytest.approx(0.58, rel=1e-8) and law.batch_n == 0.0
    loo = step_law_leave_one_out(optima)
    assert (
        loo["n"] == 9 and loo["lr_mean_factor"] == pytest.approx(1.0) and loo["batch_max_factor"] == pytest.approx(1.0)
    )
    assert loo["lr_base_mean_factor"] > 1.5  # holding the LR constant across a 16× range of N misses
    with pytest.raises(UserError, match="two or more model sizes"):
        fit_step_law([o for o in optima if o.params == 1e6])


def test_leave_one_out_by_hand():
    # η* = N^-1 exactly at three points plus one 2× off: leaving that one out, the others predict it exactly
    opts = [GridOptimum(n, d, 1.0 / n, d, 1.0, True) for n, d in ((1.0, 1.0), (10.0, 1.0), (1.0, 10.0))]
    opts.append(GridOptimum(10.0, 10.0, 2.0 / 10.0, 10.0, 1.0, True))
    loo = step_law_leave_one_out(opts)
    assert loo["n"] == 4 and loo["lr_max_factor"] == pytest.approx(2.0)


def test_fit_and_predict_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [r for n in (1e6, 4e6, 1.6e7) for d in (1e8, 4e8, 1.6e9) for r in grid_rows(n, d, noise=0.002, rng=rng)]
    csv_path = write_csv(tmp_path / "grid.csv", rows)
    assert main(["fit", "step-law", str(csv_path), "--out", str(tmp_path / "fit"), "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "step-law fit on 216 points" in out and "leave-one-out on 9 grids" in out
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["params"]["lr_n"] == pytest.approx(-0.713, abs=0.05)
    assert fit["params"]["batch_d"] == pytest.approx(0.571, abs=0.05)
    lo, hi = fit["intervals"]["lr_n"]
    assert lo < -0.713 < hi and fit["warnings"] == [] and (tmp_path / "fit" / "fit.png").is_file()
    assert main(["predict", "hparams", str(tmp_path / "fit"), "--params", "4e6", "--tokens", "4e8"]) == 0
    line = capsys.readouterr().out
    assert "by the fit in" in line and "lr*=" in line and "warning" not in line
    assert main(["predict", "hparams", str(tmp_path / "fit"), "--params", "1e9", "--tokens", "4e8"]) == 0
    assert "warning: N=1e+09 is more than 10x outside the fitted" in capsys.readouterr().out
    # two sizes only: fitted, with the warning
    two = [r for r in rows if r["non_embedding_params"] != 1.6e7]
    assert main(["fit", "step-law", str(write_csv(tmp_path / "two.csv", two)), "--out", str(tmp_path / "f2"),
                 "--bootstrap", "0"]) == 0  # fmt: skip
    assert "warning: 2 model sizes: a power law needs at least 3 to be checked" in capsys.readouterr().out


def test_bad_inputs(tmp_path, capsys):
    rows = grid_rows(1e6, 1e8)
    for r in rows:
        del r["batch_tokens"]
    assert main(["fit", "step-law", str(write_csv(tmp_path / "a.csv", rows)), "--out", str(tmp_path / "o")]) == 1
    assert "batch_tokens" in capsys.readouterr().err
    sparse = [r for r in grid_rows(1e6, 1e8) if r["lr"] < 0.6 * float(STEP_LAW.lr(1e6, 1e8))]  # two LRs
    sparse += grid_rows(4e6, 4e8)
    assert main(["fit", "step-law", str(write_csv(tmp_path / "b.csv", sparse)), "--out", str(tmp_path / "o")]) == 1
    assert (
        "grid at non_embedding_params=1e+06, tokens=1e+08: a Step Law grid needs at least 3" in capsys.readouterr().err
    )
    assert main(["predict", "hparams", "--params", "-1", "--tokens", "1e9"]) == 1
    assert "must be positive" in capsys.readouterr().err


def test_results_rows_carry_the_batch_in_tokens(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"micro_batch_size": 4, "grad_accum": 2, "seq_len": 32}}))
    (run / "summary.json").write_text(json.dumps({"status": "finished", "world_size": 2, "final_val_loss": 1.0}))
    assert run_row(run)["batch_tokens"] == 4 * 2 * 32 * 2
