"""Autoregressive sampling with the KV cache: greedy, temperature, top-k and nucleus (top-p).

The cache is the growing one (``KVCache``) or a static-shape one whose single-token decode step can be
replayed from a CUDA graph (``generate(..., cache="static", cuda_graphs=True)``; ``lmlab.models.static_cache``).

Top-k keeps the k most likely tokens; top-p keeps the smallest set of most likely tokens
whose probability mass reaches p (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", arXiv 1904.09751). Both are standalone functions on logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from lmlab.models.attention import topk_attention_of
from lmlab.models.static_cache import StaticDecodeStep, StaticKVCache


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


CacheKind = Literal["dynamic", "static", "pruned"]

# The last CUDA-graph decode step of each model, reused by a later call of the same shape on the same weights:
# model -> (key, cache, step). Weakly keyed, so it goes with the model; ``clear_cuda_graphs`` frees it earlier.
_GRAPH_STEPS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, StaticKVCache, StaticDecodeStep]] = (
    weakref.WeakKeyDictionary()
)


def clear_cuda_graphs(model: nn.Module | None = None) -> None:
    """Drop the captured decode graph (and its static cache) kept for ``model``, or for every model."""
    if model is None:
        _GRAPH_STEPS.clear()
    else:
        _GRAPH_STEPS.pop(model, None)


def _static_decoder(
    model: nn.Module, batch: int, max_len: int, cuda_graphs: bool
) -> tuple[StaticKVCache, Callable[[], StaticDecodeStep]]:
    """A static cache of ``max_len`` slots and a factory for its decode step (built after the prefill).

    With CUDA graphs the previous call's cache and captured step are reused when the batch size, cache
    length, device and weights (their addresses, which the graph reads) are the same.
    """
    if not cuda_graphs:
        cache = model.new_kv_cache(max_len=max_len)
        return cache, lambda: StaticDecodeStep(model, cache)
    params = tuple(p.data_ptr() for p in model.parameters())
    key = (batch, max_len, str(next(model.parameters()).device), params)
    kept = _GRAPH_STEPS.get(model)
    if kept is not None and kept[0] == key:
        _, cache, step = kept
        cache.reset()
        return cache, lambda: step
    _GRAPH_STEPS.pop(model, None)  # free the old graph's memory before capturing a new one
    cache = model.new_kv_cache(max_len=max_len)

    def build() -> StaticDecodeStep:
        step = StaticDecodeStep(model, cache, cuda_graph=True)
        _GRAPH_STEPS[model] = (key, cache, step)
        return step

    return cache, build


@torch.no_grad()
def _generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: frozenset[int] | None,
    generator: torch.Generator | None,
    stop: Callable[[list[int]], bool] | None,
    cache_kind: CacheKind = "dynamic",
    cuda_graphs: bool = False,
    attention_topk: int | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts of any lengths; each row stops after one of ``eos_ids`` or when ``stop`` says so.

    Prompts of different lengths are left-padded; the cache's key mask hides the padding and every row's
    positions count from its own first token, so a row's tokens do not depend on the others in its batch.
    Without ``eos_ids`` and ``stop`` no row can end early: the new tokens stay on the device until the end
    (no host synchronisation per step).
    """
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, T]
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    static = cache_kind == "static"
    if static:
        # every fed position: the prompt and all new tokens but the last (which is never fed back); a graph
        # only when there is a decode step to replay (a one-token call leaves the kept graph alone)
        graphs = cuda_graphs and max_new_tokens > 1
        cache, make_step = _static_decoder(model, batch, width + max_new_tokens - 1, graphs)
    else:
        cache = model.new_kv_cache(prune=True) if cache_kind == "pruned" else model.new_kv_cache()
    padded = any(len(p) != width for p in prompts)
    if padded:
        real = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]  # [B, T]
        cache.key_mask = real
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        logits = model(ids, position_ids=positions, kv_cache=cache)[:, -1]  # [B, V]
    else:
        logits = model(ids, kv_cache=cache)[:, -1]
    if static:
        decode = make_step()
        decode.start(width)
    with topk_attention_of(model, attention_topk):  # the prompt was read densely; each new token attends top-k
        return _decode(model, logits, cache, batch, lengths, max_new_tokens, temperature, top_k, top_p, eos_ids,
                       generator, stop, decode if static else None, padded)  # fmt: skip


