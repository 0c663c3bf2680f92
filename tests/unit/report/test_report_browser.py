"""Reports open in headless Chromium: no console errors, every figure decodes, the results table sorts by a click.

The report is written unchanged; a copy gets a probe script that, once the page has loaded, counts the figures,
checks that each image decoded (``naturalWidth > 0``), clicks table headers and writes what it saw into a
``data-probe`` attribute, which ``--dump-dom`` hands back. Console messages (an uncaught error in the report's own
script included) go to Chromium's log on stderr; the report logs nothing, so any console line is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmlab.report.multi import runs_report
from lmlab.report.run_report import run_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
if CHROMIUM is None and os.environ.get("LMLAB_REQUIRE_CHROMIUM") == "1":  # CI installs it: a skip there is a failure
    raise RuntimeError("LMLAB_REQUIRE_CHROMIUM=1 but no chromium binary is on PATH")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt install chromium)")

PROBE = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.querySelectorAll("figure.figure img"));
  const out = {
    figures: document.querySelectorAll("figure.figure").length,
    captions: document.querySelectorAll("figure.figure figcaption").length,
    decoded: images.filter((im) => im.complete && im.naturalWidth > 0).length,
  };
  const table = document.querySelector("table.sortable");
  if (table) {
    const heads = Array.from(table.tHead.rows[0].cells);
    const column = (name) => {
      const i = heads.findIndex((h) => h.textContent === name);
      return Array.from(table.tBodies[0].rows).map((r) => r.cells[i].textContent);
    };
    const loss = heads.find((h) => h.textContent === "loss");
    loss.click();
    out.ascending = column("loss");
    out.aria = loss.getAttribute("aria-sort");
    loss.click();
    out.descending = column("loss");
    heads.find((h) => h.textContent === "run").click();
    out.byName = column("run");
  }
  document.body.setAttribute("data-probe", JSON.stringify(out));
});
</script>
"""


def open_in_chromium(report: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """``(probe, console lines)`` of ``report`` loaded in headless Chromium with the probe added."""
    probed = tmp_path / f"probed-{report.name}"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    cmd += ["--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"the probe did not run; chromium said: {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html.unescape(found.group(1))), console


def test_run_report_renders(run_factory, tmp_path):
    report = tmp_path / "run.html"
    report.write_text(run_report(run_factory()))
    probe, console = open_in_chromium(report, tmp_path)
    assert console == []
    assert probe["figures"] == probe["captions"] == probe["decoded"] == 12


def test_multi_run_report_renders_and_sorts(run_factory, tmp_path):
    runs = [run_factory(f"r{i}", loss=loss) for i, loss in enumerate([3.25, 2.5, 12.125])]
    runs.append(run_factory("r3-diverged", loss=float("nan"), status="diverged"))
    report = tmp_path / "compare.html"
    report.write_text(runs_report(runs))
    probe, console = open_in_chromium(report, tmp_path)
    assert console == []
    assert probe["figures"] == probe["captions"] == probe["decoded"] >= 15
    # Numbers sort by value (text order would put 12.125 first); the run without a loss stays last both ways.
    assert probe["ascending"] == ["2.5", "3.25", "12.125", ""] and probe["aria"] == "ascending"
    assert probe["descending"] == ["12.125", "3.25", "2.5", ""]
    assert probe["byName"] == ["r0", "r1", "r2", "r3-diverged"]


def test_screenshot_script(run_factory, tmp_path):
    report = tmp_path / "run.html"
    report.write_text(run_report(run_factory()))
    script = Path(__file__).resolve().parents[3] / "scripts" / "report_screenshot.sh"
    out = tmp_path / "shot.png"
    done = subprocess.run(["bash", str(script), str(report), str(out), "800,600"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
