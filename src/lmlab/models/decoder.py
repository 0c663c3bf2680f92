"""The Llama-style decoder: token embeddings, pre-norm blocks (an attention and an FFN component,
each with a residual), a final RMSNorm and the output projection (tied to the embeddings or not).
Under μP (``model.parametrization: mup``, ``lmlab.models.mup``) the embeddings and logits carry their
multipliers α_in and α_out/m_d.

The attention and FFN modules come from the config's slots (``cfg.attention.build``,
``cfg.ffn.build``; ``lmlab.models.component``), so a new variant never edits this file.

Single-device and plain PyTorch (docs/design.md, principle 1): FSDP, activation checkpointing
and ``torch.compile`` wrap ``model.layers[i]`` from outside. Parameter names follow
docs/CONTRACTS.md (Model) and map one-to-one onto Hugging Face Llama names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.abacus import AbacusEmbedding
from lmlab.models.attention import KVCache, LayerKVCache, attention_mask
from lmlab.models.flex import MaskSpec, use_flex
from lmlab.models.mup import input_mult, logit_mult
from lmlab.models.norms import RMSNorm, autocast_dtype
from lmlab.models.recurrent import Recurrence
from lmlab.models.rope import RotaryEmbedding
from lmlab.models.s2_cache import PrunedKVCache, ShardedLayerKVCache
from lmlab.models.static_cache import StaticKVCache


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document boundary: [B, T] ids -> [B, T] positions.

    A boundary is any change of id between neighbours, e.g. doc_ids [7, 7, 7, 2, 2] gives
    [0, 1, 2, 0, 1].
    """
    seq = doc_ids.shape[1]
    index = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)  # [B, T]
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values  # [B, T]
    return index - start


