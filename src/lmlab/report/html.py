"""Small HTML building blocks for reports: escaped text, tables (optionally sortable), figures, the page.

A report is one self-contained file: CSS and the few lines of JavaScript that sort tables are inline, images are
base64 ``data:`` URIs, nothing is fetched from the network, so it can be copied or mailed without its run directory.
Every figure is ``<figure class="figure">`` with an ``<img>`` and a ``<figcaption>``, so tests and readers can find
them.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lmlab.report.flat import flatten

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
nav { font-size: 0.9em; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[aria-sort=ascending]::after { content: " \\2191"; color: #222; }
table.sortable th[aria-sort=descending]::after { content: " \\2193"; color: #222; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
figure.figure { margin: 0; border: 1px solid #e4e4e4; padding: 0.4em; }
figure.figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
.kv { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
td.text { white-space: pre-wrap; overflow-wrap: break-word; max-width: 40em; }
.wide { overflow-x: auto; } .wide td, .wide th { white-space: nowrap; }
.bad { color: #b00; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 0.5em 1em; margin: 0.6em 0; }
details > summary { cursor: pointer; color: #336; }
"""

# Click a header of a ``table.sortable`` to sort by that column (again to reverse). Cells compare by their
# ``data-v`` (the raw number) when both are numbers, else as text; empty cells always go last.
SORT_SCRIPT = """
function lmlabCompare(a, b) {
  const x = parseFloat(a), y = parseFloat(b);
  if (!isNaN(x) && !isNaN(y) && isFinite(a) && isFinite(b)) return x - y;
  return a.localeCompare(b, undefined, {numeric: true});
}
function lmlabSort(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
  table.querySelectorAll("th").forEach((h) => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  const key = (row) => { const c = row.cells[col]; return c ? (c.dataset.v ?? c.textContent.trim()) : ""; };
  const rows = Array.from(body.rows);
  rows.sort((r, s) => {
    const a = key(r), b = key(s);
    if (a === "" || b === "") return (a === "") - (b === "");
    return dir * lmlabCompare(a, b);
  });
  rows.forEach((r) => body.appendChild(r));
}
document.querySelectorAll("table.sortable th").forEach((th) => th.addEventListener("click", () => lmlabSort(th)));
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """Numbers with 5 significant digits (thousands separators for big integers); other values as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) >= 1e3 and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.5g}"
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raw = "" if isinstance(value, float) and math.isnan(value) else f' data-v="{value!r}"'
        return f"<td{raw}>{esc(fmt(value))}</td>"
    return f"<td class=text>{esc(fmt(value))}</td>"


def table(
    rows: Sequence[dict], columns: Sequence[str] | None = None, bad_key: str | None = None, sortable: bool = False
) -> str:
    """An HTML table of dict rows; a row whose ``bad_key`` is not ``finished`` is marked in red.

    ``sortable``: clicking a header sorts the rows by that column (numbers by value, not by their formatted text).
    """
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="bad"' if bad_key and str(r.get(bad_key, "finished")) not in ("finished", "") else ""
        body.append(f"<tr{cls}>{''.join(_cell(r.get(c, '')) for c in columns)}</tr>")
    attr = ' class="sortable"' if sortable else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(data: dict, key: str = "key", value: str = "value", rows_per_column: int = 16) -> str:
    """``data`` as key/value rows, nested dicts flattened into key paths (``init_from.path``); a long list is split
    into side-by-side tables of ``rows_per_column`` rows so that it reads like a page, not a scroll."""
    rows = [{key: k, value: v} for k, v in flatten(data).items()]
    if len(rows) <= rows_per_column:
        return table(rows, [key, value])
    parts = [table(rows[i : i + rows_per_column], [key, value]) for i in range(0, len(rows), rows_per_column)]
    return f'<div class="kv">{"".join(parts)}</div>'


def figure(png: bytes, caption: str) -> str:
    """An embedded PNG with its caption (also the image's alt text)."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure class="figure"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def figure_file(path: Path, caption: str) -> str:
    """:func:`figure` of a PNG file; empty string when the file does not exist."""
    return figure(path.read_bytes(), caption) if path.is_file() else ""


def figures(items: Sequence[str]) -> str:
    """Figures laid out in a grid (two columns on a wide screen)."""
    return f'<div class="figures">{"".join(items)}</div>' if items else ""


def wide(content: str) -> str:
    """A wide table that scrolls sideways instead of squeezing its cells."""
    return f'<div class="wide">{content}</div>'


def warning(text: str) -> str:
    return f'<p class="warning">{esc(text)}</p>'


class Section(NamedTuple):
    """A titled part of a page; :func:`page` gives it a heading and a link in the contents line."""

    anchor: str
    title: str
    body: str


def page(title: str, intro: str, sections: Sequence[Section]) -> str:
    """The whole document: title, a contents line linking every non-empty section, the sections, the sort script."""
    parts = [s for s in sections if s.body]
    nav = " ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in parts)
    body = "\n".join(f'<h2 id="{esc(a)}">{esc(t)}</h2>\n{b}' for a, t, b in parts)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n{intro}\n<nav>{nav}</nav>\n{body}\n"
        f"<script>{SORT_SCRIPT}</script>\n</body></html>\n"
    )
