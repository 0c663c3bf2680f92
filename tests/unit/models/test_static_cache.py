"""The static-shape KV cache: same logits and tokens as the growing cache (MHA and GQA, single and left-padded
prompts), a mask that hides unwritten and padding slots, identical shapes at every decode step (no recompiles),
and CUDA-graph replay equal to eager decoding (on a GPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmlab.models import attention, static_cache
from lmlab.models.decoder import Decoder
from lmlab.models.generation import _GRAPH_STEPS, clear_cuda_graphs, generate
from lmlab.models.static_cache import StaticDecodeStep, StaticKVCache, decode_step

from helpers import model_cfg

BASE = model_cfg(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64, ffn_multiple_of=16)
HEADS = {"mha": {}, "gqa": {"n_kv_heads": 2}, "mqa_qk_norm": {"n_kv_heads": 1, "qk_norm": True}}
PROMPTS = {"single": [[3, 14, 15, 9, 26]], "padded": [[3, 9, 14, 2, 7, 30], [5], [11, 4, 8]]}
STEPS = 6


def make(init_std: float | None = None, **overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = model_cfg(BASE, **overrides)
    if init_std is not None:
        # a larger init std spreads the logits, so greedy paths are not dominated by near-ties
        cfg = replace(cfg, init_std=init_std)
    return Decoder(cfg).eval()


def batch_of(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-padded ids [B, T], lengths [B] and the real-token mask (None when no row is padded)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    real = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    return ids, lengths, None if bool(real.all()) else real


def prefill(model: Decoder, cache, ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    if real is None:
        return model(ids, kv_cache=cache)[:, -1]
    cache.key_mask = real
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return model(ids, position_ids=positions, kv_cache=cache)[:, -1]


def forward_one(model: Decoder, cache, tokens: torch.Tensor, positions: torch.Tensor, padded: bool) -> torch.Tensor:
    """A decode step through the public ``forward(..., kv_cache=...)``, with the key-mask contract."""
    if padded:
        cache.key_mask = torch.cat((cache.key_mask, cache.key_mask.new_ones(len(tokens), 1)), dim=1)
    return model(tokens[:, None], position_ids=positions[:, None], kv_cache=cache)[:, -1]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("prompts", PROMPTS)
@torch.no_grad()
def test_static_logits_equal_dynamic_at_every_step(heads, prompts):
    """Teacher-forced on the dynamic run's greedy tokens: the static cache through ``model.forward`` and through
    ``decode_step`` give the dynamic cache's logits at the prefill and at every decode step (fp32, 1e-5)."""
    model = make(**HEADS[heads])  # default init: logits of order 1, so 1e-5 is a tight absolute bound
    ids, lengths, real = batch_of(PROMPTS[prompts])
    room = ids.shape[1] + STEPS
    dynamic, static, stepped = model.new_kv_cache(), model.new_kv_cache(max_len=room), model.new_kv_cache(room)
    assert isinstance(static, StaticKVCache)
    expected = prefill(model, dynamic, ids, real)
    torch.testing.assert_close(prefill(model, static, ids, real), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill(model, stepped, ids, real), expected, atol=1e-5, rtol=0)
    padded = real is not None
    for step in range(STEPS):
        tokens, positions = expected.argmax(dim=-1), lengths + step
        expected = forward_one(model, dynamic, tokens, positions, padded)
        torch.testing.assert_close(forward_one(model, static, tokens, positions, padded), expected, atol=1e-5, rtol=0)
        got = decode_step(model, stepped, tokens[:, None], positions[:, None])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert dynamic.length == static.length == stepped.length == ids.shape[1] + STEPS


