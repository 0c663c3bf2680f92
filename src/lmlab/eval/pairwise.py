"""Statistics of pairwise judging: position-swap debiasing, win rates with intervals, Bradley-Terry ranking.

A judge compares two answers to one prompt and returns P(first answer better). LLM judges favour one
position (Liusie, Manakul & Gales 2024, "LLM Comparative Assessment: Zero-shot NLG Evaluation through
Pairwise Comparisons using Large Language Models", EACL, arXiv 2307.07889: pairwise beats absolute
scoring, with strong positional bias that debiasing reduces), so every pair (a, b) is judged in both
orders and the two verdicts are combined (``combine_orders``); ``position_bias`` measures the bias left.

Two contestants are summarised by a win rate (ties count half) with a Wilson score interval (Wilson 1927).
Several are ranked by the Bradley-Terry model (Bradley & Terry 1952): P(i beats j) = γ_i / (γ_i + γ_j),
fitted by the MM algorithm of Hunter (2004, "MM algorithms for generalized Bradley-Terry models", Ann.
Statist. 32(1)) from an incomplete design (``comparison_design``: not every pair on every prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.stats import norm

Comparison = tuple[int, int, float]
"""``(i, j, s)``: players i and j met once and i scored ``s`` (1 win, 0.5 tie, 0 loss; j scored 1 - s)."""


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def _side(p_first: float) -> int:
    """+1: the first answer won, -1: the second, 0: a tie (P exactly 0.5)."""
    return (p_first > 0.5) - (p_first < 0.5)


# --------------------------------------------------------------------------- position swap


@dataclass(frozen=True)
class SwappedVerdict:
    """One pair judged in both orders. ``p_a``: P(a better) averaged over the orders; ``outcome``: 1 when a
    won in both orders, 0 when b did, 0.5 otherwise (a tie, or verdicts that follow the position);
    ``consistent``: both orders name the same winner (or both tie)."""

    p_a: float
    outcome: float
    consistent: bool


def combine_orders(p_ab: float, p_ba: float) -> SwappedVerdict:
    """Combine P(first better) of the order (a, b), ``p_ab``, and of the order (b, a), ``p_ba``.

    In the second order a is second, so it says P(a better) = 1 - ``p_ba``. A judge that always prefers
    the first position gives a 1 and a 0 here: a tie, not a win for whichever answer was shown first.
    """
    for name, p in (("p_ab", p_ab), ("p_ba", p_ba)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    first, second = _side(p_ab), -_side(p_ba)  # a's result in each order
    outcome = 1.0 if first == second == 1 else 0.0 if first == second == -1 else 0.5
    return SwappedVerdict((p_ab + 1.0 - p_ba) / 2, outcome, first == second)


@dataclass(frozen=True)
class PositionBias:
    """How a judge treats the positions over ``n_pairs`` pairs judged in both orders (2·n_pairs verdicts):
    the fractions of verdicts won by the first answer, by the second and tied, the mean P(first better)
    (0.5 for a judge without bias, on average), and the fraction of pairs judged the same in both orders."""

    first_wins: float
    second_wins: float
    ties: float
    mean_p_first: float
    consistency: float
    n_pairs: int


def position_bias(judged: Sequence[tuple[float, float]]) -> PositionBias:
    """Position statistics of ``(p_ab, p_ba)`` pairs, each P(first better) of one order."""
    if not judged:
        raise ValueError("position_bias needs at least one pair")
    firsts = [p for pair in judged for p in pair]
    sides = [_side(p) for p in firsts]
    n = len(firsts)
    consistent = sum(combine_orders(p_ab, p_ba).consistent for p_ab, p_ba in judged)
    return PositionBias(
        first_wins=sides.count(1) / n,
        second_wins=sides.count(-1) / n,
        ties=sides.count(0) / n,
        mean_p_first=sum(firsts) / n,
        consistency=consistent / len(judged),
        n_pairs=len(judged),
    )


# --------------------------------------------------------------------------- win rate


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927, JASA 22(158)):

        (p̂ + z²/2n ± z·sqrt(p̂(1 - p̂)/n + z²/4n²)) / (1 + z²/n)

    Unlike p̂ ± z·se it stays inside [0, 1] and keeps its coverage near p̂ = 0 or 1 and for small n.
    ``successes`` may be fractional (ties as half wins): an approximation that is exact without ties.
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """Share of comparisons won (ties count half) with its Wilson interval at ``confidence``."""

    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int
    losses: int
    confidence: float


def win_rate(outcomes: Sequence[float], confidence: float = 0.95) -> WinRate:
    """Win rate of a over b from per-comparison outcomes in [0, 1] (1 win, 0.5 tie, 0 loss)."""
    if not outcomes:
        raise ValueError("win_rate needs at least one outcome")
    if any(not 0.0 <= o <= 1.0 for o in outcomes):
        raise ValueError("outcomes must lie in [0, 1]")
    n, total = len(outcomes), float(sum(outcomes))
    low, high = wilson_interval(total, n, confidence)
    wins = sum(o > 0.5 for o in outcomes)
    losses = sum(o < 0.5 for o in outcomes)
    return WinRate(total / n, low, high, n, wins, n - wins - losses, losses, confidence)


def win_matrix(n_players: int, comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
    """``(rates, counts)`` [K, K]: ``rates[i, j]`` is i's win rate over j (ties half; nan where they never
    met) and ``counts[i, j]`` how often they met."""
    wins, counts = _tally(n_players, comparisons)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, wins / counts, np.nan)
    return rates, counts


# --------------------------------------------------------------------------- design


def comparison_design(
    n_players: int, n_prompts: int, pairs_per_prompt: int | None = None, comparisons: int | None = None, seed: int = 0
) -> list[tuple[int, int, int]]:
    """Which ``(prompt, i, j)`` (i < j) to judge: every pair on every prompt by default.

    ``pairs_per_prompt`` k: each prompt gets k different pairs, dealt round-robin from a shuffled list of
    all pairs so every pair is met about equally often (a balanced incomplete design; with k·n_prompts at
    least the number of pairs, every pair is met). ``comparisons`` N: then a random N of those.
    """
    if n_players < 2:
        raise ValueError(f"a comparison needs at least 2 players, got {n_players}")
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i in range(n_players) for j in range(i + 1, n_players)]
    pairs = [pairs[t] for t in rng.permutation(len(pairs))]
    k = len(pairs) if pairs_per_prompt is None else min(pairs_per_prompt, len(pairs))
    if k < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    design = [(p, *pairs[(p * k + t) % len(pairs)]) for p in range(n_prompts) for t in range(k)]
    if comparisons is not None and comparisons < len(design):
        if comparisons < 1:
            raise ValueError(f"comparisons must be >= 1, got {comparisons}")
        keep = np.sort(rng.choice(len(design), size=comparisons, replace=False))
        design = [design[t] for t in keep]
    return [(p, min(i, j), max(i, j)) for p, i, j in design]


# --------------------------------------------------------------------------- Bradley-Terry


@dataclass(frozen=True)
class BradleyTerry:
    """Fitted log-strengths θ_i = log γ_i, ``scores[reference] == 0``, with Wald intervals from the Fisher
    information (``low``/``high``, ``stderr`` of θ_i - θ_reference) and ``ranks`` (1 = strongest)."""

    scores: np.ndarray
    stderr: np.ndarray
    low: np.ndarray
    high: np.ndarray
    ranks: np.ndarray
    reference: int
    iterations: int


def _tally(n_players: int, comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
    """``wins[i, j]``: i's score against j summed over their meetings; ``counts[i, j]``: meetings."""
    wins = np.zeros((n_players, n_players))
    counts = np.zeros((n_players, n_players))
    for i, j, s in comparisons:
        if i == j or not (0 <= i < n_players and 0 <= j < n_players):
            raise ValueError(f"comparison ({i}, {j}) must name two different players in [0, {n_players})")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"comparison ({i}, {j}) score must lie in [0, 1], got {s}")
        wins[i, j] += s
        wins[j, i] += 1.0 - s
        counts[i, j] += 1
        counts[j, i] += 1
    return wins, counts


