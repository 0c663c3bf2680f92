"""Distillation losses: hand-computed KL/JSD on a 3-token vocabulary, limits, top-k equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.objectives.distill import distillation_loss, token_divergence, topk_distillation_loss
from lmlab.objectives.lm import causal_lm_loss

P_T = [0.7, 0.2, 0.1]
P_S = [0.2, 0.5, 0.3]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().reshape(1, 1, 3)


def test_hand_computed_kl_and_jsd_on_three_tokens():
    labels = torch.tensor([[0]])
    forward = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    reverse = 0.2 * math.log(0.2 / 0.7) + 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.1)
    m = [0.45, 0.35, 0.2]  # (p_T + p_S)/2
    jsd = 0.5 * sum(p * math.log(p / q) for p, q in zip(P_T, m)) + 0.5 * sum(
        p * math.log(p / q) for p, q in zip(P_S, m)
    )
    assert forward == pytest.approx(0.583815, abs=1e-6)
    assert reverse == pytest.approx(0.537176, abs=1e-6)
    assert jsd == pytest.approx(0.132918, abs=1e-6)
    for kind, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        out = distillation_loss(_logits(P_S), _logits(P_T), labels, divergence=kind, alpha=1.0)
        assert out.loss_sum.item() == pytest.approx(expected, abs=1e-6)
        assert out.metrics["kd"].item() == pytest.approx(expected, abs=1e-6)
        assert out.count.item() == 1


def test_alpha_mixes_kd_with_the_student_cross_entropy():
    labels = torch.tensor([[1]])
    out = distillation_loss(_logits(P_S), _logits(P_T), labels, alpha=0.3)
    forward = 0.583815
    ce = -math.log(0.5)
    assert out.metrics["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert out.loss_sum.item() == pytest.approx(0.3 * forward + 0.7 * ce, abs=1e-6)


def test_temperature_softens_both_and_scales_by_tau_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    tau = 2.0
    out = distillation_loss(student, teacher, labels, temperature=tau, alpha=0.6)
    p_t = F.softmax(teacher / tau, -1)
    naive_kd = tau**2 * (p_t * (p_t.log() - F.log_softmax(student / tau, -1))).sum()
    naive_ce = causal_lm_loss(student, labels).loss_sum
    assert out.metrics["kd"].item() == pytest.approx(naive_kd.item(), rel=1e-5)
    assert out.loss_sum.item() == pytest.approx((0.6 * naive_kd + 0.4 * naive_ce).item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_give_zero(kind):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7) * 3
    out = distillation_loss(logits, logits.clone(), torch.zeros(2, 4, dtype=torch.long), divergence=kind, alpha=1.0)
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-6)


def test_jsd_limits_are_forward_and_reverse_kl():
    torch.manual_seed(2)
    s = F.log_softmax(torch.randn(6, 9), -1)
    t = F.log_softmax(torch.randn(6, 9), -1)
    s64, t64 = s.double(), t.double()
    forward = token_divergence(s64, t64, divergence="forward_kl")
    reverse = token_divergence(s64, t64, divergence="reverse_kl")
    small, large = 1e-5, 1 - 1e-5
    torch.testing.assert_close(
        token_divergence(s64, t64, divergence="jsd", beta=small) / small, forward, rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        token_divergence(s64, t64, divergence="jsd", beta=large) / (1 - large), reverse, rtol=1e-3, atol=0
    )
    # beta = 0.5 is the symmetric JSD
    torch.testing.assert_close(
        token_divergence(s, t, divergence="jsd", beta=0.5), token_divergence(t, s, divergence="jsd", beta=0.5)
    )
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s, t, divergence="jsd", beta=0.0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_k_equal_v_equals_the_full_loss(kind):
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 2
    labels = torch.randint(0, 11, (2, 5))
    labels[1, :2] = -100
    options = {"divergence": kind, "beta": 0.3, "temperature": 1.5, "alpha": 0.7}
    full = distillation_loss(student, teacher, labels, **options)
    values, indices = F.log_softmax(teacher, -1).topk(11, dim=-1)
    topk = topk_distillation_loss(student, values, indices, labels, **options)
    assert topk.count.item() == full.count.item() == 8
    assert topk.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-5)
    assert topk.metrics["kd"].item() == pytest.approx(full.metrics["kd"].item(), rel=1e-5)


def test_topk_renormalises_the_teacher_over_its_support():
    # teacher top-2 of [0.7, 0.2, 0.1] renormalised: [0.7, 0.2]/0.9; student restricted the same way
    labels = torch.tensor([[0]])
    values, indices = _logits(P_T).topk(2, dim=-1)
    out = topk_distillation_loss(_logits(P_S), values, indices, labels, alpha=1.0)
    q_t = [0.7 / 0.9, 0.2 / 0.9]
    q_s = [0.2 / 0.7, 0.5 / 0.7]
    expected = sum(p * math.log(p / q) for p, q in zip(q_t, q_s))
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-6)


def test_masked_positions_do_not_count_and_only_the_student_gets_gradients():
    torch.manual_seed(4)
    student = torch.randn(2, 4, 6, requires_grad=True)
    teacher = torch.randn(2, 4, 6)
    labels = torch.randint(0, 6, (2, 4))
    labels[0, 0] = -100
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    out = distillation_loss(student, teacher, labels, loss_mask=mask, divergence="jsd")
    assert out.count.item() == 6
    out.loss_sum.backward()
    assert (student.grad[0, 0] == 0).all() and (student.grad[1, 3] == 0).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
