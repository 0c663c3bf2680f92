"""The Chinchilla parametric law ``L(N, D) = E + A/N^α + B/D^β`` (docs/science.md §1).

What lives here: the law and its published constants (§1.4), the closed-form compute-optimal allocation (§1.3),
the Approach-3 fitter exactly as §1.2 (log-sum-exp form, Huber δ = 1e-3 on log-loss residuals summed over points,
L-BFGS-B from each of the 4500 grid starts, lowest objective kept) and bootstrap intervals for it.

Sources: Hoffmann et al. 2022, arXiv 2203.15556 (Approach 3, §3.3 and App. D.2); Besiroglu et al. 2024, *Chinchilla
Scaling: A replication attempt*, arXiv 2404.10102, whose notebook (epoch-research/analyzing-chinchilla) is the
reference implementation of the grid fit.

Speed: the objective and its analytic gradient are vectorised over points with numpy, so one L-BFGS-B run costs a
few milliseconds and the full 4500-start grid on a few hundred points runs in seconds on one core.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

from lmlab.errors import UserError
from lmlab.science.batched_lbfgs import BatchedObjective, batched_lbfgs
from lmlab.science.huber import HUBER_DELTA, huber, huber_grad

# --------------------------------------------------------------------------- the law


@dataclass(frozen=True)
class ChinchillaParams:
    """Constants of ``L(N, D) = E + A/N^alpha + B/D^beta`` (N parameters, D training tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        """The predicted loss at ``n`` parameters and ``d`` tokens."""
        return chinchilla_loss(n, d, self)

    @property
    def a_opt(self) -> float:
        """Exponent of ``N_opt ∝ C^a``: ``beta / (alpha + beta)`` (§1.3)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b_opt(self) -> float:
        """Exponent of ``D_opt ∝ C^b``: ``alpha / (alpha + beta)`` (§1.3)."""
        return self.alpha / (self.alpha + self.beta)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ChinchillaParams:
        try:
            return cls(**{k: float(data[k]) for k in ("E", "A", "B", "alpha", "beta")})
        except KeyError as err:
            raise UserError(f"Chinchilla parameters are missing key {err.args[0]!r}") from None


#: Published constants (docs/science.md §1.4). ``hoffmann-rounded`` are the paper body's values; ``hoffmann-tex`` the
#: unrounded values of the paper's TeX source (used by Epoch); ``epoch`` the Epoch replication's headline MLE fit on
#: 240 points; ``epoch-huber`` the Epoch notebook's grid fit (the procedure :func:`fit_chinchilla` implements).
PRESETS: dict[str, ChinchillaParams] = {
    "hoffmann-rounded": ChinchillaParams(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "hoffmann-tex": ChinchillaParams(
        E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186), alpha=0.33917084, beta=0.2849083
    ),
    "epoch": ChinchillaParams(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
    # Epoch notebook's "replicate exactly" Huber + L-BFGS-B grid fit on the same 240 points (§1.4).
    "epoch-huber": ChinchillaParams(E=1.81724, A=477.84, B=2143.86, alpha=0.34731, beta=0.36718),
}


def chinchilla_loss(n: np.ndarray | float, d: np.ndarray | float, params: ChinchillaParams) -> np.ndarray:
    """``E + A / N^alpha + B / D^beta`` (docs/science.md §1.1), elementwise."""
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    return params.E + params.A / n**params.alpha + params.B / d**params.beta


def compute_optimal(c: np.ndarray | float, params: ChinchillaParams) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal ``(N_opt, D_opt)`` for training FLOPs ``c`` under ``C = 6ND`` (closed form, §1.3).

    ``G = (αA / (βB))^(1/(α+β))``, ``N_opt = G (C/6)^(β/(α+β))``, ``D_opt = G^-1 (C/6)^(α/(α+β))``.
    """
    c = np.asarray(c, dtype=float)
    p = params
    g = (p.alpha * p.A / (p.beta * p.B)) ** (1.0 / (p.alpha + p.beta))
    return g * (c / 6.0) ** p.a_opt, (c / 6.0) ** p.b_opt / g


# --------------------------------------------------------------------------- the objective

#: Raw parameter order of the fitter: ``(a, b, e, alpha, beta)`` with ``a = log A``, ``b = log B``, ``e = log E``.
RAW_ORDER = ("a", "b", "e", "alpha", "beta")


def default_grid() -> np.ndarray:
    """The 4500 initialisations of §1.2 as rows ``(a, b, e, alpha, beta)``.

    alpha, beta ∈ {0, 0.5, 1, 1.5, 2}; e ∈ {−1, −0.5, 0, 0.5, 1}; a, b ∈ {0, 5, …, 25}.
    """
    ab = np.arange(0.0, 30.0, 5.0)
    e = np.linspace(-1.0, 1.0, 5)
    exps = np.arange(0.0, 2.5, 0.5)
    return np.array(list(itertools.product(ab, ab, e, exps, exps)), dtype=float)


def small_grid() -> np.ndarray:
    """A reduced 2·2·2·3·3 = 72-start grid for quick fits (bootstrap refits, tests); *not* the §1.2 default."""
    ab = np.array([5.0, 10.0])
    e = np.array([-0.5, 0.5])
    exps = np.array([0.25, 0.5, 1.0])
    return np.array(list(itertools.product(ab, ab, e, exps, exps)), dtype=float)


def params_from_raw(x: Sequence[float]) -> ChinchillaParams:
    a, b, e, alpha, beta = (float(v) for v in x)
    return ChinchillaParams(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def raw_from_params(p: ChinchillaParams) -> np.ndarray:
    return np.array([math.log(p.A), math.log(p.B), math.log(p.E), p.alpha, p.beta])


def huber_objective(
    x: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA
) -> tuple[float, np.ndarray]:
    """Summed Huber objective of §1.2 and its analytic gradient with respect to ``(a, b, e, alpha, beta)``
    (one row of :func:`huber_objective_batched`)."""
    f, g = huber_objective_batched(np.asarray(x, dtype=float)[None, :], log_n, log_d, log_l, delta)
    return float(f[0]), g[0]


#: Largest number of (start, point) pairs :func:`huber_objective_batched` evaluates in one numpy pass.
BATCH_ELEMENTS = 2_000_000


def huber_objective_batched(
    x: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    delta: float = HUBER_DELTA,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`huber_objective` for many parameter vectors at once: ``x`` (S, 5) -> objectives (S,), gradients (S, 5).

    ``weights`` (S, n), if given, multiplies each point's Huber term per row (bootstrap multiplicities). Rows are
    processed in chunks of about :data:`BATCH_ELEMENTS` (start, point) pairs to bound memory.
    """
    rows = max(1, BATCH_ELEMENTS // max(1, len(log_n)))
    if len(x) > rows:
        parts = [
            huber_objective_batched(
                x[i : i + rows], log_n, log_d, log_l, delta, None if weights is None else weights[i : i + rows]
            )
            for i in range(0, len(x), rows)
        ]
        return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])
    a, b, e, alpha, beta = (x[:, i : i + 1] for i in range(5))
    with np.errstate(over="ignore", invalid="ignore"):
        z1 = a - alpha * log_n
        z2 = b - beta * log_d
        m = np.maximum(np.maximum(z1, z2), e)
        w1 = np.exp(z1 - m)
        w2 = np.exp(z2 - m)
        w3 = np.exp(e - m)
        s = w1 + w2 + w3
        r = m + np.log(s) - log_l
        h = huber_grad(r, delta) / s
        hub = huber(r, delta)
        if weights is not None:
            h = h * weights
            hub = hub * weights
        g1 = h * w1
        g2 = h * w2
        grad = np.stack([g1.sum(1), g2.sum(1), (h * w3).sum(1), -(g1 @ log_n), -(g2 @ log_d)], axis=1)
        f = hub.sum(1)
    return f, grad


# --------------------------------------------------------------------------- fitting


@dataclass
class ChinchillaFit:
    """Result of :func:`fit_chinchilla`."""

    params: ChinchillaParams
    objective: float  # summed Huber objective at the optimum
    raw: np.ndarray  # (a, b, e, alpha, beta)
    n_points: int
    n_starts: int
    rmse: float  # root-mean-square error in loss space

    def to_dict(self) -> dict:
        return {
            "params": self.params.to_dict(),
            "a_opt": self.params.a_opt,
            "b_opt": self.params.b_opt,
            "huber_objective": self.objective,
            "rmse": self.rmse,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
        }


#: L-BFGS-B options. Tighter than scipy's defaults so that noise-free data are recovered to 1e-3 relative with an
#: objective below 1e-10 (docs/science.md §12): scipy's default ``ftol`` (2.2e-9, an absolute decrease once |f| < 1)
#: stops far above the optimum of a Huber sum whose scale is 1e-6..1e-3.
LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12, "maxls": 50}


def check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray, what: str = "data") -> None:
    """Refuse data a Chinchilla fit cannot identify: too few points, one model size, non-positive values."""
    if not (len(n) == len(d) == len(loss)):
        raise UserError(f"{what}: params, tokens and loss have different lengths ({len(n)}, {len(d)}, {len(loss)})")
    if len(n) < 6:
        raise UserError(f"{what}: a Chinchilla fit needs at least 6 finished runs (5 parameters), got {len(n)}")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(d)) and np.all(np.isfinite(loss))):
        raise UserError(f"{what}: params, tokens and loss must be finite numbers")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise UserError(f"{what}: params, tokens and loss must be positive")
    if len(np.unique(n)) < 2:
        raise UserError(f"{what}: all runs have the same model size ({n[0]:.4g} params); alpha cannot be fitted")
    if len(np.unique(d)) < 2:
        raise UserError(f"{what}: all runs have the same token count ({d[0]:.4g}); beta cannot be fitted")


def free_mask(fixed_E: float | None) -> np.ndarray:
    """Gradient mask over ``RAW_ORDER``: zero on ``e`` when E is fixed, so no optimizer moves it."""
    mask = np.ones(len(RAW_ORDER))
    if fixed_E is not None:
        if not (math.isfinite(fixed_E) and fixed_E > 0):
            raise UserError(f"a fixed E must be a positive number, got {fixed_E}")
        mask[RAW_ORDER.index("e")] = 0.0
    return mask


def masked_objective(
    args: tuple, delta: float, free: np.ndarray, weights: np.ndarray | None = None
) -> BatchedObjective:
    """The batched Huber objective on ``args = (log N, log D, log L)`` with ``weights[rows]`` per start (none: all
    points once) and its gradient masked by ``free`` (:func:`free_mask`), for :func:`batched_lbfgs`."""

    def objective(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, g = huber_objective_batched(x, *args, delta, None if weights is None else weights[rows])
        return f, g * free

    return objective


def refit_weighted(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, fit: ChinchillaFit, weights: np.ndarray, *,
    fixed_E: float | None = None, delta: float = HUBER_DELTA,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Refits of ``fit`` with per-point ``weights`` (one row per refit: bootstrap multiplicities, leave-one-out
    zeros), all from the full-data optimum in one batched L-BFGS; returns raw end points and objectives."""
    args = (np.log(n), np.log(d), np.log(loss))
    objective = masked_objective(args, delta, free_mask(fixed_E), weights)
    return batched_lbfgs(objective, np.tile(fit.raw, (len(weights), 1)), max_iter=1000)


def fit_chinchilla(
    n: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    fixed_E: float | None = None,
    delta: float = HUBER_DELTA,
    grid: np.ndarray | None = None,
    method: str = "batched",
    screen_iters: int = 10,
    keep: int = 256,
    polish: int = 8,
    options: dict | None = None,
) -> ChinchillaFit:
    """Fit ``E, A, B, alpha, beta`` by Approach 3 as docs/science.md §1.2.

    Every row of ``grid`` (default :func:`default_grid`, the 4500 starts of §1.2) is optimised on the summed Huber
    objective of log-loss residuals, and the lowest objective wins.

    ``method="scipy"`` is the literal procedure: scipy L-BFGS-B from each start (tens of seconds for 4500 starts).
    ``method="batched"`` (default) is a documented shortcut with the same answer: all starts advance together with
    :func:`~lmlab.science.batched_lbfgs.batched_lbfgs` (the same L-BFGS algorithm, vectorised) for
    ``screen_iters`` iterations (a cheap first pass); the ``keep`` lowest continue to convergence; the ``polish``
    best distinct end points are then polished with scipy L-BFGS-B at :data:`LBFGS_OPTIONS` and the lowest is kept.
    Starts still far from the best objective after the screen are dropped, which never changed the optimum in our
    checks (the tests compare both methods and check the §12 recoveries with the default). It takes seconds.

    ``fixed_E`` holds E at a known value (e.g. a synthetic world's exact entropy floor) and fits the other four.
    """
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    loss = np.asarray(loss, dtype=float)
    check_points(n, d, loss)
    starts = default_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
    free = free_mask(fixed_E)
    if fixed_E is not None:
        starts = starts.copy()
        starts[:, RAW_ORDER.index("e")] = math.log(fixed_E)
        starts = starts[np.sort(np.unique(starts, axis=0, return_index=True)[1])]  # grid order, duplicates dropped
    opts = {**LBFGS_OPTIONS, **(options or {})}
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    args = (log_n, log_d, log_l, delta)

    def one(x: np.ndarray, *a) -> tuple[float, np.ndarray]:
        f, g = huber_objective(x, *a)
        return f, g * free

    if method == "batched":
        objective = masked_objective(args[:3], delta, free)
        ends, fs = batched_lbfgs(objective, starts, max_iter=screen_iters)
        survivors = np.argsort(np.where(np.isfinite(fs), fs, np.inf), kind="stable")[:keep]
        ends, fs = batched_lbfgs(objective, ends[survivors])
        order = [i for i in np.argsort(fs, kind="stable") if np.isfinite(fs[i])]
        chosen: list[np.ndarray] = []
        for i in order:
            if len(chosen) >= polish:
                break
            if all(np.max(np.abs(ends[i] - c)) > 1e-6 for c in chosen):
                chosen.append(ends[i])
        refine = chosen
    elif method == "scipy":
        refine = list(starts)
    else:
        raise UserError(f"unknown Chinchilla fit method {method!r}; choose 'batched' or 'scipy'")
    best_x, best_f = None, math.inf
    for x0 in refine:
        res = minimize(one, x0, args=args, jac=True, method="L-BFGS-B", options=opts)
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise UserError("the Chinchilla fit failed from every start (non-finite objective)")
    params = params_from_raw(best_x)
    rmse = float(np.sqrt(np.mean((chinchilla_loss(n, d, params) - loss) ** 2)))
    return ChinchillaFit(params, best_f, np.asarray(best_x), len(n), len(starts), rmse)


BOOTSTRAP_COLUMNS = ("E", "A", "B", "alpha", "beta", "a_opt")


def bootstrap_chinchilla_draws(
    n: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    fit: ChinchillaFit,
    *,
    n_resamples: int = 100,
    seed: int = 42,
    fixed_E: float | None = None,
    delta: float = HUBER_DELTA,
) -> np.ndarray:
    """Bootstrap refits [R, 6] of ``BOOTSTRAP_COLUMNS`` = ``E, A, B, alpha, beta, a_opt`` (points resampled with
    replacement); ``bootstrap_chinchilla`` turns them into intervals, a report draws bands from them.

    A resample is a vector of multiplicities over the original points, so all resamples are refitted at once with
    the batched L-BFGS, each from the full-data optimum (not from the 4500-start grid, which would cost a full fit
    per resample). 100 resamples (the CLI default) take a second or two; Epoch used 4000 (docs/science.md §1.2), which
    ``n_resamples=4000`` reproduces in count. Resamples whose design collapses to one model size or one token count
    are skipped. With ``fixed_E`` (the fit's) E stays at its value in every refit.
    """
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    loss = np.asarray(loss, dtype=float)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)) for _ in range(n_resamples)])
    counts = counts.astype(float).reshape(n_resamples, len(n))
    used = counts > 0
    ok = np.array([len(np.unique(n[u])) >= 2 and len(np.unique(d[u])) >= 2 for u in used], dtype=bool)
    counts = counts[ok]
    if len(counts) == 0:
        return np.empty((0, len(BOOTSTRAP_COLUMNS)))
    ends, fs = refit_weighted(n, d, loss, fit, counts, fixed_E=fixed_E, delta=delta)
    samples = []
    for x, f in zip(ends, fs):
        if np.isfinite(f):
            p = params_from_raw(x)
            samples.append([p.E, p.A, p.B, p.alpha, p.beta, p.a_opt])
    return np.array(samples).reshape(-1, len(BOOTSTRAP_COLUMNS))


def bootstrap_chinchilla(
    n, d, loss, fit: ChinchillaFit, *, level: float = 0.95, **options
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for ``E, A, B, alpha, beta, a_opt`` (``bootstrap_chinchilla_draws``)."""
    draws = bootstrap_chinchilla_draws(n, d, loss, fit, **options)
    return percentile_intervals(draws, list(BOOTSTRAP_COLUMNS), level) if len(draws) else {}


def percentile_intervals(samples: np.ndarray, names: Sequence[str], level: float = 0.95) -> dict:
    """``{name: (lo, hi)}`` percentile intervals of the columns of ``samples``; empty when there are none."""
    if samples.size == 0:
        return {}
    q = 100.0 * (1.0 - level) / 2.0
    lo = np.percentile(samples, q, axis=0)
    hi = np.percentile(samples, 100.0 - q, axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(names, lo, hi)}
