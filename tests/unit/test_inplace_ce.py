"""The in-place cross-entropy of the ``standard`` head (``objectives/inplace_ce.py``): the loss of ``causal_lm_loss``
with its gradient written over the logits. Checked against plain autograd in float32 (1e-5 relative) with ignored
tokens, a keep mask, label smoothing and z-loss, over one and several row blocks; bf16 autocast against autograd's
bf16 gradient; no [N, V] buffer is allocated beyond the logits; a second backward is refused; ``no_grad`` leaves
the logits alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from unit.test_fused_linear_ce import OPTION_CASES, assert_close, check_matches_plain, grads, inputs

from lmlab.objectives import inplace_ce
from lmlab.objectives.inplace_ce import inplace_causal_lm_loss
from lmlab.objectives.lm import causal_lm_loss


@pytest.mark.parametrize("block_numbers", [50, 7 * 50, 1 << 22])  # 1 row, 7 rows (24 = 3·7 + 3), all rows
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_matches_autograd_of_the_plain_loss(monkeypatch, case, block_numbers):
    monkeypatch.setattr(inplace_ce, "BLOCK_NUMBERS", block_numbers)
    check_matches_plain(lambda hidden, weight, labels, **options: inplace_causal_lm_loss(
        F.linear(hidden, weight), labels, **options), case)  # fmt: skip


def test_the_gradient_lands_in_the_logits_buffer():
    hidden, weight, labels, _ = inputs()
    logits = F.linear(hidden, weight)
    before = logits.detach().clone()
    out = inplace_causal_lm_loss(logits, labels, z_loss=1e-3)
    want = torch.autograd.grad(causal_lm_loss(before.requires_grad_(), labels, z_loss=1e-3).loss_sum, before)[0]
    assert_close(logits.detach(), want)  # the forward already holds ∂ℓ/∂x
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.loss_sum.backward()


def test_no_grad_leaves_the_logits_alone():
    hidden, weight, labels, keep = inputs()
    with torch.no_grad():
        logits = F.linear(hidden, weight)
        before = logits.clone()
        out = inplace_causal_lm_loss(logits, labels, label_smoothing=0.1, loss_mask=keep)
    assert torch.equal(logits, before)
    want = causal_lm_loss(before, labels, label_smoothing=0.1, loss_mask=keep)
    assert_close(out.loss_sum, want.loss_sum)


def test_bf16_autocast_matches_autograd_rounding():
    """Under autocast the logits are bf16: the float32 gradient is rounded once into their buffer, as autograd's
    cast of the float32 cross-entropy gradient rounds it; the parameters' gradients agree to bf16 precision."""
    hidden, weight, labels, keep = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = causal_lm_loss(F.linear(hidden, weight), labels, z_loss=1e-3, loss_mask=keep)
        got = inplace_causal_lm_loss(F.linear(hidden, weight), labels, z_loss=1e-3, loss_mask=keep)
    assert_close(got.loss_sum.detach(), want.loss_sum.detach())
    for g, w in zip(grads(got, hidden, weight), grads(want, hidden, weight)):
        assert_close(g, w, rtol=2e-2)


class _Allocations(TorchDispatchMode):
    """Records the numel of every tensor an op returns in new storage (not a view or an in-place result)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                self.sizes.append(t.numel())
        return out


def test_no_second_logits_sized_buffer(monkeypatch):
    """Beyond the logits themselves, neither the loss's forward nor its backward allocates an [N, V] tensor (the
    point of the module: autograd's cross-entropy allocates three)."""
    monkeypatch.setattr(inplace_ce, "BLOCK_NUMBERS", 8 * 50)  # blocks of 8 of the 24 rows
    hidden, weight, labels, _ = inputs()
    logits = F.linear(hidden, weight)
    n_v = logits.numel()
    with _Allocations() as seen:
        out = inplace_causal_lm_loss(logits, labels, z_loss=1e-3, label_smoothing=0.1)
        (grad_logits,) = torch.autograd.grad(out.loss_sum, logits)
    assert grad_logits.data_ptr() == logits.data_ptr()
    assert max(seen.sizes) < n_v
    with _Allocations() as plain:
        ref = causal_lm_loss(F.linear(hidden.detach(), weight.detach()).requires_grad_(), labels, z_loss=1e-3)
        ref.loss_sum.backward()
    assert sum(size >= n_v for size in plain.sizes) >= 3  # what the plain loss allocates


def test_float16_logits_keep_the_plain_loss():
    """An fp16 gradient made before the loss scaler would underflow: fp16 logits are left intact (plain loss)."""
    hidden, weight, labels, _ = inputs()
    logits = F.linear(hidden, weight).half()
    before = logits.detach().clone()
    out = inplace_causal_lm_loss(logits, labels, z_loss=1e-3)
    assert torch.equal(logits.detach(), before)
    assert_close(out.loss_sum.detach(), causal_lm_loss(before.float(), labels, z_loss=1e-3).loss_sum, rtol=1e-3)
