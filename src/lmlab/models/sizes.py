"""Named model sizes, from ~1M to ~1B parameters.

Each entry fixes the architecture dimensions; anything given explicitly in a config's
``model`` section overrides the named value. Parameter counts depend on the vocabulary
(see the README table, computed by ``lmlab.models.counting``).
"""

from __future__ import annotations

SIZES: dict[str, dict] = {
    # name: d_model, n_layers, n_heads, n_kv_heads
    "nano": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4),
    "micro": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=6),
    "tiny": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=8),
    "mini": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8),
    "small": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12),
    "medium": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16),
    "large": dict(d_model=1536, n_layers=24, n_heads=16, n_kv_heads=8),
    "xl": dict(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=8),
}