@torch.no_grad()
def test_chunked_static_cache_matches_full_forward():
    """Prefill in chunks of several tokens (T > 1 after cached positions) as well as single tokens."""
    model = make(n_kv_heads=2)
    x = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    cache = model.new_kv_cache(max_len=16)  # more room than used: the spare slots stay hidden
    chunks = [model(x[:, :6], kv_cache=cache), model(x[:, 6:9], kv_cache=cache)]
    chunks += [model(x[:, t : t + 1], kv_cache=cache) for t in (9, 10)]
    assert cache.length == 11 and cache.layers[0].keys.shape == (2, 2, 16, 8)
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", HEADS)
def test_greedy_and_seeded_generate_give_the_same_tokens_with_both_caches(heads):
    model = make(init_std=0.5, **HEADS[heads])
    for prompts in PROMPTS.values():
        dynamic = generate(model, prompts, max_new_tokens=12, temperature=0)
        assert generate(model, prompts, max_new_tokens=12, temperature=0, cache="static") == dynamic
        assert len(set(dynamic[0])) > 3  # a varied continuation, not one repeated token
    single = generate(model, [1, 2, 3], 10, temperature=0)
    assert generate(model, [1, 2, 3], 10, temperature=0, cache="static") == single
    eos = single[4]
    stopped = generate(model, [1, 2, 3], 10, temperature=0, eos_id=eos, cache="static")
    assert stopped == single[: single.index(eos) + 1]
    assert generate(model, [1, 2, 3], 10, temperature=0, stop=lambda new: len(new) >= 3, cache="static") == single[:3]
    assert generate(model, [1, 2, 3], 1, temperature=0, cache="static") == single[:1]  # a cache of the prompt only

    def sampled(cache: str) -> list[list[int]]:
        gen = torch.Generator().manual_seed(7)
        prompts = PROMPTS["padded"]
        return generate(model, prompts, 10, temperature=1.0, top_k=10, top_p=0.9, generator=gen, cache=cache)

    assert sampled("static") == sampled("dynamic")


@torch.no_grad()
def test_mask_hides_unwritten_and_padding_slots():
    """Large finite garbage in every slot not yet written and in the left padding changes nothing; the mask
    itself is causal over written real slots plus each query's own slot."""
    model = make(n_kv_heads=2)
    ids, lengths, real = batch_of(PROMPTS["padded"])
    width = ids.shape[1]
    clean, dirty = model.new_kv_cache(max_len=width + STEPS), model.new_kv_cache(max_len=width + STEPS)
    expected, got = prefill(model, clean, ids, real), prefill(model, dirty, ids, real)
    for layer in dirty.layers:
        for buffer in (layer.keys, layer.values):
            buffer[:, :, width:] = 1e4  # unwritten slots
            buffer.transpose(1, 2)[:, :width][~real] = -3e3  # the left padding: [B, T, H_kv, D] rows
    for step in range(STEPS):
        tokens, positions = expected.argmax(dim=-1)[:, None], (lengths + step)[:, None]
        expected = decode_step(model, clean, tokens, positions)
        got = decode_step(model, dirty, tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    dirty.begin(1)  # the mask of the next query (slot width + STEPS - 1 is the last one)
    mask = dirty._mask[:, 0, 0]  # [B, L]
    query = width + STEPS - 1
    slots = torch.arange(width + STEPS)
    visible = (slots[None, :] <= query) & torch.cat((real, torch.ones(3, STEPS, dtype=torch.bool)), dim=1)
    assert torch.equal(mask, visible)


def test_every_decode_step_has_identical_shapes(monkeypatch):
    """The static-shape property: at every decode step the step's inputs and every attention call's q, k, v
    and mask have the same shapes, and k/v are the same buffers; with the growing cache they change."""
    model = make(n_kv_heads=2, init_std=0.5)
    calls: list[tuple] = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        mask_shape = None if attn_mask is None else tuple(attn_mask.shape)
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), mask_shape, k.data_ptr(), v.data_ptr()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    step_inputs: list[tuple] = []
    step = static_cache.decode_step

    def recording_step(model, cache, tokens, positions):
        step_inputs.append((tuple(tokens.shape), tokens.dtype, tuple(positions.shape), positions.dtype))
        return step(model, cache, tokens, positions)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(static_cache, "decode_step", recording_step)
    for prompts in PROMPTS.values():
        calls.clear()
        step_inputs.clear()
        generate(model, prompts, max_new_tokens=STEPS + 1, temperature=0, cache="static")
        n_layers = model.cfg.n_layers
        decode_calls = calls[n_layers:]  # after the prefill's
        assert len(decode_calls) == STEPS * n_layers and len(step_inputs) == STEPS
        assert len(set(step_inputs)) == 1
        for layer in range(n_layers):
            assert len(set(decode_calls[layer::n_layers])) == 1, decode_calls[layer::n_layers]
        calls.clear()
        generate(model, prompts, max_new_tokens=STEPS + 1, temperature=0, cache="dynamic")
        assert len({c[1] for c in calls[n_layers:]}) == STEPS  # the growing cache: a new key length per step


