"""The decoder: shapes and names, causality, packed documents, GQA, qk-norm, init, KV cache,
and logit parity with ``transformers.LlamaForCausalLM`` on copied weights."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder

from helpers import model_cfg

TINY = model_cfg(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, ffn_multiple_of=16)


def make(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(model_cfg(TINY, **overrides)).eval()


def ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_hidden_output_split():
    model = make()
    x = ids(2, 10)
    logits = model(x)
    assert logits.shape == (2, 10, 97)
    hidden = model.forward_hidden(x)
    assert hidden.shape == (2, 10, 64)
    torch.testing.assert_close(model.output(hidden), logits)


def test_parameter_names_follow_the_contract():
    names = set(dict(make(qk_norm=True, attn_bias=True, tie_embeddings=False).named_parameters()))
    expected = {"tok_embeddings.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn_norm.weight", f"layers.{i}.mlp_norm.weight"}
        expected |= {f"layers.{i}.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"layers.{i}.attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")}
        expected |= {f"layers.{i}.attn.q_norm.weight", f"layers.{i}.attn.k_norm.weight"}
        expected |= {f"layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert names == expected
    plain = set(dict(make().named_parameters()))
    assert "lm_head.weight" not in plain and not any("q_norm" in n or n.endswith("bias") for n in plain)


def test_tied_embeddings_share_the_weight():
    model = make()
    hidden = torch.randn(1, 3, 64)
    torch.testing.assert_close(model.output(hidden), hidden @ model.tok_embeddings.weight.T)


def test_vocab_size_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        Decoder(replace(TINY, vocab_size=0))


def test_init_statistics():
    torch.manual_seed(0)
    cfg = model_cfg(TINY, d_model=256, n_layers=8, tie_embeddings=False, attn_bias=True, init_std=0.02)
    model = Decoder(cfg)
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(model.lm_head.weight.std().item() - 0.02) < 1e-3
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * 8)
    assert abs(model.layers[3].attn.o_proj.weight.std().item() - residual) < 2e-4
    assert abs(model.layers[3].mlp.down_proj.weight.std().item() - residual) < 2e-4
    assert torch.all(model.layers[0].attn.q_proj.bias == 0)
    assert torch.all(model.layers[0].attn_norm.weight == 1) and torch.all(model.norm.weight == 1)


def test_num_params():
    model = make(tie_embeddings=False)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == total - 2 * 97 * 64
    assert make().num_params(non_embedding=True) == make().num_params() - 97 * 64


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    x = ids(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 5) % 97
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2, "qk_norm": True, "attn_bias": True}])
def test_packed_documents_match_separate_forwards(overrides):
    model = make(**overrides)
    doc_a, doc_b = ids(1, 7, seed=2), ids(1, 5, seed=3)
    packed = torch.cat([doc_a, doc_b], dim=1)  # [1, 12]
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    logits = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(logits[:, 7:], model(doc_b), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, :7], model(doc_a), atol=1e-5, rtol=0)
    # without doc_ids, B attends to A and its logits differ
    assert not torch.allclose(model(packed)[:, 7:], model(doc_b), atol=1e-3)


def test_position_ids_default_and_relative_shift():
    model = make()
    x = ids(2, 9)
    torch.testing.assert_close(model(x, position_ids=torch.arange(9).expand(2, 9)), model(x))
    # RoPE is relative: shifting every position by 3 leaves the logits unchanged ...
    shifted = model(x, position_ids=torch.arange(9).expand(2, 9) + 3)
    torch.testing.assert_close(shifted, model(x), atol=1e-5, rtol=0)
    # ... while stretching the distances changes them
    stretched = model(x, position_ids=2 * torch.arange(9).expand(2, 9))
    assert not torch.allclose(stretched, model(x), atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make(n_kv_heads=2, attn_bias=True)
    mha = make(attn_bias=True)
    state = gqa.state_dict()
    head_dim, group = TINY.head_dim, 2  # 4 query heads share 2 kv heads
    for name, tensor in list(state.items()):
        if ".k_proj." in name or ".v_proj." in name:
            heads = tensor.reshape(2, head_dim, *tensor.shape[1:])  # [H_kv, D, (d)]
            state[name] = heads.repeat_interleave(group, dim=0).reshape(4 * head_dim, *tensor.shape[1:])
    mha.load_state_dict(state)
    x = ids(2, 10)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=0)


def test_qk_norm_makes_attention_invariant_to_scaling_wq_wk():
    """docs/science.md §12 §10: with qk-norm (bias-free projections), W_q, W_k ×100 leave the attention
    probabilities unchanged to 1e-4; without qk-norm they change. Only the norm's eps breaks the
    invariance (by about eps / mean(q²)), so the check uses the Llama value 1e-6, not 1e-5."""
    for qk_norm in (True, False):
        model = make(qk_norm=qk_norm, norm_eps=1e-6)
        attn = model.layers[0].attn
        x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(4))
        rope = model.rope(torch.arange(10)[None])
        before = attn.attention_probs(x, rope)
        with torch.no_grad():
            attn.q_proj.weight.mul_(100)
            attn.k_proj.weight.mul_(100)
        after = attn.attention_probs(x, rope)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
        else:
            assert (after - before).abs().max() > 0.1


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1, "qk_norm": True}])
def test_kv_cache_matches_full_forward(overrides):
    model = make(**overrides)
    x = ids(2, 11)
    full = model(x)
    cache = model.new_kv_cache()
    chunks = [model(x[:, :6], kv_cache=cache), model(x[:, 6:9], kv_cache=cache)]
    chunks += [model(x[:, t : t + 1], kv_cache=cache) for t in (9, 10)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_sequence_longer_than_max_seq_len_extends_rope():
    model = make()
    x = ids(1, 40)  # max_seq_len is 32
    assert model(x).shape == (1, 40, 97)


def test_parity_with_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from lmlab.models.hf import lmlab_state_dict_to_hf

    cfg = replace(TINY, n_kv_heads=2, tie_embeddings=False, rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=ours.layers[0].mlp.gate_proj.out_features,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(lmlab_state_dict_to_hf(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
