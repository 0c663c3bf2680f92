"""NPO and gradient-ascent unlearning losses (docs/science.md §7 and the §12 vectors)."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.objectives.unlearning import gradient_ascent_loss, npo_loss, unlearning_objective


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


def test_unlearning_objective_combines_forget_and_retain_terms():
    policy = torch.tensor([0.0, -5.0], dtype=torch.float64)
    ref = torch.tensor([0.0, -5.0], dtype=torch.float64)
    retain = torch.tensor([1.5, 2.5], dtype=torch.float64)
    out = unlearning_objective(policy, ref, beta=1.0, retain_nll=retain, forget_coeff=1.0, retain_coeff=0.5)
    assert out.count.item() == 2
    assert out.metrics["forget"].item() == pytest.approx(2 * 2 * math.log(2.0), abs=1e-9)
    assert out.metrics["retain"].item() == pytest.approx(4.0)
    assert out.loss_sum.item() == pytest.approx(4 * math.log(2.0) + 0.5 * 4.0, abs=1e-9)

    ga = unlearning_objective(policy, method="gradient_ascent")
    assert ga.loss_sum.item() == pytest.approx(-5.0)
    assert set(ga.metrics) == {"forget"}


def test_unlearning_objective_bad_arguments():
    with pytest.raises(ValueError, match="ref_forget_logps"):
        unlearning_objective(torch.zeros(2))
    with pytest.raises(ValueError, match="method"):
        unlearning_objective(torch.zeros(2), torch.zeros(2), method="kl")
    with pytest.raises(ValueError, match="retain_nll"):
        unlearning_objective(torch.zeros(2), torch.zeros(2), retain_nll=torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        npo_loss(torch.zeros(1), torch.zeros(1), beta=0.0)
