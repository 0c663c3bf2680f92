"""A static-shape KV cache, and a single-token decode step that a CUDA graph can replay.

The dynamic cache (``lmlab.models.attention.KVCache``) grows by concatenation: every decode step sees keys
of a new length, allocates new tensors and builds a mask of a new shape. ``StaticKVCache`` instead
preallocates, per layer, key and value buffers [B, H_kv, L, D] for ``L = max_len`` positions, writes the
new positions in place at slot indices computed on the device (``index_copy_``), and attends over the whole
buffer under a boolean mask [B, 1, T, L] that hides the causal future (which includes every slot not yet
written) and left padding. A single-token decode step therefore has the same tensor shapes and addresses
at every step and reads nothing back to the host: the precondition for replaying it from a CUDA graph, and
for ``torch.compile`` without recompilation.

Slots: a row's slot s holds the s-th token fed to the cache (padding included), so all rows of a
left-padded batch write the same slots; positions (RoPE) stay per row, as with the dynamic cache.

The cache is interchangeable with the dynamic one in ``Decoder.forward(..., kv_cache=...)``
(``Decoder.new_kv_cache(max_len=L)``): the same ``key_mask`` contract and the same results (the masked slots
get exactly zero attention weight, so only summation order differs). ``doc_ids`` (packed documents) are
not supported with it.

``decode_step`` is the decoder's forward for one token per row with this cache (embedding, blocks, final
norm, head) without the host-side work of ``Decoder.forward_hidden`` (reading the cache length and the largest
position back, building the dense mask). ``StaticDecodeStep`` runs it eagerly or replays it from a
``torch.cuda.CUDAGraph`` (NVIDIA, "CUDA Graphs", CUDA C++ Programming Guide; PyTorch ``torch.cuda.graphs``):

- warmup on a side stream (lazy initialisation, kernel selection, the RoPE table), then one capture;
- static inputs (tokens and positions [B, 1]) are copied into before each replay; the static output
  (logits [B, V]) is overwritten by the next replay, so the caller samples from it first;
- the warmup runs write the slot the next real step writes again, and the cache position is rewound.

Why a hand-captured graph rather than ``torch.compile(mode="reduce-overhead")``: the step is already
static-shape and free of host synchronisation, so capture alone removes the per-kernel launch cost that
dominates small-batch decoding; it needs no compilation (seconds to minutes per shape), no Inductor/Triton,
and it keeps the model code plain (docs/design.md, principle 1: ``torch.compile`` is applied from outside).
The buffers the graph reads (cache, inputs) and writes (logits) are ours and explicit, so a captured step
can be reused across ``generate`` calls of the same shape. Kernel fusion, what Inductor would add, is
orthogonal: compile the blocks from outside (``block.compile()``, as ``train.compile`` does) and the graph
captures the fused kernels (``benchmarks/decode.py --compile``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmlab.models.decoder import Decoder


class StaticLayerKVCache:
    """One layer's key and value buffers [B, H_kv, L, D] (allocated at the first write, None before).

    They are attributes of this object rather than entries of a list indexed by the layer number, so a
    compiled block reads them without specialising on the layer (one graph serves every block).
    """

    def __init__(self, parent: StaticKVCache, first: bool, last: bool) -> None:
        self.parent = parent
        self.first = first  # the first and last layers open and close a ``Decoder.forward`` call
        self.last = last
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def query_slots(self) -> torch.Tensor | None:
        """The slots [T] of the current call's queries (their positions among the buffers' keys)."""
        return self.parent._slots

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the new positions [B, H_kv, T, D] at the cache's current slots; return the whole buffers
        [B, H_kv, L, D] and the cache's mask [B, 1, T, L] (which replaces ``mask``, made for a growing cache)."""
        parent = self.parent
        if parent._auto and self.first:
            parent._begin_call(keys)
        if self.keys is None:
            batch, heads, _, dim = keys.shape
            shape = (batch, heads, parent.max_len, dim)
            self.keys = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            self.values = torch.zeros(shape, dtype=values.dtype, device=values.device)
        self.keys.index_copy_(2, parent._slots, keys)
        self.values.index_copy_(2, parent._slots, values)
        if parent._auto and self.last:
            parent.end(keys.shape[2])
        return self.keys, self.values, parent._mask


