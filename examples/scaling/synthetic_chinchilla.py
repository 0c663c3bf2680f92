"""Recover the Epoch Chinchilla constants from synthetic runs (docs/science.md §1, §12), offline in seconds.

Draws runs with N log-uniform in [5e7, 1.6e10] and D log-uniform in [8e8, 3.2e11], losses from the Epoch headline
law with multiplicative noise, fits them with the default 4500-start grid, and prints the recovered constants,
bootstrap intervals and the compute-optimal allocation at Chinchilla's budget next to the truth.

    python examples/scaling/synthetic_chinchilla.py --points 200 --sigma 0.005
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lmlab.science.chinchilla import PRESETS, bootstrap_chinchilla, compute_optimal, fit_chinchilla


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--sigma", type=float, default=0.005)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    truth = PRESETS["epoch"]
    rng = np.random.default_rng(args.seed)
    n = np.exp(rng.uniform(math.log(5e7), math.log(1.6e10), args.points))
    d = np.exp(rng.uniform(math.log(8e8), math.log(3.2e11), args.points))
    loss = truth.loss(n, d) * np.exp(args.sigma * rng.standard_normal(args.points))
    fit = fit_chinchilla(n, d, loss)
    ci = bootstrap_chinchilla(n, d, loss, fit, n_resamples=args.bootstrap)
    print(f"{'param':<6} {'truth':>10} {'fit':>10}   95% interval")
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        print(f"{k:<6} {getattr(truth, k):>10.4g} {getattr(fit.params, k):>10.4g}   ({lo:.4g}, {hi:.4g})")
    c = 6 * 70e9 * 1.4e12
    for name, params in (("truth", truth), ("fit", fit.params)):
        n_opt, d_opt = compute_optimal(c, params)
        print(f"{name}: N_opt={float(n_opt):.3g} D_opt={float(d_opt):.3g} D/N={float(d_opt / n_opt):.1f}")
    print(f"Huber objective {fit.objective:.4g}, RMSE {fit.rmse:.4g}, {fit.n_starts} starts")


if __name__ == "__main__":
    main()
