"""Adversarial suffix search: greedy coordinate gradient (GCG; Zou et al. 2023, arXiv 2307.15043) and a random
search with the same budget (docs/science.md §29.1).

The attacked input is ``before + suffix + after + target``: the chat prompt up to the end of the user's text, L
suffix tokens, the rest of the prompt (end of turn, assistant opening), and the reply prefix the attacker wants
(``AttackPrompt``). The loss of a suffix is the mean cross-entropy of the target tokens. One GCG step:

1. G = ∂loss/∂e, the gradient with respect to the one-hot indicators e [L, V] of the suffix tokens (the suffix
   embeddings are e @ W_emb); disallowed tokens get +∞;
2. X_i = the top-k tokens of −G_i at each position i;
3. B candidates, candidate b replacing position ⌊b·L/B⌋ (the reference code's even spread) with a uniform draw
   from X_i;
4. the loss of every candidate by forward passes; the suffix moves to the best of the candidates and itself (so it
   never gets worse), and the search stops once the greedy reply starts with the target.

The random baseline draws its B single-token swaps at a uniform position with a uniform allowed token and keeps
the best the same way: the same number of forward passes, no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["gcg", "random"]


@dataclass(frozen=True)
class AttackPrompt:
    """Token ids around the suffix: ``before`` it, ``after`` it (the rest of the prompt) and the ``target`` reply."""

    before: list[int]
    after: list[int]
    target: list[int]

    def inputs(self, suffixes: torch.Tensor) -> torch.Tensor:
        """``suffixes`` [B, L] -> the whole inputs [B, T] (before, suffix, after, target)."""
        b = suffixes.shape[0]
        dev = suffixes.device

        def rows(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=dev).expand(b, len(ids))

        return torch.cat([rows(self.before), suffixes, rows(self.after), rows(self.target)], dim=1)

    def target_slice(self, suffix_len: int) -> slice:
        """Positions of the logits that predict the target tokens."""
        start = len(self.before) + suffix_len + len(self.after)
        return slice(start - 1, start - 1 + len(self.target))


@dataclass
class AttackResult:
    """What a search found: the best suffix, its loss, the loss after each step, and whether it succeeded."""

    suffix: list[int]
    loss: float
    losses: list[float] = field(default_factory=list)
    success: bool = False
    steps: int = 0


def _target_losses(logits: torch.Tensor, prompt: AttackPrompt, suffix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean target CE per row [B] and whether each row's greedy prediction is the target [B]."""
    pred = logits[:, prompt.target_slice(suffix_len)].float()  # [B, n_target, V]
    target = torch.tensor(prompt.target, device=logits.device).expand(pred.shape[0], -1)
    ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(dim=1)
    return ce, (pred.argmax(-1) == target).all(dim=1)


@torch.no_grad()
def suffix_losses(model, prompt: AttackPrompt, suffixes: torch.Tensor, batch_size: int = 64):
    """Target loss [B] and greedy success [B] of each suffix in ``suffixes`` [B, L]."""
    losses, hits = [], []
    for chunk in suffixes.split(batch_size):
        ce, hit = _target_losses(model(prompt.inputs(chunk)), prompt, suffixes.shape[1])
        losses.append(ce)
        hits.append(hit)
    return torch.cat(losses), torch.cat(hits)


def suffix_gradient(model, prompt: AttackPrompt, suffix: torch.Tensor) -> torch.Tensor:
    """∂(target loss)/∂(one-hot suffix indicators): [L, V]. The suffix embeddings are replaced by
    ``onehot @ W_emb`` inside the embedding layer's output, so any lmlab decoder works unchanged."""
    emb = model.tok_embeddings
    onehot = F.one_hot(suffix, emb.num_embeddings).to(emb.weight.dtype).requires_grad_(True)  # [L, V]
    start, length = len(prompt.before), suffix.shape[0]

    def replace(module, args, out):
        out = out.clone()
        out[:, start : start + length] = onehot @ module.weight
        return out

    handle = emb.register_forward_hook(replace)
    try:
        ce, _ = _target_losses(model(prompt.inputs(suffix[None])), prompt, length)
        (grad,) = torch.autograd.grad(ce.sum(), onehot)
    finally:
        handle.remove()
    return grad


def gcg_candidates(
    suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, top_k: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """B single-token swaps [B, L]: candidate b changes position ⌊b·L/B⌋ to a uniform pick among the top-k tokens
    of −grad there (disallowed tokens never chosen)."""
    length = suffix.shape[0]
    scores = (-grad.float()).masked_fill(~allowed, float("-inf"))
    top = scores.topk(min(top_k, int(allowed.sum())), dim=1).indices  # [L, k]
    positions = torch.arange(batch) * length // batch  # [B]
    picks = torch.randint(top.shape[1], (batch,), generator=generator)
    out = suffix.expand(batch, length).clone()
    out[torch.arange(batch), positions] = top[positions, picks].to(out.device)
    return out


def random_candidates(suffix: torch.Tensor, allowed: torch.Tensor, batch: int, generator: torch.Generator):
    """B single-token swaps [B, L] at uniform positions with uniform allowed tokens (the baseline)."""
    length = suffix.shape[0]
    ids = allowed.nonzero().squeeze(1).cpu()
    positions = torch.randint(length, (batch,), generator=generator)
    tokens = ids[torch.randint(len(ids), (batch,), generator=generator)]
    out = suffix.expand(batch, length).clone()
    out[torch.arange(batch), positions] = tokens.to(out.device)
    return out


def search_suffix(
    model,
    prompt: AttackPrompt,
    init: Sequence[int],
    allowed: torch.Tensor,
    *,
    method: Method = "gcg",
    steps: int = 50,
    top_k: int = 64,
    batch: int = 64,
    seed: int = 0,
    stop_on_success: bool = True,
) -> AttackResult:
    """Run ``steps`` steps of GCG or of the random baseline from the suffix ``init`` (module docstring);
    ``allowed`` [V] marks the tokens a suffix may use."""
    if not init:
        raise ValueError("the initial suffix is empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    suffix = torch.tensor(list(init), dtype=torch.long, device=device)
    allowed = allowed.to(device)
    loss, hit = (x[0] for x in suffix_losses(model, prompt, suffix[None]))
    result = AttackResult(suffix.tolist(), float(loss), [], bool(hit))
    try:
        for step in range(steps):
            if result.success and stop_on_success:
                break
            if method == "gcg":
                grad = suffix_gradient(model, prompt, suffix)
                cands = gcg_candidates(suffix, grad, allowed, top_k, batch, generator)
            else:
                cands = random_candidates(suffix, allowed, batch, generator)
            losses, hits = suffix_losses(model, prompt, cands, batch)
            best = int(losses.argmin())
            if float(losses[best]) < result.loss:
                suffix = cands[best]
                result = AttackResult(suffix.tolist(), float(losses[best]), result.losses, bool(hits[best]))
            result.losses.append(result.loss)
            result.steps = step + 1
    finally:
        model.train(was_training)
    return result
