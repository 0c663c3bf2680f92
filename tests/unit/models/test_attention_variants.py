"""Attention variants (issue 14 item 2): every mask against a naive loop, S2's union covering every causal
position, patterned layers equal with and without a KV cache (growing and static), top-k attention against
its definition and equal to dense when k covers the context, the counts, and the impossible settings."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.models.attention import Attention, topk_attention, topk_attention_of
from lmlab.models.counting import flops_per_token
from lmlab.models.decoder import Decoder
from lmlab.models.generation import generate
from lmlab.models.masks import and_masks, causal, materialize, s2_shards, same_document, sliding_window
from lmlab.models.sparse_attention import S2Config, SlidingWindowConfig

from helpers import model_cfg


def naive(rule, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                for j in range(kv_len):
                    out[b, h, i, j] = rule(b, h, kv_len - q_len + i, j)
    return out


def test_sliding_window_mask_against_a_loop():
    got = materialize(and_masks(causal, sliding_window(3)), 1, 1, torch.arange(2, 9), 9)
    want = naive(lambda b, h, q, k: k <= q and q - k < 3, 1, 1, 7, 9)
    assert torch.equal(got, want)


def test_document_mask_against_a_loop():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 6, 6]])
    got = materialize(and_masks(causal, same_document(doc_ids)), 2, 1, torch.arange(6), 6)
    want = naive(lambda b, h, q, k: k <= q and doc_ids[b, q] == doc_ids[b, k], 2, 1, 6, 6)
    assert torch.equal(got, want)


def s2_rule(block, local, stride, step, group=1):
    def rule(b, h, q, k):
        vertical = (k // block + (h // group) * step) % stride == 0
        return k <= q and (vertical or q // block - k // block < local)

    return rule


def test_s2_mask_against_the_reference_formula():
    mask = and_masks(causal, s2_shards(block=2, local_blocks=2, stride=4, head_step=1, group=2))
    got = materialize(mask, 1, 8, torch.arange(20), 20)
    assert torch.equal(got, naive(s2_rule(2, 2, 4, 1, group=2), 1, 8, 20, 20))
    # query heads of one GQA group share their KV head's shard
    assert torch.equal(got[0, 0], got[0, 1]) and not torch.equal(got[0, 0], got[0, 2])


def test_s2_heads_together_cover_every_causal_position_and_each_head_less():
    cfg = model_cfg(vocab_size=10, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, max_seq_len=256,
                    attention={"kind": "s2", "block_size": 4, "local_blocks": 2, "vert_stride": 4, "dense_every": 0})  # fmt: skip
    got = materialize(and_masks(causal, cfg.attention.pattern(cfg)), 1, 8, torch.arange(256), 256)[0]
    union = got.any(dim=0)
    assert torch.equal(union, torch.ones(256, 256, dtype=torch.bool).tril())
    per_head = got.sum(dim=(1, 2)).float() / union.sum()
    assert per_head.max() < 0.35  # each head reads about 1/stride of the old keys plus its window


def test_dense_heads_and_homogeneous_heads():
    mask = s2_shards(block=1, local_blocks=1, stride=4, head_step=1, dense_heads=1, n_heads=4)
    got = materialize(and_masks(causal, mask), 1, 4, torch.arange(8), 8)[0]
    assert torch.equal(got[3], torch.ones(8, 8, dtype=torch.bool).tril())
    cfg = model_cfg(vocab_size=10, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                    attention={"kind": "s2", "block_size": 2, "vert_stride": 4, "homo_head": True})  # fmt: skip
    same = materialize(cfg.attention.pattern(cfg), 1, 4, torch.arange(16), 16)[0]
    assert all(torch.equal(same[0], same[h]) for h in range(4))


ATTENTIONS = [
    {"kind": "sliding", "window": 5, "global_every": 2},
    {"kind": "s2", "block_size": 2, "local_blocks": 2, "vert_stride": 2, "dense_every": 0},
]


def tiny(attention: dict, **settings):
    torch.manual_seed(0)
    cfg = model_cfg(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    attention=attention, **settings)  # fmt: skip
    cfg.validate()
    return Decoder(cfg).eval(), cfg


@pytest.mark.parametrize("attention", ATTENTIONS, ids=["sliding", "s2"])
def test_patterned_layers_give_the_same_logits_with_either_cache(attention):
    model, _ = tiny(attention)
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(x)
        for cache in (model.new_kv_cache(), model.new_kv_cache(max_len=20)):
            parts = [model(x[:, :12], kv_cache=cache)] + [model(x[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-6, rtol=1e-5)


def test_a_sliding_window_layer_equals_explicit_masked_attention():
    model, cfg = tiny({"kind": "sliding", "window": 4})
    attn: Attention = model.layers[0].attn
    x = torch.randn(1, 10, 32)
    rope = model.rope(torch.arange(10)[None], 9)
    q, k, v = attn.project(x, rope)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    allowed = naive(lambda b, h, i, j: j <= i and i - j < 4, 1, 1, 10, 10)
    want = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(1, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), attn.o_proj(want), atol=1e-6, rtol=1e-5)


def test_a_window_changes_only_the_queries_with_more_keys_than_it_holds():
    local, _ = tiny({"kind": "sliding", "window": 6})
    dense, _ = tiny({"kind": "gqa"})
    dense.load_state_dict(local.state_dict())
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        a, b = local(x), dense(x)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the first 6 queries have at most 6 keys
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-4


def test_topk_attention_is_its_definition():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    mask = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    got = topk_attention(q, k, v, mask, 2)
    for h in range(2):
        for i in range(3):
            scores = q[0, h, i] @ k[0, 0].T / 2
            best = scores.topk(2).indices
            weights = scores[best].softmax(-1)
            torch.testing.assert_close(got[0, h, i], weights @ v[0, 0, best])


def test_topk_covering_the_context_is_dense_exactly_and_small_k_is_not():
    model, _ = tiny({"kind": "gqa"})
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        dense = model(x)
        with topk_attention_of(model, 12):
            assert torch.equal(model(x), dense)
        with topk_attention_of(model, 3):
            sparse = model(x)
    torch.testing.assert_close(sparse[:, :3], dense[:, :3])  # the first 3 queries have at most 3 keys
    assert (sparse[:, 3:] - dense[:, 3:]).abs().max() > 1e-4
    assert all(m.topk is None for m in model.modules() if isinstance(m, Attention))  # restored


def test_generate_with_topk_attention():
    model, _ = tiny({"kind": "gqa"})
    prompt = torch.randint(0, 50, (14,)).tolist()
    dense = generate(model, prompt, 6, temperature=0)
    assert generate(model, prompt, 6, temperature=0, attention_topk=64) == dense
    for cache in ("dynamic", "static"):
        assert len(generate(model, prompt, 6, temperature=0, attention_topk=2, cache=cache)) == 6
    with pytest.raises(ValueError, match="k >= 1"):
        generate(model, prompt, 2, attention_topk=0)


def test_counts_follow_the_keys_each_query_reads():
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=512)
    dense = flops_per_token(model_cfg(**base), 512)["forward"]
    local = flops_per_token(model_cfg(**base, attention={"kind": "sliding", "window": 128}), 512)["forward"]
    assert dense - local == 2 * 2 * (512 - 128) * 32  # two layers, Kaplan's 2·keys·d_attn
    s2 = model_cfg(**base, attention={"kind": "s2", "block_size": 16, "local_blocks": 4, "vert_stride": 4,
                                      "dense_every": 2})  # fmt: skip
    keys = 64 + (512 - 64) / 4  # layer 0 sparse, layer 1 dense
    assert dense - flops_per_token(s2, 512)["forward"] == int(2 * keys * 32) * -1 + 2 * 512 * 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.attention.kind=sliding", "model.attention.window=512"], r"window=512 must be between 1 and model.max_seq_len=256"),
        (["model.attention.kind=sliding", "model.attention.global_every=-1"], r"global_every=-1 must be >= 0"),
        (["model.attention.kind=s2", "model.attention.vert_stride=3"], r"vert_stride=3 must divide the number of KV heads \(4\)"),
        (["model.attention.kind=s2", "model.attention.block_size=0"], r"block_size=0 must be >= 1"),
        (["model.attention.kind=s2", "model.attention.vert_stride=4", "model.attention.dense_heads=9"], r"dense_heads=9 must be between 0 and model.n_heads"),
    ],
)  # fmt: skip
def test_impossible_settings_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides).validate()


def test_configs_build_the_right_layers():
    cfg = load_config(None, ["model.vocab_size=50", "model.attention.kind=sliding", "model.attention.window=16",
                             "model.attention.global_every=2"]).model  # fmt: skip
    model = Decoder(cfg)
    assert model.layers[0].attn.pattern is not None and model.layers[1].attn.pattern is None
    assert isinstance(cfg.attention, SlidingWindowConfig)
    s2 = load_config(None, ["model.vocab_size=50", "model.attention.kind=s2", "model.attention.vert_stride=4"]).model
    assert isinstance(s2.attention, S2Config)
    layers = Decoder(s2).layers
    assert layers[0].attn.pattern is not None and layers[1].attn.pattern is None  # dense_every=2


PRUNABLE = [
    {"kind": "s2", "block_size": 4, "local_blocks": 2, "vert_stride": 2, "dense_every": 2},
    {"kind": "s2", "block_size": 2, "local_blocks": 1, "vert_stride": 2, "dense_every": 0, "dense_heads": 1},
    {"kind": "sliding", "window": 6},
]


@pytest.mark.parametrize("attention", PRUNABLE, ids=["s2_hybrid", "s2_dense_head", "sliding"])
def test_a_pruned_cache_decodes_like_the_full_forward(attention):
    model, _ = tiny(attention)
    x = torch.randint(0, 50, (2, 48))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(prune=True)
        parts = [model(x[:, :20], kv_cache=cache), *(model(x[:, t : t + 1], kv_cache=cache) for t in range(20, 48))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-6, rtol=1e-5)
    assert cache.length == 48 and cache.entries() < 2 * 2 * 48  # fewer key vectors than 2 layers × 2 KV heads × T


def test_pruned_cache_sizes_by_hand():
    # s2: block 4, 2 local blocks, stride 2, 2 KV heads (head step 1): after 48 positions (12 blocks) the next
    # query is in block 12; KV head 0 keeps its even blocks 0..10 and the local block 11 (7 blocks · 4 = 28 keys),
    # KV head 1 its odd blocks 1..11, the local one among them (24 keys); the dense layer keeps all 48 per head
    model, _ = tiny(PRUNABLE[0])
    cache = model.new_kv_cache(prune=True)
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 48)), kv_cache=cache)
    assert cache.entries() == 28 + 24 + 2 * 48
    window, _ = tiny(PRUNABLE[2])
    cache = window.new_kv_cache(prune=True)
    with torch.no_grad():
        window(torch.randint(0, 50, (1, 48)), kv_cache=cache)
    assert cache.entries() == 2 * 2 * 5  # the next query reads the last 5 positions (and itself)


def test_generate_with_a_pruned_cache_and_its_limits():
    model, _ = tiny(PRUNABLE[0])
    prompt = torch.randint(0, 50, (30,)).tolist()
    assert generate(model, prompt, 8, temperature=0, cache="pruned") == generate(model, prompt, 8, temperature=0)
    with pytest.raises(ValueError, match="rows of one length"):
        generate(model, [prompt, prompt[:10]], 2, cache="pruned")
    with pytest.raises(ValueError, match="cannot be combined with max_len"):
        model.new_kv_cache(max_len=8, prune=True)


@pytest.mark.parametrize(
    "attention", [{"kind": "gqa"}, ATTENTIONS[0], ATTENTIONS[1]], ids=["dense", "sliding", "s2"]
)  # fmt: skip
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "documents"])
def test_flex_attention_gives_the_sdpa_logits(attention, packed):
    """The same mask functions as FlexAttention block masks (forward only: PyTorch has no CPU backward for it)."""
    import warnings

    sdpa, cfg = tiny(attention, attention_backend="sdpa")
    flex = Decoder(model_cfg(cfg, attention_backend="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 50, (2, 40))
    doc_ids = torch.tensor([[0] * 15 + [1] * 25, [3] * 30 + [4] * 10]) if packed else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on a CPU warns that it is slow
        torch.testing.assert_close(flex(x, doc_ids=doc_ids), sdpa(x, doc_ids=doc_ids), atol=2e-5, rtol=1e-4)


def test_flex_is_used_where_it_helps():
    from lmlab.models.flex import use_flex

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_flex("auto", cuda, patterned=True) and not use_flex("auto", cuda, patterned=False)
    assert not use_flex("auto", cpu, patterned=True) and not use_flex("sdpa", cuda, patterned=True)
    assert use_flex("flex", cpu, patterned=False)


def test_science_vectors_of_section_9():
    """docs/science.md §12 §9: S2's vertical blocks per head and the GQA map of top-k attention."""
    got = materialize(s2_shards(block=1, local_blocks=0, stride=4, head_step=1), 1, 4, torch.arange(8), 8)[0]
    vertical = [set(torch.nonzero(got[h, 7]).flatten().tolist()) for h in range(4)]  # the last query's columns
    assert vertical == [{0, 4}, {3, 7}, {2, 6}, {1, 5}]
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # kv head of q head i: i // 4
    torch.testing.assert_close(topk_attention(q, k, v, mask, 5), want, atol=1e-6, rtol=0)
