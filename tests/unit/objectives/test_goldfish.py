"""Goldfish masks (docs/science.md §5 and the §12 checks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.objectives.goldfish import (
    GOLDFISH_TABLE_SEED,
    GOLDFISH_TABLE_SIZE,
    apply_goldfish,
    goldfish_hash_table,
    goldfish_mask,
)
from lmlab.objectives.lm import causal_lm_loss


def _wrapping_product(ids: list[int]) -> int:
    """Product in signed 64-bit arithmetic that wraps on overflow (what ``torch.prod`` on int64 does)."""
    value = 1
    for i in ids:
        value = (value * i) & (2**64 - 1)
        if value >= 2**63:
            value -= 2**64
    return value


def _naive_hash_keep(row: list[int], k: int, h: int) -> list[bool]:
    table = goldfish_hash_table()
    keep = []
    for s in range(len(row)):
        if s < h - 1:
            keep.append(True)
            continue
        key = _wrapping_product(row[s - h + 1 : s + 1]) % GOLDFISH_TABLE_SIZE
        keep.append(bool(table[key].item() >= 1.0 / k))
    return keep


def test_static_mask_drops_start_plus_multiples_of_k():
    targets = torch.arange(1, 13).reshape(1, 12)
    mask = goldfish_mask(targets, k=4, strategy="static")
    assert set(torch.nonzero(~mask[0]).flatten().tolist()) == {0, 4, 8}  # docs/science.md §12
    shifted = goldfish_mask(targets, k=4, strategy="static", start=1)
    assert set(torch.nonzero(~shifted[0]).flatten().tolist()) == {1, 5, 9}


def test_hash_table_is_the_seeded_cpu_table_and_cached():
    table = goldfish_hash_table()
    assert table.shape == (1_000_003,)
    generator = torch.Generator().manual_seed(GOLDFISH_TABLE_SEED)
    torch.testing.assert_close(table[:5], torch.rand(5, generator=generator), rtol=0, atol=0)
    assert goldfish_hash_table() is table
    assert 0.0 <= table.min().item() and table.max().item() < 1.0


def test_hash_mask_matches_a_naive_per_position_reference():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(1, 50_000, (3, 40), generator=generator)
    for h in (1, 2, 13):
        mask = goldfish_mask(targets, k=3, context_width=h)
        for b in range(3):
            assert mask[b].tolist() == _naive_hash_keep(targets[b].tolist(), k=3, h=h)


def test_hash_product_wraps_like_int64():
    # 13 ids near 2**31 overflow int64 many times over; the decision must follow the wrapped product
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(2**30, 2**31, (2, 30), generator=generator)
    mask = goldfish_mask(targets, k=2, context_width=13)
    for b in range(2):
        assert mask[b].tolist() == _naive_hash_keep(targets[b].tolist(), k=2, h=13)


def test_same_window_same_decision_anywhere():
    generator = torch.Generator().manual_seed(2)
    h = 13
    text = torch.randint(1, 30_000, (200,), generator=generator)
    base = goldfish_mask(text.unsqueeze(0), k=4, context_width=h)[0]
    # the same text at another offset, in another row of a batch, next to other text
    prefix = torch.randint(1, 30_000, (37,), generator=generator)
    other = torch.randint(1, 30_000, (237,), generator=generator)
    batch = torch.stack([other, torch.cat([prefix, text])])
    moved = goldfish_mask(batch, k=4, context_width=h)[1, 37:]
    # positions whose window lies inside `text` get identical decisions
    assert torch.equal(moved[h - 1 :], base[h - 1 :])
    assert (~base).any() and base.any()


def test_first_context_width_minus_one_positions_are_never_dropped():
    generator = torch.Generator().manual_seed(3)
    targets = torch.randint(1, 1000, (64, 20), generator=generator)
    mask = goldfish_mask(targets, k=2, context_width=13)
    assert mask[:, :12].all()
    assert not mask[:, 12:].all()
    short = goldfish_mask(targets[:, :10], k=2, context_width=13)
    assert short.all()


@pytest.mark.parametrize("k", [3, 4, 8])
def test_hash_drop_rate_is_one_over_k(k):
    generator = torch.Generator().manual_seed(4)
    targets = torch.randint(1, 50_000, (10, 10_012), generator=generator)  # 1e5 hashed positions
    mask = goldfish_mask(targets, k=k, context_width=13)
    rate = 1.0 - mask[:, 12:].float().mean().item()
    assert abs(rate - 1.0 / k) < 0.01


def test_ignored_targets_are_not_kept_and_apply_goldfish_sets_ignore_index():
    targets = torch.arange(1, 13).reshape(1, 12)
    targets[0, 5] = -100
    mask = goldfish_mask(targets, k=4, strategy="static")
    assert not mask[0, 5]
    labels = apply_goldfish(targets, k=4, strategy="static")
    assert labels[0].tolist() == [-100, 2, 3, 4, -100, -100, 7, 8, -100, 10, 11, 12]


def test_goldfish_loss_is_mean_ce_over_kept_tokens_and_dropped_tokens_get_no_gradient():
    generator = torch.Generator().manual_seed(5)
    targets = torch.randint(1, 97, (2, 30), generator=generator)
    logits = torch.randn(2, 30, 97, generator=generator, requires_grad=True)
    logits_before = logits.detach().clone()
    mask = goldfish_mask(targets, k=4, context_width=4)
    out = causal_lm_loss(logits, targets, loss_mask=mask)
    per_token = F.cross_entropy(logits.detach().reshape(-1, 97), targets.reshape(-1), reduction="none")
    expected = per_token[mask.reshape(-1)].mean()
    assert out.count.item() == mask.sum().item()
    assert (out.loss_sum / out.count).item() == pytest.approx(expected.item(), rel=1e-6)
    (out.loss_sum / out.count).backward()
    assert torch.equal(logits.detach(), logits_before)  # the mask never touches the forward
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask].abs().sum(-1) > 0).all()


def test_bad_arguments_raise():
    targets = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="strategy"):
        goldfish_mask(targets, strategy="hash-avalanche")
    with pytest.raises(ValueError, match="k"):
        goldfish_mask(targets, k=0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        goldfish_mask(targets[0])
