"""PNG line plots for reports (matplotlib, Agg backend): one metric's curves, loss against compute, a fit's band.

Each function returns PNG bytes, so the caller decides where a figure goes; nothing is written to the run directory.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.ticker import MaxNLocator

from lmlab.science.plots import pyplot

#: Above this many lines a legend covers the plot; the figure caption still names every line.
MAX_LEGEND = 12
#: Lines with at most this many points get a marker on each point (evaluations are sparse).
MARKER_POINTS = 40


@dataclass
class Line:
    """One curve: ``x`` and ``y`` of equal length (NaN is a gap)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    return buf.getvalue()


def lines_png(lines: Sequence[Line], *, title: str, xlabel: str, ylabel: str = "") -> bytes:
    """Curves sharing axes; a legend when there are several (and not too many)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for line in lines:
        style = "o-" if len(line.x) <= MARKER_POINTS else "-"
        ax.plot(line.x, line.y, style, ms=3, lw=1.2, label=line.label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if 1 < len(lines) <= MAX_LEGEND:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def loss_vs_flops_png(points: Sequence[tuple[float, float]]) -> bytes | None:
    """Final validation loss against training FLOPs (log x); ``None`` without a finite, positive point."""
    pts = [(f, loss) for f, loss in points if math.isfinite(f) and math.isfinite(loss) and f > 0]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.scatter(*zip(*pts), s=16)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def band_png(
    x: np.ndarray,
    centre: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    points: Sequence[tuple[float, float]] = (),
    title: str,
    xlabel: str,
    ylabel: str,
    label: str,
    band_label: str,
) -> bytes:
    """A fitted curve with its interval band (shaded) over the measured points (log x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.fill_between(x, lo, hi, color="tab:red", alpha=0.2, lw=0, label=band_label)
    ax.plot(x, centre, "-", color="tab:red", lw=1.5, label=label)
    if points:
        ax.scatter(*zip(*points), s=14, color="tab:blue", label="runs", zorder=3)
    ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)
