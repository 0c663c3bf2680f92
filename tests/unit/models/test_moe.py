"""Mixture-of-experts FFN (issue 14 item 1): dropless dispatch against a per-token loop, the routers against
their formulas (GRIN's SparseMixer-v2 with docs/science.md §9.3's gradient), the balancing losses by hand,
DeepSeek-V3's bias update, counts, config checks, and training through the engine (resume bitwise)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.models.counting import count_params, flops_per_token
from lmlab.models.decoder import Decoder
from lmlab.models.mlp import SwiGLU
from lmlab.models.moe import (
    MoE,
    MoEConfig,
    auxiliary_losses,
    balance_experts,
    dispatch,
    softmax_route,
    sparsemixer_route,
)
from lmlab.recipes.pretrain import run_pretraining

from helpers import crash_and_resume, model_cfg, tiny_config, train_records

MOE = ["model.ffn.kind=moe", "model.ffn.experts=4", "model.ffn.top_k=2", "model.ffn.hidden=32"]


def moe_layer(**settings) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"experts": 4, "top_k": 2, **settings})
    return MoE(16, 24, cfg, init_std=0.3, out_std=0.3)


def test_dispatch_equals_a_per_token_loop():
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLU(8, 12, init_std=0.3, out_std=0.3) for _ in range(5))
    tokens = torch.randn(11, 8)
    chosen = torch.stack([torch.randperm(5)[:3] for _ in range(11)])  # [11, 3], distinct per token
    gates = torch.rand(11, 3)
    want = torch.stack([sum(gates[n, j] * experts[int(chosen[n, j])](tokens[n]) for j in range(3)) for n in range(11)])
    torch.testing.assert_close(dispatch(tokens, gates, chosen, experts), want, atol=1e-6, rtol=1e-5)


def test_every_expert_takes_part_in_backward_even_without_tokens():
    layer = moe_layer(top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 10.0  # every token picks expert 2... for positive inputs
    x = torch.rand(2, 5, 16) + 0.1
    layer(x).sum().backward()
    grads = [e.gate_proj.weight.grad for e in layer.experts]
    assert all(g is not None for g in grads)  # DDP needs every parameter in the graph
    assert grads[2].abs().sum() > 0 and grads[0].abs().sum() == 0


def test_softmax_router_renormalised_is_top_k_then_softmax():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0], [0.0, -1.0, 4.0, 4.5]])
    gates, experts = softmax_route(logits, 2, renormalize=True)
    assert experts.tolist() == [[1, 3], [3, 2]]
    top = logits.gather(-1, experts)
    torch.testing.assert_close(gates, top.softmax(-1))  # Mixtral's order gives the same gates
    raw, _ = softmax_route(logits, 2, renormalize=False)
    torch.testing.assert_close(raw, logits.softmax(-1).gather(-1, experts))  # OLMoE: full-softmax mass


def test_selection_bias_moves_the_choice_not_the_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 5.0])
    gates, experts = softmax_route(logits, 1, renormalize=False, bias=bias)
    assert experts.tolist() == [[2]]
    torch.testing.assert_close(gates, logits.softmax(-1)[:, 2:])


def test_balancing_losses_by_hand():
    layer = moe_layer(top_k=1, load_balance_coef=0.5, z_loss_coef=0.25)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    _, experts = softmax_route(logits, 1, renormalize=True)  # experts 0, 0, 2
    layer._balance_terms(logits, experts)
    p = logits.softmax(-1).mean(0)
    balance = 4 * (2 / 3 * p[0] + 1 / 3 * p[2])  # E · Σ f_e P_e
    z = sum(math.log(math.exp(2) + 3) ** 2 for _ in range(2)) / 3 + math.log(math.e + 3) ** 2 / 3
    torch.testing.assert_close(layer.aux_loss, 0.5 * balance + 0.25 * torch.tensor(z))
    assert layer.stats["moe_max_load"].item() == pytest.approx(2 / (3 / 4))  # busiest expert vs the mean load
    assert layer.stats["moe_overflow"].item() == pytest.approx((2 - 0.75 + 1 - 0.75) / 3)  # over capacity factor 1


def test_uniform_routing_balances_to_one():
    layer = moe_layer(top_k=2)
    logits = torch.zeros(8, 4)
    experts = torch.tensor([[0, 1], [2, 3]] * 4)
    layer._balance_terms(logits, experts)
    assert layer.stats["moe_balance"].item() == pytest.approx(1.0)
    assert layer.stats["moe_overflow"].item() == 0.0


def test_sparsemixer_in_evaluation_takes_the_best_then_the_next_with_masked_softmax_gates():
    logits = torch.tensor([[3.0, 2.999, -1.0, 0.0]])
    gates, experts = sparsemixer_route(logits, 2, jitter_eps=0.01, training=False)
    assert experts.tolist() == [[0, 1]]
    # choice 1: only experts within (3 - z)/3 <= 0.02 are candidates: 0 and 1
    first = torch.tensor([3.0, 2.999]).softmax(-1)[0]
    # choice 2: max is 2.999; candidates (2.999 - z)/max(|z|, 2.999) <= 0.02: expert 1 alone (0 is taken)
    torch.testing.assert_close(gates, torch.stack([first, torch.tensor(1.0)])[None])


def test_sparsemixer_samples_only_candidates_and_scales_the_gate_by_one_or_a_third():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.995, 0.2, -3.0]]).repeat(2000, 1)
    gates, experts = sparsemixer_route(logits, 1, jitter_eps=0.01, training=True)
    picks = torch.bincount(experts[:, 0], minlength=4)
    assert picks[2] == picks[3] == 0  # outside the margin: never sampled
    probs = torch.tensor([1.0, 0.995]).softmax(-1)
    assert picks[1] / 2000 == pytest.approx(probs[1].item(), abs=0.04)  # sampled from the candidates' softmax
    expected = probs[experts[:, 0]]
    ratio = gates[:, 0] / expected
    is_best = experts[:, 0] == 0
    assert torch.allclose(ratio[is_best], torch.ones(1))  # the argmax keeps its gate
    third = torch.isclose(ratio[~is_best], torch.tensor(1 / 3))
    assert third.float().mean().item() == pytest.approx(0.75, abs=0.06)  # else 1/3 with probability 3/4


def test_sparsemixer_gradient_is_that_of_the_chosen_probability():
    torch.manual_seed(1)
    logits = torch.randn(6, 5, requires_grad=True)
    gates, experts = sparsemixer_route(logits, 1, jitter_eps=10.0, training=True)  # every expert a candidate
    upstream = torch.randn(6, 1)
    (gates * upstream).sum().backward()
    probs = logits.detach().softmax(-1)
    chosen = probs.gather(-1, experts)
    onehot = torch.nn.functional.one_hot(experts[:, 0], 5).float()
    want = upstream * chosen * (onehot - probs)  # g · π_sel · (onehot(sel) − π), docs/science.md §9.3
    torch.testing.assert_close(logits.grad, want)


def test_bias_update_pushes_load_towards_the_mean_and_counts_only_in_training():
    layer = moe_layer(top_k=1, bias_update_rate=0.1)
    layer.load_counts.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    balance_experts(layer)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))  # expert 1 is at the mean
    assert layer.load_counts.sum() == 0
    layer.eval()
    layer(torch.randn(1, 3, 16))
    assert layer.load_counts.sum() == 0
    layer.train()
    layer(torch.randn(1, 3, 16))
    assert layer.load_counts.sum() == 3


def test_sparse_blocks_counts_and_flops():
    cfg = model_cfg(vocab_size=50, d_model=32, n_layers=3, n_heads=4,
                    ffn={"kind": "moe", "experts": 4, "top_k": 2, "hidden": 32, "shared_experts": 1, "layers": [1]})  # fmt: skip
    model = Decoder(cfg)
    assert isinstance(model.layers[1].mlp, MoE) and isinstance(model.layers[0].mlp, SwiGLU)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = 3 * 32 * 32
    assert counts["total"] - counts["active"] == 2 * expert  # two of the four experts idle per token
    dense = model_cfg(vocab_size=50, d_model=32, n_layers=3, n_heads=4)
    moe_matmul = 32 * 4 + 2 * expert + expert  # router, top-2, the shared expert
    dense_matmul = 3 * 32 * dense.ffn.hidden_size(32)
    difference = flops_per_token(cfg, 16)["forward"] - flops_per_token(dense, 16)["forward"]
    assert difference == 2 * (moe_matmul - dense_matmul)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.ffn.top_k=5", r"model.ffn.top_k=5 must be between 1 and model.ffn.experts=4"),
        ("model.ffn.experts=1", r"model.ffn.experts=1 must be >= 2"),
        ("model.ffn.layers=[0,7]", r"model.ffn.layers=\[0, 7\] must be distinct block indices in 0..1"),
        ("model.ffn.load_balance_coef=-1", r"model.ffn.load_balance_coef=-1.* must be >= 0"),
        ("model.ffn.router=topk", r"model.ffn.router"),
    ],
)
def test_impossible_settings_are_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.n_layers=2", "model.ffn.kind=moe", "model.ffn.experts=4", override]).validate()


def test_sparsemixer_with_a_selection_bias_is_refused():
    with pytest.raises(ConfigError, match="bias_update_rate needs router=softmax"):
        load_config(None, [*MOE, "model.ffn.router=sparsemixer", "model.ffn.bias_update_rate=0.001"]).validate()


def test_auxiliary_losses_gather_the_last_forward():
    cfg = model_cfg(vocab_size=40, d_model=16, n_layers=2, n_heads=2, ffn={"kind": "moe", "experts": 4, "hidden": 16})
    model = Decoder(cfg)
    assert auxiliary_losses(model) is None
    model(torch.randint(0, 40, (2, 7)))
    loss, stats = auxiliary_losses(model)
    loads = {f"moe_load/e{e}" for e in range(4)}
    assert loss.requires_grad and set(stats) == {"moe_balance", "moe_max_load", "moe_overflow", "moe_router_z", *loads}
    assert sum(stats[k] for k in loads).item() == pytest.approx(4.0)  # relative loads average 1
    assert auxiliary_losses(Decoder(model_cfg(vocab_size=40, d_model=16, n_layers=2, n_heads=2))) is None


@pytest.mark.parametrize("router", ["softmax", "sparsemixer"])
def test_trains_through_the_engine_logs_routing_and_resumes_bitwise(tmp_path, monkeypatch, router):
    overrides = (*MOE, f"model.ffn.router={router}", "train.steps=6", "train.ckpt_every=3", "train.eval_every=3")
    if router == "softmax":
        overrides = (*overrides, "model.ffn.bias_update_rate=0.01")
    full = tmp_path / "full"
    summary = run_pretraining(tiny_config(*overrides), full, quiet=True)
    records = train_records(full)
    assert {"moe_aux", "moe_balance", "moe_max_load", "moe_overflow", "moe_router_z", "moe_load/e3"} <= set(records[1])
    assert records[6]["loss"] < records[1]["loss"]
    assert json.loads((full / "summary.json").read_text())["active_params"] < summary["params"]

    crashed = tmp_path / "crashed"
    crash_and_resume(tiny_config(*overrides), crashed, 5, monkeypatch)
    a, b = train_records(full), train_records(crashed)
    assert all(a[s]["loss"] == b[s]["loss"] for s in a), {s: (a[s]["loss"], b[s]["loss"]) for s in a}


def test_bias_is_saved_with_the_weights(tmp_path):
    from lmlab.train import checkpoint as ck

    cfg = model_cfg(vocab_size=40, d_model=16, n_layers=2, n_heads=2,
                    ffn={"kind": "moe", "experts": 4, "hidden": 16, "bias_update_rate": 0.1})  # fmt: skip
    model = Decoder(cfg)
    model.layers[0].mlp.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    ck.save_checkpoint(tmp_path, 1, model, model_cfg=cfg)
    fresh = Decoder(cfg)
    ck.load_weights(ck.latest_checkpoint(tmp_path), fresh, cfg)
    torch.testing.assert_close(fresh.layers[0].mlp.expert_bias, torch.tensor([0.1, -0.2, 0.3, 0.0]))


def test_science_vector_of_section_9():
    """docs/science.md §12 §9: z = [2.0, 1.99, 0, −1], ε = 0.01 masks experts 2 and 3, picks expert 0 with
    multiplier 0.5025 in evaluation, then expert 1 (alone among the candidates: gate 1)."""
    gates, experts = sparsemixer_route(torch.tensor([[2.0, 1.99, 0.0, -1.0]]), 2, jitter_eps=0.01, training=False)
    assert experts.tolist() == [[0, 1]]
    assert gates[0, 0].item() == pytest.approx(0.5025, abs=1e-4) and gates[0, 1].item() == pytest.approx(1.0)
