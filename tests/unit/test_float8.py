"""``train.float8`` (issue 16 item 4): which linears torchao converts, the refusals on machines without
float8 tensor cores, names and outputs kept by the conversion (CPU, when torchao is installed), and on a
Hopper-class GPU a loss within a few percent of bf16's over a few steps."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.train.float8 import apply_float8, check_float8_device, float8_module_filter

from helpers import tiny_config


def _model() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False))


def test_filter_takes_block_linears_only():
    model = _model()
    chosen = sorted(n for n, m in model.named_modules() if float8_module_filter(m, n))
    assert len(chosen) == 2 * 7 and all(n.startswith("layers.") for n in chosen)
    assert "lm_head" not in chosen
    odd = torch.nn.Linear(24, 32)  # 24 is not a multiple of 16: float8 GEMMs need both sizes divisible by 16
    assert not float8_module_filter(odd, "layers.0.attn.q_proj")


def test_config_refuses_cpu_and_other_precisions():
    with pytest.raises(ConfigError, match="train.float8 needs an NVIDIA GPU"):
        tiny_config("train.float8=true", "train.precision=bf16")
    with pytest.raises(ConfigError, match="set train.precision=bf16"):
        tiny_config("train.float8=true", "train.device=cuda")


def test_device_check_refuses_cpu():
    with pytest.raises(ConfigError, match="compute capability >= 8.9; this run is on cpu"):
        check_float8_device(torch.device("cpu"))


def test_conversion_keeps_names_and_function():
    pytest.importorskip("torchao.float8")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = apply_float8(model, torch.device("cpu"), check_device=False)
    assert len(converted) == 14
    assert type(model.layers[0].attn.q_proj).__name__ == "Float8Linear"
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in high precision
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the weights stay high precision; only the matmuls change


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an sm89+ GPU"
)
def test_float8_loss_close_to_bf16(tmp_path):
    pytest.importorskip("torchao.float8")
    from unit.distributed.dist_harness import RankBatches, loss_fn

    from lmlab.train.loop import Trainer

    losses = {}
    for float8 in (False, True):
        cfg = tiny_config(
            "model.vocab_size=64", "model.d_model=128", "model.n_heads=4", "train.device=cuda", "train.precision=bf16",
            f"train.float8={str(float8).lower()}", "train.steps=10",
        )  # fmt: skip
        torch.manual_seed(0)
        records = []
        trainer = Trainer(cfg, tmp_path / str(float8), Decoder(cfg.model), RankBatches(), loss_fn,
                          device=torch.device("cuda"), on_log=records.append)  # fmt: skip
        trainer.fit()
        losses[float8] = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[True] == pytest.approx(losses[False], rel=0.03)
