"""causal_lm_loss: hand-computed values, label smoothing, z-loss (docs/science.md §10), loss_mask, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.objectives.lm import causal_lm_loss, chunked_causal_lm_loss

LOG2, LOG3, LOG6 = math.log(2.0), math.log(3.0), math.log(6.0)


def _hand_logits() -> torch.Tensor:
    # every row is [log 1, log 2, log 3]: Z = 6, p = [1/6, 2/6, 3/6]
    return torch.tensor([[0.0, LOG2, LOG3]] * 3).reshape(1, 3, 3)


def test_hand_computed_cross_entropy_and_count():
    labels = torch.tensor([[2, 0, -100]])
    out = causal_lm_loss(_hand_logits(), labels)
    # −log(3/6) + −log(1/6) = log 2 + log 6 over 2 counted tokens
    assert out.count.item() == 2
    assert out.loss_sum.item() == pytest.approx(LOG2 + LOG6, abs=1e-6)
    assert out.metrics["ce"].item() == pytest.approx(LOG2 + LOG6, abs=1e-6)
    assert set(out.metrics) == {"ce"}


def test_hand_computed_label_smoothing_and_z_loss():
    labels = torch.tensor([[2, -100, -100]])
    eps, coeff = 0.1, 1e-4
    out = causal_lm_loss(_hand_logits(), labels, label_smoothing=eps, z_loss=coeff)
    ce = LOG2
    uniform_ce = LOG6 - (0.0 + LOG2 + LOG3) / 3.0  # log Z − mean logit = (2/3)·log 6
    smoothed = (1 - eps) * ce + eps * uniform_ce
    z_term = coeff * LOG6**2
    assert out.metrics["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert out.metrics["smoothed"].item() == pytest.approx(smoothed, abs=1e-6)
    assert out.metrics["z_loss"].item() == pytest.approx(z_term, abs=1e-9)
    assert out.loss_sum.item() == pytest.approx(smoothed + z_term, abs=1e-6)


def test_z_loss_science_vector_all_zero_logits():
    # docs/science.md §12 (§10): all-zero logits, V = 32000: 1e-4·(ln 32000)² = 0.0107609
    logits = torch.zeros(1, 1, 32000)
    out = causal_lm_loss(logits, torch.tensor([[7]]), z_loss=1e-4)
    assert out.metrics["z_loss"].item() == pytest.approx(0.0107609, abs=1e-7)
    assert out.loss_sum.item() == pytest.approx(math.log(32000) + 0.0107609, abs=1e-5)


def test_matches_torch_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    for eps in (0.0, 0.2):
        out = causal_lm_loss(logits, labels, label_smoothing=eps)
        ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), label_smoothing=eps, reduction="sum")
        assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
        assert out.count.item() == 13


def test_z_loss_matches_naive_formula():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7) * 3
    labels = torch.randint(0, 7, (2, 4))
    out = causal_lm_loss(logits, labels, z_loss=1e-2)
    naive = 1e-2 * torch.logsumexp(logits, -1).square().sum()
    assert out.metrics["z_loss"].item() == pytest.approx(naive.item(), rel=1e-6)
    assert (out.loss_sum - out.metrics["ce"]).item() == pytest.approx(naive.item(), rel=1e-5)


def test_loss_mask_equals_ignoring_the_masked_labels():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[1, 0] = -100
    mask = torch.rand(2, 6) > 0.4
    out = causal_lm_loss(logits, labels, loss_mask=mask, z_loss=1e-3, label_smoothing=0.1)
    ref = causal_lm_loss(logits, labels.masked_fill(~mask, -100), z_loss=1e-3, label_smoothing=0.1)
    assert out.count.item() == ((labels != -100) & mask).sum().item()
    assert out.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100])
def test_chunked_equals_full_loss_and_gradient(chunk_size):
    torch.manual_seed(3)
    base = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    labels[0, 3] = -100
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    full_logits = base.clone().requires_grad_(True)
    full = causal_lm_loss(full_logits, labels, **options)
    full.loss_sum.backward()
    chunk_logits = base.clone().requires_grad_(True)
    chunked = causal_lm_loss(chunk_logits, labels, chunk_size=chunk_size, **options)
    chunked.loss_sum.backward()
    assert chunked.count.item() == full.count.item()
    assert chunked.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)
    for name in full.metrics:
        assert chunked.metrics[name].item() == pytest.approx(full.metrics[name].item(), rel=1e-6)
    torch.testing.assert_close(chunk_logits.grad, full_logits.grad, rtol=1e-5, atol=1e-7)


def test_micro_batches_accumulate_to_the_full_batch():
    torch.manual_seed(4)
    logits = torch.randn(4, 3, 8)
    labels = torch.randint(0, 8, (4, 3))
    labels[:3, 0] = -100  # unequal token counts per micro-batch
    full = causal_lm_loss(logits, labels, z_loss=1e-4)
    parts = [causal_lm_loss(logits[i : i + 2], labels[i : i + 2], z_loss=1e-4) for i in (0, 2)]
    total = sum(p.loss_sum for p in parts) / sum(p.count for p in parts)
    assert total.item() == pytest.approx((full.loss_sum / full.count).item(), rel=1e-6)


def test_bfloat16_logits_are_evaluated_in_float32():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 17).bfloat16()
    labels = torch.randint(0, 17, (2, 3))
    out = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits.float().reshape(-1, 17), labels.reshape(-1), reduction="sum")
    assert out.loss_sum.dtype == torch.float32
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)


def test_invalid_options_raise():
    logits, labels = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="z_loss"):
        causal_lm_loss(logits, labels, z_loss=-1.0)
    with pytest.raises(ValueError, match="loss_mask"):
        causal_lm_loss(logits, labels, loss_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(logits, labels, chunk_size=0)


@pytest.mark.parametrize("chunk_size", [3, 8, 64])
def test_chunked_from_hidden_equals_full_loss_and_gradients(chunk_size):
    torch.manual_seed(6)
    head = torch.nn.Linear(6, 19, bias=False)
    hidden_full = torch.randn(2, 7, 6, requires_grad=True)
    labels = torch.randint(0, 19, (2, 7))
    labels[1, 5:] = -100
    mask = torch.rand(2, 7) > 0.2
    options = {"label_smoothing": 0.05, "z_loss": 1e-3, "loss_mask": mask}

    full = causal_lm_loss(head(hidden_full), labels, **options)
    full.loss_sum.backward()
    full_head_grad = head.weight.grad.clone()
    head.weight.grad = None

    hidden_chunked = hidden_full.detach().clone().requires_grad_(True)
    chunked = chunked_causal_lm_loss(hidden_chunked, head, labels, chunk_size=chunk_size, **options)
    chunked.loss_sum.backward()

    assert chunked.count.item() == full.count.item()
    assert chunked.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)
    assert set(chunked.metrics) == set(full.metrics) == {"ce", "smoothed", "z_loss"}
    for name in full.metrics:
        assert chunked.metrics[name].item() == pytest.approx(full.metrics[name].item(), rel=1e-6)
    torch.testing.assert_close(hidden_chunked.grad, hidden_full.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, full_head_grad, rtol=1e-5, atol=1e-7)


def test_chunked_from_hidden_without_grad_matches():
    torch.manual_seed(7)
    head = torch.nn.Linear(4, 9, bias=False)
    hidden = torch.randn(3, 5, 4)
    labels = torch.randint(0, 9, (3, 5))
    with torch.no_grad():
        full = causal_lm_loss(head(hidden), labels)
        chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
    assert chunked.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)
