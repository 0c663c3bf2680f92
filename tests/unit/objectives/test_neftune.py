"""NEFTune noise and hook (docs/science.md §6 and the §12 checks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmlab.objectives.neftune import attach_neftune, neftune_noise


class _TinyLM(nn.Module):
    """The part of the lmlab Decoder NEFTune touches: an embedding named ``tok_embeddings``."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.last_embeddings = self.tok_embeddings(input_ids)
        return self.head(self.last_embeddings)


def test_noise_norm_is_alpha_over_sqrt_three():
    # docs/science.md §12: L = 512, d = 256, alpha = 5: Frobenius norm within 1% of 5/sqrt(3)
    embeddings = torch.zeros(2, 512, 256)
    noised = neftune_noise(embeddings, alpha=5.0, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        assert noised[b].norm().item() == pytest.approx(5.0 / math.sqrt(3.0), rel=0.01)


def test_unpadded_variant_pads_get_exactly_zero_noise_and_norm_uses_real_length():
    embeddings = torch.randn(2, 512, 256, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 512, dtype=torch.long)
    mask[1, 300:] = 0
    noised = neftune_noise(embeddings, alpha=5.0, attention_mask=mask, generator=torch.Generator().manual_seed(2))
    noise = noised - embeddings
    assert torch.equal(noised[1, 300:], embeddings[1, 300:])
    # mag_b = alpha / sqrt(len_b·d): the real tokens still carry a total norm of about alpha/sqrt(3)
    for b in range(2):
        assert noise[b].norm().item() == pytest.approx(5.0 / math.sqrt(3.0), rel=0.01)
    assert noise[1, :300].abs().max().item() <= 5.0 / math.sqrt(300 * 256) * (1 + 1e-5)


def test_padded_variant_is_bounded_by_mag_and_noises_every_position():
    embeddings = torch.zeros(2, 64, 32)
    mask = torch.ones(2, 64)
    mask[0, 40:] = 0
    noised = neftune_noise(
        embeddings, alpha=10.0, attention_mask=mask, padded=True, generator=torch.Generator().manual_seed(3)
    )
    mag = 10.0 / math.sqrt(64 * 32)
    assert noised.abs().max().item() <= mag * (1 + 1e-6)
    assert noised.abs().max().item() > 0.9 * mag  # uniform over the whole interval
    assert (noised[0, 40:] != 0).any()  # pads are noised too in this variant


def test_same_generator_seed_gives_the_same_noise():
    embeddings = torch.randn(1, 10, 4)
    first = neftune_noise(embeddings, alpha=5.0, generator=torch.Generator().manual_seed(7))
    second = neftune_noise(embeddings, alpha=5.0, generator=torch.Generator().manual_seed(7))
    other = neftune_noise(embeddings, alpha=5.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_hook_adds_noise_only_in_training_and_can_be_removed():
    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(0, 50, (2, 12))
    clean = model.tok_embeddings(ids).detach()
    handle = attach_neftune(model, alpha=5.0)

    model.eval()
    eval_logits = model(ids)
    assert torch.equal(model.last_embeddings, clean)  # bit-identical in eval
    model.train()
    model(ids)
    noise = model.last_embeddings.detach() - clean
    assert noise.abs().max().item() > 0
    assert noise.abs().max().item() <= 5.0 / math.sqrt(12 * 8) * (1 + 1e-6)

    handle.remove()
    model(ids)
    assert torch.equal(model.last_embeddings, clean)
    model.eval()
    assert torch.equal(model(ids), eval_logits)


def test_hook_with_pad_id_leaves_pads_clean_and_gradients_reach_the_embeddings():
    torch.manual_seed(1)
    model = _TinyLM()
    ids = torch.randint(1, 50, (2, 10))
    ids[0, 6:] = 0  # pad_id 0
    clean = model.tok_embeddings(ids).detach()
    attach_neftune(model, alpha=5.0, pad_id=0, generator=torch.Generator().manual_seed(4))
    model.train()
    model(ids).sum().backward()
    assert torch.equal(model.last_embeddings[0, 6:].detach(), clean[0, 6:])
    assert not torch.equal(model.last_embeddings[0, :6].detach(), clean[0, :6])
    assert model.tok_embeddings.weight.grad is not None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tok_embeddings"):
        attach_neftune(nn.Linear(2, 2), alpha=5.0)
    with pytest.raises(ValueError, match="alpha"):
        neftune_noise(torch.zeros(1, 2, 3), alpha=-1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        neftune_noise(torch.zeros(1, 2, 3), alpha=1.0, attention_mask=torch.ones(1, 3))
