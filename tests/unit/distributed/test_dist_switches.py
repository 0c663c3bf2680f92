"""Speed switches change speed, not the model (issue 6 item 5): each is compared with it off on the
tiny 10-step run (dist_harness.config). Tolerances: activation checkpointing recomputes the same
fp32 ops (1e-6); compile fuses and reorders fp32 ops (1e-5; the 10-step runs use the ``aot_eager``
backend, which runs dynamo graph capture and AOTAutograd but skips inductor's C++ code generation,
minutes on a 2-core CI box; inductor itself runs on a 1-layer model for 3 steps); fused AdamW is the same update in one kernel (1e-5); bf16 (autocast, or FSDP2's
bf16 parameter policy) rounds activations to 8 mantissa bits (5e-2 on losses near 4)."""

from __future__ import annotations

import pytest
import torch
from unit.distributed.dist_harness import RankBatches, config, loss_fn, train

from lmlab.models.decoder import Decoder
from lmlab.train import checkpoint as ck
from lmlab.train.distributed import DistContext, apply_activation_checkpointing, prepare_model, setup_distributed


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return losses(train(config(1), tmp_path_factory.mktemp("base")))


def losses(records):
    return [loss for _, loss, _ in records]


def test_activation_checkpointing_same_losses(baseline, tmp_path):
    got = losses(train(config(1, "distributed.activation_checkpointing=full"), tmp_path))
    assert got == pytest.approx(baseline, abs=1e-6)


def test_activation_checkpointing_stores_fewer_activations():
    """Real checkpointing: the forward keeps only each block's input, not its intermediate tensors."""
    cfg = config(1)

    def saved_in_forward(model):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        batch = RankBatches().next_batch(2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model, batch).loss_sum.backward()
        return count

    torch.manual_seed(0)
    plain = saved_in_forward(Decoder(cfg.model))
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    apply_activation_checkpointing(model.layers)
    assert saved_in_forward(model) < plain / 2


def test_compile_same_losses(baseline, tmp_path):
    got = losses(train(config(1, "train.compile=true"), tmp_path, compile_backend="aot_eager"))
    assert got == pytest.approx(baseline, abs=1e-5)


def test_compile_with_activation_checkpointing_same_losses(baseline, tmp_path):
    cfg = config(1, "train.compile=true", "distributed.activation_checkpointing=full")
    assert losses(train(cfg, tmp_path, compile_backend="aot_eager")) == pytest.approx(baseline, abs=1e-5)


@pytest.mark.slow
def test_inductor_compile_same_losses(tmp_path):
    """The real backend (C++ code generation, ~35 s on 2 CPU cores), on a 1-layer model for 3 steps."""
    small = ("model.n_layers=1", "train.steps=3")
    base = losses(train(config(1, *small), tmp_path / "eager"))
    got = losses(train(config(1, *small, "train.compile=true"), tmp_path / "ind", compile_backend="inductor"))
    assert got == pytest.approx(base, abs=1e-5)


def test_compile_keeps_parameter_names():
    cfg = config(1, "train.compile=true", "distributed.activation_checkpointing=full")
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    names = list(model.state_dict())
    assert prepare_model(model, cfg, DistContext(), compile_backend="aot_eager") is model
    assert list(model.state_dict()) == names  # checkpoints do not depend on the switches


def test_fused_adamw_same_losses(baseline, tmp_path):
    assert losses(train(config(1, "optim.fused=false"), tmp_path / "f")) == pytest.approx(baseline, abs=1e-6)
    assert losses(train(config(1, "optim.fused=true"), tmp_path / "t")) == pytest.approx(baseline, abs=1e-5)


def test_bf16_autocast_close(baseline, tmp_path):
    got = losses(train(config(1, "train.precision=bf16"), tmp_path))
    assert got == pytest.approx(baseline, abs=5e-2)
    assert got != pytest.approx(baseline, abs=1e-6)  # bf16 really ran


def test_fsdp_one_process_bf16_parameters(baseline, tmp_path):
    """FSDP2 on one process (a one-member gloo group) with the bf16 MixedPrecisionPolicy; its
    checkpoints are sharded and load into a plain model."""
    cfg = config(1, "distributed.strategy=fsdp", "distributed.mixed_precision_param=bf16")
    ctx = setup_distributed(cfg)
    try:
        assert ctx.has_group and ctx.sharded and ctx.world_size == 1
        got = losses(train(cfg, tmp_path, ctx))
    finally:
        ctx.close()
    assert got == pytest.approx(baseline, abs=5e-2)
    assert got != pytest.approx(baseline, abs=1e-6)
    ckpt = ck.latest_checkpoint(tmp_path)
    assert ck.is_sharded(ckpt)
    ck.load_weights(ckpt, Decoder(cfg.model), cfg.model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_flash_matches_math_kernel():
    """SDPA's flash / memory-efficient kernels give the math kernel's loss and gradients in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = config(1, "model.d_model=64", "model.n_heads=2")
    torch.manual_seed(0)
    model = Decoder(cfg.model).cuda()
    batch = {k: v.cuda() for k, v in RankBatches().next_batch(4).items()}
    results = []
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        model.zero_grad()
        with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            out = loss_fn(model, batch)
        out.loss_sum.backward()
        results.append((float(out.loss_sum / out.count), model.layers[0].attn.q_proj.weight.grad.clone()))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=2e-2)
        torch.testing.assert_close(grad, results[0][1], atol=2e-2, rtol=5e-2)
