"""Attention slot variants that restrict which keys a query sees: a sliding window and S2-Attention.

Both build the dense ``Attention`` module with a *pattern* (``lmlab.models.masks``) that is combined with the
causal, document and padding rules, so training, prefill and cached decoding share one definition.

- ``sliding`` (``model.attention: {kind: sliding, window: 128, global_every: 2}``): each query sees the last
  ``window`` positions (itself included); every ``global_every``-th block (``(i + 1) % global_every == 0``)
  keeps full attention, e.g. 2 alternates local and global layers (Gemma 2's layout; Beltagy et al. 2020).
- ``s2`` (``model.attention: {kind: s2, block_size: 64, local_blocks: 16, vert_stride: 8}``): S2-Attention
  (Lin et al. 2024, arXiv 2407.17678; docs/science.md §9.2). Keys are grouped in blocks; a KV head sees the
  blocks of its own stride class ``(j + h·head_step) mod vert_stride == 0`` plus the ``local_blocks`` most
  recent blocks, and the KV heads' classes together cover every block (so ``vert_stride`` must divide the
  number of KV heads). Every ``dense_every``-th block is dense (Phi-3-small: 2, the hybrid the paper favours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lmlab.errors import ConfigError
from lmlab.models.attention import Attention, GQAConfig
from lmlab.models.component import ComponentCount, hidden_std, residual_std
from lmlab.models.masks import MaskFn, s2_shards, sliding_window
from lmlab.models.mup import attention_scale

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


def _is_every(layer: int, every: int) -> bool:
    return every > 0 and (layer + 1) % every == 0


def _attention(model: ModelConfig, qk_norm: bool, qkv_bias: bool, pattern: MaskFn | None) -> Attention:
    return Attention(
        model.d_model,
        model.n_heads,
        model.kv_heads,
        head_dim=model.head_dim,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        norm_eps=model.norm_eps,
        init_std=hidden_std(model),
        out_std=residual_std(model),
        scale=attention_scale(model),
        pattern=pattern,
    )


def _with_keys(dense: ComponentCount, model: ModelConfig, keys: float) -> ComponentCount:
    """``dense`` with Kaplan's context term for ``keys`` keys per query instead of the whole context."""
    return ComponentCount(dense.params, dense.matmul_params, int(2 * keys * model.n_heads * model.head_dim))


@dataclass
class SlidingWindowConfig:
    """Causal attention over the last ``window`` positions; every ``global_every``-th block global (0: none)."""

    kind: Literal["sliding"] = "sliding"
    window: int = 128
    global_every: int = 0
    qk_norm: bool = False
    qkv_bias: bool = False

    def validate(self, model: ModelConfig, key: str) -> None:
        GQAConfig().validate(model, key)
        if not 1 <= self.window <= model.max_seq_len:
            raise ConfigError(
                f"{key}.window={self.window} must be between 1 and model.max_seq_len={model.max_seq_len} "
                "(a window as long as the context is dense attention: use kind: gqa)"
            )
        if self.global_every < 0:
            raise ConfigError(f"{key}.global_every={self.global_every} must be >= 0 (0: no global layers)")

    def is_global(self, layer: int) -> bool:
        return _is_every(layer, self.global_every)

    def build(self, model: ModelConfig, layer: int) -> Attention:
        pattern = None if self.is_global(layer) else sliding_window(self.window)
        return _attention(model, self.qk_norm, self.qkv_bias, pattern)

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        dense = GQAConfig(qk_norm=self.qk_norm, qkv_bias=self.qkv_bias).count(model, seq_len, layer)
        return dense if self.is_global(layer) else _with_keys(dense, model, min(seq_len, self.window))


@dataclass
class S2Config:
    """S2-Attention: per-KV-head strided key blocks plus a local window of blocks (docs/science.md §9.2)."""

    kind: Literal["s2"] = "s2"
    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    head_step: int | None = None  # shift of the stride class per KV head (None: max(1, vert_stride // KV heads))
    homo_head: bool = False  # every head the same shard (then the union does not cover the context)
    dense_heads: int = 0  # the last query heads attend densely
    dense_every: int = 2  # every n-th block dense (0: none)
    qk_norm: bool = False
    qkv_bias: bool = False

    def step(self, model: ModelConfig) -> int:
        return self.head_step or max(1, self.vert_stride // model.kv_heads)

    def validate(self, model: ModelConfig, key: str) -> None:
        GQAConfig().validate(model, key)
        for name in ("block_size", "local_blocks", "vert_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 1")
        if self.head_step is not None and self.head_step < 1:
            raise ConfigError(f"{key}.head_step={self.head_step} must be >= 1 (or null)")
        if not self.homo_head and model.kv_heads % self.vert_stride:
            raise ConfigError(
                f"{key}.vert_stride={self.vert_stride} must divide the number of KV heads ({model.kv_heads}), so that "
                f"the heads' strided shards cover every block (or set {key}.homo_head: true)"
            )
        if not 0 <= self.dense_heads <= model.n_heads:
            raise ConfigError(f"{key}.dense_heads={self.dense_heads} must be between 0 and model.n_heads")
        if self.dense_every < 0:
            raise ConfigError(f"{key}.dense_every={self.dense_every} must be >= 0 (0: no dense layers)")

    def is_dense(self, layer: int) -> bool:
        return _is_every(layer, self.dense_every)

    def pattern(self, model: ModelConfig) -> MaskFn:
        group = model.n_heads if self.homo_head else model.n_heads // model.kv_heads
        return s2_shards(
            self.block_size,
            self.local_blocks,
            self.vert_stride,
            self.step(model),
            group=group,
            dense_heads=self.dense_heads,
            n_heads=model.n_heads,
        )

    def build(self, model: ModelConfig, layer: int) -> Attention:
        return _attention(model, self.qk_norm, self.qkv_bias, None if self.is_dense(layer) else self.pattern(model))

    def count(self, model: ModelConfig, seq_len: int, layer: int = 0) -> ComponentCount:
        """Context FLOPs for the keys of the local window plus 1/vert_stride of the older ones (Kaplan's term)."""
        dense = GQAConfig(qk_norm=self.qk_norm, qkv_bias=self.qkv_bias).count(model, seq_len, layer)
        if self.is_dense(layer):
            return dense
        local = min(seq_len, self.local_blocks * self.block_size)
        return _with_keys(dense, model, local + (seq_len - local) / self.vert_stride)
