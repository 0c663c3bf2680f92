"""Parameter and FLOP counts of a decoder from its config alone (no model is built).

Conventions (used by ``summary.json`` and the scaling-law fitters):

- ``embedding`` parameters are the token embedding V·d plus the lm_head V·d when it is
  not tied; ``non_embedding`` is everything else (attention, MLP, biases and norms).
- Forward FLOPs per token follow Kaplan et al. 2020 (arXiv 2001.08361, Table 1):
  ``2·N_matmul + 2·n_layers·seq_len·d_attn + 2·d_model·V``, where N_matmul counts the
  weights of the q/k/v/o and MLP projections (biases and norms are negligible and left
  out), ``2·n_layers·seq_len·d_attn`` is Kaplan's attention term (d_attn = n_heads·head_dim
  = d_model unless ``head_size`` is set) with the causal mask *not* halving it, and ``2·d·V`` is the lm_head matmul.
  Each component contributes its own share (``ComponentCount`` from ``cfg.attention.count`` and
  ``cfg.ffn.count``), so a sparse variant counts only its active weights.
  Chinchilla (Hoffmann et al. 2022, App. F) counts the logits and the weighted sum of
  attention separately (4·seq_len·d per layer); we keep Kaplan's term.
- Training FLOPs = 3 × forward (backward ≈ 2 × forward), i.e. ≈ 6·N per token.

``python -m lmlab.models.counting`` prints the README table of the named sizes.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from lmlab.config import ModelConfig
from lmlab.models.component import ComponentCount
from lmlab.models.sizes import SIZES


def layer_counts(cfg: ModelConfig, seq_len: int) -> list[ComponentCount]:
    """Each layer's attention and FFN share, and its two norm gains."""
    out = []
    for layer in range(cfg.n_layers):
        out += [
            cfg.attention.count(cfg, seq_len, layer),
            cfg.ffn.count(cfg, seq_len, layer),
            ComponentCount(2 * cfg.d_model, 0),
        ]
    return out


def adapter_count(cfg: ModelConfig) -> ComponentCount:
    """The recurrent-depth input adapter (2d -> d), or nothing."""
    if not cfg.recurrence.enabled:
        return ComponentCount(0, 0)
    return ComponentCount(2 * cfg.d_model**2, 2 * cfg.d_model**2)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """``{"total", "non_embedding", "embedding", "active"}`` parameter counts (tied weights once); ``active``
    is what one token uses (all of them, except the unchosen experts of a mixture of experts). Digit-place
    embeddings (Abacus) count as embedding parameters."""
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.abacus.enabled:
        embedding += cfg.abacus.table_size * cfg.d_model
    layers = [*layer_counts(cfg, 0), adapter_count(cfg)]
    non_embedding = sum(c.params for c in layers) + cfg.d_model  # + final norm
    active = embedding + sum(c.active for c in layers) + cfg.d_model
    return {
        "total": embedding + non_embedding,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "active": active,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """``{"forward", "training"}`` FLOPs per token at context ``seq_len`` (conventions above). A recurrent-depth
    model counts its core blocks and adapter ``mean_iterations`` times (the expected cost of a training step
    is higher by one iteration's: r = Poisson + 1)."""
    per_layer = layer_counts(cfg, seq_len)
    if cfg.recurrence.enabled:
        rc = cfg.recurrence
        core = range(3 * rc.prelude_layers, 3 * (cfg.n_layers - rc.coda_layers))  # three counts per layer
        scale = [rc.mean_iterations if i in core else 1.0 for i in range(len(per_layer))]
        blocks = sum(s * c.forward_flops for s, c in zip(scale, per_layer))
        blocks += rc.mean_iterations * adapter_count(cfg).forward_flops
    else:
        blocks = sum(c.forward_flops for c in per_layer)
    forward = int(blocks) + 2 * cfg.d_model * cfg.vocab_size
    return {"forward": forward, "training": 3 * forward}


def size_config(name: str, vocab_size: int) -> ModelConfig:
    """The ``ModelConfig`` of a named size (``lmlab.models.sizes``) with a given vocabulary."""
    return replace(ModelConfig(), size=name, vocab_size=vocab_size, **SIZES[name])


def size_table(vocab_size: int = 32000, seq_len: int = 2048) -> list[dict]:
    """One row per named size: name, layers, width, heads, kv_heads, params, non_embedding_params,
    flops_per_token (training FLOPs per token, 3 × forward)."""
    rows = []
    for name in SIZES:
        cfg = size_config(name, vocab_size)
        params = count_params(cfg)
        rows.append(
            {
                "name": name,
                "layers": cfg.n_layers,
                "width": cfg.d_model,
                "heads": cfg.n_heads,
                "kv_heads": cfg.kv_heads,
                "params": params["total"],
                "non_embedding_params": params["non_embedding"],
                "flops_per_token": flops_per_token(cfg, seq_len)["training"],
            }
        )
    return rows


def _human(n: float, billions: str = "B") -> str:
    for unit, scale in ((billions, 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def markdown_table(rows: list[dict]) -> str:
    """Render ``size_table`` rows as a markdown table."""
    header = "| size | layers | width | heads | kv heads | params | non-embedding | training FLOPs/token |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['width']} | {r['heads']} | {r['kv_heads']} | "
            f"{_human(r['params'])} | {_human(r['non_embedding_params'])} | {_human(r['flops_per_token'], 'G')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlab.models.counting", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    print(markdown_table(size_table(args.vocab_size, args.seq_len)))
    print(f"\nVocabulary {args.vocab_size}, context {args.seq_len}; training FLOPs = 3 x forward (Kaplan et al. 2020).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
