"""Residual-stream perturbations and PGD (docs/science.md §29.4): the hook adds δ only on masked positions, PGD
stays in the per-token ε-ball and raises the target's probability, bad layers and ε are refused."""

from __future__ import annotations

import pytest
import torch

from lmlab.models.build import build_model
from lmlab.models.latent_perturbation import (
    check_layer,
    completion_loss,
    perturbed,
    pgd_delta,
    project_per_token,
)

from helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config("model.vocab_size=64", "model.init_std=0.1").model).eval()


IDS = torch.tensor([[1, 5, 9, 12, 2, 40, 41, 42]])
PROMPT = torch.tensor([[True] * 5 + [False] * 3])
TARGET = ~PROMPT


def test_hook_changes_only_later_positions(model):
    delta = torch.zeros(1, 8, 32)
    delta[0, 3] = 5.0
    with torch.no_grad():
        clean = model(IDS)
        with perturbed(model, 0, delta, PROMPT):
            moved = model(IDS)
        after = model(IDS)
    torch.testing.assert_close(clean[0, :3], moved[0, :3])  # causal: positions before 3 cannot see it
    assert (clean[0, 3:] - moved[0, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(clean, after)  # the hook is gone


def test_projection_is_per_token():
    d = torch.tensor([[[3.0, 4.0], [0.3, 0.4]]])
    torch.testing.assert_close(project_per_token(d, 1.0), torch.tensor([[[0.6, 0.8], [0.3, 0.4]]]))


@pytest.mark.parametrize("epsilon", [0.5, 4.0])
def test_pgd_stays_in_the_ball_and_raises_the_target(model, epsilon):
    def loss(delta):
        with perturbed(model, 1, delta, PROMPT):
            return completion_loss(model(IDS), IDS, TARGET)

    with torch.no_grad():
        before = loss(torch.zeros(1, 8, 32)).item()
    delta = pgd_delta(loss, torch.zeros(1, 8, 32), epsilon=epsilon, steps=10, step_size=epsilon / 4)
    assert delta.norm(dim=-1).max() <= epsilon * (1 + 1e-5)
    assert delta[0, 5:].abs().sum() == 0  # the gradient never reaches unmasked positions
    with torch.no_grad():
        after = loss(delta).item()
    assert after < before  # −log p(target) fell: its probability rose


def test_bad_layer_and_epsilon(model):
    with pytest.raises(IndexError, match="out of range .* 2 blocks"):
        check_layer(model, 2)
    check_layer(model, -1)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        pgd_delta(lambda d: d.sum(), torch.zeros(1, 2, 3), epsilon=0.0, steps=1, step_size=0.1)
