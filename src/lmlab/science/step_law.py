"""Step Law: the optimal learning rate and batch size as power laws of model size N and data D.

Li et al. 2025, *Predictable Scale: Part I — Optimal Hyperparameter Scaling Law in Large Language Model
Pretraining* (arXiv 2503.04715), fitted on ~3,700 models:

    η*(N, D) = 1.79 · N^−0.713 · D^0.307          B*(D) = 0.58 · D^0.571 tokens

with N the non-embedding parameters (``n_layer·(4h² + 3h·d_ff)`` for their models) and D the training tokens.
The plug-and-play predictor is :data:`STEP_LAW`; :func:`fit_step_law` refits the constants from an LR × batch
grid at several (N, D): each grid's optimum comes from a quadratic surface in (ln η, ln B) through the 3 × 3
block of runs around its best one (the paper finds the landscape convex, with a plateau around the optimum), then ln η* and ln B* are fitted
linearly in ln N and ln D. docs/science.md §27.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lmlab.errors import UserError


@dataclass(frozen=True)
class StepLaw:
    """``η* = lr_coef·N^lr_n·D^lr_d`` and ``B* = batch_coef·N^batch_n·D^batch_d`` (tokens)."""

    lr_coef: float
    lr_n: float
    lr_d: float
    batch_coef: float
    batch_d: float
    batch_n: float = 0.0

    def lr(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.lr_coef * np.power(n, self.lr_n) * np.power(d, self.lr_d)

    def batch_tokens(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.batch_coef * np.power(n, self.batch_n) * np.power(d, self.batch_d)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


STEP_LAW = StepLaw(lr_coef=1.79, lr_n=-0.713, lr_d=0.307, batch_coef=0.58, batch_d=0.571)
#: The means of the paper's 1,000 bootstrap fits (its released constants, unrounded).
STEP_LAW_UNROUNDED = StepLaw(lr_coef=1.79734, lr_n=-0.712922, lr_d=0.307491, batch_coef=0.580688, batch_d=0.570944)


def step_law_params(n_layers: int, d_model: int, d_ff: int) -> int:
    """N as the paper counts it: ``n_layer·(4h² + 3h·d_ff)`` (attention with full-width K and V, a gated MLP)."""
    return n_layers * (4 * d_model**2 + 3 * d_model * d_ff)


@dataclass(frozen=True)
class GridOptimum:
    """The optimum of one LR × batch grid at (params, tokens). ``inside``: a convex quadratic's vertex within the
    grid; otherwise the grid's best point (on its edge or where the surface is not convex)."""

    params: float
    tokens: float
    lr_opt: float
    batch_opt: float
    loss_opt: float
    inside: bool


def grid_optimum(
    params: float, tokens: float, lrs: Sequence[float], batches: Sequence[float], losses: Sequence[float]
) -> GridOptimum:
    """Fit ``loss ≈ c + g·x + xᵀHx/2`` in x = (ln η, ln B) by least squares to the 3 × 3 block of grid values
    around the best run and take its vertex when H is positive definite and the vertex lies within the block;
    else (the best run on the grid's edge, a surface not convex there) the best run itself. Local, because the
    landscape is a bowl only near its optimum: runs far from it (a diverging high LR) would bend a quadratic
    through the whole grid. Needs 3 LRs and 3 batches at least."""
    lr, bs, loss = (np.asarray(v, dtype=float) for v in (lrs, batches, losses))
    lr_values, bs_values = np.unique(lr), np.unique(bs)
    if len(lr_values) < 3 or len(bs_values) < 3:
        raise UserError(f"a Step Law grid needs at least 3 learning rates and 3 batch sizes, got {len(lr)} runs")
    best = int(np.argmin(loss))
    fallback = GridOptimum(params, tokens, float(lr[best]), float(bs[best]), float(loss[best]), False)
    i, j = int(np.searchsorted(lr_values, lr[best])), int(np.searchsorted(bs_values, bs[best]))
    if not (0 < i < len(lr_values) - 1 and 0 < j < len(bs_values) - 1):
        return fallback
    near = np.isin(lr, lr_values[i - 1 : i + 2]) & np.isin(bs, bs_values[j - 1 : j + 2])
    x, y = np.log(lr[near]), np.log(bs[near])
    design = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    if np.linalg.matrix_rank(design) < 6:  # e.g. a bootstrap resample that lost the block's corners
        return fallback
    c, *_ = np.linalg.lstsq(design, loss[near], rcond=None)
    hessian = np.array([[2 * c[3], c[5]], [c[5], 2 * c[4]]])
    if np.all(np.linalg.eigvalsh(hessian) > 0):
        vx, vy = np.linalg.solve(hessian, -c[1:3])
        if x.min() <= vx <= x.max() and y.min() <= vy <= y.max():
            value = float(c[0] + c[1] * vx + c[2] * vy + c[3] * vx**2 + c[4] * vy**2 + c[5] * vx * vy)
            return GridOptimum(params, tokens, math.exp(vx), math.exp(vy), value, True)
    return fallback


