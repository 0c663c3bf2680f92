"""The unlearning losses (docs/science.md §7, §14 and their test vectors)."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.models.contrast import uld_logits
from lmlab.objectives.unlearning import (
    flat_loss,
    gradient_ascent_loss,
    idk_dpo_loss,
    mean_token_probability,
    npo_loss,
    retain_kl,
    rmu_direction,
    rmu_loss,
    simnpo_loss,
    uniform_kl,
    unlearning_objective,
)


def _grad_wrt_s(s: float, beta: float) -> float:
    policy = torch.tensor([s], dtype=torch.float64, requires_grad=True)
    npo_loss(policy, torch.zeros(1, dtype=torch.float64), beta=beta).sum().backward()
    return policy.grad.item()


def test_npo_at_zero_log_ratio_is_two_over_beta_log_two():
    zero = torch.zeros(1, dtype=torch.float64)
    assert npo_loss(zero, zero, beta=0.1).item() == pytest.approx(13.862944, abs=1e-6)
    assert npo_loss(zero, zero, beta=1.0).item() == pytest.approx(1.386294, abs=1e-6)
    # the closed form (2/β)·log(1 + (πθ/πref)^β) at s = −3, β = 0.5
    value = npo_loss(torch.tensor([-7.0]), torch.tensor([-4.0]), beta=0.5).item()
    assert value == pytest.approx(4.0 * math.log1p(math.exp(-1.5)), rel=1e-6)


def test_npo_gradient_is_two_sigmoid_beta_s():
    assert _grad_wrt_s(0.0, 0.1) == pytest.approx(1.0, abs=1e-12)  # as for gradient ascent
    assert _grad_wrt_s(-50.0, 0.1) == pytest.approx(0.013386, abs=1e-6)
    assert _grad_wrt_s(-50.0, 1e-6) == pytest.approx(1.0, abs=1e-4)  # β → 0: gradient ascent
    assert _grad_wrt_s(3.0, 0.7) == pytest.approx(2.0 / (1.0 + math.exp(-2.1)), abs=1e-12)


def test_gradient_ascent_has_unit_gradient():
    policy = torch.tensor([-3.0, -9.0], requires_grad=True)
    gradient_ascent_loss(policy).sum().backward()
    assert policy.grad.tolist() == [1.0, 1.0]


def test_gradient_ascent_per_token_form_divides_by_length():
    assert gradient_ascent_loss(torch.tensor([-8.0, -3.0]), torch.tensor([4.0, 1.0])).tolist() == [-2.0, -3.0]


def test_simnpo_vectors():
    logps, lengths = torch.tensor([-8.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    assert simnpo_loss(logps, lengths, beta=2.5).item() == pytest.approx(0.00537228, abs=1e-8)
    assert simnpo_loss(logps, lengths, beta=2.5, delta=0.5).item() == pytest.approx(0.0185964, abs=1e-7)
    # the paper's form with γ = β·δ: −(2/β)·log σ(−(β/|y|)·log π − γ)
    paper = -(2 / 2.5) * math.log(1 / (1 + math.exp(-(2.5 / 4 * 8 - 1.25))))
    assert simnpo_loss(logps, lengths, beta=2.5, delta=0.5).item() == pytest.approx(paper, rel=1e-9)
    assert simnpo_loss(torch.zeros(1), torch.ones(1), beta=2.5).item() == pytest.approx(0.554518, abs=1e-6)


def test_idk_dpo_vectors_in_both_scales():
    z = torch.zeros(1, dtype=torch.float64)
    assert idk_dpo_loss(z, z, z, z, beta=0.1).item() == pytest.approx(13.862944, abs=1e-6)
    assert idk_dpo_loss(z, z, z, z, beta=0.1, scale="dpo").item() == pytest.approx(0.693147, abs=1e-6)
    ten = torch.tensor([10.0], dtype=torch.float64)  # margin (s_idk − s_forget) = 10
    assert idk_dpo_loss(ten, z, z, z, beta=0.1).item() == pytest.approx(6.265234, abs=1e-6)
    assert idk_dpo_loss(ten, z, z, z, beta=0.1, scale="dpo").item() == pytest.approx(0.313262, abs=1e-6)
    # the margin is of log-ratios: the reference's preference cancels
    assert idk_dpo_loss(ten, z, ten, z, beta=0.1).item() == pytest.approx(13.862944, abs=1e-6)


def test_rmu_forget_term_is_c_squared_over_d_for_any_unit_vector():
    u = rmu_direction(4, seed=3)
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()  # uniform [0, 1) draws, not Gaussian
    assert torch.equal(u, rmu_direction(4, seed=3)) and not torch.equal(u, rmu_direction(4, seed=4))
    hidden = torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert rmu_loss(hidden, mask, 6.5 * u).tolist() == pytest.approx([10.5625, 10.5625])
    # retain: distance to the frozen states, masked positions ignored
    frozen = torch.zeros(2, 3, 4)
    frozen[0, 0] = 2.0
    frozen[0, 2] = 100.0  # masked out
    assert rmu_loss(hidden, mask, u, frozen_hidden=frozen).tolist() == pytest.approx([2.0, 0.0])


def test_flat_vectors_and_importance_weights():
    pe, pf = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    expected = {"tv": 0.203496, "kl": 0.540818, "js": 0.315031, "pearson": 0.6225}
    for name, value in expected.items():
        assert flat_loss(pe, pf, divergence=name).item() == pytest.approx(value, abs=1e-6), name
    # KL: d/dP̄_e = −1, d/dP̄_f = exp(P̄_f − 1) (the importance weights)
    pe.requires_grad_(True)
    pf.requires_grad_(True)
    flat_loss(pe, pf, divergence="kl").backward()
    assert pe.grad.item() == pytest.approx(-1.0) and pf.grad.item() == pytest.approx(math.exp(-0.3))
    with pytest.raises(ValueError, match="divergence"):
        flat_loss(pe, pf, divergence="hellinger")


def test_mean_token_probability_ignores_padding():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.9, 0.9]]))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert mean_token_probability(logps, mask).item() == pytest.approx((0.5 + 0.25 + 0.1) / 3)


def test_retain_kl_is_zero_for_equal_models_and_matches_the_definition():
    torch.manual_seed(0)
    p, q = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert retain_kl(p, p, mask).abs().max().item() < 1e-6
    lq, lp = q.log_softmax(-1), p.log_softmax(-1)
    per = (lq.exp() * (lq - lp)).sum(-1)
    assert retain_kl(p, q, mask).tolist() == pytest.approx([per[0].mean().item(), per[1, 0].item()], rel=1e-5)


def test_uniform_kl_is_zero_for_uniform_logits():
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert uniform_kl(torch.zeros(1, 2, 7), mask).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    expected = 0.5 * (math.log(0.5 / 0.25) + math.log(0.5 / 0.75))
    assert uniform_kl(logits, mask[:, :1]).item() == pytest.approx(expected, rel=1e-6)


def test_uld_vector():
    p = torch.tensor([0.5, 0.2, 0.1, 0.06, 0.04, 0.03, 0.03, 0.02, 0.01, 0.01], dtype=torch.float64)
    assistant = torch.zeros(10, dtype=torch.float64)
    assistant[0], assistant[5] = 3.0, 5.0  # index 5 is outside the target's plausible set: not subtracted
    out = uld_logits(p.log(), assistant, alpha=0.8, rho=0.1).softmax(-1)
    expected = [0.083173, 0.366731, 0.183365, 0.110019, 0.073346, 0.055010, 0.055010, 0.036673, 0.018337, 0.018337]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_unlearning_objective_combines_forget_and_retain_terms():
    forget = torch.tensor([2.0, 4.0], dtype=torch.float64)
    retain = torch.tensor([1.5, 2.5], dtype=torch.float64)
    out = unlearning_objective(forget, retain, forget_coeff=0.5, retain_coeff=2.0)
    assert out.count.item() == 2
    assert out.metrics["forget"].item() == pytest.approx(6.0) and out.metrics["retain"].item() == pytest.approx(4.0)
    assert (out.loss_sum / out.count).item() == pytest.approx(0.5 * 3.0 + 2.0 * 2.0)
    assert set(unlearning_objective(forget).metrics) == {"forget"}
    with pytest.raises(ValueError, match="pair one-to-one"):
        unlearning_objective(forget, torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        npo_loss(torch.zeros(1), torch.zeros(1), beta=0.0)
