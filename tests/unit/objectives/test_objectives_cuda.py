"""Objectives on CUDA give the CPU results (device-independent goldfish masks, bf16 logits, chunking)."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.objectives.distill import distillation_loss
from lmlab.objectives.goldfish import goldfish_hash_table, goldfish_mask
from lmlab.objectives.lm import causal_lm_loss, chunked_causal_lm_loss
from lmlab.objectives.neftune import neftune_noise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_goldfish_mask_is_identical_on_cuda_and_cpu():
    assert torch.equal(goldfish_hash_table("cuda").cpu(), goldfish_hash_table())
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(1, 128_000, (8, 2048), generator=generator)
    for strategy in ("hash", "static"):
        cpu = goldfish_mask(targets, k=4, strategy=strategy)
        gpu = goldfish_mask(targets.cuda(), k=4, strategy=strategy)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)


def test_lm_loss_with_bf16_cuda_logits_matches_cpu_float32():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 64, 32_000, generator=generator).bfloat16()
    labels = torch.randint(0, 32_000, (2, 64), generator=generator)
    options = {"z_loss": 1e-4, "label_smoothing": 0.1}
    cpu = causal_lm_loss(logits.float(), labels, **options)
    gpu = causal_lm_loss(logits.cuda(), labels.cuda(), **options)
    assert gpu.loss_sum.dtype == torch.float32
    assert gpu.loss_sum.item() == pytest.approx(cpu.loss_sum.item(), rel=1e-5)
    assert gpu.metrics["z_loss"].item() == pytest.approx(cpu.metrics["z_loss"].item(), rel=1e-5)


def test_chunked_hidden_loss_matches_full_on_cuda_and_saves_memory():
    torch.manual_seed(2)
    vocab, dim, tokens = 128_000, 256, 4096
    head = torch.nn.Linear(dim, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    full = causal_lm_loss(head(hidden), labels, z_loss=1e-4)
    full.loss_sum.backward()
    full_peak = torch.cuda.max_memory_allocated() - base
    full_grad = hidden.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size=512, z_loss=1e-4)
    chunked.loss_sum.backward()
    chunked_peak = torch.cuda.max_memory_allocated() - base

    assert chunked.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-4)
    torch.testing.assert_close(hidden.grad.float(), full_grad.float(), rtol=2e-2, atol=1e-4)
    assert chunked_peak < full_peak / 2


def test_neftune_and_distillation_on_cuda():
    embeddings = torch.zeros(2, 512, 256, device="cuda")
    noised = neftune_noise(embeddings, alpha=5.0, generator=torch.Generator().manual_seed(3))
    assert noised.device.type == "cuda"
    assert noised[0].norm().item() == pytest.approx(5.0 / math.sqrt(3.0), rel=0.01)

    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 8, 50, generator=generator), torch.randn(2, 8, 50, generator=generator)
    labels = torch.randint(0, 50, (2, 8), generator=generator)
    cpu = distillation_loss(student, teacher, labels, divergence="jsd", temperature=2.0)
    gpu = distillation_loss(student.cuda(), teacher.cuda(), labels.cuda(), divergence="jsd", temperature=2.0)
    assert gpu.loss_sum.item() == pytest.approx(cpu.loss_sum.item(), rel=1e-5)


def test_inplace_loss_on_cuda_matches_plain_autograd_and_allocates_less():
    """The standard head's in-place cross-entropy on a GPU (its own row-block size): the plain loss's value and
    gradients, and a lower peak than autograd's three [N, V] float32 buffers."""
    from lmlab.objectives.inplace_ce import inplace_causal_lm_loss

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 512, 256, generator=generator).cuda().requires_grad_()
    weight = (0.05 * torch.randn(32_000, 256, generator=generator)).cuda().requires_grad_()
    labels = torch.randint(0, 32_000, (4, 512), generator=generator).cuda()
    options = {"z_loss": 1e-4, "label_smoothing": 0.1}
    peaks, results = {}, {}
    for name, loss in (("plain", causal_lm_loss), ("inplace", inplace_causal_lm_loss)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = loss(torch.nn.functional.linear(hidden, weight), labels, **options)
        grads = torch.autograd.grad(out.loss_sum, (hidden, weight))
        peaks[name] = torch.cuda.max_memory_allocated() - start
        results[name] = (out.loss_sum.detach(), *grads)
    for got, want in zip(results["inplace"], results["plain"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    logits_bytes = 4 * 512 * 32_000 * 4
    assert peaks["inplace"] < peaks["plain"] - logits_bytes
