"""Sampling: top-k / top-p on hand examples, greedy cached generation vs full recomputation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lmlab.models import generation
from lmlab.models.decoder import Decoder
from lmlab.models.generation import generate, greedy_many, sample_next, top_k_filter, top_p_filter

from helpers import model_cfg

CFG = model_cfg(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64, ffn_multiple_of=16)
INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    # a larger init std spreads the logits, so greedy paths are not dominated by near-ties
    return Decoder(replace(CFG, init_std=0.5)).eval()


def test_top_k_filter_hand_example():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    assert top_k_filter(logits, 2).tolist() == [[INF, 5.0, INF, INF, 4.0]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()
    assert top_k_filter(logits, 9).tolist() == logits.tolist()


def test_top_p_filter_hand_example():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    # ranked 0.5, 0.25, 0.15, 0.1: mass before each = 0, 0.5, 0.75, 0.9
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.8) == [False, True, True, True]
    assert kept(0.95) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # the top token always stays
    assert kept(1.0) == [True, True, True, True]


def test_sample_next_respects_filters_and_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(200, 1)
    assert sample_next(logits, temperature=0).unique().tolist() == [1]
    sampled = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(sampled.tolist()) == {1, 2}


def test_sampling_frequencies_follow_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(20000, 1)  # p = [0.25, 0.75]
    draws = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert abs(draws.float().mean().item() - 0.75) < 0.015
    hot = sample_next(logits, temperature=1e6, generator=torch.Generator().manual_seed(2))
    assert abs(hot.float().mean().item() - 0.5) < 0.015


def _greedy_without_cache(model: Decoder, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_cached_generation_equals_full_recomputation(model):
    prompt = [3, 14, 15, 9, 26]
    new = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert len(new) == 20
    assert new == _greedy_without_cache(model, prompt, 20)
    assert len(set(new)) > 3  # a varied continuation, not one repeated token


def test_last_position_logits_with_cache_equal_without():
    torch.manual_seed(0)
    model = Decoder(CFG).eval()  # default init: logits of order 1, so 1e-5 is a tight absolute bound
    seq = torch.tensor([[5, 8, 13, 21, 34, 55, 1, 2]])
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(seq[:, :5], kv_cache=cache)
        model(seq[:, 5:7], kv_cache=cache)
        cached = model(seq[:, 7:], kv_cache=cache)[:, -1]
        full = model(seq)[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_batches_eos_and_tensor_prompts(model):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    batch = generate(model, prompts, max_new_tokens=6, temperature=0)
    assert batch == [generate(model, p, max_new_tokens=6, temperature=0) for p in prompts]
    assert generate(model, torch.tensor([1, 2, 3]), 6, temperature=0) == batch[0]
    assert generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 6, temperature=0) == batch[:2]
    eos = batch[0][2]
    stopped = generate(model, [1, 2, 3], max_new_tokens=6, temperature=0, eos_id=eos)
    assert stopped == batch[0][: batch[0].index(eos) + 1]
    assert generate(model, [1, 2], max_new_tokens=0) == []


def test_seeded_sampling_is_reproducible(model):
    run = lambda seed: generate(  # noqa: E731
        model, [1, 2, 3], 12, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert model.training is False


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, [1, 2], 2, temperature=0)
    assert model.training
    model.eval()


def test_cpu_generator_works_for_any_device_logits():
    """Regression: sampling with a CPU generator must not fail when the logits live elsewhere
    (CUDA runs crashed in samples.txt). On CPU the path is the same call; on CUDA it is exercised for real."""
    import torch

    from lmlab.models.generation import sample_next

    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(3, 11, device=device)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    b = sample_next(logits.cpu(), 1.0, generator=torch.Generator().manual_seed(0))
    assert a.device.type == device and torch.equal(a.cpu(), b)


def test_left_padded_batch_equals_one_prompt_at_a_time(model):
    """Prompts of different lengths share one batch (left padding under the cache's key mask) and each row's
    greedy continuation and logits are those it gets alone."""
    prompts = [[3, 9, 14, 2, 7, 30], [5], [11, 4, 8]]
    alone = [generate(model, p, max_new_tokens=8, temperature=0) for p in prompts]
    assert generate(model, prompts, max_new_tokens=8, temperature=0) == alone
    # the same prompts in another order (other padding per row) give the same rows
    assert generate(model, prompts[::-1], max_new_tokens=8, temperature=0) == alone[::-1]


def test_greedy_many_equals_one_prompt_at_a_time(model, monkeypatch):
    """Own budgets, batches of 2, an end-of-text id, and rows near max_seq_len (64) that need their own batch."""
    prompts = [[3, 9, 14, 2, 7, 30], [5], [11, 4, 8], list(range(1, 59)), [7, 7], list(range(2, 60))]
    budgets = [8, 3, 5, 5, 0, 6]  # row 5 (58 tokens) + row 0's budget of 8 would pass 64: they decode apart
    eos = generate(model, [5], max_new_tokens=3, temperature=0)[1]  # row 1 ends on its second token
    alone = [generate(model, p, max_new_tokens=b, temperature=0, eos_id=eos) for p, b in zip(prompts, budgets)]
    calls = []

    def spy(m, batch, max_new_tokens, **kwargs):
        calls.append((len(batch), max(len(p) for p in batch) + max_new_tokens))
        return generate(m, batch, max_new_tokens, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    assert greedy_many(model, prompts, budgets, batch_size=2, eos_id=eos) == alone
    assert all(size <= 2 and longest <= CFG.max_seq_len for size, longest in calls) and len(calls) == 4
    assert alone[1][-1] == eos and len(alone[1]) == 2 and alone[4] == []
    with pytest.raises(ValueError, match="2 prompts but 1 budgets"):
        greedy_many(model, prompts[:2], [1], batch_size=2)


def test_stop_callback_ends_a_row_early(model):
    full = generate(model, [1, 2, 3], max_new_tokens=8, temperature=0)
    stopped = generate(model, [1, 2, 3], max_new_tokens=8, temperature=0, stop=lambda new: len(new) >= 3)
    assert stopped == full[:3]