def test_compiled_decode_step_has_no_graph_breaks_and_no_recompiles():
    """``torch.compile(fullgraph=True)`` traces the step in one graph (no host reads) and every later step
    reuses it (static shapes); the compiled step gives the eager step's logits."""
    model = make(n_kv_heads=2, init_std=0.5)
    ids, lengths, real = batch_of(PROMPTS["padded"])
    eager_cache, compiled_cache = model.new_kv_cache(max_len=ids.shape[1] + 4), model.new_kv_cache(ids.shape[1] + 4)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, backend="eager", fullgraph=True)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            expected = prefill(model, eager_cache, ids, real)
            prefill(model, compiled_cache, ids, real)
            for step in range(4):
                tokens, positions = expected.argmax(dim=-1)[:, None], (lengths + step)[:, None]
                expected = decode_step(model, eager_cache, tokens, positions)
                got = compiled(model, compiled_cache, tokens, positions)
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()


def test_blocks_compiled_from_outside_do_not_recompile_per_step_or_layer():
    """Blocks compiled in place (as ``train.compile`` does) under static decoding: once warm, a second
    ``generate`` of the same shape compiles nothing, at any decode step, and gives the same tokens; the
    number of compiled graphs does not grow with the number of layers (no specialisation on the layer)."""
    from torch._dynamo.utils import counters

    graphs = []
    for n_layers in (3, 5):  # a first, middle and last layer
        model = make(n_layers=n_layers, n_kv_heads=2, init_std=0.5)
        expected = generate(model, PROMPTS["padded"], 6, temperature=0, cache="static")
        torch._dynamo.reset()
        counters.clear()
        try:
            for block in model.layers:
                block.compile(backend="eager")
            assert generate(model, PROMPTS["padded"], 6, temperature=0, cache="static") == expected
            graphs.append(counters["stats"]["unique_graphs"])
            with torch._dynamo.config.patch(error_on_recompile=True):
                assert generate(model, PROMPTS["padded"], 6, temperature=0, cache="static") == expected
        finally:
            torch._dynamo.reset()
    assert graphs[0] == graphs[1] > 0


def test_reset_keeps_the_buffers_and_forgets_the_positions():
    model = make()
    cache = model.new_kv_cache(max_len=12)
    first = generate(model, [[1, 2, 3], [4]], 5, temperature=0, cache="static")
    with torch.no_grad():
        prefill(model, cache, *batch_of([[1, 2, 3], [4]])[::2])
        pointers = [layer.keys.data_ptr() for layer in cache.layers]
        cache.reset()
        assert cache.length == 0 and cache.key_mask is None
        ids, _, real = batch_of([[1, 2, 3], [4]])
        prefill(model, cache, ids, real)
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers
        assert cache.length == 3
    assert generate(model, [[1, 2, 3], [4]], 5, temperature=0, cache="static") == first


