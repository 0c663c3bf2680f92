"""Muon and NorMuon (issue 16 item 1; docs/science.md §22): the Newton–Schulz iteration against an SVD,
the published test vectors, step-for-step agreement with ``torch.optim.Muon`` and ``torch.optim.AdamW``,
which parameters each rule gets, the config's refusals, and a trainer run that resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.build import build_model
from lmlab.train import muon as muon_module
from lmlab.train.muon import MuonWithAdamW, adjusted_lr, newton_schulz, normuon_normalise
from lmlab.train.optim import build_optimizer, hidden_matrices

from helpers import tiny_config


def ns_on_singular_values(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The reference: NS₅ as the scalar map φ(σ) = aσ + bσ³ + cσ⁵ on the SVD's singular values, in float64."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    s = s / torch.linalg.matrix_norm(x.double())
    for _ in range(steps):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    return u @ torch.diag(s) @ vh


def test_newton_schulz_test_vector():
    """docs/science.md §22: diag(1, 0.5, 0.1) -> [0.698839, 1.118739, 0.711959] in float64 (bf16: atol 0.05)."""
    x = torch.diag(torch.tensor([1.0, 0.5, 0.1]))
    assert torch.diagonal(ns_on_singular_values(x)).tolist() == pytest.approx([0.698839, 1.118739, 0.711959], abs=1e-6)
    assert torch.diagonal(newton_schulz(x, dtype=torch.float32)).tolist() == pytest.approx(
        [0.698839, 1.118739, 0.711959], abs=1e-5
    )
    assert torch.diagonal(newton_schulz(x).float()).tolist() == pytest.approx([0.698839, 1.118739, 0.711959], abs=0.05)


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12)])
def test_newton_schulz_against_svd(shape):
    """On random matrices (tall ones are transposed inside) NS₅ equals U·φ⁵(Σ)·Vᵀ, and it points where the
    polar factor U·Vᵀ points: the directions are the SVD's, only the singular values are approximate."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    got = newton_schulz(x, dtype=torch.float32).double()
    torch.testing.assert_close(got, ns_on_singular_values(x), atol=1e-4, rtol=0)
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    polar = u @ vh
    cosine = (got * polar).sum() / (got.norm() * polar.norm())
    assert cosine > 0.95
    top = torch.linalg.svdvals(got)[: min(shape) // 2]  # the larger half of the spectrum is pushed near 1
    assert top.min() > 0.65 and top.max() < 1.25
    bf16 = newton_schulz(x).double()  # the GPU path: same matrix up to bf16 rounding
    assert (bf16 - got).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12)])
