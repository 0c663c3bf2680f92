"""Causal self-attention with grouped-query heads, optional qk-norm and q/k/v bias, a KV
cache for decoding, and block-diagonal masks for packed documents.

- Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): ``n_kv_heads`` key/value
  heads are shared by groups of ``n_heads / n_kv_heads`` query heads.
- qk-norm (Wortsman et al. 2023, arXiv 2309.14322; docs/science.md §10): RMSNorm over the head
  dimension of q and k, after the projections and before RoPE, bounds the attention logits.
- q/k/v bias: the Qwen2 variant; the output projection never has a bias.
- Packed sequences: ``doc_ids`` [B, T] restrict each query to keys of the same document
  (a block-diagonal causal mask), so a row packing documents A|B computes B as if alone.

``GQAConfig`` is the attention slot's first variant (``model.attention: {kind: gqa, ...}``; the slot
contract is ``lmlab.models.component``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.component import ComponentCount, hidden_std, module_setting, residual_std
from lmlab.models.flex import MaskSpec, flex_attention
from lmlab.models.masks import MaskFn, and_masks, causal, materialize, same_document
from lmlab.models.mup import attention_scale
from lmlab.models.norms import RMSNorm
from lmlab.models.rope import apply_rotary

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class GQAConfig:
    """Dense causal attention with grouped-query heads (``model.n_heads`` / ``model.n_kv_heads``)."""

    kind: Literal["gqa"] = "gqa"
    qk_norm: bool = False  # RMSNorm on q and k over the head dimension (Qwen3)
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2)

    def validate(self, model: ModelConfig, key: str) -> None:
        if model.head_dim % 2:
            raise ConfigError(f"head dimension {model.head_dim} (d_model/n_heads or head_size) must be even for RoPE")

    def build(self, model: ModelConfig, layer: int) -> Attention:
        return Attention(
            model.d_model,
            model.n_heads,
            model.kv_heads,
            head_dim=model.head_dim,
            qk_norm=self.qk_norm,
            qkv_bias=self.qkv_bias,
            norm_eps=model.norm_eps,
            init_std=hidden_std(model),
            out_std=residual_std(model),
            scale=attention_scale(model),
        )

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        """q, k, v, o weights (+ q/k/v biases, qk-norm gains); Kaplan et al.'s 2·T·d_attn score FLOPs per
        token (scores and weighted sum, causal mask not halving it)."""
        d, hd = model.d_model, model.head_dim
        q_out, kv_out = model.n_heads * hd, model.kv_heads * hd
        matmul = d * q_out + 2 * d * kv_out + q_out * d
        bias = (q_out + 2 * kv_out) if self.qkv_bias else 0
        norms = 2 * hd if self.qk_norm else 0
        return ComponentCount(matmul + bias + norms, matmul, 2 * seq_len * q_out)


class LayerKVCache:
    """Keys and values [B, H_kv, T_past, D] of one layer's past positions."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append the new positions; return all keys and values so far and ``mask`` unchanged (a static
        cache, ``lmlab.models.static_cache``, returns its buffers and its own mask over them instead)."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)  # [B, H_kv, T_past + T, D]
            self.values = torch.cat((self.values, values), dim=2)
        return self.keys, self.values, mask


class KVCache:
    """The per-layer caches of a decoder; ``length`` is the number of positions already seen.

    ``key_mask`` [B, T_past + T] (True = a real token) lets rows of different lengths share one batch:
    prompts are left-padded, and the caller extends the mask to cover the positions of each forward call
    before making it. None: every cached position is real.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(n_layers)]
        self.key_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]

    def layer(self, slot: int) -> LayerKVCache:
        """The cache of ``slot``, added if new (a recurrent-depth model has one per core block and iteration)."""
        while len(self.layers) <= slot:
            self.layers.append(LayerKVCache())
        return self.layers[slot]


def attention_mask(
    q_len: int,
    past_len: int,
    doc_ids: torch.Tensor | None,
    device: torch.device,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for ``q_len`` new queries after ``past_len`` cached keys.

    Returns None when plain causal attention suffices: no past keys (``is_causal`` then
    applies), or a single query that may see every key. Otherwise [T_q, T_k] for an
    offset causal mask, or [B, 1, T, T] block-diagonal causal when ``doc_ids`` is given.
    ``key_mask`` [B, T_k] (left-padded rows, see ``KVCache``) hides padding keys: [B, 1, T_q, T_k]. A query
    always sees itself, so a padding query's row is never empty (an empty row would give NaN, and NaN
    values leak through zero attention weights).
    """
    if key_mask is not None:
        if doc_ids is not None:
            raise ValueError("doc_ids cannot be combined with a key mask")
        keys = past_len + q_len
        seen = torch.ones(q_len, keys, dtype=torch.bool, device=device).tril(diagonal=past_len)  # [T_q, T_k]
        itself = torch.zeros_like(seen)
        itself[torch.arange(q_len), torch.arange(past_len, keys)] = True
        return ((seen[None] & key_mask[:, None, :]) | itself[None])[:, None]  # [B, 1, T_q, T_k]
    if doc_ids is not None:
        if past_len:
            raise ValueError("doc_ids cannot be combined with a KV cache")
        positions = torch.arange(q_len, device=device)
        return materialize(and_masks(causal, same_document(doc_ids)), doc_ids.shape[0], 1, positions, q_len)
    if past_len == 0 or q_len == 1:
        return None
    # query i (absolute position past_len + i) sees keys 0 .. past_len + i
    return torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(diagonal=past_len)


