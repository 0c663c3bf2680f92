"""Speed of the architecture variants (issue 14 item 6), as same-run ratios.

- **moe**: one training step (forward, backward, AdamW) of a decoder whose FFNs are mixtures of experts
  (E experts, top-k, each expert ``hidden/k`` wide) against the same decoder with dense SwiGLU FFNs ``hidden``
  wide: equal active parameters and tokens. Also the MoE layer alone (forward + backward) against Hugging Face's
  ``MixtralSparseMoeBlock`` with the same weights (the peer; ``--no-hf`` skips it).
- **attention**: one attention layer, forward + backward, dense causal SDPA against the masked variants at the
  same shape: a sliding window, S2-Attention's shards, and packed documents (a ``doc_ids`` mask). On a CPU all
  masked variants run SDPA with a materialised boolean mask; the speed-ups of the papers need block-sparse
  kernels: on CUDA the same masks also run as FlexAttention block masks (``*_flex``; ``documents_flex`` is the
  packed-document path that replaces today's dense [B, 1, T, T] mask).
- **topk**: one decode step (a single query against a KV cache of L positions) with dense SDPA against top-k
  attention keeping k = ``--topk-fraction`` of the keys (``lmlab.models.attention.topk_attention``, the exact
  form: all scores, then the top k).

Implementations alternate within each repetition (A B A B …) after discarded warmup calls; the figure is the
median over repetitions of the per-repetition ratio. Writes every number to ``--json``.

    python benchmarks/architectures.py --threads 2 --json arch-cpu.json
    python benchmarks/architectures.py --device cuda --json arch-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lmlab.config import ModelConfig  # noqa: E402
from lmlab.models.attention import Attention, attention_mask, topk_attention  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.models.flex import MaskSpec  # noqa: E402
from lmlab.models.masks import and_masks, causal, materialize  # noqa: E402
from lmlab.models.moe import MoEConfig  # noqa: E402
from lmlab.models.sparse_attention import S2Config, SlidingWindowConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def compare(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, calls: int, reps: int):
    """Per implementation: the median seconds per call, and the median per-repetition time ratio to the first."""
    for fn in fns.values():
        timed(fn, device, warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, calls))
    base = next(iter(fns))
    out = {}
    for name in fns:
        ratios = [b / t for b, t in zip(times[base], times[name])]  # > 1: faster than the first
        out[name] = {"seconds": statistics.median(times[name]), "speed_vs_" + base: statistics.median(ratios)}
    return out


def model_step(cfg: ModelConfig, batch: int, seq: int, device: torch.device) -> Callable[[], object]:
    torch.manual_seed(0)
    model = Decoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> None:
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:-1], ids.flatten()[1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_moe(args, device: torch.device) -> dict:
    d, hidden, experts, k = args.d_model, args.hidden, args.experts, args.top_k
    base = dict(vocab_size=4096, d_model=d, n_layers=args.layers, n_heads=d // 64, max_seq_len=args.seq)
    dense = ModelConfig(**base)
    dense.ffn.hidden = hidden
    moe = ModelConfig(**base, ffn=MoEConfig(experts=experts, top_k=k, hidden=hidden // k))
    out = {"model_step": compare({"dense": model_step(dense, args.batch, args.seq, device),
                                  "moe": model_step(moe, args.batch, args.seq, device)},
                                 device, args.warmup, args.calls, args.reps)}  # fmt: skip
    layer = Decoder(moe).layers[0].mlp.to(device)
    x = torch.randn(args.batch, args.seq, d, device=device, requires_grad=True)
    fns = {"lmlab_moe": lambda: layer(x).sum().backward()}
    if not args.no_hf:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden // k, num_local_experts=experts,
                               num_experts_per_tok=k, router_jitter_noise=0.0)  # fmt: skip
        peer = MixtralSparseMoeBlock(hf_cfg).to(device)
        copy_experts(layer, peer)
        with torch.no_grad():
            got, want = layer(x), peer(x)
            want = want[0] if isinstance(want, tuple) else want
        out["layer_max_abs_diff_vs_hf"] = float((got - want).abs().max())
        fns["hf_mixtral_block"] = lambda: (lambda y: (y[0] if isinstance(y, tuple) else y).sum().backward())(peer(x))
    out["layer_fwd_bwd"] = compare(fns, device, args.warmup, args.calls, args.reps)
    return out


@torch.no_grad()
def copy_experts(layer, peer) -> None:
    """lmlab's router and experts into HF's Mixtral block (fused ``gate_up_proj`` or per-expert ``w1/w3/w2``)."""
    peer.gate.weight.copy_(layer.router.weight)
    experts = peer.experts
    if hasattr(experts, "gate_up_proj"):  # transformers 5: [E, 2h, d] and [E, d, h]
        for e, expert in enumerate(layer.experts):
            experts.gate_up_proj[e].copy_(torch.cat((expert.gate_proj.weight, expert.up_proj.weight)))
            experts.down_proj[e].copy_(expert.down_proj.weight)
    else:
        for e, expert in enumerate(layer.experts):
            experts[e].w1.weight.copy_(expert.gate_proj.weight)
            experts[e].w3.weight.copy_(expert.up_proj.weight)
            experts[e].w2.weight.copy_(expert.down_proj.weight)


def bench_attention(args, device: torch.device) -> dict:
    d, heads = args.d_model, args.d_model // 64
    out = {}
    for seq in args.attn_seqs:
        cfg = ModelConfig(vocab_size=16, d_model=d, n_layers=2, n_heads=heads, max_seq_len=seq)
        variants = {
            "dense": None,
            "sliding": SlidingWindowConfig(window=seq // 8),
            "s2": S2Config(block_size=32, local_blocks=2, vert_stride=heads, dense_every=0),
        }
        x = torch.randn(args.batch, seq, d, device=device, requires_grad=True)
        rope = Decoder(cfg).rope(torch.arange(seq, device=device)[None], seq - 1)
        doc_ids = (torch.arange(seq, device=device) // (seq // 4)).expand(args.batch, seq)  # 4 documents per row
        fns = {}
        for name, variant in variants.items():
            layer = (variant.build(cfg, 0) if variant else Attention(d, heads, heads)).to(device)
            fns[name] = lambda layer=layer, x=x, rope=rope: layer(x, rope).sum().backward()
        doc_layer = Attention(d, heads, heads).to(device)
        mask = attention_mask(seq, 0, doc_ids, device)
        fns["documents"] = lambda layer=doc_layer, x=x, rope=rope, mask=mask: layer(x, rope, mask).sum().backward()
        if device.type == "cuda":  # the same masks as FlexAttention block masks (built per call, as in training)
            for name, variant in variants.items():
                layer = (variant.build(cfg, 0) if variant else Attention(d, heads, heads)).to(device)
                docs = doc_ids if name == "dense" else None
                label = "documents_flex" if name == "dense" else f"{name}_flex"
                fns[label] = lambda layer=layer, x=x, rope=rope, docs=docs, seq=seq: (
                    layer(x, rope, MaskSpec(seq, docs, device)).sum().backward()
                )
        out[f"T={seq}"] = compare(fns, device, args.warmup, args.calls, args.reps)
    return out


def bench_topk(args, device: torch.device) -> dict:
    heads, head_dim = args.d_model // 64, 64
    out = {}
    for length in args.cache_lengths:
        q = torch.randn(args.decode_batch, heads, 1, head_dim, device=device)
        k = torch.randn(args.decode_batch, heads, length, head_dim, device=device)
        v = torch.randn_like(k)
        top = max(1, int(args.topk_fraction * length))
        mask = materialize(and_masks(causal), 1, 1, torch.tensor([length - 1], device=device), length)
        fns = {
            "dense_sdpa": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            f"topk_{top}": lambda q=q, k=k, v=v, mask=mask, top=top: topk_attention(q, k, v, mask, top),
        }
        out[f"L={length}"] = compare(fns, device, args.warmup, args.calls * 10, args.reps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", default="moe,attention,topk")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=704, help="dense FFN width; each expert is hidden/top_k")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--attn-seqs", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024])
    p.add_argument("--cache-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--topk-fraction", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    parts = {"moe": bench_moe, "attention": bench_attention, "topk": bench_topk}
    for name in args.parts.split(","):
        result[name] = parts[name](args, device)
        print(name, json.dumps(result[name], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
