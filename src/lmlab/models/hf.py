"""Hugging Face format interop: configs, weight names and safetensors checkpoints.

Supported architectures (all Llama-style: RMSNorm, rotate-half RoPE, SwiGLU, GQA):

- ``LlamaForCausalLM`` (also SmolLM and TinyLlama; tied or untied embeddings),
- ``MistralForCausalLM`` (a ``sliding_window`` shorter than the context is ``model.attention.kind=sliding``
  with that window in every layer: both attend to the last ``window`` positions, the query's own included;
  a sliding-window model without global layers, qk-norm or bias exports as Mistral),
- ``Qwen2ForCausalLM`` (bias on the q/k/v projections: ``model.attention.qkv_bias``),
- ``Qwen3ForCausalLM`` (RMSNorm on q and k over the head dimension before RoPE: ``model.attention.qk_norm``;
  its heads are wider than hidden/heads: ``model.head_size``),
- ``Phi3ForCausalLM`` (Llama with fused ``qkv_proj`` and ``gate_up_proj``, split on import and fused again on
  export, which writes Phi-3 for a model imported from it: ``model.hf_architecture``; a ``sliding_window`` as
  Mistral's; LongRoPE and partial rotary are refused),
- ``MixtralForCausalLM`` (``model.ffn.kind=moe`` in every block: softmax router, top-k gates renormalised to
  sum to 1; its sliding window as Mistral's),
- ``Qwen3MoeForCausalLM`` (qk-norm; MoE with ``renormalize = norm_topk_prob``; the blocks that
  ``mlp_only_layers`` / ``decoder_sparse_step`` make dense are ``model.ffn.layers``' complement, ``intermediate_size``
  wide; the experts are ``moe_intermediate_size`` wide). Qwen's per-layer windows (``use_sliding_window``) are
  exact on sequences no longer than the window, so ``max_seq_len`` is capped at it.

Llama 3.1/3.2's RoPE frequency scaling (``rope_type: llama3``) is ``model.rope_scaling`` (``lmlab.models.rope``);
other scalings (linear, dynamic, YaRN, LongRoPE) are refused. Gemma's families are refused with the reasons
(``_REFUSED_ARCHITECTURES``): they need components lmlab's decoder does not have.

Digit-place embeddings and recurrent depth have no Hugging Face architecture: such models do not export.

Mixture-of-experts checkpoints are read in both layouts: one tensor per expert, as the hub's checkpoints and
``save_pretrained`` (transformers 4, and 5 by default) write them (Mixtral ``block_sparse_moe.experts.E.w1/w3/w2``,
Qwen3-MoE ``mlp.experts.E.gate_proj/up_proj/down_proj``), and the fused 3-D tensors of transformers 5's modules
(``mlp.experts.gate_up_proj`` [E, 2·h, d], gate rows first, and ``mlp.experts.down_proj`` [E, d, h]); export
writes one tensor per expert, which every transformers version loads. The router is HF's ``gate``, our
``router``. Refused, each with its reason: Qwen2-MoE (a sigmoid-gated shared expert), OLMoE (qk-norm over the
whole projection, not per head), and, on export, what no family represents: shared experts, the SparseMixer
router, and a DeepSeek-V3 selection bias that is in effect (``bias_update_rate > 0`` with a non-zero
``expert_bias``; a zero bias routes exactly like none and is dropped). ``router_jitter_noise`` (Mixtral's
training-time input jitter) does not exist in lmlab and is ignored: in evaluation it is off in transformers too.
Training coefficients follow the families' definitions: HF's load-balancing loss sums its token fractions over
the k choices, k times lmlab's, so ``load_balance_coef = top_k · router_aux_loss_coef``; the families have no
router z-loss (``z_loss_coef = 0``).

In evaluation the routing is the same computation in both: router logits in the model's dtype, softmax in
float32, top-k of the probabilities, renormalisation in float32. The one documented difference is where the
gate multiplies the expert output in half precision: Mixtral multiplies in float32 and rounds the product to
the model dtype, lmlab (and Qwen3-MoE) round the gate to the model dtype first, a last-bit difference in
bfloat16 only; float32 is identical up to summation order.

Our parameter names are HF Llama's without the ``model.`` prefix and with shorter block
names (docs/CONTRACTS.md, Model); ``hf_to_lmlab_name`` / ``lmlab_to_hf_name`` map them.
Weights are read and written with safetensors only: nothing is ever unpickled, and no file outside
the model directory is opened, whatever its ``model.safetensors.index.json`` names (``shard_path``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, UserError
from lmlab.models.attention import GQAConfig
from lmlab.models.mlp import SwiGLUConfig, ffn_hidden_size
from lmlab.models.moe import MoEConfig
from lmlab.models.mup import exports_untied, fold_multipliers
from lmlab.models.rope import RopeScalingConfig
from lmlab.models.sparse_attention import SlidingWindowConfig

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Phi3ForCausalLM",
)
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# Mixture-of-experts families lmlab knows but cannot represent, with the reason (model_type -> architecture).
_REFUSED_MODEL_TYPES = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
}
_GEMMA = (
    "it scales the embeddings by sqrt(hidden_size), its RMSNorm multiplies by (1 + weight) and its MLP is GeGLU "
    "(gelu_pytorch_tanh), none of which lmlab's decoder has"
)
_REFUSED_ARCHITECTURES = {
    "Qwen2MoeForCausalLM": (
        "its shared expert is scaled by a learned sigmoid gate (shared_expert_gate), which lmlab's shared experts "
        "(model.ffn.shared_experts, always on, ungated) do not have"
    ),
    "OlmoeForCausalLM": (
        "its q/k RMSNorm spans the whole projection (all heads at once, OLMo style), while lmlab's "
        "model.attention.qk_norm normalises each head (Qwen3 style); it also may clip q/k/v (clip_qkv)"
    ),
    "GemmaForCausalLM": _GEMMA,
    "Gemma2ForCausalLM": (
        f"{_GEMMA}; it also soft-caps attention scores and final logits, normalises after each sublayer as well "
        "as before (sandwich norms) and alternates sliding-window and global layers"
    ),
    "Gemma3ForCausalLM": (
        f"{_GEMMA}; it also normalises after each sublayer as well as before (sandwich norms), interleaves "
        "sliding-window layers with their own RoPE base, and scales its queries by query_pre_attn_scalar"
    ),
    "Gemma3ForConditionalGeneration": "a vision-language model; lmlab trains text-only decoders (and Gemma 3's "
    "text decoder needs components lmlab does not have: see Gemma3ForCausalLM)",
}

# --------------------------------------------------------------------------- names

# (HF pattern, lmlab pattern); {i} is the layer index.
_LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "mlp_norm.weight"),
    *[(f"self_attn.{p}.{t}", f"attn.{p}.{t}") for p in ("q_proj", "k_proj", "v_proj") for t in ("weight", "bias")],
    ("self_attn.o_proj.weight", "attn.o_proj.weight"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
    *[(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")],
]
_GLOBAL_NAMES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_HF_TO_LMLAB = {hf: ours for hf, ours in _LAYER_NAMES}
_LMLAB_TO_HF = {ours: hf for hf, ours in _LAYER_NAMES}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LMLAB_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# MoE blocks, one tensor per expert (the hub's layout): (HF block name, {HF projection: ours}); the router is
# HF's ``{block}.gate`` and our ``mlp.router``. Only these families' checkpoints may hold these names.
_MOE_BLOCKS = {
    "MixtralForCausalLM": ("block_sparse_moe", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
    "Qwen3MoeForCausalLM": ("mlp", {p: p for p in ("gate_proj", "up_proj", "down_proj")}),
}
_EXPERT = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")
# transformers 5's fused experts ([E, 2·h, d] gate then up rows, and [E, d, h]) and the router beside them.
_HF_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")
# Our DeepSeek-V3 selection bias: a buffer with no HF counterpart (dropped on export if it changes nothing).
_EXPERT_BIAS = re.compile(r"^layers\.(\d+)\.mlp\.expert_bias$")
# Phi-3's fused projections: [q; k; v] rows and [gate; up] rows.
_FUSED_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$")
_FUSED_GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight$")
# Buffers some older HF checkpoints carry; they are recomputed, never weights.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hf_moe_name(rest: str, arch: str | None) -> str | None:
    """Our name (after ``layers.i.``) for the MoE weight ``rest`` of an ``arch`` block, or None."""
    if arch not in _MOE_BLOCKS:
        return None
    block, projections = _MOE_BLOCKS[arch]
    if not rest.startswith(block + "."):
        return None
    rest = rest[len(block) + 1 :]
    if rest == "gate.weight":
        return "mlp.router.weight"
    match = _EXPERT.match(rest)
    if match and match.group(2) in projections:
        return f"mlp.experts.{match.group(1)}.{projections[match.group(2)]}.weight"
    return None


def _lmlab_moe_name(rest: str, arch: str | None) -> str | None:
    """The ``arch`` name (after ``model.layers.i.``) of our MoE weight ``rest``, or None."""
    if arch not in _MOE_BLOCKS:
        return None
    block, projections = _MOE_BLOCKS[arch]
    if rest == "mlp.router.weight":
        return f"{block}.gate.weight"
    match = _EXPERT.match(rest.removeprefix("mlp."))
    hf_projection = {ours: hf for hf, ours in projections.items()}
    if rest.startswith("mlp.") and match and match.group(2) in hf_projection:
        return f"{block}.experts.{match.group(1)}.{hf_projection[match.group(2)]}.weight"
    return None


def hf_to_lmlab_name(name: str, arch: str | None = None) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attn.q_proj.weight`` etc.; the experts and
    router of a mixture-of-experts ``arch`` (``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``) too."""
    for hf, ours in _GLOBAL_NAMES:
        if name == hf:
            return ours
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _HF_TO_LMLAB:
        return f"layers.{match.group(1)}.{_HF_TO_LMLAB[match.group(2)]}"
    moe = _hf_moe_name(match.group(2), arch) if match else None
    if moe is not None:
        return f"layers.{match.group(1)}.{moe}"
    family = f"a {arch}" if arch in _MOE_BLOCKS else "a supported Llama-style model"
    raise CheckpointError(f"unexpected Hugging Face weight '{name}': not part of {family}")


