"""Attention masks written once, as predicates over token indices.

A *mask function* has FlexAttention's ``mask_mod`` signature, ``(b, h, q_idx, kv_idx) -> bool``: may query
``q_idx`` of row ``b`` and head ``h`` attend to key ``kv_idx``? Each is made of elementwise tensor operations,
so the same function serves two backends: ``materialize`` broadcasts it over index grids into the boolean
mask ``F.scaled_dot_product_attention`` takes ([B, H, T_q, T_k], size-1 dimensions where the function ignores
them), and ``torch.nn.attention.flex_attention.create_block_mask`` can evaluate it block by block.

Indices are absolute positions in the row (with a KV cache, a query's index counts the cached positions), so
a window or a strided shard means the same thing in training, in prefill and in decoding.

- ``causal``: ``kv <= q``;
- ``same_document(doc_ids)``: both tokens in one packed document (a block-diagonal mask);
- ``sliding_window(w)``: the last ``w`` positions, the query's own included (Mistral's convention;
  Beltagy et al. 2020, arXiv 2004.05150);
- ``s2_shards(...)``: S2-Attention (Lin et al. 2024, arXiv 2407.17678; docs/science.md §9.2): each head sees
  the key blocks of its own stride class plus a local window of blocks; the heads' classes together cover
  every block.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv <= q


def same_document(doc_ids: torch.Tensor) -> MaskFn:
    """Keys of the query's own document; ``doc_ids`` [B, T] (a change of id starts a document)."""

    def mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return doc_ids[b, q] == doc_ids[b, kv]

    return mask


@cache  # one function per setting: layers built alike share it (and FlexAttention block masks with it)
def sliding_window(window: int) -> MaskFn:
    """The ``window`` most recent positions up to the query (and the future; combine with ``causal``)."""

    def mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return q - kv < window

    return mask


@cache
def s2_shards(block: int, local_blocks: int, stride: int, head_step: int, head_offset: int = 0,
              group: int = 1, dense_heads: int = 0, n_heads: int = 0) -> MaskFn:  # fmt: skip
    """S2-Attention's pattern (docs/science.md §9.2), to be combined with ``causal``.

    Query block ``q // block`` sees key block ``j = kv // block`` when ``(j + h'·head_step + head_offset) mod
    stride == 0`` (the head's vertical shard) or ``q_block − j < local_blocks`` (the local window), where
    ``h' = h // group`` is the head's key/value head (query heads of one GQA group share their KV head's
    pattern, so each KV head's cache holds only its own shard). The last ``dense_heads`` of ``n_heads`` query
    heads attend densely."""

    def mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_block, kv_block = q // block, kv // block
        vertical = (kv_block + (h // group) * head_step + head_offset) % stride == 0
        allowed = vertical | (q_block - kv_block < local_blocks)
        if dense_heads:
            allowed = allowed | (h >= n_heads - dense_heads)
        return allowed

    return mask


def and_masks(*masks: MaskFn) -> MaskFn:
    """Attend where every mask allows it."""

    def mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        out = masks[0](b, h, q, kv)
        for other in masks[1:]:
            out = out & other(b, h, q, kv)
        return out

    return mask


def materialize(mask: MaskFn, batch: int, heads: int, q_idx: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The boolean mask [B', H', T_q, T_k] of ``mask`` for queries at ``q_idx`` [T_q] and keys 0..kv_len−1;
    B' and H' are 1 when the function ignores the row or the head (broadcasting keeps them so)."""
    device = q_idx.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = q_idx.view(1, 1, -1, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    out = mask(b, h, q, kv)
    return out.expand(out.shape[0], out.shape[1], q_idx.numel(), kv_len)
