"""``train.compile``: false | true | blocks | full (issue 16 item 4).

``true`` is ``blocks`` (each block compiled in place, as before); ``full`` compiles the whole training forward,
embedding to loss (the LM objective passes its token loss as the ``Decoder``'s ``head_fn``), with
``fullgraph=True``. Compiled runs give the eager losses: with the ``aot_eager`` backend (dynamo capture and
AOTAutograd, no C++ code generation) for every ``loss_impl``, and with inductor on a 1-layer model (slow).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from unit.distributed.dist_harness import RankBatches, config

from lmlab.config import TrainConfig, load_config, validate
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.objectives.lm_objective import build_lm_loss
from lmlab.train.distributed import DistContext, prepare_model, unwrap
from lmlab.train.loop import Trainer

OPTIONS = ("objective.loss_chunk_tokens=20", "objective.z_loss=1e-3", "objective.label_smoothing=0.1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (no shape history or recompile count carried over from another test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(cfg, run_dir, backend: str | None = None) -> list[float]:
    """Losses of a fresh seed-0 tiny decoder trained with the LM objective; compiled with ``backend`` first."""
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    if backend is not None:
        model = prepare_model(model, cfg, DistContext(), compile_backend=backend)
    records: list[dict[str, Any]] = []
    loss_fn = build_lm_loss(cfg.objective)
    trainer = Trainer(cfg, run_dir, model, RankBatches(), loss_fn, device=torch.device("cpu"), on_log=records.append)
    trainer.fit()
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_compile_setting_values():
    assert TrainConfig().compile_mode == "none"
    for value, mode in (("false", "none"), ("true", "blocks"), ("blocks", "blocks"), ("full", "full")):
        cfg = validate(load_config(None, [f"train.compile={value}"]))
        assert cfg.train.compile_mode == mode
    with pytest.raises(
        ConfigError, match="train.compile='fast' has the wrong type: expected bool or one of blocks, full"
    ):
        load_config(None, ["train.compile=fast"])
    with pytest.raises(ConfigError, match="must be false, true"):
        TrainConfig(compile="fast").validate()
    with pytest.raises(ConfigError, match="train.compile=full compiles the whole forward in one process, but "
                       "distributed.strategy=fsdp; use train.compile=blocks with DDP / FSDP"):  # fmt: skip
        validate(load_config(None, ["train.compile=full", "distributed.strategy=fsdp"]))


@pytest.mark.parametrize("value", ["true", "blocks"])
def test_blocks_compiles_each_block_in_place(value):
    cfg = config(1, f"train.compile={value}")
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    names = list(model.state_dict())
    assert prepare_model(model, cfg, DistContext(), compile_backend="aot_eager") is model
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert model._compiled_call_impl is None
    assert list(model.state_dict()) == names


def test_full_returns_a_compiled_forward_and_keeps_the_model():
    cfg = config(1, "train.compile=full")
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    names = list(model.state_dict())
    forward = prepare_model(model, cfg, DistContext(), compile_backend="aot_eager")
    assert forward is not model and unwrap(forward) is model
    assert prepare_model(forward, cfg, DistContext()) is forward  # applying twice is a no-op
    assert all(block._compiled_call_impl is None for block in model.layers)  # the model itself stays eager
    assert list(model.state_dict()) == names  # checkpoints do not depend on the switch


@pytest.mark.parametrize("impl", ["standard", "fused", "chunked"])
def test_full_compile_same_losses(impl, tmp_path):
    cfg = config(1, f"objective.loss_impl={impl}", *OPTIONS, "train.steps=3")
    eager = train(cfg, tmp_path / "eager")
    full = config(1, f"objective.loss_impl={impl}", *OPTIONS, "train.steps=3", "train.compile=full")
    assert train(full, tmp_path / "full", backend="aot_eager") == pytest.approx(eager, abs=1e-5)


def test_full_compile_graph_break_is_an_error():
    """``fullgraph=True``: a head that breaks the graph fails loudly instead of running in pieces."""
    cfg = config(1, "train.compile=full")
    torch.manual_seed(0)
    forward = prepare_model(Decoder(cfg.model), cfg, DistContext(), compile_backend="aot_eager")

    def breaking_head(hidden, weight):
        torch._dynamo.graph_break()
        return hidden @ weight.t()

    with pytest.raises(torch._dynamo.exc.Unsupported):
        forward(torch.zeros(1, 4, dtype=torch.long), head_fn=breaking_head)


@pytest.mark.slow
def test_full_compile_inductor_same_losses(tmp_path):
    """The real backend (C++ code generation) on a 1-layer model for 2 steps, with the fused head."""
    small = ("model.n_layers=1", "train.steps=2", "objective.loss_impl=fused", *OPTIONS)
    eager = train(config(1, *small), tmp_path / "eager")
    got = train(config(1, *small, "train.compile=full"), tmp_path / "inductor", backend="inductor")
    assert got == pytest.approx(eager, abs=1e-5)


def test_full_compile_packed_rows_same_loss_and_gradients():
    """Packed rows (``doc_ids`` and ``position_ids``, as SFT packing makes them) compile without a graph break."""
    cfg = config(1, "train.compile=full", "objective.loss_impl=fused", *OPTIONS)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(9), torch.arange(3)]).view(2, 12)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "doc_ids": doc_ids, "position_ids": positions}
    loss_fn = build_lm_loss(cfg.objective)

    def run(backend):
        torch.manual_seed(0)
        model = Decoder(cfg.model)
        forward = model if backend is None else prepare_model(model, cfg, DistContext(), compile_backend=backend)
        out = loss_fn(forward, batch)
        out.loss_sum.backward()
        return out.loss_sum.detach(), [p.grad for p in model.parameters()]

    (want, want_grads), (got, got_grads) = run(None), run("aot_eager")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_full_compile_new_batch_shape():
    """Shapes are static (``dynamic=False``): a batch of another length compiles its own graph instead of
    tracing symbolic sizes (which attention's ``is_causal`` cannot take under ``fullgraph``)."""
    cfg = config(1, "train.compile=full", "objective.loss_impl=fused", *OPTIONS)
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    forward = prepare_model(model, cfg, DistContext(), compile_backend="aot_eager")
    loss_fn = build_lm_loss(cfg.objective)
    for length in (12, 9, 7):
        ids = torch.randint(0, 64, (2, length))
        batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
        got = loss_fn(forward, batch).loss_sum
        torch.testing.assert_close(got, loss_fn(model, batch).loss_sum, rtol=1e-5, atol=1e-5)


MOE = ("model.ffn.kind=moe", "model.ffn.experts=4", "model.ffn.hidden=32", "model.ffn.bias_update_rate=0.01")


def test_moe_blocks_compile_same_losses(tmp_path):
    """Each MoE block compiled (the expert dispatch, whose sizes depend on the routing, is a graph break)."""
    eager = train(config(1, *MOE, "train.steps=3"), tmp_path / "eager")
    compiled = train(config(1, *MOE, "train.steps=3", "train.compile=blocks"), tmp_path / "blocks", backend="aot_eager")
    assert compiled == pytest.approx(eager, abs=1e-5)


def test_moe_full_compile_is_refused():
    with pytest.raises(ConfigError, match="train.compile=full cannot trace model.ffn.kind=moe"):
        validate(load_config(None, [*MOE, "train.compile=full"]))


@pytest.mark.parametrize(
    "attention",
    [("model.attention.kind=sliding", "model.attention.window=5"),
     ("model.attention.kind=s2", "model.attention.block_size=2", "model.attention.vert_stride=2",
      "model.attention.local_blocks=1")],
    ids=["sliding", "s2"],
)  # fmt: skip
def test_patterned_attention_full_compile_same_losses(attention, tmp_path):
    eager = train(config(1, *attention, "train.steps=3"), tmp_path / "eager")
    full = train(config(1, *attention, "train.steps=3", "train.compile=full"), tmp_path / "full", backend="aot_eager")
    assert full == pytest.approx(eager, abs=1e-5)
