"""Weight-space merging of models that share an architecture: pure functions on state dicts (no I/O).

- ``average``: the (weighted) mean of the weights: a uniform model soup (Wortsman et al. 2022, "Model soups",
  arXiv 2203.05482), or the average of a run's last checkpoints;
- ``greedy_soup``: the soup's recipe from the same paper (Algorithm 1): sort the models by their held-out score,
  start from the best, and add each next one only if the soup's held-out score does not get worse;
- ``slerp``: spherical interpolation of two models, tensor by tensor (linear where they are nearly parallel);
- ``task_arithmetic``: base + λ·Σ_i (θ_i − base) (Ilharco et al. 2023, "Editing models with task arithmetic",
  arXiv 2212.04089);
- ``ties``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708): each task vector keeps its ``density`` share of
  largest-magnitude entries (trim), each entry's sign is the sign of the trimmed vectors' sum (elect), and the
  merged vector is the mean of the entries that agree with it (disjoint merge); base + λ·that.

Weights are combined in float32 and returned in the dtype of the first model. Integer buffers (none in lmlab's
decoder, but a state dict may carry them) are taken from the first model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def check_compatible(states: Sequence[StateDict], names: Sequence[str]) -> None:
    """Every state dict has the same names and shapes as the first (``ValueError`` naming the first difference)."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(first):
            extra = sorted(set(state) ^ set(first))[:3]
            raise ValueError(f"{name} has other weights than {names[0]} ({', '.join(extra)} …): not the same model")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f"{name}: {key} has shape {tuple(tensor.shape)}, {names[0]} {tuple(first[key].shape)}")


def _combine(states: Sequence[StateDict], fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> StateDict:
    out = {}
    for key, tensor in states[0].items():
        if not tensor.is_floating_point():
            out[key] = tensor.clone()
            continue
        out[key] = fn([s[key].float() for s in states]).to(tensor.dtype)
    return out


def average(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Σ_i w_i·θ_i with the weights normalised to sum to 1 (uniform by default)."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if len(w) != len(states) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(states)} non-negative numbers with a positive sum, got {weights}")
    w = (w / w.sum()).tolist()
    return _combine(states, lambda ts: sum(wi * t for wi, t in zip(w, ts)))


def slerp(a: StateDict, b: StateDict, t: float, eps: float = 1e-7) -> StateDict:
    """Per tensor: sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between a and b; linear when
    sin Ω < ``eps`` (parallel tensors) or a tensor is zero."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")

    def one(ts: list[torch.Tensor]) -> torch.Tensor:
        x, y = ts
        nx, ny = x.norm(), y.norm()
        if nx < eps or ny < eps:
            return (1 - t) * x + t * y
        cos = torch.clamp((x * y).sum() / (nx * ny), -1.0, 1.0)
        omega = torch.arccos(cos)
        if torch.sin(omega) < eps:
            return (1 - t) * x + t * y
        return (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)

    return _combine([a, b], one)


def task_arithmetic(base: StateDict, states: Sequence[StateDict], scale: float = 1.0) -> StateDict:
    """base + scale · Σ_i (θ_i − base)."""
    return _combine([base, *states], lambda ts: ts[0] + scale * sum(t - ts[0] for t in ts[1:]))


def trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """``vector`` with all but its ``density`` share of largest-magnitude entries set to zero (ties kept)."""
    if density >= 1.0:
        return vector
    k = max(1, int(round(density * vector.numel())))
    threshold = vector.abs().flatten().kthvalue(vector.numel() - k + 1).values
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def ties(base: StateDict, states: Sequence[StateDict], density: float = 0.2, scale: float = 1.0) -> StateDict:
    """TIES-merging (module docstring): trim each task vector to ``density``, elect signs, average agreeing
    entries; base + scale · the merged task vector."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")

    def one(ts: list[torch.Tensor]) -> torch.Tensor:
        vectors = torch.stack([trim(t - ts[0], density) for t in ts[1:]])  # [N, ...]
        sign = torch.sign(vectors.sum(dim=0))
        agree = (torch.sign(vectors) == sign) & (vectors != 0)
        count = agree.sum(dim=0).clamp(min=1)
        return ts[0] + scale * (vectors * agree).sum(dim=0) / count

    return _combine([base, *states], one)


def greedy_soup(
    states: Sequence[StateDict], score: Callable[[StateDict], float], *, higher_is_better: bool = False
) -> tuple[StateDict, list[int], list[float]]:
    """Wortsman et al.'s greedy soup. ``score`` evaluates a state dict on held-out data (a loss by default,
    lower is better). Returns the soup, the indices of the models in it (in the order added) and every model's
    own score."""
    better = (lambda x, y: x >= y) if higher_is_better else (lambda x, y: x <= y)
    own = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: own[i], reverse=higher_is_better)
    chosen = [order[0]]
    best = own[order[0]]
    for i in order[1:]:
        candidate = average([states[j] for j in [*chosen, i]])
        value = score(candidate)
        if better(value, best):
            chosen.append(i)
            best = value
    return average([states[j] for j in chosen]), chosen, own
