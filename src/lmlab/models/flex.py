"""FlexAttention for the masked forwards of training: the mask functions of ``lmlab.models.masks`` as block masks.

A dense boolean mask ([B, 1, T, T] for packed documents, [1, H, T, T] for a sliding window or S2's shards)
turns ``scaled_dot_product_attention`` away from its flash kernels and costs O(T²) memory per call.
FlexAttention (PyTorch ≥ 2.5, ``torch.nn.attention.flex_attention``) instead evaluates the same mask function
on 128×128 tiles once per forward (``create_block_mask``), skips the tiles it rules out entirely, and runs a
fused, compiled kernel. Where it runs: forwards without a KV cache (training, evaluation, prefill) of models with
sliding-window or S2 layers on CUDA by default (``model.attention_backend: auto``); ``flex`` forces it, packed
documents included (on a CPU only without gradients: PyTorch has no CPU backward for it); ``sdpa`` turns it off. ``MaskSpec`` is the per-forward rule the decoder hands its
blocks; each attention layer asks it for the block mask of its own pattern, built once per forward per pattern.
"""

from __future__ import annotations

from functools import cache

import torch

from lmlab.models.masks import MaskFn, and_masks, causal, materialize, same_document


class MaskSpec:
    """The rule of one forward over T positions and no cache: causal, within documents when ``doc_ids`` [B, T]
    is given. ``dense()`` materialises it for SDPA; ``block_mask(pattern, heads)`` adds a layer's pattern."""

    def __init__(self, length: int, doc_ids: torch.Tensor | None, device: torch.device) -> None:
        self.length = length
        self.doc_ids = doc_ids
        self.device = device
        self.rule: MaskFn = causal if doc_ids is None else and_masks(causal, same_document(doc_ids))
        self._dense: torch.Tensor | None = None
        self._blocks: dict[MaskFn | None, object] = {}

    @property
    def batch(self) -> int:
        return 1 if self.doc_ids is None else self.doc_ids.shape[0]

    def dense(self) -> torch.Tensor | None:
        """The boolean mask [B, 1, T, T] of the rule (None for plain causal: SDPA's ``is_causal`` is faster)."""
        if self.doc_ids is None:
            return None
        if self._dense is None:
            self._dense = materialize(
                self.rule, self.batch, 1, torch.arange(self.length, device=self.device), self.length
            )
        return self._dense

    def block_mask(self, pattern: MaskFn | None, heads: int):
        """FlexAttention's ``BlockMask`` of the rule and ``pattern`` (built at the first layer that asks)."""
        if pattern not in self._blocks:
            from torch.nn.attention.flex_attention import create_block_mask

            fn = self.rule if pattern is None else and_masks(self.rule, pattern)
            batch = None if self.doc_ids is None else self.batch
            self._blocks[pattern] = create_block_mask(
                fn, batch, None if pattern is None else heads, self.length, self.length, device=self.device
            )
        return self._blocks[pattern]


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None = None
) -> torch.Tensor:
    """softmax(q·kᵀ·scale where the block mask allows)·v for q [B, H, T, D], k and v [B, H_kv, T, D] (``scale``
    None: 1/sqrt(D)): compiled on CUDA (eager FlexAttention materialises the scores), eager elsewhere."""
    if q.is_cuda and not torch.compiler.is_compiling():
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    from torch.nn.attention.flex_attention import flex_attention as eager

    return eager(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def use_flex(backend: str, device: torch.device, patterned: bool) -> bool:
    """Whether a forward without a KV cache runs FlexAttention: ``flex`` always (packed documents included),
    ``auto`` on CUDA for a model with patterned layers (sliding window, S2), ``sdpa`` never.

    Packed documents alone keep SDPA's dense mask under ``auto`` until FlexAttention's document path has been
    measured on a GPU (``benchmarks/architectures.py``, ``documents_flex``); ``flex`` turns it on."""
    if backend == "flex":
        return True
    return backend == "auto" and device.type == "cuda" and patterned