def bradley_terry(
    n_players: int,
    comparisons: Sequence[Comparison],
    prior: float = 1.0,
    confidence: float = 0.95,
    reference: int = 0,
    tol: float = 1e-10,
    max_iter: int = 100_000,
) -> BradleyTerry:
    """Maximum a posteriori Bradley-Terry strengths from ``(i, j, score_of_i)`` comparisons.

    MM update (Hunter 2004): γ_i ← W_i / Σ_j N_ij / (γ_i + γ_j), W_i the total score of i (a tie is half a
    win for each side; Rao & Kupper 1967 and Davidson 1970 model ties with a parameter instead), N_ij the
    meetings of i and j. The prior adds, for every player, ``prior`` virtual games against a fixed player
    of strength 1 that end half won: a player that won every comparison keeps a finite score, and players
    with few comparisons shrink towards the average. ``prior=0`` is the plain maximum-likelihood estimate,
    which exists only when the "beat someone" graph is strongly connected (Ford 1957's condition, in Hunter 2004);
    for two players it is θ_1 - θ_0 = log(w/l) with variance 1/w + 1/l.

    Intervals: θ ± z·se with the covariance the pseudo-inverse of the observed Fisher information
    I_ii = Σ_j N_ij p_ij p_ji (+ prior·p_i0 p_0i), I_ij = -N_ij p_ij p_ji, p_ij = γ_i / (γ_i + γ_j), and
    se the standard error of the contrast θ_i - θ_reference.
    """
    if n_players < 2:
        raise ValueError(f"Bradley-Terry needs at least 2 players, got {n_players}")
    if not (math.isfinite(prior) and prior >= 0):
        raise ValueError(f"prior must be finite and >= 0, got {prior}")
    if not 0 <= reference < n_players:
        raise ValueError(f"reference must be a player in [0, {n_players}), got {reference}")
    z = _z(confidence)
    wins, counts = _tally(n_players, comparisons)
    if prior == 0:
        n_parts, _ = connected_components(wins > 0, directed=True, connection="strong")
        if n_parts > 1:
            raise ValueError(
                "the maximum-likelihood Bradley-Terry estimate does not exist: some players won (or lost) every "
                "comparison against the others they met; use prior > 0"
            )
    total = wins.sum(axis=1) + prior / 2
    gamma = np.ones(n_players)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        denom = (counts / (gamma[:, None] + gamma[None, :])).sum(axis=1) + prior / (gamma + 1.0)
        new = total / denom
        if prior == 0:
            new /= math.exp(np.log(new).mean())  # the likelihood fixes only ratios: pin the geometric mean
        step = np.abs(np.log(new) - np.log(gamma)).max()
        gamma = new
        if step < tol:
            break
    theta = np.log(gamma)
    p = gamma[:, None] / (gamma[:, None] + gamma[None, :])  # p[i, j] = P(i beats j)
    info = -counts * p * p.T
    np.fill_diagonal(info, 0.0)
    np.fill_diagonal(info, -info.sum(axis=1) + prior * gamma / (gamma + 1.0) ** 2)
    cov = np.linalg.pinv(info)
    var = np.diag(cov) + cov[reference, reference] - 2 * cov[:, reference]
    stderr = np.sqrt(np.clip(var, 0.0, None))
    scores = theta - theta[reference]
    # competition ranking: equal scores share a rank (1, 2, 2, 4), so a tie is not broken by the order of the names
    ranks = np.array([1 + int(np.sum(scores > s + 1e-9)) for s in scores], dtype=int)
    return BradleyTerry(scores, stderr, scores - z * stderr, scores + z * stderr, ranks, reference, iterations)
