"""QLoRA's 4-bit base (issue 13 item 4; Dettmers et al. 2023, arXiv 2305.14314): the frozen block weights become
bitsandbytes NF4 layers that compute close to the full-precision ones while only the adapters train; a run asks
for a CUDA device and says so on a CPU. The layers run here on bitsandbytes' CPU backend; QLoRA training itself
is exercised on a GPU (benchmarks/gpu_speed.sh)."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.models.lora import AdapterConfig, LoRALinear, adapter_parameters, apply_adapters
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.train.engine import execute

from helpers import model_cfg, tiny_config


def test_quantized_base_computes_close_and_only_adapters_train():
    bnb = pytest.importorskip("bitsandbytes")
    from lmlab.models.qlora import frozen_linears, quantize_base

    torch.manual_seed(0)
    model = Decoder(model_cfg(d_model=64, n_layers=2, n_heads=2, vocab_size=97, max_seq_len=32))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
    model.requires_grad_(False)
    apply_adapters(model, AdapterConfig(kind="lora", rank=4, targets=["q_proj", "v_proj"]))
    assert len(frozen_linears(model)) == 2 * 7  # q and v inside their adapters, k, o and the MLP as they are
    assert quantize_base(model, compute_dtype=torch.float32) == 14
    model.to("cpu")  # bitsandbytes quantizes on the move to a device
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    assert isinstance(model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head or model.tok_embeddings, bnb.nn.Linear4bit)
    out = model(ids)
    rel = (out - full).norm() / full.norm()
    assert 0 < rel < 0.2, rel  # NF4 is lossy, but the logits stay close
    out.logsumexp(-1).mean().backward()
    trained = adapter_parameters(model)
    assert all(p.grad is not None for n, p in trained.items() if "lora_A" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


def test_qlora_on_cpu_is_refused(tmp_path):
    execute(PretrainRecipe(), tiny_config("train.steps=2"), tmp_path / "base", quiet=True)
    cfg = tiny_config(f"init_from={tmp_path / 'base'}", "adapter.kind=lora", "adapter.quantize=nf4")
    with pytest.raises(ConfigError, match=r"CUDA.*adapter.quantize=none"):
        execute(PretrainRecipe(), cfg, tmp_path / "qlora", quiet=True)
    assert not (tmp_path / "qlora" / "checkpoints").exists()


def test_qlora_settings_are_checked():
    with pytest.raises(ConfigError, match="kind=lora"):
        tiny_config("adapter.quantize=nf4")
    with pytest.raises(ConfigError, match="quantize=none"):
        tiny_config("init_from=x", "adapter.kind=lora", "adapter.quantize=nf4", "adapter.init=corda_ipm")
    with pytest.raises(ConfigError, match="FSDP"):
        tiny_config("init_from=x", "adapter.kind=lora", "adapter.quantize=nf4", "distributed.strategy=fsdp")
