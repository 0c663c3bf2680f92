"""GCG and the random-suffix baseline (docs/science.md §29.1): candidate layout, the one-hot gradient, and GCG
beating random search at the same budget on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lmlab.eval.gcg import (
    AttackPrompt,
    gcg_candidates,
    random_candidates,
    search_suffix,
    suffix_gradient,
    suffix_losses,
)
from lmlab.models.build import build_model

from helpers import tiny_config

V = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(f"model.vocab_size={V}", "model.init_std=0.2").model).eval()


PROMPT = AttackPrompt(before=[1, 5, 9, 12], after=[2, 3], target=[40, 41, 42])


def test_candidate_positions_follow_the_reference_spread():
    suffix = torch.zeros(20, dtype=torch.long)
    grad = torch.randn(20, V)
    allowed = torch.ones(V, dtype=torch.bool)
    cands = gcg_candidates(suffix, grad, allowed, 8, 512, torch.Generator().manual_seed(0))
    positions = torch.arange(512) * 20 // 512
    counts = torch.bincount(positions, minlength=20).tolist()
    assert counts == [26, 26, 25, 26, 25, 26, 26, 25, 26, 25, 26, 26, 25, 26, 25, 26, 26, 25, 26, 25]  # §17
    changed = (cands != suffix).sum(dim=1)
    assert (changed <= 1).all()  # one swap each (a swap may redraw the same token)
    top = (-grad).topk(8, dim=1).indices
    for b in range(512):
        assert cands[b, positions[b]] in top[positions[b]]


def test_disallowed_tokens_are_never_proposed():
    suffix = torch.zeros(5, dtype=torch.long)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[10:20] = True
    gen = torch.Generator().manual_seed(1)
    for cands in (gcg_candidates(suffix, torch.randn(5, V), allowed, 64, 50, gen),
                  random_candidates(suffix, allowed, 50, gen)):  # fmt: skip
        swapped = cands[cands != 0]
        assert ((swapped >= 10) & (swapped < 20)).all()


def test_onehot_gradient_is_the_embedding_gradient_times_w(model):
    """∂L/∂onehot[i, v] = ⟨∂L/∂emb_i, W_v⟩ (the chain rule through emb = onehot @ W)."""
    suffix = torch.tensor([7, 8, 9])
    grad = suffix_gradient(model, PROMPT, suffix)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["emb"] = out

    handle = model.tok_embeddings.register_forward_hook(keep)
    try:
        logits = model(PROMPT.inputs(suffix[None]))
    finally:
        handle.remove()
    pred = logits[0, PROMPT.target_slice(3)]
    torch.nn.functional.cross_entropy(pred, torch.tensor(PROMPT.target)).backward()
    model.zero_grad()
    expected = seen["emb"].grad[0, 4:7] @ model.tok_embeddings.weight.detach().T  # [L, V]
    assert grad.shape == (3, V)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_gcg_beats_random_search_at_the_same_budget(model):
    allowed = torch.ones(V, dtype=torch.bool)
    init = [0] * 6
    gcg = [search_suffix(model, PROMPT, init, allowed, method="gcg", steps=8, top_k=8, batch=16, seed=s,
                         stop_on_success=False).loss for s in range(3)]  # fmt: skip
    rand = [search_suffix(model, PROMPT, init, allowed, method="random", steps=8, batch=16, seed=s,
                          stop_on_success=False).loss for s in range(3)]  # fmt: skip
    start = suffix_losses(model, PROMPT, torch.tensor([init]))[0].item()
    assert max(gcg) < start and sum(gcg) < sum(rand)


def test_search_never_gets_worse(model):
    result = search_suffix(model, PROMPT, [0] * 4, torch.ones(V, dtype=torch.bool), steps=5, top_k=4, batch=8)
    assert result.losses == sorted(result.losses, reverse=True) and result.loss == result.losses[-1]
    assert len(result.suffix) == 4