def pattern_of(block: nn.Module):
    """The attention pattern (a mask function) of a block's attention, or None (dense, or a variant without one)."""
    return getattr(block.attn, "pattern", None)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = cfg.attention.build(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = cfg.ffn.build(cfg, layer)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Unit norm gains; each component initialises its own weights."""
        self.attn_norm.reset_parameters()
        self.attn.init_weights()
        self.mlp_norm.reset_parameters()
        self.mlp.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        # Under autocast the norms hand their output over already in the autocast dtype, so the projections
        # reading it (q/k/v, gate/up) do not each cast it (and each save their own cast copy for backward).
        cast = autocast_dtype(x)
        x = x + self.attn(self.attn_norm(x, cast), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x, cast))


class Decoder(nn.Module):
    """Decoder-only language model built from ``ModelConfig`` (see docs/CONTRACTS.md, Model).

    It holds no buffers (the RoPE tables are built lazily), so it can be created on the meta
    device, materialised with ``to_empty(device=...)`` and initialised with ``init_weights()``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size={cfg.vocab_size}: set it, or take it from the tokenizer, before building"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # digit-place embeddings (lmlab.models.abacus) and recurrent depth (lmlab.models.recurrent), when enabled
        self.abacus = AbacusEmbedding(cfg.abacus, cfg.d_model, cfg.init_std) if cfg.abacus.enabled else None
        self.recurrence = Recurrence(cfg.recurrence, cfg.d_model, cfg.init_std) if cfg.recurrence.enabled else None
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, enabled=cfg.position == "rope", scaling=cfg.rope_scaling
        )
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))  # blocks initialise themselves
        self.patterned = any(pattern_of(block) is not None for block in self.layers)  # sliding / S2 layers
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the output projection reuses tok_embeddings.weight and has no parameter of its own.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.input_mult = input_mult(cfg)  # μP's α_in on the embeddings; None: none (standard)
        self.logit_mult = logit_mult(cfg)  # μP's α_out/m_d on the logits; None: none (standard)
        self._init_own_weights()

    @torch.no_grad()
    def _init_own_weights(self) -> None:
        """normal(0, init_std) for the embedding and an untied lm_head; a unit final-norm gain; the digit-place
        embeddings and the recurrence adapter initialise themselves."""
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=self.cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=self.cfg.init_std)
        self.norm.reset_parameters()
        for module in (self.abacus, self.recurrence):
            if module is not None:
                module.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every weight: each block's components initialise their own (projections into
        the residual stream with init_std / sqrt(2·n_layers), GPT-2), then the embedding, head and norm."""
        for block in self.layers:
            block.init_weights()
        self._init_own_weights()

    def new_kv_cache(self, max_len: int | None = None, *, prune: bool = False) -> KVCache | StaticKVCache:
        """An empty cache for incremental decoding with ``forward(..., kv_cache=cache)``: one that grows, or
        with ``max_len`` a ``StaticKVCache`` of that many positions (static shapes, for CUDA graphs). ``prune``:
        layers with an attention pattern (S2, sliding window) keep only the keys later queries can read
        (``lmlab.models.s2_cache``)."""
        if max_len is not None:
            if prune:
                raise ValueError("a pruned KV cache grows; it cannot be combined with max_len (a static cache)")
            return StaticKVCache(len(self.layers), max_len)
        if not prune:
            return KVCache(len(self.layers))
        if self.recurrence is not None:
            raise ValueError("a recurrent-depth model keeps the plain KV cache (prune=False)")
        layers = [
            LayerKVCache()
            if pattern_of(b) is None
            else ShardedLayerKVCache(pattern_of(b), b.attn.n_heads, b.attn.n_kv_heads)
            for b in self.layers
        ]
        return PrunedKVCache(layers)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``input_ids`` [B, T] -> final-normed hidden states [B, T, d].

        ``position_ids`` default to 0..T−1 (restarting per document when ``doc_ids`` is
        given; continuing after the cached positions with ``kv_cache``). ``doc_ids`` [B, T]
        restricts attention to the same document. ``kv_cache`` is extended in place.
        """
        batch, seq = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        max_position = None
        if position_ids is None:
            if doc_ids is not None:
                position_ids = document_positions(doc_ids)
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
            max_position = past + seq - 1
        rope = self.rope(position_ids, max_position)  # cos, sin: [B, T, head_dim]
        key_mask = kv_cache.key_mask if kv_cache is not None else None
        if kv_cache is None and use_flex(self.cfg.attention_backend, input_ids.device, self.patterned):
            mask = MaskSpec(seq, doc_ids, input_ids.device)  # FlexAttention block masks (lmlab.models.flex)
        else:
            mask = attention_mask(seq, past, doc_ids, input_ids.device, key_mask)
        hidden = self.embed(input_ids)  # [B, T, d]
        if self.abacus is not None:  # a number may continue across cached calls: its run length is carried
            places, carry = self.abacus(input_ids, getattr(kv_cache, "digit_carry", None))
            hidden = hidden + places
            if kv_cache is not None:
                kv_cache.digit_carry = carry
        if self.recurrence is not None:
            return self.norm(self._recurrent_blocks(hidden, rope, mask, kv_cache))
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, rope, mask, None if kv_cache is None else kv_cache.layers[i])
        return self.norm(hidden)

    def _recurrent_blocks(
        self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, kv_cache
    ) -> torch.Tensor:
        """Prelude, the core iterated with input injection, coda (``lmlab.models.recurrent``). Cache slots:
        prelude blocks, then coda blocks, then each iteration's core blocks (so the coda's do not move with r)."""
        rc = self.recurrence.cfg
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise ValueError("a recurrent-depth model decodes with the growing KV cache (new_kv_cache())")
        n_pre, n_coda = rc.prelude_layers, rc.coda_layers
        core = self.layers[n_pre : len(self.layers) - n_coda]
        coda = self.layers[len(self.layers) - n_coda :]

        def cache(slot: int) -> LayerKVCache | None:
            return None if kv_cache is None else kv_cache.layer(slot)

        for i in range(n_pre):
            hidden = self.layers[i](hidden, rope, mask, cache(i))
        iterations, with_grad = self.recurrence.schedule()
        state = self.recurrence.initial_state(hidden)
        for step in range(iterations):
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= iterations - with_grad):
                state = self.recurrence.adapter(torch.cat((state, hidden), dim=-1))
                for j, block in enumerate(core):
                    state = block(state, rope, mask, cache(n_pre + n_coda + step * len(core) + j))
        for c, block in enumerate(coda):
            state = block(state, rope, mask, cache(n_pre + c))
        return state

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> embeddings [..., d] (times μP's α_in)."""
        hidden = self.tok_embeddings(input_ids)
        return hidden if self.input_mult is None else hidden * self.input_mult

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the output projection reads: the final hidden states, times μP's α_out/m_d (the logit multiplier,
        applied before the projection so a fused loss given only the hidden states and the weight sees it too)."""
        return hidden if self.logit_mult is None else hidden * self.logit_mult

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden [..., d] -> logits [..., V]."""
        hidden = self.head_input(hidden)
        if self.lm_head is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.lm_head(hidden)

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight [V, d]: the lm_head's, or the embedding matrix when tied."""
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        head_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """``input_ids`` [B, T] -> logits [B, T, V]; arguments as in ``forward_hidden``.

        ``head_fn(hidden [B, T, d], weight [V, d])`` replaces the output projection and ``forward`` returns
        its result: a loss that never forms the logits (``lmlab.objectives.fused_linear_ce``) then runs inside
        the module's forward, where DDP / FSDP2 hooks and ``torch.compile`` of the model cover it.
        """
        hidden = self.forward_hidden(input_ids, position_ids=position_ids, doc_ids=doc_ids, kv_cache=kv_cache)
        if head_fn is not None:
            return head_fn(self.head_input(hidden), self.head_weight())
        return self.output(hidden)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves out the token
        embedding and an untied lm_head (the convention of ``lmlab.models.counting``)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            if self.abacus is not None:
                total -= self.abacus.embedding.weight.numel()
            if self.lm_head is not None:
                total -= self.lm_head.weight.numel()
        return total
