"""``lmlab fit`` / ``lmlab predict`` end to end on generated CSVs and run directories, and bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.science.annealing import REFERENCE_FIT
from lmlab.science.chinchilla import PRESETS
from lmlab.science.results import collect_results, usable_rows, write_results_csv
from lmlab.science.schedules import constant_schedule, cosine_schedule

from helpers import write_csv


def chinchilla_rows(noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in (1e18, 1e19, 1e20):
        for n in np.geomspace(3e7, 3e9, 6):
            d = c / (6 * n)
            loss = float(PRESETS["epoch"].loss(n, d)) * math.exp(noise * rng.standard_normal())
            rows.append(
                {"run": f"r{len(rows)}", "params": n, "tokens": d, "flops": c, "loss": loss, "status": "finished"}
            )
    return rows


def test_fit_chinchilla_writes_fit_json_and_plot(tmp_path, capsys):
    rows = chinchilla_rows()
    rows.append({"run": "blew-up", "params": 1e8, "tokens": 1e9, "flops": 6e17, "loss": "nan", "status": "finished"})
    rows.append({"run": "cut-short", "params": 1e8, "tokens": 1e9, "flops": 6e17, "loss": 4.0, "status": "running"})
    src = write_csv(tmp_path / "results.csv", rows)
    out = tmp_path / "fit"
    rc = main(
        ["fit", "chinchilla", str(src), "--out", str(out), "--compute", "1e21", "--bootstrap", "20", "--grid", "small"]
    )
    assert rc == 0
    fit = json.loads((out / "fit.json").read_text())
    assert {"law", "params", "intervals", "fit_error", "compute_optimal", "excluded", "n_points", "isoflop"} <= set(fit)
    assert fit["excluded"] == {"blew-up": "diverged", "cut-short": "running"}
    assert fit["n_points"] == 18
    assert fit["params"]["alpha"] == pytest.approx(PRESETS["epoch"].alpha, abs=0.05)
    (alloc,) = fit["compute_optimal"]
    assert 6 * alloc["N_opt"] * alloc["D_opt"] == pytest.approx(1e21, rel=1e-9)
    assert set(fit["intervals"]) == {"E", "A", "B", "alpha", "beta", "a_opt"}
    assert fit["isoflop"]["a"] == pytest.approx(PRESETS["epoch"].a_opt, abs=0.05)
    assert (out / "fit.png").stat().st_size > 1000
    # the refits behind the intervals, for a report's band, and what a reader should be warned about
    assert 15 <= len(fit["bootstrap_params"]) <= 20 and set(fit["bootstrap_params"][0]) == {
        "E",
        "A",
        "B",
        "alpha",
        "beta",
    }
    alphas = sorted(d["alpha"] for d in fit["bootstrap_params"])
    assert alphas[0] <= fit["intervals"]["alpha"][0] <= fit["intervals"]["alpha"][1] <= alphas[-1]
    assert any("2 run(s) left out" in w for w in fit["warnings"])
    assert not any("extrapolation" in w for w in fit["warnings"])  # 1e21 is 10x the largest run: within 100x
    assert "excluded: blew-up (diverged), cut-short (running)" in capsys.readouterr().out
    assert main(["predict", "loss", str(out), "--params", "1e9", "--tokens", "2e10"]) == 0
    line = capsys.readouterr().out
    predicted = float(line.split()[0])
    assert predicted == pytest.approx(float(PRESETS["epoch"].loss(1e9, 2e10)), abs=0.02)
    lo, hi = (float(v) for v in line.split("95% interval ")[1].split(" over")[0].split("–"))
    assert lo <= predicted <= hi and "over 20 bootstrap refits" in line and "warning" not in line
    # 6·N·D = 1.2e24 is 12,000× the largest run (1e20): the prediction says so
    assert main(["predict", "loss", str(out), "--params", "1e11", "--tokens", "2e12"]) == 0
    assert "warning: compute 1.2e+24 is 12,000× the largest run's FLOPs" in capsys.readouterr().out


def test_fit_errors_are_one_line(tmp_path, capsys):
    rows = chinchilla_rows()
    no_loss = write_csv(tmp_path / "a.csv", [{k: v for k, v in r.items() if k not in ("loss", "tokens")} for r in rows])
    assert main(["fit", "chinchilla", str(no_loss), "--out", str(tmp_path / "o")]) == 1
    assert "missing required column(s): tokens, loss" in capsys.readouterr().err
    few = write_csv(tmp_path / "b.csv", rows[:4])
    assert main(["fit", "chinchilla", str(few), "--out", str(tmp_path / "o")]) == 1
    assert "at least 6 finished runs, got 4" in capsys.readouterr().err
    one_size = write_csv(tmp_path / "c.csv", [{**r, "params": 1e8} for r in rows])
    assert main(["fit", "chinchilla", str(one_size), "--out", str(tmp_path / "o")]) == 1
    assert "same model size" in capsys.readouterr().err
    assert main(["fit", "chinchilla", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


def test_fit_annealing_from_csv_and_predict_curve(tmp_path, capsys):
    rows = []
    for name, lrs in (
        ("cosine", cosine_schedule(20000, 2e-4, warmup=500)),
        ("constant", constant_schedule(20000, 2e-4, warmup=500)),
    ):
        loss = REFERENCE_FIT.predict(lrs, 500)
        for s in range(0, 20001, 50):
            rows.append(
                {"curve": name, "step": s, "lr": lrs[s], "loss": loss[s] if s >= 1000 and s % 1000 == 0 else ""}
            )
    src = write_csv(tmp_path / "curves.csv", rows)
    out = tmp_path / "ann"
    assert main(["fit", "annealing", str(src), "--out", str(out), "--bootstrap", "5"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    # The LR is given every 50 steps and interpolated, so the schedule is close to, not exactly, the true one.
    assert fit["params"]["L0"] == pytest.approx(REFERENCE_FIT.L0, abs=5e-3)
    assert fit["params"]["alpha"] == pytest.approx(REFERENCE_FIT.alpha, abs=2e-2)
    assert set(fit["intervals"]) == {"L0", "A", "C", "alpha"}
    assert (out / "fit.png").exists()
    capsys.readouterr()
    curve_csv = tmp_path / "pred.csv"
    args = ["predict", "curve", str(out), "--schedule", "wsd", "--steps", "20000", "--lr", "2e-4", "--warmup", "500"]
    assert main([*args, "--decay-fraction", "0.2", "--out", str(curve_csv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "step,lr,loss,loss_lo,loss_hi"  # with the 95% interval over the 5 bootstrap refits
    last = [float(v) for v in lines[-1].split(",")]
    assert int(last[0]) == 20000 and last[2] == pytest.approx(2.7782, abs=5e-3)
    assert last[3] - 1e-4 <= last[2] <= last[4] + 1e-4 and last[4] - last[3] < 0.05
    data = np.loadtxt(curve_csv, delimiter=",", skiprows=1)
    assert data.shape == (20001, 5)
    assert main(["predict", "loss", str(out), "--params", "1e9", "--tokens", "1e10"]) == 1
    assert "needs a chinchilla fit" in capsys.readouterr().err
    # the Power scheduler: its LR falls with the tokens seen, so the curve needs the batch
    power = ["predict", "curve", str(out), "--schedule", "power", "--steps", "20000", "--lr", "2e-4", "--warmup", "500"]
    assert main(power) == 1
    assert "needs --batch-sequences and --seq-len" in capsys.readouterr().err
    assert main([*power, "--batch-sequences", "64", "--seq-len", "128", "--power-a", "1e-3"]) == 0
    rows = [[float(v) for v in line.split(",")] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    lr_mid = 64 * 1e-3 * (10000 * 64 * 128) ** -0.51  # below the 2e-4 cap: the power law sets the LR
    assert [r[1] for r in rows if r[0] == 10000] == [pytest.approx(lr_mid)]
    assert rows[-1][0] == 20000 and rows[-1][1] == 0.0  # decayed to 0 (--min-lr-ratio 0)
    # the constant curve held out: the law fitted on the cosine curve alone predicts it (noise-free data, but one
    # schedule cannot pin down the annealing term: the error is reported, not asserted small)
    held = tmp_path / "held"
    assert main(["fit", "annealing", str(src), "--out", str(held), "--bootstrap", "0", "--holdout", "constant"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((held / "fit.json").read_text())
    assert fit["curves"] == ["cosine"] and set(fit["holdout"]["per_curve"]) == {"constant"}
    assert fit["holdout"]["n"] == 20 and "held-out error on 20 points" in printed
    assert "warning: one curve" in printed
    assert main(["fit", "annealing", str(src), "--out", str(held), "--holdout", "wsd"]) == 1
    assert "no usable curve named wsd (curves: cosine, constant)" in capsys.readouterr().err
    assert main(["fit", "mixture", str(src), "--out", str(held), "--holdout", "x"]) == 1
    assert "--holdout applies to chinchilla and annealing fits, not mixture" in capsys.readouterr().err


def _run_dir(path, lr, schedule, losses, status="finished"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        "name: r\nmodel: {d_model: 64, n_layers: 2, n_heads: 2, max_seq_len: 32}\n"
        f"optim: {{lr: {lr}}}\nschedule: {{name: {schedule}, warmup_steps: 0, min_lr_ratio: 0.0}}\n"
        "train: {steps: 2000, micro_batch_size: 2, seq_len: 32}\n"
    )
    with (path / "metrics.jsonl").open("w") as fh:
        for step, loss in losses:
            fh.write(json.dumps({"kind": "eval", "step": step, "tokens": step * 64, "val_loss": loss}) + "\n")
    (path / "summary.json").write_text(
        json.dumps(
            {
                "status": status,
                "steps": 2000,
                "tokens": 128000,
                "params": 1e5,
                "non_embedding_params": 5e4,
                "flops": 1e11,
                "final_val_loss": losses[-1][1] if losses else None,
            }
        )
    )


def test_fit_annealing_from_run_dirs(tmp_path):
    from lmlab.config import load_config
    from lmlab.train.schedule import lr_schedule

    law = REFERENCE_FIT
    sweep = tmp_path / "sweep"
    for name, sched in (("cos", "cosine"), ("flat", "constant")):
        cfg = load_config(
            None,
            [
                f"schedule.name={sched}",
                "schedule.warmup_steps=0",
                "schedule.min_lr_ratio=0.0",
                "optim.lr=2e-3",
                "train.steps=2000",
            ],
        )
        lrs = np.array(lr_schedule(2000, 2e-3, cfg.schedule))
        pred = law.predict(lrs)
        _run_dir(sweep / name, 2e-3, sched, [(k, float(pred[k - 1])) for k in range(100, 2001, 100)])
    _run_dir(sweep / "stopped", 2e-3, "cosine", [(100, 5.0)], status="running")
    out = tmp_path / "fit"
    assert main(["fit", "annealing", str(sweep), "--out", str(out), "--bootstrap", "0"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["excluded"] == {"stopped": "running"}
    assert fit["curves"] == ["cos", "flat"]
    for k in ("L0", "A", "C", "alpha"):
        assert fit["params"][k] == pytest.approx(getattr(law, k), rel=1e-3), k
    # noise-free curves of one law: each curve is predicted from the other almost exactly, far better than by
    # "the schedule does not matter" (cosine ends below constant); one model, so no warning
    loo = fit["leave_one_out"]
    assert loo["n"] == 40 and set(loo["per_curve"]) == {"cos", "flat"}
    assert loo["mean_rel_error"] < 1e-3 < loo["baseline_mean_rel_error"]
    assert fit["warnings"] == [] and fit["models"]["cos"] == fit["models"]["flat"]
    assert fit["data_range"]["steps"] == [99, 1999]
    # a curve of another model joins: the fit says so
    cfg = load_config(None, ["schedule.name=cosine", "schedule.warmup_steps=0", "schedule.min_lr_ratio=0.0",
                             "optim.lr=2e-3", "train.steps=2000"])  # fmt: skip
    pred = law.predict(np.array(lr_schedule(2000, 2e-3, cfg.schedule)))
    _run_dir(sweep / "wide", 2e-3, "cosine", [(k, float(pred[k - 1]) + 0.3) for k in range(100, 2001, 100)])
    config = (sweep / "wide" / "config.yaml").read_text().replace("d_model: 64", "d_model: 128")
    (sweep / "wide" / "config.yaml").write_text(config)
    assert main(["fit", "annealing", str(sweep), "--out", str(out), "--bootstrap", "0"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert any(w.startswith("the curves come from 2 different models (d_model=64") for w in fit["warnings"])
    assert fit["leave_one_out"]["n"] == 60


def test_annealing_warnings_on_hand_made_numbers():
    from lmlab.science.annealing import Curve
    from lmlab.science.fit_checks import annealing_warnings

    one = [Curve("a", np.ones(3), np.arange(3), np.ones(3))]
    params = {"L0": 2.0, "A": 0.4, "C": 0.0, "alpha": 0.5}
    loo = {"n": 10, "mean_rel_error": 0.02, "baseline_mean_rel_error": 0.01}
    assert annealing_warnings(params, {"A": (0.01, 0.9)}, one, loo) == [
        "C=0 is at its lower bound (0)",
        "A's 95% interval 0.01–0.9 spans more than 10×",
        "one curve: the law's schedule terms are fitted on one schedule and cannot be checked on another",
        "leave-one-curve-out error 2.00% is worse than the trivial baseline's 1.00% (the other curves' mean loss at "
        "each step)",
    ]


def test_fit_lr_horizon(tmp_path):
    rows = []
    for n in (1e7, 1e8):
        for d in (1e8, 1e9, 1e10):
            lr_star = 0.5 * n**-0.2 * d**-0.32
            for lr in lr_star * np.geomspace(0.1, 10, 7):
                rows.append({"params": n, "tokens": d, "lr": lr, "loss": 3 + 0.1 * math.log(lr / lr_star) ** 2})
    rows.append({"params": 1e7, "tokens": 1e8, "lr": 1.0, "loss": "inf"})
    src = write_csv(tmp_path / "lr.csv", rows)
    out = tmp_path / "lrfit"
    assert main(["fit", "lr-horizon", str(src), "--out", str(out), "--bootstrap", "10"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["params"]["joint"]["beta"] == pytest.approx(0.32, abs=1e-6)
    assert fit["params"]["joint"]["alpha"] == pytest.approx(0.2, abs=1e-6)
    assert fit["params"]["per_size"]["1e+07"]["beta"] == pytest.approx(0.32, abs=1e-6)
    assert len(fit["vertices"]) == 6 and list(fit["excluded"].values()) == ["diverged"]
    # exact power-law LR*: every sweep's LR* is predicted from the other five to 1e-6, while a constant LR* is off
    loo = fit["leave_one_out"]
    assert loo["n"] == 6 and loo["max_factor"] == pytest.approx(1.0, abs=1e-6) and loo["baseline_max_factor"] > 2
    assert fit["data_range"]["tokens"] == [1e8, 1e10]
    assert fit["warnings"] == []


def test_lr_horizon_warnings_and_leave_one_out_by_hand():
    from lmlab.science.fit_checks import lr_horizon_warnings, lr_leave_one_out

    def vertex(d, lr, inside=True):
        return {"params": 1e7, "tokens": d, "lr_opt": lr, "inside": inside}

    # LR* = D^-0.5 measured at D = 1, 100 and 1e4 (0.99 of it at 1e4): per size, each left out is predicted
    vertices = [vertex(1.0, 1.0), vertex(100.0, 0.1), vertex(1e4, 0.0099, inside=False)]
    loo = lr_leave_one_out(vertices, joint=False)
    # left out D=1e4: the line through (1, 1) and (100, 0.1) predicts 0.01 -> |ln(0.01/0.0099)|; left out D=100:
    # through (1, 1), (1e4, 0.0099) the prediction at 100 is sqrt(0.0099) -> |ln(sqrt(0.0099)/0.1)|; left out D=1:
    # through (100, 0.1), (1e4, 0.0099) it is 0.1 * (0.1/0.0099) -> |ln(1.0101...)|
    expected = [abs(math.log(0.1 * 0.1 / 0.0099)), abs(math.log(0.0099**0.5 / 0.1)), abs(math.log(0.01 / 0.0099))]
    assert loo["mean_abs_log_error"] == pytest.approx(np.mean(expected), rel=1e-9)
    base = [abs(math.log(1.0) - 0.5 * math.log(0.1 * 0.0099)), abs(math.log(0.1) - 0.5 * math.log(0.0099)),
            abs(math.log(0.0099) - 0.5 * math.log(0.1))]  # fmt: skip
    assert loo["baseline_mean_abs_log_error"] == pytest.approx(np.mean(base), rel=1e-9)
    warnings = lr_horizon_warnings(vertices, {"beta": (-0.1, 0.6)}, loo)
    assert warnings == [
        "LR* 0.0099 at params=1e+07, tokens=1e+04 lies outside the swept LRs: the parabola is extrapolated (widen "
        "that sweep)",
        "beta's 95% interval -0.1–0.6 includes 0: the data do not say LR* moves",
    ]
    assert lr_horizon_warnings(vertices[:2], {}, {"n": 0}) == [
        "2 token horizon(s): a power law in D needs at least 3 to be checked"
    ]


def test_fit_mixture(tmp_path):
    rows = []
    for fam, gamma, scale in (("romance", 0.1, 3.0), ("slavic", 0.3, 3.5)):
        for p in (0.1, 0.3, 0.5, 0.9):
            rows.append({"family": fam, "params": 1e8, "tokens": 1e9, "p": p, "loss": scale * p**-gamma})
    src = write_csv(tmp_path / "mix.csv", rows)
    out = tmp_path / "mix"
    assert main(["fit", "mixture", str(src), "--out", str(out)]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["params"]["romance"]["gamma"] == pytest.approx(0.1, abs=1e-9)
    ratios = fit["optimal_ratios_normalised"]
    assert ratios["romance"] == pytest.approx(0.258621, abs=1e-6)
    assert ratios["slavic"] == pytest.approx(0.741379, abs=1e-6)
    # exact power laws in p: each run is predicted from the other three, ignoring p is not
    loo = fit["params"]["slavic"]["leave_one_out"]
    assert loo["n"] == 4 and loo["max_rel_error"] < 1e-9 < 0.1 < loo["baseline_mean_rel_error"]
    assert fit["data_range"]["p"] == [0.1, 0.9]
    assert fit["warnings"] == []


def test_mixture_leave_one_out_and_warnings_by_hand():
    from lmlab.science.fit_checks import mixture_leave_one_out, mixture_warnings

    n, d = np.full(3, 1e8), np.full(3, 1e9)
    p, loss = np.array([0.25, 0.5, 1.0]), np.array([4.0, 2.0, 2.0])
    loo = mixture_leave_one_out(n, d, p, loss)
    # left out p=0.25: γ from (0.5, 2), (1, 2) is 0 -> 2 (error 0.5); left out p=0.5: through (0.25, 4), (1, 2)
    # γ = 0.5 -> 2·0.5^-0.5 = 2.828 (error 0.414); left out p=1: through (0.25, 4), (0.5, 2) γ = 1 -> 1 (error 0.5)
    assert loo["mean_rel_error"] == pytest.approx((0.5 + (2 * 2**0.5 - 2) / 2 + 0.5) / 3, rel=1e-9)
    # ignoring p: the mean of the other two losses -> 2 (0.5), 3 (0.5), 3 (0.5)
    assert loo["baseline_mean_rel_error"] == pytest.approx(0.5, rel=1e-9)
    families = {"a": {"gamma": -0.1, "leave_one_out": loo}, "b": {"gamma": 0.2, "leave_one_out": {"n": 0}}}
    assert mixture_warnings(families, {"a": 3, "b": 2}) == [
        "a: gamma=-0.1 <= 0 (more of this family does not lower its loss)",
        "b: 2 sampling ratio(s): a power law in p needs at least 3",
    ]


def test_collect_results_from_run_dirs(tmp_path):
    _run_dir(tmp_path / "a", 1e-3, "cosine", [(100, 4.0), (2000, 3.0)])
    _run_dir(tmp_path / "b", 1e-3, "cosine", [(100, 4.0)], status="running")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.yaml").write_text("optim: {lr: 0.01}\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.json").write_text(json.dumps({"status": "diverged", "final_val_loss": None}))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": None}))
    rows = collect_results(tmp_path)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("a", "finished"),
        ("b", "running"),
        ("c", "missing"),
        ("d", "diverged"),
        ("e", "no final loss"),
    ]
    assert rows[0]["loss"] == 3.0 and rows[0]["lr"] == 1e-3 and rows[0]["schedule"] == "cosine"
    sel = usable_rows(rows, ["loss"])
    assert [r["run"] for r in sel.rows] == ["a"]
    assert sel.excluded == {"b": "running", "c": "missing", "d": "diverged", "e": "no final loss"}
    path = write_results_csv(rows, tmp_path / "results.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header == [
        "run",
        "params",
        "non_embedding_params",
        "tokens",
        "flops",
        "loss",
        "lr",
        "batch_tokens",
        "schedule",
        "seed",
        "status",
        "curve",
    ]


def test_missing_final_loss_falls_back_to_final_eval(tmp_path):
    _run_dir(tmp_path / "a", 1e-3, "cosine", [(100, 4.0), (2000, 3.25)])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    (tmp_path / "a" / "summary.json").write_text(json.dumps({**summary, "final_val_loss": None}))
    _run_dir(tmp_path / "b", 1e-3, "cosine", [(100, 4.0)])  # last eval not at the final step
    (tmp_path / "b" / "summary.json").write_text(json.dumps({**summary, "final_val_loss": None}))
    rows = {r["run"]: r for r in collect_results(tmp_path)}
    assert rows["a"]["loss"] == 3.25 and rows["a"]["status"] == "finished"
    assert math.isnan(rows["b"]["loss"]) and rows["b"]["status"] == "no final loss"


def test_chinchilla_warnings_name_extrapolation_and_loose_exponents():
    from types import SimpleNamespace

    from lmlab.science.fits import chinchilla_warnings

    sel = SimpleNamespace(rows=[{}] * 8, excluded={})
    params = {"alpha": 0.34, "beta": 0.28}
    intervals = {"alpha": (0.10, 0.60), "beta": (0.25, 0.31)}
    warnings = chinchilla_warnings(params, intervals, sel, np.array([1e18, 1e19]), [1e20, 1e22])
    assert warnings[0].startswith("only 8 runs")
    assert any(w.startswith("alpha=0.34 has a 95% interval 0.1–0.6") for w in warnings)
    assert not any(w.startswith("beta") for w in warnings)
    assert [w for w in warnings if "extrapolation" in w] == [
        "compute 1e+22 is 1,000× the largest run's FLOPs (1e+19): an extrapolation"
    ]


def chinchilla_fit(tmp_path, bootstrap: int) -> tuple[list[dict], object, list[str]]:
    """The rows of :func:`chinchilla_rows` in a CSV, the fit's output directory and its ``lmlab fit`` arguments."""
    rows = chinchilla_rows()
    src = write_csv(tmp_path / "results.csv", rows)
    out = tmp_path / "fit"
    return (
        rows,
        out,
        ["fit", "chinchilla", str(src), "--out", str(out), "--bootstrap", str(bootstrap), "--grid", "small"],
    )


