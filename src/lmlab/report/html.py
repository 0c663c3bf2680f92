"""Small HTML building blocks for reports: escaped text, tables, embedded PNG images.

Everything is plain HTML with inline CSS; images are embedded as base64 ``data:`` URIs so a report is one file that
can be copied or mailed without its run directory.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; }
.bad { color: #b00; }
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


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, bad_key: str | None = None) -> str:
    """An HTML table of dict rows; a row whose ``bad_key`` is not ``finished`` is marked in red."""
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="bad"' if bad_key and str(r.get(bad_key, "finished")) not in ("finished", "") else ""
        cells = "".join(
            f"<td{' class=text' if isinstance(r.get(c), str) else ''}>{esc(fmt(r.get(c, '')))}</td>" for c in columns
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def image_file(path: Path, alt: str) -> str:
    """An ``<img>`` with ``path``'s PNG embedded; empty string when the file does not exist."""
    if not path.is_file():
        return ""
    return image_bytes(path.read_bytes(), alt)


def image_bytes(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def page(title: str, sections: Sequence[str]) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