def lmlab_to_hf_name(name: str, arch: str | None = None) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` etc.; our experts and
    router in the layout of the mixture-of-experts ``arch`` (one tensor per expert)."""
    for hf, ours in _GLOBAL_NAMES:
        if name == ours:
            return hf
    match = _LMLAB_LAYER.match(name)
    if match and match.group(2) in _LMLAB_TO_HF:
        return f"model.layers.{match.group(1)}.{_LMLAB_TO_HF[match.group(2)]}"
    moe = _lmlab_moe_name(match.group(2), arch) if match else None
    if moe is not None:
        return f"model.layers.{match.group(1)}.{moe}"
    raise ValueError(f"no Hugging Face name for parameter '{name}'" + ("" if arch else " (no architecture given)"))


def _unfuse_experts(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors (``save_pretrained(save_original_format=False)``, or a state dict
    taken from a live module) as one tensor per expert under ``arch``'s hub names; other tensors pass."""
    block, projections = _MOE_BLOCKS[arch]
    hf_projection = {ours: hf for hf, ours in projections.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _HF_FUSED.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix, kind = f"model.layers.{match.group(1)}.{block}", match.group(2)
        if kind == "gate.weight":  # the router: ``mlp.gate`` in the module, ``block_sparse_moe.gate`` on the hub
            out[f"{prefix}.gate.weight"] = tensor
            continue
        if tensor.dim() != 3 or (kind.endswith("gate_up_proj") and tensor.shape[1] % 2):
            raise CheckpointError(
                f"Hugging Face weight '{name}' has shape {tuple(tensor.shape)}; fused experts are "
                "[experts, 2·hidden, d_model] (gate_up_proj) or [experts, d_model, hidden] (down_proj)"
            )
        for e, weight in enumerate(tensor.unbind(0)):
            if kind.endswith("gate_up_proj"):
                gate, up = weight.chunk(2, dim=0)  # transformers: linear(x, gate_up).chunk(2, -1) -> gate, up
                out[f"{prefix}.experts.{e}.{hf_projection['gate_proj']}.weight"] = gate
                out[f"{prefix}.experts.{e}.{hf_projection['up_proj']}.weight"] = up
            else:
                out[f"{prefix}.experts.{e}.{hf_projection['down_proj']}.weight"] = weight
    return out


def _unfuse_dense(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3's ``qkv_proj`` ([q; k; v] rows) and ``gate_up_proj`` ([gate; up] rows) as separate projections."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        qkv, gate_up = _FUSED_QKV.match(name), _FUSED_GATE_UP.match(name)
        if qkv and tensor.shape[0] == q_rows + 2 * kv_rows:
            prefix = f"model.layers.{qkv.group(1)}.self_attn"
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            out.update({f"{prefix}.q_proj.weight": q, f"{prefix}.k_proj.weight": k, f"{prefix}.v_proj.weight": v})
        elif gate_up and tensor.dim() == 2 and tensor.shape[0] % 2 == 0:
            gate, up = tensor.chunk(2, dim=0)  # transformers: gate_up_proj(x).chunk(2, dim=-1) -> gate, up
            out[f"model.layers.{gate_up.group(1)}.mlp.gate_proj.weight"] = gate
            out[f"model.layers.{gate_up.group(1)}.mlp.up_proj.weight"] = up
        elif qkv or gate_up:
            raise CheckpointError(
                f"Hugging Face weight '{name}' has shape {tuple(tensor.shape)}, which does not split into the "
                f"projections of config.json ({q_rows} + 2 x {kv_rows} rows for qkv_proj, 2 x hidden for gate_up_proj)"
            )
        else:
            out[name] = tensor
    return out


def _moe_family(cfg: ModelConfig) -> str | None:
    """The mixture-of-experts family whose weight names ``cfg`` uses (None: a dense model)."""
    if not isinstance(cfg.ffn, MoEConfig):
        return None
    return "Qwen3MoeForCausalLM" if getattr(cfg.attention, "qk_norm", False) else "MixtralForCausalLM"


def hf_state_dict_to_lmlab(
    state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename HF weights to ours; a tied model drops ``lm_head.weight`` (it is the embedding). A MoE model
    (``arch``, or the family ``cfg`` implies) has its fused experts split and gets a zero ``expert_bias``."""
    arch = arch if arch in _MOE_BLOCKS else _moe_family(cfg)
    if arch in _MOE_BLOCKS:
        state = _unfuse_experts(state, arch)
    else:
        state = _unfuse_dense(state, cfg)
    out = {}
    for name, tensor in state.items():
        if _HF_IGNORED.search(name):
            continue
        ours = hf_to_lmlab_name(name, arch)
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[ours] = tensor
    if isinstance(cfg.ffn, MoEConfig):  # no HF family has a selection bias: ours starts at zero (no effect)
        for layer in range(cfg.n_layers):
            if cfg.ffn.is_sparse(layer):
                out[f"layers.{layer}.mlp.expert_bias"] = torch.zeros(cfg.ffn.experts)
    return out


def lmlab_state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Rename our weights to HF names (contiguous copies, safe to write with safetensors). A MoE model needs
    its ``cfg`` (the family decides the names); its ``expert_bias`` buffers are dropped when they change no
    routing decision (zero, or ``bias_update_rate = 0`` so lmlab ignores them too), else refused. A μP model
    needs its ``cfg`` too: its multipliers are folded into the weights (``lmlab.models.mup.fold_multipliers``)."""
    arch = export_architecture(cfg) if cfg is not None and isinstance(cfg.ffn, MoEConfig) else None
    if cfg is not None:
        state = fold_multipliers(state, cfg)
    out = {}
    for name, tensor in state.items():
        if _EXPERT_BIAS.match(name) and cfg is not None and isinstance(cfg.ffn, MoEConfig):
            if cfg.ffn.bias_update_rate > 0 and bool(tensor.detach().ne(0).any()):
                raise UserError(
                    f"cannot export {name}: the DeepSeek-V3 selection bias (model.ffn.bias_update_rate="
                    f"{cfg.ffn.bias_update_rate}) is non-zero and changes which experts are chosen, and no Hugging "
                    f"Face family lmlab writes ({arch}) has one, so the export would route differently. To export "
                    "without it, set model.ffn.bias_update_rate: 0 in the run's config.yaml (lmlab then routes "
                    "without the bias too; check the model's quality after that)"
                )
            continue
        out[lmlab_to_hf_name(name, arch)] = tensor.detach().contiguous().clone()
    if cfg is not None and arch is None and export_architecture(cfg) == "Phi3ForCausalLM":
        out = _fuse_dense(out)
    return out


# --------------------------------------------------------------------------- configs


def hf_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    """The supported architecture named by a ``config.json`` dict, or a ``UserError`` listing them."""
    archs = hf.get("architectures") or []
    model_type = str(hf.get("model_type"))
    arch = archs[0] if archs else _MODEL_TYPES.get(model_type, _REFUSED_MODEL_TYPES.get(model_type))
    if arch in _REFUSED_ARCHITECTURES:
        raise UserError(
            f"{source}: unsupported Hugging Face architecture '{arch}': {_REFUSED_ARCHITECTURES[arch]}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        found = arch or hf.get("model_type") or "unknown"
        raise UserError(
            f"{source}: unsupported Hugging Face architecture '{found}'; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScalingConfig]:
    """RoPE base and scaling from ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters``
    (transformers 5). Llama 3's scaling is ``model.rope_scaling``; any other (linear, dynamic, YaRN, LongRoPE …)
    and partial rotary (RoPE on part of each head) are refused: our RoPE rotates whole heads."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope = RopeScalingConfig()
    for settings in (params, scaling):
        kind = settings.get("rope_type", settings.get("type", "default"))
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if k not in settings]
            if missing:
                raise UserError(f"{source}: rope_scaling of type 'llama3' needs {', '.join(missing)}")
            rope = RopeScalingConfig(
                kind="llama3",
                factor=float(settings["factor"]),
                low_freq_factor=float(settings["low_freq_factor"]),
                high_freq_factor=float(settings["high_freq_factor"]),
                original_max_seq_len=int(settings["original_max_position_embeddings"]),
            )
        elif kind != "default":
            raise UserError(
                f"{source}: unsupported RoPE scaling '{kind}'; lmlab supports plain RoPE and Llama 3's 'llama3'"
            )
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise UserError(f"{source}: unsupported partial_rotary_factor={partial}; lmlab rotates every channel of a head")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), rope


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise UserError(f"{source} has no '{key}'")
    return hf[key]


def hf_config_to_model_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` equal in function to an HF ``config.json`` (as a dict; ``source`` names
    the file in error messages).

    Raises ``UserError`` for an unsupported architecture (listing the supported ones) and
    for features we do not implement: RoPE scaling, an activation other than SiLU, biases
    outside q/k/v, a head dimension other than hidden/heads.
    """
    arch = hf_architecture(hf, source)
    d_model = int(_require(hf, "hidden_size", source))
    n_heads = int(_require(hf, "num_attention_heads", source))
    n_kv_heads = int(hf.get("num_key_value_heads") or n_heads)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{source}: unsupported hidden_act '{act}'; only 'silu' (SwiGLU) is supported")
    head_dim = hf.get("head_dim")
    head_size = int(head_dim) if head_dim is not None and int(head_dim) * n_heads != d_model else None
    if head_size is None and d_model % n_heads:
        raise UserError(f"{source}: hidden_size={d_model} is not a multiple of num_attention_heads={n_heads}")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: unsupported mlp_bias=true; lmlab's MLP has no biases")
    attn_bias = arch == "Qwen2ForCausalLM"
    n_layers = int(_require(hf, "num_hidden_layers", source))
    if hf.get("attention_bias"):
        raise UserError(f"{source}: unsupported attention_bias=true; lmlab has no bias on o_proj")
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types") or []
    uses_window = (
        arch in _ONE_WINDOW  # a window whenever sliding_window is set
        or hf.get("use_sliding_window", False)
        or "sliding_attention" in layer_types
    )
    attention: GQAConfig | SlidingWindowConfig = GQAConfig(
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), qkv_bias=attn_bias
    )
    if uses_window and window is not None and int(window) < max_seq_len:
        if arch in _ONE_WINDOW:  # one window in every layer: lmlab's own
            attention = SlidingWindowConfig(window=int(window))
        else:  # Qwen's per-layer windows: equal to full causal attention on sequences no longer than the window
            max_seq_len = int(window)
    theta, rope_scaling = _rope(hf, source)
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", source)),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_size=head_size,
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attention=attention,
        ffn=_hf_ffn(hf, arch, n_layers, source),
        hf_architecture=arch,
    )


# Families whose sliding_window applies to every layer whenever it is set.
_ONE_WINDOW = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")


def _hf_ffn(hf: dict[str, Any], arch: str, n_layers: int, source: str) -> SwiGLUConfig | MoEConfig:
    """The FFN slot of an HF config: SwiGLU, or Mixtral's / Qwen3-MoE's experts (see the module docstring)."""
    if arch not in _MOE_BLOCKS:
        return SwiGLUConfig(hidden=int(_require(hf, "intermediate_size", source)))
    if arch == "MixtralForCausalLM":
        experts = int(_require(hf, "num_local_experts", source))
        hidden, dense_hidden, renormalize, sparse = int(_require(hf, "intermediate_size", source)), None, True, None
    else:  # Qwen3-MoE: the hub writes num_experts, transformers 5's save_pretrained num_local_experts
        experts = int(hf.get("num_experts", hf.get("num_local_experts")) or 0)
        dense_hidden = int(_require(hf, "intermediate_size", source))
        step = int(hf.get("decoder_sparse_step") or 1)
        dense_only = {int(i) for i in hf.get("mlp_only_layers") or []}
        sparse = [i for i in range(n_layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0]
        if not sparse:  # no expert anywhere: a dense Qwen3
            return SwiGLUConfig(hidden=dense_hidden)
        sparse = None if len(sparse) == n_layers else sparse
        hidden, renormalize = int(_require(hf, "moe_intermediate_size", source)), bool(hf.get("norm_topk_prob"))
    top_k = int(hf.get("num_experts_per_tok", 2))
    if experts < 2 or not 1 <= top_k <= experts:
        raise UserError(f"{source}: a mixture of {experts} experts with num_experts_per_tok={top_k} is not valid")
    return MoEConfig(
        experts=experts,
        top_k=top_k,
        hidden=hidden,
        router="softmax",
        renormalize=renormalize,
        layers=sparse,
        dense_hidden=dense_hidden,
        # HF's balancing loss sums over the k choices (k x ours); the families have no z-loss.
        load_balance_coef=top_k * float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
        z_loss_coef=0.0,
    )


def export_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that represents ``cfg`` exactly, or a ``UserError`` if none does."""
    attn, ffn = cfg.attention, cfg.ffn
    for section, name in ((cfg.abacus, "abacus"), (cfg.recurrence, "recurrence")):
        if section.enabled:
            raise UserError(
                f"cannot export model.{name}.enabled=true: no Hugging Face architecture has "
                f"{'digit-place (Abacus) embeddings' if name == 'abacus' else 'recurrent depth'}"
            )
    if cfg.position != "rope":
        raise UserError(
            f"cannot export model.position={cfg.position}: every Hugging Face family lmlab writes rotates q and k "
            "(RoPE); a model without position embeddings (NoPE) has no such format"
        )
    if isinstance(attn, SlidingWindowConfig):
        return _as_phi3(cfg, _sliding_export_architecture(cfg, attn))
    if not isinstance(attn, GQAConfig) or not isinstance(ffn, (SwiGLUConfig, MoEConfig)):
        raise UserError(
            f"cannot export model.attention.kind={attn.kind} / model.ffn.kind={ffn.kind} in Hugging Face "
            "Llama/Qwen/Mistral/Mixtral format: only dense or sliding-window GQA attention with a SwiGLU or MoE "
            "FFN is supported"
        )
    if attn.qk_norm and attn.qkv_bias:
        raise UserError(
            "cannot export model.attention.qk_norm together with model.attention.qkv_bias: no Hugging Face "
            "architecture has qk-norm with bias on q/k/v only (Llama has no qk-norm; Qwen3 biases o_proj too)"
        )
    if isinstance(ffn, MoEConfig):
        return _moe_export_architecture(cfg, ffn)
    if attn.qk_norm:
        return "Qwen3ForCausalLM"
    if attn.qkv_bias and cfg.head_size is not None:
        raise UserError(
            "cannot export model.attention.qkv_bias with model.head_size: Qwen2, the family with q/k/v bias, "
            "has no head_dim setting (its heads are hidden_size / num_attention_heads wide)"
        )
    return "Qwen2ForCausalLM" if attn.qkv_bias else _as_phi3(cfg, "LlamaForCausalLM")