def test_chinchilla_fit_reports_leave_one_out_and_held_out_errors_against_the_trivial_baseline(tmp_path, capsys):
    rows, out, args = chinchilla_fit(tmp_path, bootstrap=0)
    assert main([*args, "--holdout", "top:6"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((out / "fit.json").read_text())
    assert fit["n_points"] == 12 and fit["holdout"]["n"] == 6
    held = {r["run"] for r in fit["holdout"]["runs"]}
    assert held == {r["run"] for r in rows if r["flops"] == 1e20}  # the top 6 by compute: the largest budget
    # the held-out runs come from the same law with 0.3% noise: the law predicts them to about that, and far
    # better than the lowest fitted loss does (the largest budget's losses are lower)
    assert fit["holdout"]["mean_rel_error"] < 0.02 < fit["holdout"]["baseline_mean_rel_error"]
    loo = fit["leave_one_out"]
    assert loo["n"] == 12 and loo["mean_rel_error"] < 0.02 < loo["baseline_mean_rel_error"]
    assert fit["data_range"]["flops"] == [1e18, 1e19]
    assert "held-out error on 6 runs: mean" in printed and "leave-one-out error on 12 runs" in printed
    assert main([*args, "--holdout", "r0", "r7"]) == 0
    assert [r["run"] for r in json.loads((out / "fit.json").read_text())["holdout"]["runs"]] == ["r0", "r7"]
    capsys.readouterr()
    assert main([*args, "--holdout", "nobody"]) == 1
    assert "no usable run named nobody" in capsys.readouterr().err
    assert main([*args, "--holdout", "top:18"]) == 1
    assert "K must be between 1 and 17" in capsys.readouterr().err


def test_leave_one_out_refits_equal_separate_fits():
    from lmlab.science.chinchilla import chinchilla_loss, fit_chinchilla, small_grid
    from lmlab.science.fit_checks import leave_one_out_baseline, leave_one_out_predictions

    rows = chinchilla_rows(noise=0.01, seed=3)
    n, d, loss = (np.array([r[k] for r in rows]) for k in ("params", "tokens", "loss"))
    fit = fit_chinchilla(n, d, loss, grid=small_grid())
    predicted = leave_one_out_predictions(n, d, loss, fit)
    for i in (0, 9, 17):
        keep = np.arange(len(n)) != i
        alone = fit_chinchilla(n[keep], d[keep], loss[keep], grid=small_grid())
        assert predicted[i] == pytest.approx(float(chinchilla_loss(n[i], d[i], alone.params)), rel=2e-3)
    assert leave_one_out_baseline(np.array([3.0, 2.0, 4.0])).tolist() == [2.0, 3.0, 2.0]


def test_fixed_E_is_held_and_a_garbage_fit_is_named(tmp_path, capsys):
    rows, out, args = chinchilla_fit(tmp_path, bootstrap=20)
    assert main([*args, "--fix-E", "1.8172"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["params"]["E"] == pytest.approx(1.8172, rel=1e-12) and fit["fixed_E"] == 1.8172
    assert fit["params"]["alpha"] == pytest.approx(PRESETS["epoch"].alpha, abs=0.03)
    assert all(p["E"] == pytest.approx(1.8172, rel=1e-12) for p in fit["bootstrap_params"])
    capsys.readouterr()
    assert main([*args, "--fix-E", "-1"]) == 1
    assert "a fixed E must be a positive number" in capsys.readouterr().err
    # Losses that fall as a pure power law of D with no floor: the fit drives E to 0 and must say so
    flat = [{**r, "loss": 50.0 * r["tokens"] ** -0.2 * r["params"] ** -0.01} for r in rows]
    assert main(["fit", "chinchilla", str(write_csv(tmp_path / "f.csv", flat)), "--out", str(out), "--bootstrap", "20",
                 "--grid", "small"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "warning: E=" in printed and "at its lower bound (0): the fit found no loss floor" in printed


def test_fit_warnings_on_hand_made_numbers():
    from lmlab.science.fit_checks import fit_warnings

    params = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.3, "beta": 0.01}
    intervals = {"E": (1.6, 1.8), "A": (10.0, 1e4), "B": (-5.0, 900.0)}
    n, flops, loss = np.array([1e7, 1e8, 1e7, 1e8]), np.array([1e17, 1e17, 1e18, 1e18]), np.array([3.0, 2.8, 2.9, 2.6])
    loo = {"n": 4, "mean_rel_error": 0.05, "baseline_mean_rel_error": 0.03}
    warnings = fit_warnings(params, intervals, n, flops, loss, loo=loo)
    assert warnings == [
        "beta=0.01 is at its lower bound (0): the loss does not follow a power law here",
        "A's 95% interval 10–1e+04 spans more than 10×",
        "B's 95% interval -5–900 spans more than 10×",
        "2 model size(s) and 2 compute budget(s): a fit needs at least 3 of each",
        "leave-one-out error 5.00% is worse than the trivial baseline's 3.00% (predict the lowest fitted loss)",
    ]


def test_holdout_top_k_counts_6nd_where_flops_are_missing():
    from lmlab.science.fit_checks import split_holdout

    rows = [
        {"run": "a", "params": 1.0, "tokens": 1.0, "flops": "n/a"},  # 6ND = 6
        {"run": "b", "params": 2.0, "tokens": 2.0, "flops": ""},  # 6ND = 24
        {"run": "c", "params": 1.0, "tokens": 1.0, "flops": "10"},
    ]
    assert [r["run"] for r in split_holdout(rows, ["top:1"]).held_out] == ["b"]
    assert [r["run"] for r in split_holdout(rows, ["top:2"]).fitted] == ["a"]


def test_fit_another_loss_column(tmp_path, capsys):
    # a floor 0.1 nats lower: fitting val_loss_docs moves E by -0.1 and nothing else
    rows = [{**r, "val_loss_docs": r["loss"] - 0.1} for r in chinchilla_rows(noise=0.0)]
    path = write_csv(tmp_path / "runs.csv", rows)
    for metric, out in ((None, "a"), ("val_loss_docs", "b")):
        extra = ["--metric", metric] if metric else []
        assert main(["fit", "chinchilla", str(path), "--out", str(tmp_path / out), "--bootstrap", "0", *extra]) == 0
    a, b = (json.loads((tmp_path / d / "fit.json").read_text()) for d in "ab")
    assert b["loss_column"] == "val_loss_docs" and a["loss_column"] == "loss"
    assert b["params"]["E"] == pytest.approx(a["params"]["E"] - 0.1, abs=2e-3)
    assert main(["fit", "chinchilla", str(path), "--out", str(tmp_path / "c"), "--metric", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["fit", "mixture", str(path), "--out", str(tmp_path / "d"), "--metric", "x"]) == 1
    assert "does not apply to a mixture fit" in capsys.readouterr().err
