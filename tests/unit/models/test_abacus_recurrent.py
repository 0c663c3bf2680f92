"""Abacus digit-place embeddings and recurrent depth (issue 14 items 3 and 4): places by hand and across cached
calls, the training offset, the truncated backpropagation and the iteration schedule, cached decoding equal to
the full forward, counts, the impossible settings, and runs through the engine (resumed bitwise)."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.models.abacus import AbacusConfig, AbacusEmbedding, digit_places
from lmlab.models.counting import count_params, flops_per_token
from lmlab.models.decoder import Decoder
from lmlab.models.recurrent import recurrence_iterations, sample_iterations
from lmlab.recipes.pretrain import run_pretraining

from helpers import crash_and_resume, model_cfg, tiny_config, train_records

DIGITS = list(range(10, 20))  # token ids standing for "0".."9" in the hand-made tests


def test_digit_places_by_hand_and_across_calls():
    ids = torch.tensor([[11, 12, 3, 13, 14, 15, 4, 16], [17, 5, 18, 19, 10, 11, 12, 13]])
    places, carry = digit_places(ids, torch.tensor(DIGITS))
    assert places.tolist() == [[1, 2, 0, 1, 2, 3, 0, 1], [1, 0, 1, 2, 3, 4, 5, 6]]
    assert carry.tolist() == [1, 6]
    # the same rows in two calls: a number spanning the cut continues its count
    first, carry = digit_places(ids[:, :5], torch.tensor(DIGITS))
    second, _ = digit_places(ids[:, 5:], torch.tensor(DIGITS), carry)
    assert torch.equal(torch.cat((first, second), dim=1), places)


def test_training_shifts_every_place_of_a_row_by_one_offset():
    torch.manual_seed(0)
    layer = AbacusEmbedding(AbacusConfig(enabled=True, max_digits=8, max_offset=50, digit_ids=DIGITS), 4, 0.02)
    ids = torch.tensor([[11, 12, 13, 3, 14, 15]] * 64)
    layer.eval()
    assert torch.equal(layer(ids)[0], layer.embedding(torch.tensor([[1, 2, 3, 0, 1, 2]] * 64)))
    layer.train()
    out, _ = layer(ids)
    table = layer.embedding.weight
    offsets = [int((table == out[r, 0]).all(-1).nonzero()[0, 0]) - 1 for r in range(64)]
    assert 0 <= min(offsets) and max(offsets) <= 50 and len(set(offsets)) > 10
    for r in range(64):  # one offset per row, the same for every digit; non-digits stay at the zero vector
        want = torch.tensor([1, 2, 3, 0, 1, 2]) + torch.tensor([1, 1, 1, 0, 1, 1]) * offsets[r]
        assert torch.equal(out[r], table[want])
    assert torch.all(out[:, 3] == 0)


def abacus_model(position="rope", **abacus):
    torch.manual_seed(0)
    cfg = model_cfg(vocab_size=40, d_model=32, n_layers=2, n_heads=4, position=position,
                    abacus={"enabled": True, "digit_ids": DIGITS, **abacus})  # fmt: skip
    cfg.validate()
    return Decoder(cfg).eval(), cfg


@pytest.mark.parametrize("position", ["rope", "none"])  # none: NoPE, the paper's pairing with Abacus
def test_abacus_changes_only_rows_with_digits_and_decodes_with_the_cache(position):
    model, cfg = abacus_model(position)
    plain = Decoder(model_cfg(cfg, abacus={"enabled": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("abacus.")})
    no_digits = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(no_digits), plain(no_digits))
        ids = torch.tensor([[1, 11, 12, 13, 2, 14, 15, 16, 17, 3]])
        full = model(ids)
        assert (full - plain(ids)).abs().max() > 1e-4
        cache = model.new_kv_cache()
        parts = [model(ids[:, :6], kv_cache=cache), *(model(ids[:, t : t + 1], kv_cache=cache) for t in range(6, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-6, rtol=1e-5)


def test_abacus_counts_as_embedding():
    model, cfg = abacus_model(max_digits=20, max_offset=10)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == 40 * 32 + 31 * 32
    assert model.num_params(non_embedding=True) == counts["non_embedding"]


def test_abacus_settings_are_checked():
    with pytest.raises(ConfigError, match=r"digit_ids=\[1, 2\] must be the 10 distinct ids"):
        load_config(None, ["model.abacus.enabled=true", "model.abacus.digit_ids=[1,2]"]).validate()
    with pytest.raises(ConfigError, match="needs the digit token ids"):
        Decoder(model_cfg(vocab_size=40, d_model=32, n_layers=1, n_heads=4, abacus={"enabled": True}))


ARITHMETIC = ("data.synthetic.world=arithmetic", "tokenizer.split_digits=true", "model.abacus.enabled=true",
              "model.abacus.max_digits=24", "model.abacus.max_offset=8")  # fmt: skip


def test_a_run_takes_the_digit_ids_from_its_tokenizer(tmp_path):
    from lmlab.data.tokenizer import TextTokenizer, digit_token_ids

    run_pretraining(tiny_config(*ARITHMETIC, "train.steps=2"), tmp_path / "r", quiet=True)
    saved = load_config(tmp_path / "r" / "config.yaml").model.abacus
    assert saved.digit_ids == list(digit_token_ids(TextTokenizer.load(tmp_path / "r" / "tokenizer.json")))


def test_abacus_without_one_token_per_digit_is_one_config_error(tmp_path):
    overrides = ("data.synthetic.world=arithmetic", "tokenizer.vocab_size=400", "model.abacus.enabled=true")
    with pytest.raises(ConfigError, match=r"split_digits: true"):
        run_pretraining(tiny_config(*overrides), tmp_path / "r", quiet=True)


# --------------------------------------------------------------------------- recurrent depth


def recurrent_model(**recurrence):
    torch.manual_seed(0)
    cfg = model_cfg(vocab_size=40, d_model=32, n_layers=4, n_heads=4,
                    recurrence={"enabled": True, "prelude_layers": 1, "coda_layers": 1, **recurrence})  # fmt: skip
    cfg.validate()
    return Decoder(cfg), cfg


def test_iterations_follow_the_poisson_lognormal():
    torch.manual_seed(0)
    draws = torch.tensor([sample_iterations(4.0, 0.5) for _ in range(4000)], dtype=torch.float)
    assert draws.min() >= 1
    assert draws.mean().item() == pytest.approx(5.0, abs=0.15)  # E[Poisson(e^τ)] + 1 = mean + 1
    assert draws.var().item() > draws.mean().item() - 1  # over-dispersed: more spread than a Poisson


def test_only_the_last_iterations_take_gradients():
    model, _ = recurrent_model(backprop_depth=2)
    seen = []
    model.layers[1].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    with recurrence_iterations(model, 5):
        model(torch.randint(0, 40, (2, 6))).sum().backward()
    assert seen == [False, False, False, True, True]
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0  # the prelude learns through the injection
    model.eval()
    seen.clear()
    with torch.no_grad(), recurrence_iterations(model, 3):
        model(torch.randint(0, 40, (1, 4)))
    assert seen == [False] * 3


def test_test_time_iterations_change_the_output_deterministically_and_decode_with_the_cache():
    model, _ = recurrent_model(eval_iterations=3)
    model.eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        three = model(ids)
        assert torch.equal(model(ids), three)  # a zero initial state in evaluation
        with recurrence_iterations(model, 6):
            six = model(ids)
            cache = model.new_kv_cache()
            parts = [
                model(ids[:, :5], kv_cache=cache),
                *(model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 9)),
            ]
    assert (six - three).abs().max() > 1e-4
    torch.testing.assert_close(torch.cat(parts, dim=1), six, atol=2e-6, rtol=1e-5)
    assert len(cache.layers) == 1 + 1 + 6 * 2  # prelude, coda, 6 iterations of the 2 core blocks
    with pytest.raises(ValueError, match="growing KV cache"):
        model(ids, kv_cache=model.new_kv_cache(max_len=16))


def test_recurrent_counts():
    model, cfg = recurrent_model(mean_iterations=3.0)
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    plain = model_cfg(cfg, recurrence={"enabled": False})
    block = (flops_per_token(plain, 16)["forward"] - 2 * 32 * 40) // 4  # one block's FLOPs
    adapter = 2 * 2 * 32 * 32
    assert flops_per_token(cfg, 16)["forward"] == 2 * block + 3 * (2 * block + adapter) + 2 * 32 * 40


def test_recurrence_settings_are_checked():
    with pytest.raises(ConfigError, match="must leave at least one core block of model.n_layers=2"):
        load_config(None, ["model.n_layers=2", "model.recurrence.enabled=true"]).validate()
    with pytest.raises(ConfigError, match="eval_iterations=0 must be >= 1"):
        load_config(None, ["model.recurrence.enabled=true", "model.recurrence.eval_iterations=0"]).validate()


def test_recurrent_and_abacus_run_trains_and_resumes_bitwise(tmp_path, monkeypatch):
    overrides = (*ARITHMETIC, "model.n_layers=3", "model.recurrence.enabled=true", "model.recurrence.mean_iterations=2",
                 "train.steps=6", "train.ckpt_every=3", "train.eval_every=3")  # fmt: skip
    run_pretraining(tiny_config(*overrides), tmp_path / "full", quiet=True)
    crash_and_resume(tiny_config(*overrides), tmp_path / "crashed", 5, monkeypatch)
    full, resumed = train_records(tmp_path / "full"), train_records(tmp_path / "crashed")
    assert {s: r["loss"] for s, r in full.items()} == {s: r["loss"] for s, r in resumed.items()}
