"""Refusal-token steering at inference (docs/science.md §28; Jain et al. 2024, arXiv 2412.06748): which control
token to force at the first response position, then the reply generated after it.

One forward pass over the chat prompt (with the assistant turn opened) gives the logits of the first reply token.
A logit bias b is added to the refusal tokens' logits, then ``p = softmax(logits / T)`` over the whole vocabulary.

* One refusal token (``[refuse]``): with t = −1, force ``[refuse]`` iff p[refuse] ≥ p[respond]; with t in [0, 1],
  iff p[refuse] ≥ t; otherwise force ``[respond]``.
* Category tokens: take the most probable of the category tokens and ``[respond]``. If it is a category token
  whose threshold t_c (its own, else the global t) is in [0, 1]: force it iff p ≥ t_c, else force ``[respond]``.
  Otherwise (``[respond]`` is the most probable, or the category's threshold is −1) force the most probable one.

Raising t lowers the refusal rate; raising b raises it. The rest of the reply is then generated after the forced
token with the caller's sampling settings.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lmlab.data.refusal_tokens import REFUSE, RESPOND, category_tokens
from lmlab.errors import UserError

ARGMAX = -1.0  # the paper's default threshold: compare the refusal token with [respond] (or take the argmax)


@dataclass(frozen=True)
class RefusalSteering:
    """The inference knobs: threshold t (−1 or [0, 1]), softmax temperature, logit bias on the refusal tokens,
    and per-category thresholds (category tokens only)."""

    threshold: float = ARGMAX
    temperature: float = 1.0
    bias: float = 0.0
    category_thresholds: Mapping[str, float] = field(default_factory=dict)

    def validate(self, flag: str = "--refusal-threshold") -> RefusalSteering:
        """Raise a one-line ``UserError`` for a threshold outside [0, 1] (other than −1), a temperature ≤ 0 or a
        non-finite bias; returns self."""
        check_threshold(self.threshold, flag)
        for name, t in self.category_thresholds.items():
            check_threshold(t, f"--category-threshold {name}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"--refusal-temperature must be finite and > 0, got {self.temperature}")
        if not math.isfinite(self.bias):
            raise UserError(f"--refusal-bias must be finite, got {self.bias}")
        return self


def check_threshold(t: float, flag: str) -> None:
    """A refusal threshold is −1 (the argmax rule) or a probability in [0, 1]."""
    if not (t == ARGMAX or 0.0 <= t <= 1.0):
        raise UserError(f"{flag} must be in [0, 1], or -1 for 'refuse iff p[refuse] >= p[respond]', got {t}")


@dataclass(frozen=True)
class ControlTokens:
    """The ids of ``[respond]`` and of the refusal tokens: ``[refuse]`` alone, or one per category (``names``)."""

    respond: int
    refuse: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def categories(self) -> bool:
        return self.names != ("refuse",)

    @classmethod
    def of(cls, tokenizer, where: str) -> ControlTokens:
        """The tokenizer's control tokens: its category tokens when it has any, else ``[refuse]``. A tokenizer
        without ``[respond]`` (or without any refusal token) is a ``UserError`` naming ``where``."""
        respond = tokenizer.token_to_id(RESPOND)
        cats = category_tokens(tokenizer)
        refuse = tokenizer.token_to_id(REFUSE)
        if respond is None or (not cats and refuse is None):
            raise UserError(
                f"{where}: the tokenizer has no {RESPOND} / {REFUSE} tokens; refusal steering needs a run fine-tuned "
                "with sft.refusal_tokens=single or category"
            )
        if cats:
            return cls(respond, tuple(cats.values()), tuple(cats))
        return cls(respond, (refuse,), ("refuse",))

    def check_categories(self, names: Sequence[str]) -> None:
        """Per-category thresholds need category tokens, and every name must be one of them."""
        if names and not self.categories:
            raise UserError(
                "--category-threshold needs a run fine-tuned with sft.refusal_tokens=category; this tokenizer has "
                f"only {REFUSE}"
            )
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise UserError(
                f"--category-threshold: unknown category {', '.join(map(repr, unknown))}; the tokenizer's "
                f"categories: {', '.join(self.names)}"
            )


@dataclass(frozen=True)
class Choice:
    """Per row: the forced token, the most probable refusal token, and its probability (the ROC score)."""

    token: torch.Tensor  # [B] ids
    refusal_token: torch.Tensor  # [B] ids: [refuse], or the most probable category token
    score: torch.Tensor  # [B] p of refusal_token; −inf where [respond] beats every category token


def control_probabilities(logits: torch.Tensor, tokens: ControlTokens, steering: RefusalSteering) -> torch.Tensor:
    """``softmax((logits + b·[refusal token]) / T)`` over the vocabulary; ``logits`` [B, V] -> [B, V] (float32)."""
    z = logits.float().clone()
    z[:, list(tokens.refuse)] += steering.bias
    return (z / steering.temperature).softmax(dim=-1)


def choose_control_token(logits: torch.Tensor, tokens: ControlTokens, steering: RefusalSteering) -> Choice:
    """The token to force at the first response position for each row of ``logits`` [B, V] (module docstring)."""
    p = control_probabilities(logits, tokens, steering)
    p_respond = p[:, tokens.respond]  # [B]
    p_refuse = p[:, list(tokens.refuse)]  # [B, R]
    best_p, best = p_refuse.max(dim=-1)  # [B]
    refuse_ids = torch.tensor(tokens.refuse, device=p.device)[best]  # [B]
    respond_ids = torch.full_like(refuse_ids, tokens.respond)
    t_global = steering.threshold
    if not tokens.categories:
        refuse = best_p >= (p_respond if t_global == ARGMAX else torch.full_like(best_p, t_global))
        return Choice(torch.where(refuse, refuse_ids, respond_ids), refuse_ids, best_p)
    thresholds = torch.tensor(
        [steering.category_thresholds.get(name, t_global) for name in tokens.names], device=p.device
    )[best]  # [B]: the threshold of each row's most probable category
    top_is_category = best_p > p_respond  # ties go to [respond], the argmax over (categories..., respond)
    selected = top_is_category & (thresholds != ARGMAX)
    refuse = torch.where(selected, best_p >= thresholds, top_is_category)
    score = torch.where(top_is_category, best_p, torch.full_like(best_p, -math.inf))
    return Choice(torch.where(refuse, refuse_ids, respond_ids), refuse_ids, score)


@torch.no_grad()
def first_position_logits(model, prompts: Sequence[list[int]], *, batch_size: int = 32) -> torch.Tensor:
    """The logits after each prompt's last token, [N, V], read in right-padded batches (a causal model's logits
    at a real position do not see the padding after it)."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(p)
        logits = model(ids.to(device))  # [b, T, V]
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)
        rows.append(logits[torch.arange(len(chunk), device=device), last].float().cpu())
    return torch.cat(rows)


