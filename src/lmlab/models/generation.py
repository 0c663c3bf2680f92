"""Autoregressive sampling with the KV cache: greedy, temperature, top-k and nucleus (top-p).

Top-k keeps the k most likely tokens; top-p keeps the smallest set of most likely tokens
whose probability mass reaches p (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", arXiv 1904.09751). Both are standalone functions on logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row [..., V] to -inf; ``k <= 0`` keeps all.

    Ties with the k-th largest value are kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability is >= ``p``.

    A token is dropped when the probability mass of the tokens ranked above it already
    reaches ``p``; the most likely token is always kept. ``p >= 1`` keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly higher-ranked tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] -> [B]; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    scaled = top_p_filter(top_k_filter(scaled, top_k), top_p)
    probs = scaled.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator gives the same samples on every device: draw on the CPU.
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
    generator: torch.Generator | None,
    stop: Callable[[list[int]], bool] | None,
) -> list[list[int]]:
    """Generate for a batch of prompts of any lengths; each row stops after its ``eos_id`` or when ``stop`` says so.

    Prompts of different lengths are left-padded; the cache's key mask hides the padding and every row's
    positions count from its own first token, so a row's tokens do not depend on the others in its batch.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # [B, T]
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    cache = model.new_kv_cache()
    padded = bool((lengths != width).any())
    if padded:
        real = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]  # [B, T]
        cache.key_mask = real
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        logits = model(ids, position_ids=positions, kv_cache=cache)[:, -1]  # [B, V]
    else:
        logits = model(ids, kv_cache=cache)[:, -1]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                outputs[row].append(token)
                finished[row] = (eos_id is not None and token == eos_id) or (stop is not None and stop(outputs[row]))
        if all(finished) or step == max_new_tokens - 1:
            break
        if padded:
            cache.key_mask = torch.cat((cache.key_mask, cache.key_mask.new_ones(len(prompts), 1)), dim=1)
            logits = model(tokens[:, None], position_ids=(lengths + step)[:, None], kv_cache=cache)[:, -1]
        else:
            logits = model(tokens[:, None], kv_cache=cache)[:, -1]
    return outputs


def generate(
    model: nn.Module,
    prompt_ids: list[int] | list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int] | list[list[int]]:
    """Sample up to ``max_new_tokens`` new tokens after a prompt, using the model's KV cache.

    ``prompt_ids``: one prompt (a list of ids or a 1-D tensor) returns one list of new ids;
    a batch (a list of lists, or a 2-D tensor) returns one list per prompt, generated together
    (prompts of different lengths are left-padded). Generation of a row stops after ``eos_id``
    (which is included in the output) or once ``stop(new_ids_so_far)`` is true. ``temperature=0``
    is greedy decoding. ``model`` needs ``forward(ids, position_ids=..., kv_cache=...)`` and
    ``new_kv_cache()`` (``lmlab.models.decoder.Decoder``).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(prompt_ids, torch.Tensor):
        single = prompt_ids.dim() == 1
        prompts = [prompt_ids.tolist()] if single else prompt_ids.tolist()
    else:
        single = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple))
        prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt must contain at least one token (e.g. BOS)")
    if max_new_tokens <= 0:
        outputs = [[] for _ in prompts]
        return outputs[0] if single else outputs
    was_training = model.training
    model.eval()
    try:
        outputs = _generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, generator, stop)
    finally:
        model.train(was_training)
    return outputs[0] if single else outputs