class StaticKVCache:
    """Preallocated keys and values of every layer for ``max_len`` positions; see the module docstring.

    Buffers are allocated at the first write, with the batch size, dtype and device of the first keys
    (so autocast's dtype is followed). ``position`` is a 0-d int64 device tensor, the number of slots written;
    ``length`` reads it back (a host synchronisation on a GPU). ``key_mask`` [B, T_past + T] (True = a real
    token) has the contract of ``KVCache.key_mask``: the caller sets it to cover the positions of a forward
    call before making it; slots beyond what it covers count as real.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"a static KV cache needs max_len >= 1, got {max_len}")
        self.n_layers = n_layers
        self.max_len = max_len
        self.layers = [StaticLayerKVCache(self, i == 0, i == n_layers - 1) for i in range(n_layers)]
        self.position: torch.Tensor | None = None  # 0-d int64: slots written so far
        self._real: torch.Tensor | None = None  # [B, L] bool: slot holds a real token (not left padding)
        self._slot_ids: torch.Tensor | None = None  # [L] int64: 0 .. L-1
        self._key_mask: torch.Tensor | None = None  # as last set by the caller
        self._slots: torch.Tensor | None = None  # [T] slots of the current forward call
        self._mask: torch.Tensor | None = None  # [B, 1, T, L] mask of the current forward call
        # True: a forward call opens and closes itself (the first layer computes the slots and the mask, the
        # last one advances ``position``); ``decode_step`` does both itself, around the blocks.
        self._auto = True

    @property
    def batch_size(self) -> int | None:
        return None if self._real is None else self._real.shape[0]

    @property
    def length(self) -> int:
        """Slots written so far (a host synchronisation when the cache is on a GPU)."""
        return 0 if self.position is None else int(self.position)

    @property
    def key_mask(self) -> torch.Tensor | None:
        return self._key_mask

    @key_mask.setter
    def key_mask(self, value: torch.Tensor | None) -> None:
        if value is None:
            if self._real is not None:
                self._real.fill_(True)
        else:
            covered = value.shape[1]
            if covered > self.max_len:
                raise ValueError(f"key_mask covers {covered} positions; the static cache holds {self.max_len}")
            self._allocate_state(value.shape[0], value.device)
            self._real[:, :covered].copy_(value)
            self._real[:, covered:].fill_(True)
        self._key_mask = value

    def reset(self) -> None:
        """Forget every position (in place: buffers keep their addresses, so a captured graph stays valid)."""
        if self.position is not None:
            self.position.zero_()
            self._real.fill_(True)
        self._key_mask = None

    def _allocate_state(self, batch: int, device: torch.device) -> None:
        if self._real is not None:
            if self._real.shape[0] != batch or self._real.device != device:
                raise ValueError(
                    f"this static cache holds a batch of {self._real.shape[0]} on {self._real.device}; "
                    f"got {batch} on {device}"
                )
            return
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._real = torch.ones(batch, self.max_len, dtype=torch.bool, device=device)
        self._slot_ids = torch.arange(self.max_len, device=device)

    def begin(self, q_len: int) -> None:
        """Slots and mask for the next ``q_len`` positions (device work only, no host synchronisation).

        Query slot q may see slot s when s <= q and s holds a real token; it always sees itself (so a padding
        query's row is never empty, as in ``attention_mask``). Unwritten slots are all > q: hidden.
        """
        slots = self.position + torch.arange(q_len, device=self.position.device)  # [T]
        ids = self._slot_ids  # [L]
        seen = ids[None, :] <= slots[:, None]  # [T, L]
        itself = ids[None, :] == slots[:, None]  # [T, L]
        self._mask = ((seen[None] & self._real[:, None, :]) | itself[None])[:, None]  # [B, 1, T, L]
        self._slots = slots

    def end(self, q_len: int) -> None:
        self.position.add_(q_len)

    def _begin_call(self, keys: torch.Tensor) -> None:
        """The first layer of a ``Decoder.forward`` call: allocate, check the room left, open the call."""
        batch, _, q_len, _ = keys.shape
        self._allocate_state(batch, keys.device)
        if not torch.compiler.is_compiling():  # a compiled block must not read the device back
            written = int(self.position)
            if written + q_len > self.max_len:
                raise ValueError(
                    f"static KV cache full: {written} of {self.max_len} positions written, {q_len} more given"
                )
        self.begin(q_len)


def decode_step(model: Decoder, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token per row: ``tokens`` and ``positions`` [B, 1] (int64, on the model's device) -> logits [B, V].

    The same computation as ``model(tokens, position_ids=positions, kv_cache=cache)[:, -1]`` (a test checks
    it), with identical shapes at every step and no host synchronisation. The cache must already hold a
    prefill (its batch size and device are set) and have a free slot; positions must be < ``cache.max_len``
    (RoPE's table is looked up with that bound instead of reading the largest position back).
    """
    cache._auto = False
    try:
        cache.begin(1)
        rope = model.rope(positions, cache.max_len - 1)  # cos, sin: [B, 1, head_dim]
        hidden = model.embed(tokens)  # [B, 1, d]
        for layer, layer_cache in zip(model.layers, cache.layers, strict=True):
            hidden = layer(hidden, rope, None, layer_cache)
        cache.end(1)
        return model.output(model.norm(hidden))[:, -1]  # [B, V]
    finally:
        cache._auto = True


class StaticDecodeStep:
    """Next-token logits for one new token per row, ``step(tokens [B], positions [B]) -> [B, V]``, run
    eagerly or (``cuda_graph=True``, CUDA only) replayed from a graph captured at the first call.

    ``start(written)`` is called after every prefill with the number of slots it wrote (known on the host:
    the padded prompt width), so the room left is checked without reading the device. The logits tensor a
    graph returns is overwritten by the next call.
    """

    WARMUP = 3  # eager runs on a side stream before the capture

    def __init__(self, model: Decoder, cache: StaticKVCache, *, cuda_graph: bool = False) -> None:
        if cuda_graph and (cache.position is None or cache.position.device.type != "cuda"):
            raise ValueError("a CUDA-graph decode step needs a static cache filled on a CUDA device")
        self._model = weakref.ref(model)  # weak: a step kept for reuse must not keep its model alive
        self.cache = cache
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self._tokens: torch.Tensor | None = None  # [B, 1] static inputs of the graph
        self._positions: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None  # [B, V] static output of the graph
        self._kept: list[torch.Tensor] = []
        self._written = cache.length

    @property
    def model(self) -> Decoder:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decode step was deleted")
        return model

    def start(self, written: int) -> None:
        self._written = written

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._written >= self.cache.max_len:
            raise ValueError(f"static KV cache full: all {self.cache.max_len} positions written")
        tokens, positions = tokens.reshape(-1, 1), positions.reshape(-1, 1)
        if not self.cuda_graph:
            logits = decode_step(self.model, self.cache, tokens, positions)
        else:
            if self.graph is None:
                self._capture(tokens, positions)
            self._tokens.copy_(tokens)
            self._positions.copy_(positions)
            self.graph.replay()
            logits = self._logits
        self._written += 1
        return logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self._tokens, self._positions = tokens.clone(), positions.clone()
        cache, written = self.cache, self._written
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                decode_step(self.model, cache, self._tokens, self._positions)
                cache.position.fill_(written)  # rewind: slot `written` is written again by the real step
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the position does not move
            self._logits = decode_step(self.model, cache, self._tokens, self._positions)
        self.graph = graph
        # The graph reads by address. Parameters are checked by the caller (``generation``); tensors held as
        # plain attributes (RoPE's lazily built tables) are kept alive here, so rebuilding one cannot free memory
        # the graph reads (the old table still covers every position of this cache).
        self._kept = [v for m in self.model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
