"""PNG plots of scaling-law fits (matplotlib, Agg backend; nothing is shown on screen).

- :func:`plot_chinchilla`: measured loss vs training FLOPs, coloured by model size, with the fitted compute-optimal
  frontier ``L(N_opt(C), D_opt(C))`` and, when Approach 2 was possible, the IsoFLOP parabolas.
- :func:`plot_annealing`: measured vs predicted loss curves.
- :func:`plot_lr_sweeps`: loss vs LR per (N, D) with the fitted parabola and its vertex.
- :func:`plot_mixture`: loss vs sampling ratio per family with the fitted ``c·p^-γ``.
- :func:`plot_coord_check`: μP's coordinate check, mean |activation| vs width per step and parametrization.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_chinchilla(path: Path, n, d, loss, flops, params, isoflop=None) -> Path:
    """Loss vs compute with the fitted frontier (``params``: ChinchillaParams; ``isoflop``: IsoFlopFit or None)."""
    from lmlab.science.chinchilla import compute_optimal

    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if isoflop else 1, figsize=(11 if isoflop else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    sc = ax.scatter(flops, loss, c=np.log10(n), cmap="viridis", s=18, label="runs")
    fig.colorbar(sc, ax=ax, label="log10 params")
    c = np.geomspace(min(flops) / 2, max(flops) * 10, 200)
    n_opt, d_opt = compute_optimal(c, params)
    ax.plot(c, params.loss(n_opt, d_opt), "r-", label=f"fitted frontier (a={params.a_opt:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6ND)")
    ax.set_ylabel("loss")
    ax.set_title("Chinchilla fit (Approach 3)")
    ax.legend()
    if isoflop:
        ax2 = axes[0, 1]
        for prof in isoflop.profiles:
            x = np.log(prof.params)
            xs = np.linspace(x.min(), x.max(), 100)
            c2, c1, c0 = prof.coeffs
            (line,) = ax2.plot(np.exp(xs), c2 * xs**2 + c1 * xs + c0, "-", lw=1)
            ax2.scatter(prof.params, prof.losses, color=line.get_color(), s=14, label=f"C={prof.compute:.2g}")
            ax2.plot([prof.n_opt], [prof.loss_opt], "k*", ms=9)
        ax2.set_xscale("log")
        ax2.set_xlabel("params")
        ax2.set_ylabel("loss")
        ax2.set_title(f"IsoFLOP profiles (Approach 2): a={isoflop.a:.3f}")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_annealing(path: Path, curves: Sequence, params, predicted: dict[str, np.ndarray]) -> Path:
    """Measured points (markers) and the law's predictions over every step (lines) for each curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        pred = predicted[curve.name]
        start = max(curve.warmup_steps, 1)
        (line,) = ax.plot(np.arange(start, len(pred)), pred[start:], "-", lw=1, label=f"{curve.name} (law)")
        ax.plot(curve.steps, curve.losses, "o", ms=3, color=line.get_color(), label=f"{curve.name} (measured)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"L0={params.L0:.4g} A={params.A:.4g} C={params.C:.4g} alpha={params.alpha:.4g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_sweeps(path: Path, groups: list[dict]) -> Path:
    """``groups``: dicts with ``label``, ``lrs``, ``losses`` and ``vertex`` (an LrVertex)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        x = np.log(np.asarray(g["lrs"], dtype=float))
        (pts,) = ax.plot(g["lrs"], g["losses"], "o", ms=4, label=g["label"])
        v = g["vertex"]
        lo, hi = (np.log(v.window[0]), np.log(v.window[1])) if v.window else (x.min(), x.max())
        xs = np.linspace(lo, hi, 100)  # a local vertex's parabola only where it was fitted
        c2, c1, c0 = v.coeffs
        ax.plot(np.exp(xs), c2 * xs**2 + c1 * xs + c0, "-", color=pts.get_color(), lw=1)
        ax.plot([v.lr_opt], [v.loss_opt], "k*", ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final loss")
    ax.set_title("LR sweeps and fitted optima (*)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_law(path: Path, optima: Sequence, law) -> Path:
    """Measured grid optima (η*, B*) against the fitted Step Law's, one panel each (log-log, y = x dashed)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, measured, predicted, label in (
        (axes[0], [o.lr_opt for o in optima], [law.lr(o.params, o.tokens) for o in optima], "learning rate η*"),
        (
            axes[1],
            [o.batch_opt for o in optima],
            [law.batch_tokens(o.params, o.tokens) for o in optima],
            "batch B* (tokens)",
        ),
    ):
        ax.plot(predicted, measured, "o", ms=5)
        lo, hi = min(measured + predicted) / 1.3, max(measured + predicted) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted {label}")
        ax.set_ylabel(f"grid optimum {label}")
    fig.suptitle("Step Law: grid optima vs the fitted law")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mixture(path: Path, families: list[dict]) -> Path:
    """``families``: dicts with ``name``, ``p``, ``loss`` and ``gamma``, ``scale`` for the fitted ``scale·p^-γ``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in families:
        (pts,) = ax.plot(f["p"], f["loss"], "o", ms=4, label=f"{f['name']} (gamma={f['gamma']:.3f})")
        ps = np.geomspace(min(f["p"]), 1.0, 100)
        ax.plot(ps, f["scale"] * ps ** (-f["gamma"]), "-", color=pts.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("sampling ratio p")
    ax.set_ylabel("loss")
    ax.set_title("Per-family loss vs sampling ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coord_check(path: Path, report: dict) -> Path:
    """One row per parametrization, one panel per activation (embedding, one attention and MLP output per block,
    logits): mean |coordinate| vs width, one line per training step (dark: early, light: late)."""
    plt = pyplot()
    results = report["results"]
    names = list(next(iter(results.values()))["sizes"])
    fig, axes = plt.subplots(
        len(results), len(names), figsize=(2.6 * len(names), 2.6 * len(results)), squeeze=False, sharex=True
    )
    colors = plt.cm.viridis(np.linspace(0, 0.9, report["steps"]))
    for row, (parametrization, result) in enumerate(results.items()):
        for col, name in enumerate(names):
            ax = axes[row, col]
            for step, values in enumerate(result["sizes"][name]):
                ax.plot(report["widths"], values, "-o", ms=2, lw=1, color=colors[step])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrization}: {name}\nslope {result['slopes'][name]:+.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(results) - 1:
                ax.set_xlabel("width", fontsize=8)
        axes[row, 0].set_ylabel("mean |activation|", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
