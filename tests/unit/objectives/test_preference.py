"""Preference losses: the docs/science.md §12 vectors and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.objectives.preference import (
    dpo_loss,
    ipo_loss,
    ln_dpo_loss,
    orpo_loss,
    preference_objective,
    sft_term,
    simpo_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_science_vectors_and_rewards():
    # Δ = s_w − s_l = 0 gives log 2; β = 0.1, Δ = 10 gives −log σ(1) = 0.313262
    out = dpo_loss(t(-5.0, -2.0), t(-5.0, -14.0), t(-5.0, -4.0), t(-5.0, -6.0), beta=0.1)
    assert out.losses[0].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert out.losses[1].item() == pytest.approx(0.313262, abs=1e-6)
    # s_w = −2 − (−4) = 2, s_l = −14 − (−6) = −8
    torch.testing.assert_close(out.chosen_rewards, t(0.0, 0.2))
    torch.testing.assert_close(out.rejected_rewards, t(0.0, -0.8))


def test_conservative_dpo_label_smoothing():
    # −(1 − ε)·log σ(1) − ε·log σ(−1), and log σ(−1) = log σ(1) − 1
    out = dpo_loss(t(0.0), t(-10.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.313262 + 0.1 * 1.313262, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)


def test_ipo_science_vector_and_length_normalisation():
    # Δ = 0 with τ = 0.1: (0 − 1/(2τ))² = 25
    out = ipo_loss(t(-3.0), t(-3.0), t(-3.0), t(-3.0), t(3.0), t(3.0), beta=0.1)
    assert out.losses.item() == pytest.approx(25.0, abs=1e-9)
    # s_w = 6 over 3 tokens, s_l = −4 over 2 tokens: h = 2 + 2 = 4, (4 − 5)² = 1
    out = ipo_loss(t(0.0), t(-4.0), t(-6.0), t(0.0), t(3.0), t(2.0), beta=0.1)
    assert out.losses.item() == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(out.chosen_rewards, t(0.6))  # unnormalised β·s, as TRL logs


def test_simpo_science_vector():
    # average log-probs −1 and −2, β = 2, γ = 0.5: −log σ(2·(−1 + 2) − 0.5) = −log σ(1.5)
    out = simpo_loss(t(-3.0), t(-8.0), t(3.0), t(4.0), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(0.201413, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, t(-2.0))
    torch.testing.assert_close(out.rejected_rewards, t(-4.0))


def test_ln_dpo_science_vector():
    # s_w = −3 over 3 tokens, s_l = −8 over 4 tokens, β = 1: −log σ(−1 + 2) = 0.313262
    out = ln_dpo_loss(t(-13.0), t(-18.0), t(-10.0), t(-10.0), t(3.0), t(4.0), beta=1.0)
    assert out.losses.item() == pytest.approx(0.313262, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, t(-3.0))


def test_orpo_hand_computed():
    # chosen: per-token likelihood 0.5 (odds 1); rejected: 0.2 (odds 1/4); log odds ratio = log 4
    out = orpo_loss(t(3 * math.log(0.5)), t(2 * math.log(0.2)), t(3.0), t(2.0), lam=0.1)
    or_loss = math.log(1.25)  # −log σ(log 4) = log(1 + 1/4)
    assert out.metrics["log_odds"].item() == pytest.approx(math.log(4.0), abs=1e-9)
    assert out.metrics["or_loss"].item() == pytest.approx(or_loss, abs=1e-9)
    assert out.losses.item() == pytest.approx(math.log(2.0) + 0.1 * or_loss, abs=1e-9)  # 0.715461
    assert out.losses.item() == pytest.approx(0.715461, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, t(0.1 * math.log(0.5)))
    with_nll = orpo_loss(t(3 * math.log(0.5)), t(2 * math.log(0.2)), t(3.0), t(2.0), lam=0.1, chosen_nll=t(2.0))
    assert with_nll.losses.item() == pytest.approx(2.0 + 0.1 * or_loss, abs=1e-9)


def test_orpo_is_stable_for_likelihoods_near_one_and_zero():
    out = orpo_loss(t(-1e-6, -200.0), t(-50.0, -300.0), t(1.0, 1.0), t(1.0, 1.0))
    assert torch.isfinite(out.losses).all()


def test_sft_term():
    assert sft_term(t(-6.0), t(3.0), weight=0.5).item() == pytest.approx(1.0)
    assert sft_term(t(-6.0)).item() == pytest.approx(6.0)


def test_gradients_flow_to_the_policy_log_probs_only_sensibly():
    chosen = t(-4.0).requires_grad_(True)
    rejected = t(-6.0).requires_grad_(True)
    out = dpo_loss(chosen, rejected, t(-5.0), t(-5.0), beta=0.5)
    out.losses.sum().backward()
    # dL/ds_w = −β·σ(−βΔ), Δ = 1 − (−1) = 2
    expected = -0.5 / (1 + math.exp(0.5 * 2))
    assert chosen.grad.item() == pytest.approx(expected, abs=1e-9)
    assert rejected.grad.item() == pytest.approx(-expected, abs=1e-9)
    assert not out.chosen_rewards.requires_grad


def test_preference_objective_sums_over_pairs():
    out = dpo_loss(t(-5.0, -2.0), t(-5.0, -14.0), t(-5.0, -4.0), t(-5.0, -6.0), beta=0.1)
    loss = preference_objective(out)
    assert loss.count.item() == 2
    assert loss.loss_sum.item() == pytest.approx(math.log(2.0) + 0.313262, abs=1e-6)
    assert loss.metrics["rewards/accuracies"].item() == 1.0  # only the second pair has chosen > rejected
    assert loss.metrics["rewards/margins"].item() == pytest.approx(1.0, abs=1e-9)
