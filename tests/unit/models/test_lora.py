"""LoRA / DoRA adapters: the forward and merged weight by hand, and PEFT parity both ways (an lmlab adapter written
in PEFT's format loads with ``peft.PeftModel`` with equal logits; a PEFT adapter loads into lmlab with equal
logits), on random-weight Llama models built by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.lora import AdapterConfig, LoRALinear, adapter_parameters, apply_adapters, merge_adapters


def _randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_lora_forward_and_merge_by_hand():
    base = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, AdapterConfig(kind="lora", rank=1, alpha=2.0))  # s = 2
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [0.0]]))
    # W x + b = (7.5, -1.5); s·B A x = 2·(1+2)·(1, 0) = (6, 0)
    torch.testing.assert_close(layer(x), torch.tensor([[13.5, -1.5]]))
    torch.testing.assert_close(layer.merged_weight(), torch.tensor([[3.0, 2.0, 2.0], [0.0, 1.0, -1.0]]))
    rs = LoRALinear(nn.Linear(3, 2), AdapterConfig(kind="lora", rank=4, alpha=2.0, rslora=True))
    assert rs.scaling == pytest.approx(1.0)  # alpha / sqrt(r)


def test_dora_forward_and_merge_by_hand():
    """W rows (3, 4) and (0, 1): m starts at their norms (5, 1). With s·B A adding (1, 0) to row 1 only,
    W' = ((4, 4), (0, 1)), ‖W'‖ = (√32, 1), merged row 1 = 5/√32 · (4, 4)."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    layer = LoRALinear(base, AdapterConfig(kind="dora", rank=1, alpha=1.0))
    assert layer.lora_magnitude_vector.tolist() == [5.0, 1.0]
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [0.0]]))
    expected = torch.tensor([[5 / 32**0.5 * 8.0, 1.0]])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged_weight() @ x[0], expected[0])


def test_targets_and_merging_a_decoder():
    from lmlab.models.decoder import Decoder

    from helpers import model_cfg

    torch.manual_seed(0)
    model = Decoder(model_cfg(vocab_size=50, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=16)).eval()
    x = torch.randint(0, 50, (2, 9))
    names = apply_adapters(model, AdapterConfig(kind="lora", rank=2, targets=["q_proj", "layers.1.mlp.down_proj"]))
    assert names == ["layers.0.attn.q_proj", "layers.1.attn.q_proj", "layers.1.mlp.down_proj"]
    assert len(adapter_parameters(model)) == 6
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    assert not adapter_parameters(model)
    with pytest.raises(ConfigError, match=r"\['w_proj'\] match no linear layer"):
        apply_adapters(model, AdapterConfig(kind="lora", targets=["q_proj", "w_proj"]))


transformers = pytest.importorskip("transformers")


@pytest.fixture()
def llama():
    from unit.models.test_hf import COMMON, _randomize

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)
    ).eval()
    _randomize(model, seed=1)
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lmlab_adapter_loads_in_peft_with_equal_logits(llama, kind, tmp_path):
    peft = pytest.importorskip("peft")
    from lmlab.models import hf
    from lmlab.models.peft_io import save_peft_adapter

    llama.save_pretrained(tmp_path / "base")
    model, _ = hf.load_hf_model(tmp_path / "base")
    cfg = AdapterConfig(kind=kind, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    apply_adapters(model, cfg)
    _randomize_adapters(model)
    save_peft_adapter(model.eval(), cfg, tmp_path / "adapter", base=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["use_dora"] == (kind == "dora")
    theirs = peft.PeftModel.from_pretrained(llama, tmp_path / "adapter").eval()
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_adapter_loads_into_lmlab_with_equal_logits(llama, kind, tmp_path):
    peft = pytest.importorskip("peft")
    from lmlab.models import hf
    from lmlab.models.peft_io import load_peft_adapter

    llama.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj"], use_dora=kind == "dora",
        use_rslora=True, init_lora_weights=False,
    )  # fmt: skip
    theirs = peft.get_peft_model(llama, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    model, _ = hf.load_hf_model(tmp_path / "base")
    cfg = load_peft_adapter(model.eval(), tmp_path / "adapter")
    assert (cfg.kind, cfg.rank, cfg.rslora) == (kind, 4, True)
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, atol=1e-4, rtol=0)


def test_unsupported_peft_adapters_are_refused(tmp_path):
    from lmlab.models.peft_io import adapter_config_of

    with pytest.raises(CheckpointError, match="modules_to_save"):
        adapter_config_of({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                           "modules_to_save": ["lm_head"]}, "a.json")  # fmt: skip
    with pytest.raises(CheckpointError, match="peft_type 'IA3'"):
        adapter_config_of({"peft_type": "IA3", "target_modules": ["q_proj"]}, "a.json")
