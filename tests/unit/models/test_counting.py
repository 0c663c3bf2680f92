"""Parameter and FLOP counts from the config, checked against built models and a hand formula."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lmlab.config import ModelConfig
from lmlab.models.counting import count_params, flops_per_token, main, markdown_table, size_table
from lmlab.models.decoder import Decoder
from lmlab.models.sizes import SIZES

from helpers import model_cfg

BASE = model_cfg(vocab_size=101, d_model=48, n_layers=3, n_heads=4, ffn_multiple_of=16)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_heads": 2},
        {"n_kv_heads": 1, "qk_norm": True},
        {"attn_bias": True, "tie_embeddings": False},
        {"ffn_hidden": 100, "qk_norm": True, "attn_bias": True, "n_kv_heads": 2},
        {"head_size": 20, "qk_norm": True, "n_kv_heads": 2},  # heads wider than d_model / n_heads (Qwen3)
    ],
)
def test_count_params_matches_the_built_model(overrides):
    cfg = model_cfg(BASE, **overrides)
    model = Decoder(cfg)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]


def test_count_params_hand_formula():
    # d=48, H=4 (head 12), H_kv=2, ffn = 16·ceil(128/16) = 128, V=101, L=3, untied, bias, qk-norm
    cfg = model_cfg(BASE, n_kv_heads=2, tie_embeddings=False, attn_bias=True, qk_norm=True)
    attn = 48 * 48 + 2 * 48 * 24 + 48 * 48  # q, k, v, o weights = 6912
    bias = 48 + 2 * 24
    mlp = 3 * 48 * 128  # 18432
    per_layer = attn + bias + 2 * 12 + 2 * 48 + mlp
    assert count_params(cfg) == {
        "total": 3 * per_layer + 48 + 2 * 101 * 48,
        "non_embedding": 3 * per_layer + 48,
        "embedding": 2 * 101 * 48,
        "active": 3 * per_layer + 48 + 2 * 101 * 48,
    }


def test_flops_per_token_hand_formula():
    cfg = model_cfg(BASE, n_kv_heads=2, attn_bias=True)  # biases and norms are not matmul FLOPs
    matmul_per_layer = 48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 128
    forward = 2 * 3 * matmul_per_layer + 2 * 3 * 64 * 48 + 2 * 48 * 101
    assert flops_per_token(cfg, seq_len=64) == {"forward": forward, "training": 3 * forward}


def test_flops_close_to_six_n_for_short_context():
    cfg = replace(ModelConfig(), vocab_size=32000, **SIZES["small"])
    n = count_params(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model  # + lm_head matmul
    ratio = flops_per_token(cfg, seq_len=1)["training"] / (6 * n)
    assert 0.99 < ratio < 1.0  # only norms are not matmuls


def test_size_table_and_main(capsys):
    rows = size_table(vocab_size=32000, seq_len=1024)
    assert [r["name"] for r in rows] == list(SIZES)
    small = next(r for r in rows if r["name"] == "small")
    # 12 layers of d=768 with ffn 2048: 12·(4·768² + 3·768·2048) + 25·768 = 84,953,856 (+ tied 32000·768)
    assert small["non_embedding_params"] == 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 768
    assert small["params"] == small["non_embedding_params"] + 32000 * 768
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| small | 12 | 768 | 12 | 12 |" in table
    assert main(["--vocab-size", "1000", "--seq-len", "256"]) == 0
    assert "| nano |" in capsys.readouterr().out
