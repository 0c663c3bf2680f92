"""QLoRA's frozen base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314):
the frozen linear layers of the transformer blocks stored as 4-bit NormalFloat (NF4) with double quantization of
the block scales, through ``bitsandbytes``; the adapters, norms, embeddings and output head stay in full
precision, and each quantized matrix is dequantized to ``compute_dtype`` for its product.

``bitsandbytes`` is an optional dependency (``pip install 'lmlab[qlora]'``), imported only here. Training with a
quantized base needs a CUDA device (``Job.start_model`` refuses others); the layers themselves also run on the
CPUs bitsandbytes supports, which is how they are tested without a GPU. A run's checkpoints hold only its
adapters, so loading it afterwards (generation, evaluation, export) adds them to the full-precision base.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.models.lora import LoRALinear


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("adapter.quantize=nf4 (QLoRA) needs bitsandbytes: pip install 'lmlab[qlora]'") from None
    return bitsandbytes


def frozen_linears(model: nn.Module) -> list[str]:
    """Names of the frozen ``nn.Linear`` layers inside the model's blocks: what QLoRA quantizes."""
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    found = []
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            trainable = any(p.requires_grad for p in module.parameters())
            if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and not trainable:
                found.append(f"layers.{i}.{name}")
    return found


@torch.no_grad()
def quantize_base(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every frozen linear layer of ``model``'s blocks by a ``bitsandbytes`` NF4 layer holding the same
    weight (quantized when the model is moved to its device); returns how many were replaced."""
    bnb = _bitsandbytes()
    names = frozen_linears(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear: nn.Linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantization of the block scales
            quant_type="nf4",
            device=linear.weight.device,
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(parent, child, quantized)
    return len(names)
