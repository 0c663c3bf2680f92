"""CorDA initialisation (Yang et al. 2024, arXiv 2406.05223; docs/science.md §24): hand-computed decompositions,
a layer that starts equal to its base with the base weight untouched, and CorDA runs (issue 13 item 4)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.corda import corda_init, decompose, input_covariances
from lmlab.models.lora import AdapterConfig, LoRALinear, adapters_disabled
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.recipes.sft import SFTRecipe
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.engine import execute
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrained import load_run_model

from helpers import tiny_config, write_pairs_and_chat


def test_decompose_by_hand():
    """W = diag(3, 1). With C = I the largest component of W C is W's first (3); with C = diag(1, 10) the context
    makes input 2 the strongest, W C = diag(3, 10), and the instruction-previewed rank-1 start is W's *second*
    component: U Σ Vᵀ C⁻¹ = 10 · e₂e₂ᵀ · (1/10) = e₂e₂ᵀ. Knowledge-preserved takes the other one."""
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    for cov, ipm, kpm in [
        (torch.eye(2), [[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]),
        (torch.diag(torch.tensor([1.0, 10.0])), [[0.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]),
    ]:
        b, a = decompose(w, cov, 1, "corda_ipm", damping=0.0)
        assert torch.allclose(b @ a, torch.tensor(ipm, dtype=torch.float64), atol=1e-9)
        b, a = decompose(w, cov, 1, "corda_kpm", damping=0.0)
        assert torch.allclose(b @ a, torch.tensor(kpm, dtype=torch.float64), atol=1e-9)


def test_full_rank_reconstructs_the_weight():
    torch.manual_seed(0)
    w, x = torch.randn(5, 4), torch.randn(50, 4)
    b, a = decompose(w, x.T.double() @ x.double(), 4, "corda_ipm", damping=0.0)
    assert torch.allclose(b @ a, w.double(), atol=1e-8)


@pytest.mark.parametrize("mode", ["corda_ipm", "corda_kpm"])
def test_layer_starts_at_its_base(mode):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    original = base.weight.detach().clone()
    model = nn.Sequential(LoRALinear(base, AdapterConfig(kind="lora", rank=2, alpha=4.0, init=mode)))
    x = torch.randn(3, 7, 6)
    sums, passes = input_covariances(model, lambda m, batch: m(batch), [x[:2], x[2:]])
    assert passes == 2
    assert torch.allclose(sums["0"], x.reshape(-1, 6).double().T @ x.reshape(-1, 6).double())
    covs = {name: c / passes for name, c in sums.items()}
    corda_init(model, covs, mode)
    layer = model[0]
    assert torch.equal(layer.base_layer.weight, original)  # the base weight is never rewritten
    assert layer.lora_B.weight.abs().sum() > 0  # the adapter starts non-zero ...
    assert torch.allclose(model(x), base(x), atol=1e-5)  # ... yet the layer computes its base
    assert torch.allclose(layer.merged_weight(), original, atol=1e-5)
    with adapters_disabled(model):
        assert torch.equal(model(x), base(x))
    # the adapter holds the chosen rank-2 component: s·B A = B₀A₀ of decompose
    b0, a0 = decompose(original, covs["0"], 2, mode)
    assert torch.allclose(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, (b0 @ a0).float(), atol=1e-5)


def test_corda_with_dora_is_refused():
    with pytest.raises(ConfigError, match="kind=lora"):
        AdapterConfig(kind="dora", init="corda_ipm").validate()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("corda")
    execute(PretrainRecipe(), tiny_config("train.steps=10", "model.max_seq_len=96"), root / "base", quiet=True)
    write_pairs_and_chat(root, 24)
    return root


def corda_cfg(root, *extra):
    return tiny_config(
        f"init_from={root / 'base'}", f"sft.train_file={root / 'chat.jsonl'}", "model.max_seq_len=96",
        "train.steps=3", "train.log_every=1", "schedule.warmup_steps=0", "adapter.kind=lora", "adapter.rank=4",
        "adapter.corda_samples=6", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["corda_ipm", "corda_kpm"])
def test_corda_run(world, mode):
    """A CorDA SFT run starts at its base (step 1's loss equals the plain-LoRA run's, whose adapters are zero),
    keeps (A₀, B₀) in its adapter-only checkpoints, and records what the covariances were computed on."""
    plain = world / "plain"
    if not plain.exists():
        execute(SFTRecipe(), corda_cfg(world), plain, quiet=True)
    run = world / mode
    summary = execute(SFTRecipe(), corda_cfg(world, f"adapter.init={mode}"), run, quiet=True)
    assert summary["corda"]["mode"] == mode and summary["corda"]["sequences"] == 6
    first = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}[1]["loss"]
    assert first == pytest.approx(
        {r["step"]: r for r in read_metrics(plain) if r["kind"] == "train"}[1]["loss"], abs=1e-4
    )
    weights = load_file(str(ckpt_io.latest_checkpoint(run) / ckpt_io.MODEL_FILE))
    assert any(k.endswith("lora_A0") for k in weights) and all(".lora_" in k for k in weights)
    load_run_model(run)  # base + adapters + starting values, merged


def test_corda_from_a_context_file(world):
    run = world / "kpm-file"
    summary = execute(
        SFTRecipe(), corda_cfg(world, "adapter.init=corda_kpm", f"adapter.corda_file={world / 'chat.jsonl'}"), run,
        quiet=True,
    )  # fmt: skip
    assert summary["corda"]["source"] == str(world / "chat.jsonl") and summary["corda"]["tokens"] > 0