@torch.no_grad()
def test_static_cache_errors():
    model = make()
    cache = model.new_kv_cache(max_len=4)
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    with pytest.raises(ValueError, match="static KV cache full: 3 of 4"):
        model(torch.tensor([[1, 2]]), kv_cache=cache)
    with pytest.raises(ValueError, match="holds a batch of 1"):
        cache.key_mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="covers 5 positions"):
        cache.key_mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_len >= 1"):
        model.new_kv_cache(max_len=0)
    step = StaticDecodeStep(model, cache)
    step(torch.tensor([7]), torch.tensor([3]))
    with pytest.raises(ValueError, match="all 4 positions written"):
        step(torch.tensor([7]), torch.tensor([4]))


def test_cuda_graphs_argument_errors():
    model = make()
    with pytest.raises(ValueError, match="needs the model on a CUDA device; it is on cpu"):
        generate(model.cpu(), [1, 2], 3, temperature=0, cache="static", cuda_graphs=True)
    with pytest.raises(ValueError, match="needs cache='static'"):
        generate(model, [1, 2], 3, temperature=0, cuda_graphs=True)
    with pytest.raises(ValueError, match="cache must be 'dynamic', 'static' or 'pruned'"):
        generate(model, [1, 2], 3, temperature=0, cache="paged")
    cache = model.new_kv_cache(max_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), kv_cache=cache)
    with pytest.raises(ValueError, match="filled on a CUDA device"):
        StaticDecodeStep(model, cache, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_cuda_graph_replay_equals_eager_static_decoding(heads):
    """On a GPU (fp32): graph replay gives the eager static step's logits and tokens, for one prompt and a
    left-padded batch; a second call of the same shape reuses the captured graph (other padding, other
    sampling) and still matches; a new shape captures a new one."""
    model = make(init_std=0.5, **HEADS[heads]).cuda()
    clear_cuda_graphs()
    try:
        for prompts in PROMPTS.values():
            eager = generate(model, prompts, 16, temperature=0, cache="static")
            assert generate(model, prompts, 16, temperature=0, cache="static", cuda_graphs=True) == eager
            assert generate(model, prompts, 16, temperature=0) == eager
        kept = _GRAPH_STEPS[model]
        other = [[7, 1, 9], [2, 2, 2, 2, 5, 1], [6]]  # the same shape as PROMPTS["padded"], other padding
        greedy = generate(model, other, 16, temperature=0, cache="static")
        assert generate(model, other, 16, temperature=0, cache="static", cuda_graphs=True) == greedy
        assert _GRAPH_STEPS[model] is kept  # reused, not captured again

        def sampled(**kw) -> list[list[int]]:
            gen = torch.Generator().manual_seed(3)
            return generate(model, other, 16, temperature=1.0, top_p=0.9, generator=gen, cache="static", **kw)

        assert sampled(cuda_graphs=True) == sampled()
        assert generate(model, other, 1, temperature=0, cache="static", cuda_graphs=True) == [r[:1] for r in greedy]
        assert _GRAPH_STEPS[model] is kept  # a one-token call has no decode step: the kept graph stays
        generate(model, other, 9, temperature=0, cache="static", cuda_graphs=True)
        assert _GRAPH_STEPS[model] is not kept  # another length: a new capture replaced it

        ids, lengths, real = batch_of(PROMPTS["padded"])
        ids, lengths, real = ids.cuda(), lengths.cuda(), real.cuda()
        room = ids.shape[1] + 8
        with torch.no_grad():
            caches = model.new_kv_cache(max_len=room), model.new_kv_cache(max_len=room)
            logits = [prefill(model, cache, ids, real) for cache in caches]
            steps = [StaticDecodeStep(model, caches[0]), StaticDecodeStep(model, caches[1], cuda_graph=True)]
            for step in range(8):
                tokens = logits[0].argmax(dim=-1)
                logits = [s(tokens, lengths + step).clone() for s in steps]
                torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=0)
    finally:
        clear_cuda_graphs()
