"""``lmlab report RUN1 RUN2 --out FILE`` and ``lmlab report SWEEP``: overlaid curves, the sortable results table, fits."""

from __future__ import annotations

import html
import re

from lmlab.cli import main
from lmlab.report.multi import display_names, runs_report


def captions(text: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r'<figure class="figure">.*?<figcaption>(.*?)</figcaption>', text)]


def test_two_runs_overlay_every_shared_metric(run_factory, records_factory, tmp_path, capsys):
    a = run_factory("run-a", loss=3.0, records=records_factory(3.0, extra_train={"only_a": 1.0}))
    b = run_factory("run-b", loss=2.5)
    out = tmp_path / "compare.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    caps = captions(text)
    shared = ["train: " + k for k in ("loss", "lr", "grad_norm", "goldfish_dropped", "tokens_per_s")]
    shared += ["eval: " + k for k in ("val_loss", "val_ppl", "val_loss/<wiki>", "val_loss/code")]
    shared += ["task_eval: " + k for k in ("arith/acc", "arith/exact_match", "copy/acc", "eval_cost_pct")]
    shared += ["diagnostic: grad_cos", "diagnostic: probe_logps/chosen"]
    # One figure per shared metric, one line per run: both run names are the legend, also written in the caption.
    assert caps[1:] == [f"{c} (run-a, run-b)" for c in shared]
    assert caps[0] == "final validation loss against training FLOPs (finished runs)"
    assert not any("only_a" in c for c in caps)  # logged by one run only: nothing to compare
    assert not any(c.startswith("data:") for c in caps)  # logged once: not a curve
    # Task-eval scores and harness results are columns of the results table.
    head = text.split("<thead>")[1].split("</thead>")[0]
    for column in ("arith/acc", "copy/acc", "harness:hellaswag/acc", "harness:arc_easy/acc", "val_loss/code"):
        assert f"<th>{html.escape(column)}</th>" in head


def test_results_table_is_sortable(run_factory):
    runs = [run_factory(f"r{i}", loss=loss) for i, loss in enumerate([3.25, 2.5, 12.125])]
    text = runs_report(runs)
    table = text.split('<table class="sortable">')[1].split("</table>")[0]
    columns = re.findall(r"<th>(.*?)</th>", table.split("</thead>")[0])
    assert columns[:3] == ["run", "params", "non_embedding_params"] and "loss" in columns
    loss_col = columns.index("loss")
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>.*?</td>", r) for r in rows]
    # Numbers carry their raw value for sorting (the text is formatted: 12.125 -> "12.125", 1.5e11 -> "150,000,...").
    assert [c[loss_col] for c in cells] == [f'<td data-v="{v!r}">{v:.5g}</td>' for v in (3.25, 2.5, 12.125)]
    assert "function lmlabSort" in text and 'querySelectorAll("table.sortable th")' in text


def test_same_named_runs_are_told_apart(tmp_path):
    assert display_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]
