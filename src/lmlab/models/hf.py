"""Hugging Face format interop: configs, weight names and safetensors checkpoints.

Supported architectures (all Llama-style: RMSNorm, rotate-half RoPE, SwiGLU, GQA):

- ``LlamaForCausalLM`` (also SmolLM and TinyLlama; tied or untied embeddings),
- ``MistralForCausalLM`` (sliding-window attention is exact as long as sequences are not
  longer than the window, so ``max_seq_len`` is capped at the window),
- ``Qwen2ForCausalLM`` (bias on the q/k/v projections: ``model.attention.qkv_bias``),
- ``Qwen3ForCausalLM`` (RMSNorm on q and k over the head dimension before RoPE: ``model.attention.qk_norm``).

Our parameter names are HF Llama's without the ``model.`` prefix and with shorter block
names (docs/CONTRACTS.md, Model); ``hf_to_lmlab_name`` / ``lmlab_to_hf_name`` map them.
Weights are read and written with safetensors only: nothing is ever unpickled, and no file outside
the model directory is opened, whatever its ``model.safetensors.index.json`` names (``shard_path``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, UserError
from lmlab.models.attention import GQAConfig
from lmlab.models.mlp import SwiGLUConfig, ffn_hidden_size

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
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
# Buffers some older HF checkpoints carry; they are recomputed, never weights.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_to_lmlab_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attn.q_proj.weight`` etc."""
    for hf, ours in _GLOBAL_NAMES:
        if name == hf:
            return ours
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _HF_TO_LMLAB:
        return f"layers.{match.group(1)}.{_HF_TO_LMLAB[match.group(2)]}"
    raise CheckpointError(f"unexpected Hugging Face weight '{name}': not part of a supported Llama-style model")


def lmlab_to_hf_name(name: str) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` etc."""
    for hf, ours in _GLOBAL_NAMES:
        if name == ours:
            return hf
    match = _LMLAB_LAYER.match(name)
    if match and match.group(2) in _LMLAB_TO_HF:
        return f"model.layers.{match.group(1)}.{_LMLAB_TO_HF[match.group(2)]}"
    raise ValueError(f"no Hugging Face name for parameter '{name}'")


def hf_state_dict_to_lmlab(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF weights to ours; a tied model drops ``lm_head.weight`` (it is the embedding)."""
    out = {}
    for name, tensor in state.items():
        if _HF_IGNORED.search(name):
            continue
        ours = hf_to_lmlab_name(name)
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[ours] = tensor
    return out


def lmlab_state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our weights to HF names (contiguous copies, safe to write with safetensors)."""
    return {lmlab_to_hf_name(name): tensor.detach().contiguous().clone() for name, tensor in state.items()}


# --------------------------------------------------------------------------- configs


def hf_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    """The supported architecture named by a ``config.json`` dict, or a ``UserError`` listing them."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(str(hf.get("model_type")))
    if arch not in SUPPORTED_ARCHITECTURES:
        found = arch or hf.get("model_type") or "unknown"
        raise UserError(
            f"{source}: unsupported Hugging Face architecture '{found}'; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (transformers 5);
    any scaling (linear, dynamic, YaRN, Llama-3 …) is refused: our RoPE is the plain one."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for source in (params, scaling or {}):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise UserError(f"{source}: unsupported RoPE scaling '{kind}'; only plain RoPE is supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


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
    if head_dim is not None and int(head_dim) * n_heads != d_model:
        raise UserError(
            f"{source}: unsupported head_dim={head_dim}; lmlab needs head_dim = hidden_size / "
            f"num_attention_heads = {d_model // n_heads}"
        )
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: unsupported mlp_bias=true; lmlab's MLP has no biases")
    attn_bias = arch == "Qwen2ForCausalLM"
    if hf.get("attention_bias"):
        raise UserError(f"{source}: unsupported attention_bias=true; lmlab has no bias on o_proj")
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types") or []
    uses_window = (
        arch == "MistralForCausalLM" or hf.get("use_sliding_window", False) or "sliding_attention" in layer_types
    )
    if uses_window and window is not None and int(window) < max_seq_len:
        # Sliding-window attention equals full causal attention on sequences no longer than the window.
        max_seq_len = int(window)
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", source)),
        d_model=d_model,
        n_layers=int(_require(hf, "num_hidden_layers", source)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        max_seq_len=max_seq_len,
        rope_theta=_rope_theta(hf, source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attention=GQAConfig(qk_norm=arch == "Qwen3ForCausalLM", qkv_bias=attn_bias),
        ffn=SwiGLUConfig(hidden=int(_require(hf, "intermediate_size", source))),
    )


def export_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that represents ``cfg`` exactly, or a ``UserError`` if none does."""
    attn, ffn = cfg.attention, cfg.ffn
    if not isinstance(attn, GQAConfig) or not isinstance(ffn, SwiGLUConfig):
        raise UserError(
            f"cannot export model.attention.kind={attn.kind} / model.ffn.kind={ffn.kind} in Hugging Face "
            "Llama/Qwen format: only dense GQA attention with a SwiGLU FFN is supported"
        )
    if attn.qk_norm and attn.qkv_bias:
        raise UserError(
            "cannot export model.attention.qk_norm together with model.attention.qkv_bias: no Hugging Face "
            "architecture has qk-norm with bias on q/k/v only (Llama has no qk-norm; Qwen3 biases o_proj too)"
        )
    if attn.qk_norm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if attn.qkv_bias else "LlamaForCausalLM"


def model_config_to_hf_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg``: Llama, Qwen2 with q/k/v bias, Qwen3 with qk-norm."""
    arch = export_architecture(cfg)
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[arch]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
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
    else:  # Qwen2 / Qwen3: full attention in every layer
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if arch == "Qwen3ForCausalLM":
        out["attention_bias"] = False
    return out


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

    cfg = hf_config_to_model_config(read_hf_config(hf_dir), source=str(Path(hf_dir) / "config.json"))
    state = hf_state_dict_to_lmlab(load_hf_state_dict(hf_dir), cfg)
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
