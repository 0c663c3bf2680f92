"""``lmlab report RUN``: every logged metric drawn, evaluations, samples, the config diff, run facts, environment."""

from __future__ import annotations

import base64
import html
import re

from lmlab.cli import main
from lmlab.report.config_diff import config_diff, default_config
from lmlab.report.figures import Line, lines_png
from lmlab.report.metrics import groups, series_by_kind
from lmlab.report.run_report import run_report


def captions(text: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r'<figure class="figure">.*?<figcaption>(.*?)</figcaption>', text)]


def test_run_report_sections(run_factory, capsys):
    run = run_factory(config_changes={"optim.lr": 0.0042, "train.steps": 12})
    assert main(["report", str(run)]) == 0
    assert f"wrote {run / 'report.html'}" in capsys.readouterr().out
    text = (run / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "12,345" in text and "<b class=>finished</b>" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "5 &lt;i&gt;" in text  # samples.txt and samples.jsonl, escaped
    assert "Question: 3 plus 2?" in text
    assert "&lt;wiki&gt;" in text  # the last eval's per-source losses, escaped
    # run.json facts and its starts, env.json
    assert "326222624b76" in text and "lmlab align a.yaml" in text
    assert "2.13.0+cpu" in text
    # The harness file is tabled: task, metric, value, stderr ("N/A" stderr left empty).
    assert "harness-0-shot.json" in text
    assert re.search(
        r"<td class=text>hellaswag</td><td class=text>acc</td><td[^>]*>0.2512</td><td[^>]*>0.0043</td>", text
    )
    assert re.search(
        r"<td class=text>arc_easy</td><td class=text>acc</td><td[^>]*>0.4321</td><td class=text></td>", text
    )
    # The SFT-style "data" record logged once is a table, not a one-point figure.
    assert "Logged once: data (step 0)" in text and not any(c.startswith("data:") for c in captions(text))
    # Every figure is a real PNG.
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)
    assert len(images) == len(captions(text)) == 12
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    # Self-contained: nothing is loaded from elsewhere (images are data: URIs, CSS and script inline).
    assert re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', text) == []
    assert "<link" not in text and "url(" not in text and "<script src" not in text


def test_every_logged_metric_gets_a_figure(run_factory, records_factory):
    """Discovery is generic: a made-up metric and a made-up record kind are drawn; bookkeeping keys are not."""
    records = records_factory(extra_train={"zeta_wobble": 0.5, "flag": True, "note": "x"})
    records += [{"kind": "probe", "step": s, "foo/bar": s, "foo/baz": -s} for s in (1, 2, 3)]
    text = run_report(run_factory(records=records))
    caps = captions(text)
    assert caps[0] == "loss: train and validation loss against step"
    expected = {
        "train: lr",
        "train: grad_norm",
        "train: goldfish_dropped",
        "train: tokens_per_s",
        "train: zeta_wobble",
        "eval: val_loss (val_loss, val_loss/<wiki>, val_loss/code)",
        "eval: val_ppl",
        "task_eval: arith (arith/acc, arith/exact_match)",
        "task_eval: copy (copy/acc)",
        "task_eval: eval_cost_pct",
        "diagnostic: grad_cos",
        "diagnostic: probe_logps (probe_logps/chosen)",
        "probe: foo (foo/bar, foo/baz)",
    }
    assert set(caps[1:]) == expected
    assert not any(key in c for c in caps for key in ("time", "tokens:", "flag", "note", "eval_seconds"))


def test_task_evaluations_are_tabled(run_factory):
    text = run_report(run_factory())
    section = text.split("Task evaluations (step 12)")[1].split("</table>")[0]
    assert re.search(r"<td class=text>arith</td><td class=text>acc</td><td[^>]*>0.2</td>", section)
    assert re.search(r"<td class=text>copy</td><td class=text>acc</td><td[^>]*>0.5</td>", section)
    assert "eval_cost_pct" in text.split("Task evaluations (step 12)")[1]


def test_series_and_groups():
    records = [
        {"kind": "train", "step": 1, "tokens": 10, "loss": 2.0, "rewards/chosen": 1.0, "rewards/rejected": 0.0},
        {"kind": "train", "step": 2, "tokens": 20, "loss": float("inf"), "rewards/chosen": 2.0},
        {"kind": "eval", "step": 2, "val_loss": 1.5},
        {"kind": "train", "loss": 9.0},  # no step: not a point
    ]
    by_kind = series_by_kind(records)
    assert list(by_kind) == ["train", "eval"]
    train = by_kind["train"]
    assert train["loss"].steps == [1.0, 2.0] and train["loss"].values[0] == 2.0 and train["loss"].values[1] != 2.0
    assert train["loss"].x("tokens") == [10.0, 20.0] and train["loss"].has_tokens
    assert not by_kind["eval"]["val_loss"].has_tokens
    assert {g: [s.key for s in ss] for g, ss in groups(train).items()} == {
        "loss": ["loss"],
        "rewards": ["rewards/chosen", "rewards/rejected"],
    }


def test_nested_summary_is_flattened(run_factory):
    text = run_report(run_factory())
    summary = text.split('id="summary"')[1].split("<h2")[0]
    assert "<td class=text>init_from.path</td><td class=text>/runs/base</td>" in summary
    assert re.search(r"<td class=text>final_eval.val_margin</td><td[^>]*>0.4972</td>", summary)
    assert re.search(r"<td class=text>train_data.pairs</td><td[^>]*>40</td>", summary)
    assert "{" not in html.unescape(summary.split("<table", 1)[1])  # no Python or JSON dict printed


def test_config_diff_shows_only_changed_keys(run_factory):
    defaults = default_config()
    changed = {**defaults, "optim": {**defaults["optim"], "lr": 0.0042}, "init_from": "/runs/base", "new_key": 1}
    assert config_diff(changed, defaults) == [
        {"key": "optim.lr", "default": defaults["optim"]["lr"], "run": 0.0042},
        {"key": "init_from", "default": "null", "run": "/runs/base"},
        {"key": "new_key", "default": "(absent)", "run": 1},
    ]
    assert config_diff(defaults, defaults) == []
    text = run_report(run_factory(config_changes={"optim.lr": 0.0042, "schedule.name": "wsd"}))
    diff = text.split("Settings that differ")[1].split("</table>")[0]
    assert len(re.findall(r"<tr>", diff)) == 3  # the header and two settings
    assert "optim.lr" in diff and "schedule.name" in diff and "wsd" in diff and "cosine" in diff
    assert "model.d_model" not in diff  # unchanged settings are not listed


def test_run_without_metrics_uses_loss_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "running"}')
    (run / "loss.png").write_bytes(lines_png([Line("x", [1, 2], [1, 2])], title="t", xlabel="step"))
    text = run_report(run)
    assert captions(text) == ["loss curves (loss.png)"] and "<b class=bad>running</b>" in text


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "neither a run directory nor a sweep directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty"), str(tmp_path / "empty")]) == 1
    assert "--out FILE" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")]) == 1
    assert "not a run directory" in capsys.readouterr().err
