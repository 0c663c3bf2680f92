"""A KV cache that keeps, per KV head, only the keys S2-Attention will read again (Lin et al. 2024, §3.3).

In an S2 layer (``lmlab.models.sparse_attention``) a key in block j stays visible to later queries only if
j is in its KV head's stride class or still inside the local window of the next query's block: the pattern is
"KV-cache efficient" (a key no longer needed by the next query is never needed again). After each call this
cache drops, head by head, every key that fails both tests, so an S2 layer holds about
``T / vert_stride + local_blocks · block_size`` keys per KV head instead of T. Heads keep different positions;
each head's keys are stored compacted (padded to the longest head) with their positions, and the cache hands
the attention layer a mask that already applies the pattern. Dense layers of the same model keep a plain cache.

Use ``Decoder.new_kv_cache(prune=True)``; rows must share one length (no key mask: left-padded batches keep the
plain cache).
"""

from __future__ import annotations

import torch

from lmlab.models.attention import KVCache, LayerKVCache
from lmlab.models.masks import MaskFn


class ShardedLayerKVCache:
    """One S2 layer's compacted keys and values [B, H_kv, L', D] and their positions [H_kv, L'] (−1: empty)."""

    applies_pattern = True  # the mask it returns is complete; the attention layer adds nothing

    def __init__(self, pattern: MaskFn, n_heads: int, n_kv_heads: int) -> None:
        self.pattern = pattern
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.seen = 0  # positions written so far, kept or not

    def _allowed(self, positions: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
        """[1, H, T_q, L] may query head h at ``q_idx`` read the key at ``positions`` [H_kv, L] of its KV head?"""
        group = self.n_heads // self.n_kv_heads
        heads = torch.arange(self.n_heads, device=positions.device)
        pos = positions[heads // group][None, :, None, :]  # [1, H, 1, L]
        q = q_idx[None, None, :, None]
        h = heads[None, :, None, None]
        return (pos >= 0) & (pos <= q) & self.pattern(torch.zeros_like(h), h, q, pos.clamp(min=0))

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the new positions; return every stored key and value plus the new ones and the complete mask
        [1, H, T, L]; then keep only what a later query can read."""
        batch, kv_heads, q_len, _ = keys.shape
        new = torch.arange(self.seen, self.seen + q_len, device=keys.device)
        if self.keys is None:
            all_keys, all_values, positions = keys, values, new.expand(kv_heads, q_len)
        else:
            all_keys = torch.cat((self.keys, keys), dim=2)
            all_values = torch.cat((self.values, values), dim=2)
            positions = torch.cat((self.positions, new.expand(kv_heads, q_len)), dim=1)
        allowed = self._allowed(positions, new)
        self.seen += q_len
        self._keep(all_keys, all_values, positions)
        return all_keys, all_values, allowed

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store, per KV head, the keys some query head of its group may read from the next position on."""
        group = self.n_heads // self.n_kv_heads
        upcoming = torch.tensor([self.seen], device=keys.device)
        needed = self._allowed(positions, upcoming)[0, :, 0]  # [H, L] at the next position
        keep = needed.view(self.n_kv_heads, group, -1).any(dim=1)  # [H_kv, L]
        width = int(keep.sum(dim=1).max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
        kept = keep.gather(1, order)
        self.positions = torch.where(kept, positions.gather(1, order), torch.full_like(order, -1))
        index = order[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])
        self.keys = keys.gather(2, index)
        self.values = values.gather(2, index)


class PrunedKVCache(KVCache):
    """A decoder's cache in which S2 layers keep only their shards (``ShardedLayerKVCache``); others are plain."""

    def __init__(self, layers: list[LayerKVCache | ShardedLayerKVCache]) -> None:
        super().__init__(0)
        self.layers = layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        if isinstance(first, ShardedLayerKVCache):
            return first.seen
        return 0 if first.keys is None else first.keys.shape[2]

    @property
    def key_mask(self) -> torch.Tensor | None:
        return None

    @key_mask.setter
    def key_mask(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise ValueError("a pruned S2 cache needs rows of one length (no key mask); use new_kv_cache()")

    def entries(self) -> int:
        """Key (= value) vectors held over all layers and KV heads, per row: the cache's size in head vectors."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                if isinstance(layer, ShardedLayerKVCache):
                    total += int((layer.positions >= 0).sum())
                else:
                    total += layer.keys.shape[1] * layer.keys.shape[2]
        return total