def _decode(model, logits, cache, batch, lengths, max_new_tokens, temperature, top_k, top_p, eos_ids, generator,
            stop, decode, padded) -> list[list[int]]:  # fmt: skip
    """The decoding loop of ``_generate_batch``, after the prompt's forward gave ``logits``."""
    static = decode is not None
    check = eos_ids is not None or stop is not None
    outputs: list[list[int]] = [[] for _ in range(batch)]
    kept: list[torch.Tensor] = []  # new tokens [B] per step, when no row can end early
    finished = [False] * batch
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
        if check:
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    outputs[row].append(token)
                    ended = eos_ids is not None and token in eos_ids
                    finished[row] = ended or (stop is not None and stop(outputs[row]))
            if all(finished):
                break
        else:
            kept.append(tokens)
        if step == max_new_tokens - 1:
            break
        if static:
            logits = decode(tokens, lengths + step)
        elif padded:
            cache.key_mask = torch.cat((cache.key_mask, cache.key_mask.new_ones(batch, 1)), dim=1)
            logits = model(tokens[:, None], position_ids=(lengths + step)[:, None], kv_cache=cache)[:, -1]
        else:
            logits = model(tokens[:, None], kv_cache=cache)[:, -1]
    if not check:
        outputs = torch.stack(kept, dim=1).tolist()  # [B, N]
    return outputs


def generate(
    model: nn.Module,
    prompt_ids: list[int] | list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    *,
    cache: CacheKind = "dynamic",
    cuda_graphs: bool = False,
    attention_topk: int | None = None,
) -> list[int] | list[list[int]]:
    """Sample up to ``max_new_tokens`` new tokens after a prompt, using the model's KV cache.

    ``prompt_ids``: one prompt (a list of ids or a 1-D tensor) returns one list of new ids;
    a batch (a list of lists, or a 2-D tensor) returns one list per prompt, generated together
    (prompts of different lengths are left-padded). Generation of a row stops after ``eos_id``, one id or
    several (an instruct model's end of text and end of turn; it is included in the output) or once ``stop(new_ids_so_far)`` is true. ``temperature=0``
    is greedy decoding. ``model`` needs ``forward(ids, position_ids=..., kv_cache=...)`` and
    ``new_kv_cache()`` (``lmlab.models.decoder.Decoder``).

    ``cache``: ``"dynamic"`` grows the cache by concatenation; ``"static"`` preallocates it for the prompt
    and all new tokens (``lmlab.models.static_cache``; an lmlab ``Decoder`` only), so every decode step has
    the same shapes; ``"pruned"`` keeps, in layers with an attention pattern (S2, sliding window), only the keys
    later tokens can read (``lmlab.models.s2_cache``; prompts of one length). Same tokens every way (up to
    floating-point summation order). ``cuda_graphs=True``
    (with ``cache="static"``, on a CUDA device) replays each decode step from a captured CUDA graph; the
    last graph is kept and reused by a later call with the same batch size and length
    (``clear_cuda_graphs`` frees it).

    ``attention_topk=k``: after the prompt is read with dense attention, each new token attends only to its k
    highest-scoring cached keys (top-k attention, Synk et al. 2025; ``lmlab.models.attention.topk_attention``).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cache not in ("dynamic", "static", "pruned"):
        raise ValueError(f"cache must be 'dynamic', 'static' or 'pruned', got {cache!r}")
    if attention_topk is not None and cuda_graphs:
        raise ValueError("attention_topk cannot be combined with cuda_graphs (a kept graph would replay it later)")
    if cuda_graphs:
        if cache != "static":
            raise ValueError("cuda_graphs=True needs cache='static' (a graph replays fixed shapes)")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device.type}")
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
    stops = None if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    was_training = model.training
    model.eval()
    try:
        outputs = _generate_batch(
            model,
            prompts,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stops,
            generator,
            stop,
            cache,
            cuda_graphs,
            attention_topk,
        )
    finally:
        model.train(was_training)
    return outputs[0] if single else outputs


def greedy_many(
    model: nn.Module, prompts: Sequence[list[int]], budgets: Sequence[int], *, batch_size: int,
    eos_id: int | Sequence[int] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of many prompts, ``batch_size`` at a time, row i with at most ``budgets[i]`` new tokens.

    Rows are sorted by budget and prompt length so a batch pads little; a batch decodes up to its largest budget
    and each row is cut to its own (a row's tokens do not depend on the others in its batch, ``generate``'s left
    padding), so the result is what decoding the prompts one at a time gives. A row whose prompt plus the
    batch's budget would pass ``model.cfg.max_seq_len`` starts a new batch.
    """
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    limit = model.cfg.max_seq_len
    batches: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i]))):
        batch = batches[-1] + [i] if batches else [i]
        budget = max(budgets[j] for j in batch)
        if batches and len(batch) <= batch_size and all(len(prompts[j]) + budget <= limit for j in batch):
            batches[-1] = batch
        else:
            batches.append([i])
    outputs: list[list[int]] = [[] for _ in prompts]
    for batch in batches:
        budget = max(budgets[j] for j in batch)
        if budget <= 0:
            continue
        new = generate(model, [prompts[j] for j in batch], max_new_tokens=budget, temperature=0.0, eos_id=eos_id)
        for j, ids in zip(batch, new):
            outputs[j] = ids[: budgets[j]]
    return outputs