# Longest sequence for which CPU bf16 training uses explicit attention instead of scaled_dot_product_attention.
EXPLICIT_ATTENTION_MAX_LEN = 512


def use_explicit_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``Attention`` computes plain causal attention explicitly: on the CPU in bfloat16 (autocast), for
    sequences of at most ``EXPLICIT_ATTENTION_MAX_LEN`` with as many key as query heads. There two batched
    matmuls and a softmax (forward and backward) took 0.75-1.0x the time of the CPU flash kernel of
    ``scaled_dot_product_attention`` at T = 256 and 512 (head dims 32 and 64, 1 and 2 threads; torch 2.13 on an
    AVX-512-BF16 CPU without AMX), but 1.5x at T = 1024; they also hold the [B, H, T, T] probabilities for
    backward. In float32 the flash kernel is the faster one and is kept."""
    q_len = q.shape[-2]
    return (
        mask is None
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and 1 < q_len <= EXPLICIT_ATTENTION_MAX_LEN
        and k.shape[-2] == q_len
        and k.shape[1] == q.shape[1]
    )


def explicit_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + causal mask)·v for q, k, v [B, H, T, D] (``scale`` None: 1/sqrt(D); the softmax
    accumulates in float32)."""
    q_len, head_dim = q.shape[-2], q.shape[-1]
    scores = torch.matmul(q * (head_dim**-0.5 if scale is None else scale), k.transpose(-1, -2))  # [B, H, T, T]
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=q.device).triu(1)
    scores.masked_fill_(future, float("-inf"))  # in place: the matmul's backward needs its inputs, not its output
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention through ``F.scaled_dot_product_attention`` (computed
    explicitly for short bf16 sequences on the CPU, where that is faster: ``use_explicit_attention``)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        head_dim: int | None = None,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float = 0.02,
        scale: float | None = None,
        pattern: MaskFn | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale  # of the attention logits q·k; None: 1/sqrt(head_dim) (μP: 1/head_dim)
        self.pattern = pattern  # which keys a query may see besides the causal / document / padding rules
        self.topk: int | None = None  # set by ``topk_attention``: each query keeps only its k best keys
        self._mask_cache: dict[tuple, torch.Tensor] = {}  # full_mask's last causal + pattern mask
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.init_std = init_std
        self.out_std = out_std
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        # qk-norm has weights only when enabled, so state-dict names follow the config.
        self.q_norm: nn.Module = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for q/k/v, normal(0, out_std) for o_proj (it writes into the residual
        stream), zero biases, unit qk-norm gains."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=self.init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=self.out_std)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, RMSNorm):
                norm.reset_parameters()

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, T, d] -> q [B, H, T, D], k and v [B, H_kv, T, D], with qk-norm and RoPE applied."""
        batch, q_len, _ = x.shape
        q = self.q_proj(x).view(batch, q_len, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim)  # [B, T, H_kv, D]
        v = self.v_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim)
        if isinstance(self.q_norm, RMSNorm):  # keep the projections' dtype: the fp32 gains would promote bf16 to fp32
            q, k = self.q_norm(q, out_dtype=q.dtype), self.k_norm(k, out_dtype=k.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, H_kv, T, D]
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, d] -> [B, T, d]. ``rope`` = (cos, sin) [B, T, D] for the new positions;
        ``mask`` from ``attention_mask`` (None: causal, or all keys for a single query)."""
        batch, q_len, _ = x.shape
        q, k, v = self.project(x, rope)
        if isinstance(mask, MaskSpec):  # a forward without a cache that runs FlexAttention (lmlab.models.flex)
            if self.topk is None:
                out = flex_attention(q, k, v, mask.block_mask(self.pattern, self.n_heads), self.scale)  # [B, H, T, D]
                return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim))
            mask = mask.dense()
        if cache is not None:
            k, v, mask = cache.update(k, v, mask)  # [B, H_kv, T_past + T, D] (static cache: [B, H_kv, L, D])
        topk = self.topk is not None and self.topk < k.shape[-2]  # k >= the keys: dense attention, exactly
        complete = getattr(cache, "applies_pattern", False)  # a pruned cache's mask (lmlab.models.s2_cache)
        if (self.pattern is not None or topk) and not complete:
            mask = self.full_mask(mask, cache, q_len, k.shape[-2], q.device)
        if topk:
            out = topk_attention(q, k, v, mask, self.topk, self.scale)
        elif use_explicit_attention(q, k, mask):
            out = explicit_causal_attention(q, k, v, self.scale)  # [B, H, T, D]
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and q_len > 1,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim)  # [B, T, H·D]
        return self.o_proj(out)

    def full_mask(
        self, mask: torch.Tensor | None, cache: LayerKVCache | None, q_len: int, kv_len: int, device: torch.device
    ) -> torch.Tensor:
        """The layer's boolean mask [B|1, H|1, T_q, T_k]: ``mask`` (None: causal) and the layer's ``pattern``.

        Queries sit at the last ``q_len`` of the ``kv_len`` key positions, or at the static cache's slots."""
        q_idx = getattr(cache, "query_slots", None)
        # causal + pattern is a function of the shapes alone: kept for the next call (eager mode only)
        plain = mask is None and q_idx is None and not torch.compiler.is_compiling()
        key = (q_len, kv_len, device)
        if plain and key in self._mask_cache:
            return self._mask_cache[key]
        if q_idx is None:
            q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
        if mask is None:
            mask = materialize(causal, 1, 1, q_idx, kv_len)
        elif mask.dim() == 2:
            mask = mask[None, None]
        if self.pattern is not None:
            mask = mask & materialize(self.pattern, 1, self.n_heads, q_idx, kv_len)
        if plain:
            self._mask_cache = {key: mask}  # the last shape only: training repeats one shape
        return mask

    def attention_probs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Causal attention probabilities [B, H, T, T], computed explicitly in fp32 (a diagnostic,
        e.g. for the qk-norm invariance check of docs/science.md §12 §10)."""
        q_len = x.shape[1]
        q, k, _ = self.project(x, rope)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, T, D]
        scores = q.float() @ k.float().transpose(-1, -2)  # [B, H, T, T]
        scores = scores / self.head_dim**0.5 if self.scale is None else scores * self.scale
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, top: int, scale: float | None = None
) -> torch.Tensor:
    """Attention in which each query keeps only its ``top`` highest-scoring allowed keys (docs/science.md §9.1).

    The exact form of Synk et al. 2025 (arXiv 2502.06766) with a flat index: scores q·kᵀ·scale (None: 1/sqrt(D)) of the keys
    ``mask`` [B|1, H|1, T_q, T_k] allows, every score below the query's ``top``-th largest set to −inf, then
    the softmax over what is left (float32) and the weighted sum of values. q [B, H, T_q, D]; k, v
    [B, H_kv, T_k, D] (grouped-query heads share their key/value head)."""
    groups = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(groups, dim=1).float()  # [B, H, T_k, D]
    values = v.repeat_interleave(groups, dim=1).float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # [B, H, T_q, T_k]
    scores = scores.masked_fill(~mask, float("-inf"))
    kth = scores.topk(top, dim=-1).values[..., -1:]  # [B, H, T_q, 1]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    return (scores.softmax(dim=-1) @ values).to(q.dtype)


@contextmanager
def topk_attention_of(model: nn.Module, top: int | None) -> Iterator[None]:
    """Within the block, every ``Attention`` of ``model`` keeps only each query's ``top`` best keys
    (``topk_attention``; None: unchanged). For inference: ``generate(..., attention_topk=k)`` and evaluation."""
    if top is not None and top < 1:
        raise ValueError(f"top-k attention needs k >= 1, got {top}")
    with module_setting(model, Attention, "topk", top):
        yield
