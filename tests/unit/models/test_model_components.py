"""Components of the decoder: RMSNorm, RoPE, SwiGLU width, packed positions and masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.models.attention import KVCache, attention_mask, explicit_causal_attention, use_explicit_attention
from lmlab.models.decoder import Decoder, document_positions
from lmlab.models.mlp import ffn_hidden_size
from lmlab.models.norms import RMSNorm
from lmlab.models.rope import RotaryEmbedding, apply_rotary, rotate_half

from helpers import model_cfg


def test_rmsnorm_hand_example():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = [3, 4]: rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    out = norm(torch.tensor([[3.0, 4.0]]))
    rms = math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3.0 / rms, 8.0 / rms]]))


def test_rmsnorm_eps_and_dtype():
    norm = RMSNorm(4, eps=1.0)
    out = norm(torch.zeros(1, 4) + 1.0)  # mean(x²) = 1, so 1/sqrt(1 + 1)
    torch.testing.assert_close(out, torch.full((1, 4), 1 / math.sqrt(2.0)))
    half = norm.to(torch.bfloat16)(torch.randn(3, 4, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16


def _plain_rmsnorm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The textbook formula, differentiated by autograd (what RMSNorm computed before its own backward)."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return norm.weight * normed.to(x.dtype)


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 32), (2, 3, 4, 16)])
def test_rmsnorm_backward_matches_autograd(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    out, expected = norm(x), _plain_rmsnorm(norm, x)
    assert torch.equal(out, expected)  # the same forward arithmetic, bit for bit
    ours = torch.autograd.grad(out, (x, norm.weight), grad)
    theirs = torch.autograd.grad(expected, (x, norm.weight), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the output written in bf16 (what a block under autocast asks for) is the float32 output rounded once
    low = norm(x, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected.to(torch.bfloat16))
    ours = torch.autograd.grad(low, (x, norm.weight), grad.to(torch.bfloat16))
    theirs = torch.autograd.grad(_plain_rmsnorm(norm, x), (x, norm.weight), grad.to(torch.bfloat16).float())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rmsnorm_backward_of_a_bf16_input():
    """qk-norm under autocast normalises the projections' bf16 output: computed in float32, rounded once, the
    gradient returned in bf16; within one bf16 rounding of autograd on the textbook formula."""
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)
    out = norm(x, torch.bfloat16)
    expected = _plain_rmsnorm(norm, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16))
    ours = torch.autograd.grad(out, (x, norm.weight), grad)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    exact = w64 * x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + norm.eps)  # float64 reference
    theirs = torch.autograd.grad(exact, (x64, w64), grad.double())
    torch.testing.assert_close(ours[0].double(), theirs[0], atol=1e-2, rtol=1e-2)  # one bf16 rounding
    torch.testing.assert_close(ours[1].double(), theirs[1], atol=1e-4, rtol=1e-4)  # float32 throughout


def test_qk_norm_keeps_the_autocast_dtype():
    """The float32 qk-norm gains must not promote bf16 queries and keys to float32 (attention would then run
    in float32 on the CPU, 1.3x slower for the step)."""
    cfg = model_cfg(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    cfg.attention.qk_norm = True
    attn = Decoder(cfg).layers[0].attn
    rope = RotaryEmbedding(8, 16)(torch.arange(16)[None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.project(torch.randn(1, 16, 32, requires_grad=True), rope)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert use_explicit_attention(q, k, None)


def test_block_norms_hand_over_the_autocast_dtype():
    """Under autocast a block's projections get the norm's output already in bf16; the logits are the same
    bits as when every projection casts the float32 output itself."""
    torch.manual_seed(0)
    model = Decoder(model_cfg(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)).train()
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    originals = {}
    for block in model.layers:  # the plain norms: float32 out, cast by each projection
        for norm in (block.attn_norm, block.mlp_norm):
            originals[norm] = norm.forward
            norm.forward = lambda h, out_dtype=None, n=norm: _plain_rmsnorm(n, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    assert torch.equal(logits, expected)


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(2, 16, 4, 8, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
        out = explicit_causal_attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), grad)
        theirs = torch.autograd.grad(expected, (q, k, v), grad)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=4 * tol, rtol=4 * tol)


def test_explicit_attention_only_for_short_bf16_cpu_causal():
    q = torch.zeros(1, 4, 16, 8, dtype=torch.bfloat16)
    assert use_explicit_attention(q, q, None)
    assert not use_explicit_attention(q.float(), q.float(), None)  # float32: the flash kernel
    assert not use_explicit_attention(q, q, torch.ones(16, 16, dtype=torch.bool))  # packed / cached masks
    assert not use_explicit_attention(q, q[:, :2], None)  # grouped-query heads
    assert not use_explicit_attention(q[:, :, :1], q, None)  # decoding
    long = torch.zeros(1, 1, 1024, 8, dtype=torch.bfloat16)
    assert not use_explicit_attention(long, long, None)


def test_rotate_half_layout():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_rope_angles_hand_example():
    rope = RotaryEmbedding(head_dim=4, max_seq_len=8, theta=100.0)
    cos, sin = rope(torch.tensor([[0, 3]]))
    # inv_freq = [1, 100^(-1/2)] = [1, 0.1]; position 3 -> angles [3, 0.3, 3, 0.3]
    angles = torch.tensor([3.0, 0.3, 3.0, 0.3])
    torch.testing.assert_close(cos[0, 1], angles.cos())
    torch.testing.assert_close(sin[0, 1], angles.sin())
    torch.testing.assert_close(cos[0, 0], torch.ones(4))


def test_rope_relative_position_property():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(torch.tensor([[m]]))
        cos_n, sin_n = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_cache_extends_beyond_max_seq_len():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=4)
    cos, _ = rope(torch.tensor([[1, 2]]))
    assert rope._cos.shape[0] == 4
    cos_far, sin_far = rope(torch.tensor([[10]]))
    assert rope._cos.shape[0] == 11
    inv = rope.inv_freq()
    torch.testing.assert_close(cos_far[0, 0, :4], (10 * inv).cos())
    torch.testing.assert_close(sin_far[0, 0, 4:], (10 * inv).sin())


def test_rope_disabled_is_the_identity_rotation():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=4, enabled=False)
    cos, sin = rope(torch.tensor([[0, 3, 17]]))
    assert cos.shape == sin.shape == (1, 3, 8)
    x = torch.randn(1, 2, 3, 8)
    assert torch.equal(apply_rotary(x, cos, sin), x)  # exactly: x·1 + rotate_half(x)·0


def test_nope_decoder_has_no_position_in_one_layer():
    """With ``model.position: none`` a 1-layer decoder's last output depends on the earlier tokens only as a set
    (attention is permutation-invariant over its keys); with RoPE, the order of those tokens matters."""
    torch.manual_seed(0)
    ids = torch.tensor([[5, 9, 2, 14, 7, 3]])
    shuffled = torch.tensor([[14, 2, 5, 7, 9, 3]])  # the same earlier tokens, another order; the same last token
    for position, invariant in (("none", True), ("rope", False)):
        model = Decoder(model_cfg(vocab_size=20, d_model=32, n_layers=1, n_heads=4, position=position)).eval()
        with torch.no_grad():
            a, b = model(ids)[0, -1], model(shuffled)[0, -1]
        assert torch.allclose(a, b, atol=1e-5) == invariant, position


def test_ffn_hidden_default_and_override():
    assert ffn_hidden_size(model_cfg(d_model=256, ffn_multiple_of=64)) == 704  # 682.7 -> 704
    assert ffn_hidden_size(model_cfg(d_model=96, ffn_multiple_of=1)) == 256
    assert ffn_hidden_size(model_cfg(d_model=256, ffn_hidden=100)) == 100


def test_document_positions_restart_per_document():
    doc_ids = torch.tensor([[7, 7, 7, 2, 2, 5], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(document_positions(doc_ids), expected)


def test_attention_mask_cases():
    assert attention_mask(5, 0, None, torch.device("cpu")) is None  # is_causal fast path
    assert attention_mask(1, 7, None, torch.device("cpu")) is None  # one query sees all keys
    offset = attention_mask(2, 3, None, torch.device("cpu"))
    assert offset.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    packed = attention_mask(4, 0, torch.tensor([[0, 0, 1, 1]]), torch.device("cpu"))
    assert packed.shape == (1, 1, 4, 4)
    assert packed[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError):
        attention_mask(2, 3, torch.tensor([[0, 0]]), torch.device("cpu"))


def test_kv_cache_length():
    cache = KVCache(2)
    assert cache.length == 0
    cache.layers[0].update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    cache.layers[0].update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert cache.length == 4