def _as_phi3(cfg: ModelConfig, arch: str) -> str:
    """Phi-3 for a model imported from Phi-3 that it still represents (Llama or Mistral with fused projections,
    heads hidden / heads wide, no RoPE scaling), else ``arch``."""
    plain = arch in ("LlamaForCausalLM", "MistralForCausalLM") and cfg.head_size in (None, cfg.d_model // cfg.n_heads)
    if cfg.hf_architecture == "Phi3ForCausalLM" and plain and cfg.rope_scaling.kind == "none":
        return "Phi3ForCausalLM"
    return arch


def _fuse_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phi-3's layout: ``q/k/v_proj`` stacked as ``qkv_proj`` and ``gate/up_proj`` as ``gate_up_proj`` (the
    inverse of ``_unfuse_dense``)."""
    out = dict(state)
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^model\.layers\.(\d+)\.", k))})
    for i in layers:
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out[f"{attn}.qkv_proj.weight"] = torch.cat([out.pop(f"{attn}.{p}_proj.weight") for p in "qkv"])
        out[f"{mlp}.gate_up_proj.weight"] = torch.cat(
            [out.pop(f"{mlp}.gate_proj.weight"), out.pop(f"{mlp}.up_proj.weight")]
        )
    return out


def _sliding_export_architecture(cfg: ModelConfig, attn: SlidingWindowConfig) -> str:
    """Mistral (SwiGLU) or Mixtral (experts): one window in every layer, no qk-norm or q/k/v bias."""
    if attn.global_every or attn.qk_norm or attn.qkv_bias:
        raise UserError(
            "cannot export model.attention.kind=sliding with global_every, qk_norm or qkv_bias: the Hugging Face "
            "families lmlab writes with a window (Mistral, Mixtral) have the same window in every layer and "
            "neither qk-norm nor q/k/v bias"
        )
    ffn = cfg.ffn
    if isinstance(ffn, MoEConfig):  # Mixtral's checks, on the same model with full attention
        _moe_export_architecture(dataclasses.replace(cfg, attention=GQAConfig()), ffn)
        return "MixtralForCausalLM"
    if not isinstance(ffn, SwiGLUConfig):
        raise UserError(f"cannot export model.ffn.kind={ffn.kind} in Hugging Face format")
    return "MistralForCausalLM"


def _moe_export_architecture(cfg: ModelConfig, ffn: MoEConfig) -> str:
    """Qwen3-MoE with qk-norm (any renormalisation, dense blocks allowed); Mixtral without (experts in every
    block, renormalised gates); a ``UserError`` naming the setting for what neither family has."""
    if ffn.router != "softmax":
        raise UserError(
            f"cannot export model.ffn.router={ffn.router}: no Hugging Face family lmlab writes has GRIN's "
            "SparseMixer router (PhiMoE has it, with LayerNorm and biases lmlab does not have); only "
            "router=softmax exports (as Mixtral or Qwen3-MoE)"
        )
    if ffn.shared_experts:
        raise UserError(
            f"cannot export model.ffn.shared_experts={ffn.shared_experts}: no Hugging Face family has lmlab's "
            "always-on, ungated shared experts (Qwen2-MoE scales its shared expert by a learned sigmoid gate); "
            "only shared_experts=0 exports (as Mixtral or Qwen3-MoE)"
        )
    if cfg.attention.qkv_bias:
        raise UserError(
            "cannot export model.ffn.kind=moe with model.attention.qkv_bias: the Hugging Face MoE family with "
            "q/k/v bias (Qwen2-MoE) needs a sigmoid-gated shared expert; Mixtral and Qwen3-MoE have no bias"
        )
    if cfg.attention.qk_norm:
        return "Qwen3MoeForCausalLM"
    if not ffn.renormalize:
        raise UserError(
            "cannot export model.ffn.renormalize=false without model.attention.qk_norm: Mixtral always "
            "renormalises the top-k gates, and Qwen3-MoE (norm_topk_prob=false) has qk-norm; OLMoE's qk-norm "
            "spans all heads, unlike lmlab's"
        )
    if ffn.layers is not None and sorted(ffn.layers) != list(range(cfg.n_layers)):
        raise UserError(
            f"cannot export model.ffn.layers={ffn.layers} (dense blocks) without model.attention.qk_norm: "
            "Mixtral has experts in every block; Qwen3-MoE (mlp_only_layers) has dense blocks but also qk-norm"
        )
    return "MixtralForCausalLM"


def model_config_to_hf_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg``: Llama, Qwen2 with q/k/v bias, Qwen3 with qk-norm; a MoE FFN
    as Mixtral, or Qwen3-MoE with qk-norm."""
    arch = export_architecture(cfg)
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[arch]
    ffn = cfg.ffn
    if isinstance(ffn, MoEConfig):  # Mixtral: intermediate_size is the experts'; Qwen3-MoE: the dense blocks'
        expert_hidden = ffn.expert_hidden(cfg.d_model)
        dense_hidden = ffn.dense().hidden_size(cfg.d_model)
        intermediate = expert_hidden if arch == "MixtralForCausalLM" else dense_hidden
    else:
        intermediate = ffn_hidden_size(cfg)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": intermediate,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        **_rope_scaling_config(cfg),
        "tie_word_embeddings": cfg.tie_embeddings and not exports_untied(cfg),
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=cfg.attention.window)
    elif arch == "Phi3ForCausalLM":  # fused projections; a window in every layer when it has one
        window = cfg.attention.window if isinstance(cfg.attention, SlidingWindowConfig) else None
        out.update(sliding_window=window, original_max_position_embeddings=cfg.max_seq_len, partial_rotary_factor=1.0,
                   resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    elif arch == "MixtralForCausalLM":  # no jitter (lmlab has none)
        window = cfg.attention.window if isinstance(cfg.attention, SlidingWindowConfig) else None
        out.update(sliding_window=window, router_jitter_noise=0.0)
    else:  # Qwen2 / Qwen3 / Qwen3-MoE: full attention in every layer
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        out["attention_bias"] = False
    if isinstance(ffn, MoEConfig):
        out.update(
            num_experts_per_tok=ffn.top_k,
            router_aux_loss_coef=ffn.load_balance_coef / ffn.top_k,  # HF's loss is k times ours
            output_router_logits=False,
        )
        if arch == "MixtralForCausalLM":
            out["num_local_experts"] = ffn.experts
        else:
            out.update(
                num_experts=ffn.experts,
                moe_intermediate_size=expert_hidden,
                norm_topk_prob=ffn.renormalize,
                decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(cfg.n_layers) if not ffn.is_sparse(i)],
            )
    return out


