"""pass@k: the unbiased estimator, and sampling n checked answers per problem from a model (docs/science.md §20).

Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", arXiv 2107.03374, §2.1; as
openai/human-eval ``estimate_pass_at_k``): with n samples of a problem of which c pass, the probability that at
least one of k samples drawn without replacement passes is

    pass@k = 1 − C(n−c, k)/C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i),   and 1 when n − c < k,

averaged over problems. The product form never forms the huge binomials. The plug-in 1 − (1 − c/n)^k is biased
low (0.8319 against 0.9167 at n = 10, c = 3, k = 5), which is why n ≥ k samples are drawn and counted instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmlab.models.generation import generate

Checker = Callable[[dict[str, Any], str], bool]
"""``check(problem, response) -> bool``: is the decoded ``response`` a correct answer to ``problem`` (the
problem's JSON object: its ``prompt`` or ``messages``, its optional ``answer`` and anything else it carries)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (0 ≤ c ≤ n, 1 ≤ k ≤ n)."""
    if not 0 <= c <= n:
        raise ValueError(f"the number correct c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]: pass@k needs at least k samples per problem")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as ``(n, c)``."""
    if not counts:
        raise ValueError("pass@k needs at least one problem")
    return math.fsum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


@dataclass(frozen=True)
class Problem:
    """A prompt to sample from (token ids, already rendered) and the JSON object its checker reads."""

    prompt_ids: list[int]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassAtK:
    """``summary``: ``pass@k`` for each k, ``n``, ``problems``; ``per_problem``: one dict per problem."""

    summary: dict[str, float | int]
    per_problem: list[dict[str, Any]]


@torch.no_grad()
def sample_pass_at_k(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    check: Checker,
    *,
    n: int,
    ks: Sequence[int],
    max_new_tokens: int,
    stop_id: int | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
) -> PassAtK:
    """Draw ``n`` answers per problem (KV-cache sampling, ``batch_size`` at a time, one CPU generator seeded by
    ``seed``), decode each up to ``stop_id``, count the ones ``check`` accepts (c) and estimate pass@k.

    Per problem: ``index``, ``n``, ``c``, ``pass@k`` for every k and ``example`` (the first answer drawn).
    Answers are cut to fit the model's ``max_seq_len`` after the prompt.
    """
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k={bad[0]} must be in [1, n={n}]: draw at least as many samples as the largest k")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    per_problem = []
    for index, problem in enumerate(problems):
        room = max_new_tokens if limit is None else min(max_new_tokens, limit - len(problem.prompt_ids))
        if room <= 0:
            raise ValueError(f"problem {index}: its prompt of {len(problem.prompt_ids)} tokens fills the context")
        responses: list[str] = []
        while len(responses) < n:
            draws = min(batch_size, n - len(responses))
            new = generate(
                model, [problem.prompt_ids] * draws, max_new_tokens=room, temperature=temperature, top_k=top_k,
                top_p=top_p, eos_id=stop_id, generator=generator,
            )  # fmt: skip
            responses += [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
        c = sum(bool(check(problem.data, r)) for r in responses)
        per_problem.append(
            {"index": index, "n": n, "c": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}, "example": responses[0]}
        )
    counts = [(row["n"], row["c"]) for row in per_problem]
    summary: dict[str, float | int] = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    return PassAtK({**summary, "n": n, "problems": len(per_problem)}, per_problem)