def fit_step_law(optima: Sequence[GridOptimum], *, batch_on_params: bool = False) -> StepLaw:
    """Least squares of ``ln η* = ln a + α ln N + β ln D`` and ``ln B* = ln b + γ ln D`` (``+ δ ln N`` with
    ``batch_on_params``); needs two sizes and two token budgets."""
    n = np.log([o.params for o in optima])
    d = np.log([o.tokens for o in optima])
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise UserError("a Step Law fit needs grids at two or more model sizes and two or more token budgets")
    ones = np.ones_like(n)
    lr_coef, *_ = np.linalg.lstsq(np.stack([ones, n, d], axis=1), np.log([o.lr_opt for o in optima]), rcond=None)
    columns = [ones, d, n] if batch_on_params else [ones, d]
    b_coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), np.log([o.batch_opt for o in optima]), rcond=None)
    return StepLaw(
        lr_coef=float(math.exp(lr_coef[0])),
        lr_n=float(lr_coef[1]),
        lr_d=float(lr_coef[2]),
        batch_coef=float(math.exp(b_coef[0])),
        batch_d=float(b_coef[1]),
        batch_n=float(b_coef[2]) if batch_on_params else 0.0,
    )


def step_law_leave_one_out(optima: Sequence[GridOptimum], *, batch_on_params: bool = False) -> dict[str, float]:
    """Each grid's η* and B* predicted by the law refitted without it, beside the baseline "they do not move" (the
    geometric mean of the others). Errors are ``|ln(predicted/measured)|``; factors are their exponentials."""
    errors: dict[str, list[float]] = {"lr": [], "batch": [], "lr_base": [], "batch_base": []}
    for i, o in enumerate(optima):
        others = [p for j, p in enumerate(optima) if j != i]
        try:
            law = fit_step_law(others, batch_on_params=batch_on_params)
        except UserError:  # too few sizes or budgets left
            continue
        errors["lr"].append(abs(math.log(float(law.lr(o.params, o.tokens)) / o.lr_opt)))
        errors["batch"].append(abs(math.log(float(law.batch_tokens(o.params, o.tokens)) / o.batch_opt)))
        errors["lr_base"].append(abs(float(np.mean(np.log([p.lr_opt for p in others]))) - math.log(o.lr_opt)))
        errors["batch_base"].append(abs(float(np.mean(np.log([p.batch_opt for p in others]))) - math.log(o.batch_opt)))
    if not errors["lr"]:
        return {"n": 0}
    out: dict[str, float] = {"n": len(errors["lr"])}
    for key, values in errors.items():
        out[f"{key}_mean_factor"] = float(math.exp(np.mean(values)))
        out[f"{key}_max_factor"] = float(math.exp(max(values)))
    return out
