"""LoRA / DoRA adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<Hugging Face module>.lora_A.weight`` (``lora_B.weight``, ``lora_magnitude_vector``), the layout
``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the exported base model, and that lmlab reads back.

Only what ``lmlab.models.lora`` represents is read: plain LoRA or DoRA on linear layers, one rank and alpha for all
of them, no trained biases or extra modules (``modules_to_save``); anything else is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import CheckpointError
from lmlab.models import hf
from lmlab.models.lora import AdapterConfig, LoRALinear, adapter_parameters, apply_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _split(name: str) -> tuple[str, str]:
    """``layers.0.attn.q_proj.lora_A.weight`` -> (``layers.0.attn.q_proj``, ``.lora_A.weight``)."""
    at = name.index(".lora_")
    return name[:at], name[at:]


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under PEFT's names for the Hugging Face layout of an lmlab decoder. A CorDA start
    (B A − B₀A₀) is written as one adapter of twice the rank, A' = [A; A₀], B' = [B, −B₀]."""
    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        a, b = layer.lora_A.weight, layer.lora_B.weight
        if layer.lora_A0 is not None:
            a, b = torch.cat([a, layer.lora_A0]), torch.cat([b, -layer.lora_B0], dim=1)
        tensors = {".lora_A.weight": a, ".lora_B.weight": b}
        if layer.lora_magnitude_vector is not None:
            tensors[".lora_magnitude_vector"] = layer.lora_magnitude_vector
        hf_module = hf.lmlab_to_hf_name(f"{name}.weight")[: -len(".weight")]
        for rest, tensor in tensors.items():
            out[f"{PREFIX}{hf_module}{rest}"] = tensor.detach().to("cpu").contiguous().clone()
    return out


def _peft_rank_alpha(model: nn.Module, cfg: AdapterConfig) -> tuple[int, float]:
    """The rank and alpha PEFT must read to compute lmlab's scaling (doubled rank for a CorDA start)."""
    corda = any(isinstance(m, LoRALinear) and m.lora_A0 is not None for m in model.modules())
    if not corda:
        return cfg.rank, cfg.alpha
    rank = 2 * cfg.rank
    return rank, cfg.scaling * (rank**0.5 if cfg.rslora else rank)


def save_peft_adapter(model: nn.Module, cfg: AdapterConfig, out_dir: str | Path, base: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT adapter directory; ``base`` is recorded as the base model's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # lmlab's projections carry the Llama family's names (q_proj … down_proj), PEFT's target_modules
    targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    rank, alpha = _peft_rank_alpha(model, cfg)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.kind == "dora",
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": base,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(peft_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def adapter_config_of(config: dict[str, Any], where: str) -> AdapterConfig:
    """An ``AdapterConfig`` from a PEFT ``adapter_config.json`` (``CheckpointError`` for what lmlab lacks)."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer ranks or alphas (rank_pattern / alpha_pattern)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (GPT-2 style Conv1D layers)")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        problems.append(f"target_modules {targets!r} (a list of module names is needed)")
    if problems:
        raise CheckpointError(f"{where}: unsupported PEFT adapter: {'; '.join(problems)}")
    return AdapterConfig(
        kind="dora" if config.get("use_dora") else "lora",
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
        targets=sorted(targets),  # the same module names in lmlab
    )


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterConfig:
    """Wrap ``model`` (an lmlab decoder) with the adapters of a PEFT directory and load their weights."""
    src = Path(adapter_dir)
    config_path, weights_path = src / CONFIG_FILE, src / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{src}: not a PEFT adapter directory ({path.name} is missing)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    cfg = adapter_config_of(config, str(config_path))
    apply_adapters(model, cfg)
    weights = load_file(str(weights_path))
    expected = adapter_parameters(model)
    state = {}
    for key, tensor in weights.items():
        if not key.startswith(PREFIX) or ".lora_" not in key:
            raise CheckpointError(f"{weights_path}: unexpected adapter weight {key!r}")
        module, rest = _split(key[len(PREFIX) :])
        rest = rest.replace(".default", "")  # some PEFT versions keep the adapter name in saved keys
        state[f"{hf.hf_to_lmlab_name(f'{module}.weight')[: -len('.weight')]}{rest}"] = tensor
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{weights_path}: adapter weights do not match its config (missing {missing[:3]}, extra {extra[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)}"
                )
            expected[name].copy_(tensor)
    return cfg
