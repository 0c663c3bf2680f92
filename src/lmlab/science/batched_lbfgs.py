"""A batched, unconstrained L-BFGS in numpy: many independent starts of one smooth objective at once.

Why it exists: the §1.2 Chinchilla fit runs L-BFGS from 4500 grid starts (docs/science.md §1.2). Calling scipy once per
start spends most of its time in per-call Python overhead (tens of seconds on one core); here every start advances in
lock step and the objective is evaluated for all of them in one vectorised call, which takes a second or two. Each
start follows the standard L-BFGS two-loop recursion (Nocedal & Wright, *Numerical Optimization*, Alg. 7.4) with a
backtracking Armijo line search; a start stops when its gradient or its objective stops changing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: ``fg(X, rows) -> (f, G)``: ``X`` (k, P) holds the points of the starts ``rows`` (k indices into the batch, for
#: objectives that differ per start), ``f`` is (k,) and ``G`` (k, P).
BatchedObjective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def batched_lbfgs(
    fg: BatchedObjective,
    x0: np.ndarray,
    *,
    max_iter: int = 300,
    memory: int = 10,
    gtol: float = 1e-10,
    ftol: float = 1e-14,
    c1: float = 1e-4,
    max_halvings: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``fg`` from every row of ``x0``; return the final points (S, P) and objectives (S,).

    Non-finite objective values count as "too far" in the line search. A start whose line search fails is frozen
    at its last accepted point (its objective is still a valid value of the function there).
    """
    x = np.array(x0, dtype=float)
    f, g = fg(x, np.arange(len(x)))
    f = np.where(np.isfinite(f), f, np.inf)
    n_starts, _ = x.shape
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    rho_hist: list[np.ndarray] = []
    active = np.isfinite(f)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi = g[idx]
        # Two-loop recursion over the stored pairs (per start; rho = 0 disables a pair with bad curvature).
        q = gi.copy()
        alphas = []
        for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = rho[idx] * np.einsum("ij,ij->i", s[idx], q)
            q -= a[:, None] * y[idx]
            alphas.append(a)
        if s_hist:
            s_last, y_last = s_hist[-1][idx], y_hist[-1][idx]
            sy = np.einsum("ij,ij->i", s_last, y_last)
            yy = np.einsum("ij,ij->i", y_last, y_last)
            gamma = np.where((sy > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
        else:
            gamma = 1.0 / np.maximum(1.0, np.abs(gi).max(axis=1))
        r = gamma[:, None] * q
        for s, y, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            b = rho[idx] * np.einsum("ij,ij->i", y[idx], r)
            r += s[idx] * (a - b)[:, None]
        p = -r
        slope = np.einsum("ij,ij->i", gi, p)
        bad = ~(slope < 0) | ~np.all(np.isfinite(p), axis=1)
        p[bad] = -gi[bad] / np.maximum(1.0, np.abs(gi[bad]).max(axis=1))[:, None]
        slope[bad] = np.einsum("ij,ij->i", gi[bad], p[bad])
        # Backtracking line search, vectorised over the starts still searching.
        step = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        x_new = x[idx].copy()
        f_new = f[idx].copy()
        g_new = gi.copy()
        for _ in range(max_halvings):
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            xt = x[idx[todo]] + step[todo, None] * p[todo]
            ft, gt = fg(xt, idx[todo])
            ok = np.isfinite(ft) & (ft <= f[idx[todo]] + c1 * step[todo] * slope[todo])
            ok &= np.all(np.isfinite(gt), axis=1)
            hit = todo[ok]
            x_new[hit], f_new[hit], g_new[hit] = xt[ok], ft[ok], gt[ok]
            accepted[hit] = True
            step[todo[~ok]] *= 0.5
        s_full = np.zeros_like(x)
        y_full = np.zeros_like(x)
        s_full[idx] = x_new - x[idx]
        y_full[idx] = g_new - gi
        sy = np.einsum("ij,ij->i", s_full, y_full)
        rho = np.where(sy > 1e-300, 1.0 / np.where(sy > 1e-300, sy, 1.0), 0.0)
        s_hist.append(s_full)
        y_hist.append(y_full)
        rho_hist.append(rho)
        if len(s_hist) > memory:
            s_hist.pop(0)
            y_hist.pop(0)
            rho_hist.pop(0)
        f_old = f[idx].copy()
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        done = ~accepted
        done |= np.abs(g_new).max(axis=1) <= gtol
        done |= accepted & (f_old - f_new <= ftol * np.maximum(np.abs(f_old), 1e-300))
        active[idx[done]] = False
    return x, f