def test_newton_schulz_of_a_stack_is_each_matrix_on_its_own(shape):
    """The optimizer orthogonalises equal-shaped matrices as one stack: each must come out as if alone (its own
    norm, its own orientation), not mixed with its neighbours."""
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(3, *shape, generator=g) * torch.tensor([1.0, 30.0, 0.01])[:, None, None]
    got = newton_schulz(stack, dtype=torch.float32)
    assert got.shape == stack.shape
    for matrix, ortho in zip(stack, got):
        torch.testing.assert_close(ortho, newton_schulz(matrix, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_newton_schulz_refuses_non_matrices():
    for bad in (torch.ones(4), torch.ones(2, 2, 3, 4)):
        with pytest.raises(ValueError, match=r"matrix \[A, B\] or a stack"):
            newton_schulz(bad)


@pytest.mark.parametrize(
    ("shape", "original", "match_rms"),
    [((1024, 4096), 1.0, 12.8), ((4096, 1024), 2.0, 12.8), ((768, 768), 1.0, 5.542563)],
)
def test_lr_adjustment_vectors(shape, original, match_rms):
    assert adjusted_lr(1.0, shape, "original") == pytest.approx(original)
    assert adjusted_lr(1.0, shape, "match_rms_adamw") == pytest.approx(match_rms, rel=1e-6)
    # match_rms_adamw gives the update AdamW's RMS, 0.2, whatever the shape (orthogonal O: RMS 1/sqrt(max))
    o = torch.linalg.qr(torch.randn(max(shape), min(shape)))[0]
    o = o if shape[0] >= shape[1] else o.T
    assert (adjusted_lr(1.0, shape, "match_rms_adamw") * o).pow(2).mean().sqrt() == pytest.approx(0.2, rel=1e-4)


def test_normuon_first_step_vector():
    """docs/science.md §22: O = [[0.6, 0, 0.8], [0, 0.5, 0]] -> rows of equal norm, Frobenius norm kept."""
    o = torch.tensor([[0.6, 0.0, 0.8], [0.0, 0.5, 0.0]])
    row_ms = torch.zeros(2)
    got = normuon_normalise(o, row_ms, beta2=0.95)
    torch.testing.assert_close(got, torch.tensor([[0.474342, 0.0, 0.632456], [0.0, 0.790569, 0.0]]), atol=1e-6, rtol=0)
    assert got.norm().item() == pytest.approx(1.118034, abs=1e-6)
    torch.testing.assert_close(row_ms, 0.05 * torch.tensor([1.0 / 3, 0.25 / 3]))  # β₂ EMA from 0, no bias correction


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("convention", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_matches_torch_muon(nesterov, convention, shape):
    """Same bf16 Newton–Schulz, momentum, LR adjustment and decoupled weight decay as torch's Muon, step for step."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(*shape))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_ours = MuonWithAdamW(
        [{"params": [ours], "use_muon": True, "weight_decay": 0.1}],
        lr=0.02, momentum=0.9, nesterov=nesterov, adjust_lr=convention, ns_dtype=torch.bfloat16,
    )  # fmt: skip
    opt_theirs = torch.optim.Muon(
        [theirs], lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=convention
    )
    for _ in range(5):
        grad = torch.randn(*shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    assert (ours.detach() - theirs.detach()).abs().max() < 1e-6
    torch.testing.assert_close(
        opt_ours.state[ours]["momentum_buffer"], opt_theirs.state[theirs]["momentum_buffer"], atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("normuon", [False, True])
def test_stacked_orthogonalisation_equals_one_matrix_at_a_time(monkeypatch, normuon):
    """Equal-shaped matrices share a Newton–Schulz stack, split when it would exceed ``NS_STACK_ELEMENTS``;
    every stack size (one matrix each, two, all) gives the same updates."""
    shapes = [(8, 24), (8, 24), (24, 8), (8, 24), (16, 16)]
    torch.manual_seed(0)
    start = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    finals = []
    for budget in (1, 2 * 8 * 24, 1 << 24):
        monkeypatch.setattr(muon_module, "NS_STACK_ELEMENTS", budget)
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = MuonWithAdamW(
            [{"params": params, "use_muon": True, "weight_decay": 0.1}],
            lr=0.02,
            normuon=normuon,
            ns_dtype=torch.float32,
        )
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_auxiliary_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = MuonWithAdamW(
        [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    theirs = torch.optim.AdamW(
        [{"params": twins[:1], "weight_decay": 0.1}, {"params": twins[1:], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )  # fmt: skip
    for _ in range(6):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=1e-6)


def test_refuses_muon_on_non_matrices():
    with pytest.raises(ValueError, match="2-D matrices only"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": True}], lr=0.1)


def _groups(opt):
    return [(g.get("use_muon", False), {id(p) for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_matrices_get_muon_the_rest_adamw(tied):
    cfg = tiny_config("optim.name=muon", "optim.muon.lr=0.02", f"model.tie_embeddings={str(tied).lower()}")
    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, tie_embeddings=tied))
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = next(g for g in opt.param_groups if g["use_muon"])
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2
    )
    assert len(muon["params"]) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert muon["lr_scale"] == pytest.approx(0.02 / cfg.optim.lr)
    adam = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert "tok_embeddings.weight" in adam and "norm.weight" in adam
    assert ("lm_head.weight" in adam) == (not tied)
    assert len(adam) + len(muon["params"]) == len(names)  # every parameter once


def test_reward_head_stays_on_adamw():
    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2), head="reward")
    opt = build_optimizer(model, tiny_config("optim.name=muon").optim, torch.device("cpu"))
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert id(model.head.weight) not in muon_ids and id(model.decoder.tok_embeddings.weight) not in muon_ids
    assert {id(p) for p in hidden_matrices(model)} == muon_ids


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.muon.normuon=true"], "optim.muon.normuon is set but optim.name='adamw'"),
        (["optim.name=muon", "optim.muon.momentum=1.0"], r"optim.muon.momentum=1.0 must be in \[0, 1\)"),
        (["optim.name=muon", "optim.muon.ns_steps=0"], "optim.muon.ns_steps=0 must be > 0"),
        (["optim.name=muon", "optim.fused=true"], "optim.fused applies to AdamW"),
        (["optim.name=sgd"], "optim.name"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_trainer_uses_muon_lr_scale_and_resumes_exactly(tmp_path):
    """The schedule drives both rules (Muon at ``optim.muon.lr``), and 3 + 3 resumed steps equal 6 straight."""
    from unit.distributed.dist_harness import RankBatches, loss_fn

    from lmlab.models.decoder import Decoder
    from lmlab.train.loop import Trainer

    cfg = tiny_config(
        "model.vocab_size=64", "optim.name=muon", "optim.lr=3e-3", "optim.muon.lr=0.02",
        "optim.muon.normuon=true", "train.steps=6", "train.ckpt_every=3", "train.keep_last=3",
    )  # fmt: skip

    def run(run_dir, resume=None):
        torch.manual_seed(0)
        records = []
        trainer = Trainer(cfg, run_dir, Decoder(cfg.model), RankBatches(), loss_fn, device=torch.device("cpu"),
                          on_log=records.append)  # fmt: skip
        if resume is not None:
            trainer.resume(resume)
        trainer.fit()
        return trainer, [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]

    trainer, straight = run(tmp_path / "a")
    muon = next(g for g in trainer.optimizer.param_groups if g["use_muon"])
    adam = next(g for g in trainer.optimizer.param_groups if not g["use_muon"])
    assert muon["lr"] == pytest.approx(adam["lr"] * 0.02 / 3e-3)
    assert straight[-1][1] < straight[0][1]
    _, resumed = run(tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step_0000003")
    assert resumed == straight[3:]  # bit-exact: momentum, NorMuon statistics and AdamW moments restored


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2))
    cfg = tiny_config("optim.name=muon", "optim.muon.normuon=true").optim
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    twin = copy.deepcopy(model)
    opt2 = build_optimizer(twin, cfg, torch.device("cpu"))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a saved copy, as from a checkpoint
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
