"""Float8 training of the transformer blocks' linear layers through torchao (``train.float8``).

On GPUs with float8 tensor cores (compute capability ≥ 8.9: H100/H200, L4, RTX 40xx) the matmuls of the
attention and FFN projections can run in float8 with per-tensor dynamic scaling, the weights staying in
their own dtype (Micikevicius et al. 2022, "FP8 Formats for Deep Learning", arXiv 2209.05433). torchao's
``convert_to_float8_training`` swaps those ``nn.Linear`` modules for its ``Float8Linear``, which keeps the
parameter names, so checkpoints and exports do not change. The embedding, the output head and the loss stay
in bf16/fp32: the head's logits feed a softmax over the vocabulary, where float8's 3-bit mantissa costs the
most and saves the least.

Conversion comes before activation checkpointing, ``torch.compile`` and FSDP2 (torchao's order). Without a
suitable GPU, or without torchao (the ``float8`` extra), the run stops before any work with one message.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import ConfigError

MIN_CAPABILITY = (8, 9)


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for the linears to convert: inside a transformer block, both sizes multiples of 16 (float8 GEMMs)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("layers.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def check_float8_device(device: torch.device) -> None:
    """Refuse devices without float8 tensor cores, with the reason."""
    if device.type != "cuda":
        raise ConfigError(f"train.float8 needs an NVIDIA GPU of compute capability >= 8.9; this run is on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"train.float8 needs compute capability >= 8.9 (H100/H200, L4, RTX 40xx); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} (set train.float8=false)"
        )


def apply_float8(model: nn.Module, device: torch.device, *, check_device: bool = True) -> list[str]:
    """Convert ``model``'s block linears to torchao ``Float8Linear`` in place; returns the converted names."""
    if check_device:
        check_float8_device(device)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ConfigError("train.float8 needs torchao: pip install 'lmlab[float8]' (or pip install torchao)") from err
    names = [name for name, module in model.named_modules() if float8_module_filter(module, name)]
    if not names:
        raise ConfigError("train.float8 found no block linear layer with sizes divisible by 16 to convert")
    convert_to_float8_training(model, module_filter_fn=float8_module_filter)
    return names
