"""Causal self-attention with grouped-query heads, optional qk-norm and q/k/v bias, a KV
cache for decoding, and block-diagonal masks for packed documents.

- Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): ``n_kv_heads`` key/value
  heads are shared by groups of ``n_heads / n_kv_heads`` query heads.
- qk-norm (Wortsman et al. 2023, arXiv 2309.14322; SCIENCE.md §10): RMSNorm over the head
  dimension of q and k, after the projections and before RoPE, bounds the attention logits.
- q/k/v bias: the Qwen2 variant; the output projection never has a bias.
- Packed sequences: ``doc_ids`` [B, T] restrict each query to keys of the same document
  (a block-diagonal causal mask), so a row packing documents A|B computes B as if alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.norms import RMSNorm
from lmlab.models.rope import apply_rotary


class LayerKVCache:
    """Keys and values [B, H_kv, T_past, D] of one layer's past positions."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions and return all keys and values so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)  # [B, H_kv, T_past + T, D]
            self.values = torch.cat((self.values, values), dim=2)
        return self.keys, self.values


class KVCache:
    """The per-layer caches of a decoder; ``length`` is the number of positions already seen."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]


def attention_mask(
    q_len: int, past_len: int, doc_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for ``q_len`` new queries after ``past_len`` cached keys.

    Returns None when plain causal attention suffices: no past keys (``is_causal`` then
    applies), or a single query that may see every key. Otherwise [T_q, T_k] for an
    offset causal mask, or [B, 1, T, T] block-diagonal causal when ``doc_ids`` is given.
    """
    if doc_ids is not None:
        if past_len:
            raise ValueError("doc_ids cannot be combined with a KV cache")
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()  # [T, T]
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        return (same_doc & causal)[:, None]  # [B, 1, T, T]
    if past_len == 0 or q_len == 1:
        return None
    # query i (absolute position past_len + i) sees keys 0 .. past_len + i
    return torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(diagonal=past_len)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # qk-norm has weights only when enabled, so state-dict names follow the config.
        self.q_norm: nn.Module = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, T, d] -> q [B, H, T, D], k and v [B, H_kv, T, D], with qk-norm and RoPE applied."""
        batch, q_len, _ = x.shape
        q = self.q_proj(x).view(batch, q_len, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim)  # [B, T, H_kv, D]
        v = self.v_proj(x).view(batch, q_len, self.n_kv_heads, self.head_dim)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(k).transpose(1, 2)  # [B, H_kv, T, D]
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
        if cache is not None:
            k, v = cache.update(k, v)  # [B, H_kv, T_past + T, D]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim)  # [B, T, H·D]
        return self.o_proj(out)

    def attention_probs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Causal attention probabilities [B, H, T, T], computed explicitly in fp32 (a diagnostic,
        e.g. for the qk-norm invariance check of SCIENCE.md §12 §10)."""
        q_len = x.shape[1]
        q, k, _ = self.project(x, rope)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, T, D]
        scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5  # [B, H, T, T]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
