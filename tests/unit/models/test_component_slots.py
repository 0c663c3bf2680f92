"""Component slots (issue 9 item 2): a new FFN variant is one small module plus one registry row, and the
config loader, the decoder, the parameter/FLOP counters and the checkpoint checks all follow it without
knowing it; modules initialise their own weights; old flat keys still load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from lmlab.config import FFN_KINDS, ModelConfig, dump_yaml, load_config, model_config_diff, to_dict
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.component import ComponentConfig, ComponentCount, residual_std
from lmlab.models.counting import count_params, flops_per_token
from lmlab.models.decoder import Decoder
from lmlab.train import checkpoint as ck

from helpers import model_cfg


class GeluMLP(nn.Module):
    """A plain two-layer MLP: the new component of this test."""

    def __init__(self, d: int, hidden: int, std: float, out_std: float):
        super().__init__()
        self.up_proj = nn.Linear(d, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.std, self.out_std = std, out_std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.up_proj.weight, std=self.std)
        nn.init.zeros_(self.up_proj.bias)
        nn.init.normal_(self.down_proj.weight, std=self.out_std)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


@dataclass
class GeluMLPConfig:
    kind: Literal["gelu_mlp"] = "gelu_mlp"
    expansion: int = 4

    def validate(self, model, key: str) -> None:
        if self.expansion < 1:
            raise ConfigError(f"{key}.expansion={self.expansion} must be >= 1")

    def build(self, model, layer: int) -> nn.Module:
        return GeluMLP(model.d_model, self.expansion * model.d_model, model.init_std, residual_std(model))

    def count(self, model, seq_len: int, layer: int = 0) -> ComponentCount:
        d, h = model.d_model, self.expansion * model.d_model
        return ComponentCount(2 * d * h + h, 2 * d * h)


@pytest.fixture
def gelu_registered(monkeypatch):
    monkeypatch.setitem(FFN_KINDS, "gelu_mlp", GeluMLPConfig)  # the one registry row a new variant adds


def test_a_new_ffn_variant_is_one_registry_row(gelu_registered, tmp_path):
    cfg = load_config(None, ["model.ffn.kind=gelu_mlp", "model.ffn.expansion=2", "model.vocab_size=50"])
    assert isinstance(cfg.model.ffn, GeluMLPConfig) and isinstance(cfg.model.ffn, ComponentConfig)
    assert "kind: gelu_mlp" in dump_yaml(cfg.model)
    model = Decoder(cfg.model)
    assert isinstance(model.layers[0].mlp, GeluMLP)
    assert count_params(cfg.model)["total"] == sum(p.numel() for p in model.parameters())
    dense = load_config(None, ["model.vocab_size=50"]).model
    # FLOPs follow the component: 2·(matmul weights) per token, so GELU at 2d beats SwiGLU at 8/3·d
    assert flops_per_token(cfg.model, 64)["forward"] < flops_per_token(dense, 64)["forward"]
    ck.save_checkpoint(tmp_path, 1, model, model_cfg=cfg.model)
    with pytest.raises(CheckpointError, match="ffn.kind: checkpoint 'gelu_mlp' vs run 'swiglu'"):
        ck.load_weights(ck.latest_checkpoint(tmp_path), Decoder(dense), dense)
    with pytest.raises(ConfigError, match=r"model.ffn.expansion=0 must be >= 1"):
        load_config(None, ["model.ffn.kind=gelu_mlp", "model.ffn.expansion=0"])


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.ffn.kind='mamba' is not a valid choice; valid choices: swiglu, moe"):
        load_config(None, ["model.ffn.kind=mamba"])
    with pytest.raises(ConfigError, match=r"model.attention.window is an option of model.attention.kind=sliding"):
        load_config(None, ["model.attention.window=64"])  # an option of another kind names its kind
    with pytest.raises(ConfigError, match=r"unknown config key 'model.attention.colour'"):
        load_config(None, ["model.attention.colour=64"])


def test_modules_initialise_themselves_and_the_decoder_reinitialises_through_them():
    cfg = model_cfg(vocab_size=64, d_model=64, n_layers=4, n_heads=4, attn_bias=True)
    torch.manual_seed(0)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.init_weights()
    block = model.layers[2]
    assert torch.all(block.attn.q_proj.bias == 0) and torch.all(block.attn_norm.weight == 1)
    assert abs(block.mlp.down_proj.weight.std().item() - residual_std(cfg)) < 3e-3
    assert not any(torch.all(p == 7.0) for p in model.parameters())


def test_legacy_flat_keys_still_load_and_compare_equal():
    old = {"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2, "qk_norm": True, "ffn_hidden": 96}
    new = load_config(None, ["model.vocab_size=50", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                             "model.attention.qk_norm=true", "model.ffn.hidden=96"]).model  # fmt: skip
    assert model_config_diff(old, new) == []
    assert model_config_diff({**old, "attn_bias": True}, new) == ["attention.qkv_bias: checkpoint True vs run False"]
    with pytest.raises(ConfigError, match="model.qk_norm and model.attention.qk_norm are both set"):
        ModelConfig.upgrade({"qk_norm": True, "attention": {"qk_norm": False}})


def test_settings_that_do_not_define_the_weights_may_change():
    a = load_config(None, ["model.vocab_size=50"]).model
    b = load_config(None, ["model.vocab_size=50", "model.max_seq_len=512", "model.init_std=0.5"]).model
    assert model_config_diff(to_dict(a), b) == []
    c = load_config(None, ["model.vocab_size=50", "model.norm_eps=1e-6"]).model
    assert model_config_diff(to_dict(a), c) == ["norm_eps: checkpoint 1e-05 vs run 1e-06"]