def _rope_scaling_config(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_scaling`` as transformers 4 writes it (transformers 5 reads it into ``rope_parameters``)."""
    r = cfg.rope_scaling
    if r.kind == "none":
        return {}
    return {
        "rope_scaling": {
            "rope_type": r.kind,
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_seq_len,
        }
    }


# --------------------------------------------------------------------------- files


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """``HF_DIR/config.json`` as a dict (``UserError`` if missing or not JSON)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _allowed_roots(root: Path) -> list[Path]:
    """Where the files of the model directory ``root`` may really live: the directory itself and, for
    a snapshot of the Hugging Face hub cache (``REPO/snapshots/REV``, whose files are symlinks into
    ``REPO/blobs``), that repository's ``blobs`` folder."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return roots


def shard_path(root: Path, name: Any, source: Path) -> Path:
    """The file ``name`` of the model directory ``root`` (named by ``source``), refused with a
    ``CheckpointError`` unless it is a relative path that stays inside ``root`` once symlinks are followed."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(
            f"{source}: weight file {name!r} is not a relative path inside {root}; refusing to read it "
            "(the index may be malicious; weight_map values must be file names in the model directory)"
        )
    real = (root / name).resolve()
    if not any(real.is_relative_to(allowed) for allowed in _allowed_roots(root)):
        raise CheckpointError(
            f"{source}: weight file {name!r} resolves to {real}, outside {root}; refusing to read it "
            "(copy the file into the model directory instead of linking to it)"
        )
    return root / name


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors index."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map is not an object)")
    return weight_map


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights (HF names) from ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    Only safetensors are read; a directory with only ``pytorch_model.bin`` is refused
    (unpickling can run arbitrary code). Every shard named by the index is checked by
    ``shard_path`` before anything is opened.
    """
    from safetensors.torch import load_file

    root = Path(hf_dir)
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(shard_path(root, single.name, single)))
    if index.is_file():
        weight_map = _weight_map(index)
        shards = {name: shard_path(root, name, index) for name in weight_map.values()}
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            path = shards[shard]
            if not path.is_file():
                raise CheckpointError(f"{index} names shard '{shard}', which is missing from {root}")
            state.update(load_file(str(path)))
        missing = set(weight_map) - set(state)
        if missing:
            raise CheckpointError(f"{index}: weights missing from their shards: {', '.join(sorted(missing)[:5])}")
        return state
    if (root / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{root} has only pytorch_model.bin; lmlab reads safetensors only (never unpickles). Convert it with "
            "transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")


def load_hf_model(hf_dir: str | Path) -> tuple[torch.nn.Module, ModelConfig]:
    """Build a ``Decoder`` from an HF directory and load its weights (strict: every tensor must match)."""
    from lmlab.models.decoder import Decoder

    hf_cfg, source = read_hf_config(hf_dir), str(Path(hf_dir) / "config.json")
    cfg = hf_config_to_model_config(hf_cfg, source=source)
    state = hf_state_dict_to_lmlab(load_hf_state_dict(hf_dir), cfg, hf_architecture(hf_cfg, source))
    model = Decoder(cfg)
    check_state_dict(model, state, source=str(hf_dir))
    model.load_state_dict(state, strict=True)
    return model, cfg


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Missing, unexpected or mis-shaped tensors (against ``model``, which may live on the meta
    device) are a ``CheckpointError`` naming ``source``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: weight '{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