# --------------------------------------------------------------------------- command-line options


def add_steering_options(parser: argparse.ArgumentParser, threshold_flag: str = "--refusal-threshold") -> None:
    """The steering flags shared by ``lmlab generate`` and ``lmlab eval safety``."""
    parser.add_argument(
        threshold_flag,
        type=float,
        default=None,
        dest="refusal_threshold",
        help="force the refusal token iff its probability at the first reply position is >= t (t in [0, 1]); "
        "-1: iff it is at least p[respond] (the paper's default)",
    )
    parser.add_argument("--refusal-temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    parser.add_argument("--refusal-bias", type=float, default=0.0, help="added to the refusal tokens' logits")
    parser.add_argument(
        "--category-threshold",
        action="append",
        default=[],
        metavar="NAME=T",
        help="a category token's own threshold (repeatable; runs trained with sft.refusal_tokens=category)",
    )
    parser.set_defaults(threshold_flag=threshold_flag)


def steering_from_args(args: argparse.Namespace) -> RefusalSteering | None:
    """The steering the flags ask for (validated), or None when no steering flag was given."""
    cats: dict[str, float] = {}
    for item in args.category_threshold:
        name, sep, value = item.partition("=")
        try:
            cats[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UserError(f"--category-threshold must look like NAME=T (e.g. fraud=0.3), got {item!r}")
    given = args.refusal_threshold is not None or cats or args.refusal_bias != 0.0 or args.refusal_temperature != 1.0
    if not given:
        return None
    threshold = ARGMAX if args.refusal_threshold is None else args.refusal_threshold
    return RefusalSteering(threshold, args.refusal_temperature, args.refusal_bias, cats).validate(args.threshold_flag)


def steering_tokens(tokenizer, steering: RefusalSteering, where: str) -> ControlTokens:
    """The control tokens of ``tokenizer``, checked against the per-category thresholds ``steering`` names."""
    tokens = ControlTokens.of(tokenizer, where)
    tokens.check_categories(list(steering.category_thresholds))
    return tokens
