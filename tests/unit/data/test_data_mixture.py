import json
import math

import numpy as np
import pytest
import torch

from lmlab.data.mixture import MixturePlan, MixtureSampler, mixture_ratios, prepare_mixture_data, upweighted_loss
from lmlab.data.sampler import WindowSampler
from lmlab.data.shards import TokenShards, load_manifest
from lmlab.errors import ConfigError
from lmlab.objectives.base import LossOutput
from lmlab.recipes.pretrain import run_pretraining

from helpers import tiny_config


class Const:
    """A token stream whose every token is ``value`` (so rows reveal their source)."""

    def __init__(self, value, n=1000):
        self.a = np.full(n, value, dtype=np.int64)

    def __len__(self):
        return len(self.a)

    def read(self, start, length):
        return self.a[start : start + length]


def sampler(ratios, **kw):
    subs = {name: WindowSampler(Const(i), seq_len=4, seed=i) for i, name in enumerate(ratios)}
    return MixtureSampler(subs, ratios, **kw)


def test_ratios_and_temperature():
    assert mixture_ratios([1, 3]) == pytest.approx([0.25, 0.75])
    assert mixture_ratios([1, 4], temperature=2.0) == pytest.approx([1 / 3, 2 / 3])
    assert mixture_ratios([1, 9], temperature=1e9) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_round_robin_shares_track_ratios_at_every_prefix():
    s = sampler({"a": 0.2, "b": 0.5, "c": 0.3})
    seen = []
    for _ in range(25):
        x, _, src = s.next_batch(4)
        assert torch.equal(x[:, 0], src)  # the row's tokens come from the source it is labelled with
        seen += src.tolist()
    for n in (10, 37, 100):
        counts = np.bincount(seen[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.2, 0.5, 0.3])) <= 1.0 + 1e-9)


def test_resume_and_ranks():
    ref = sampler({"a": 0.3, "b": 0.7})
    rows = [ref.next_batch(6)[0] for _ in range(8)]
    s = sampler({"a": 0.3, "b": 0.7})
    got = [s.next_batch(6)[0] for _ in range(3)]
    t = sampler({"a": 0.3, "b": 0.7})
    t.load_state_dict(s.state_dict())
    got += [t.next_batch(6)[0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(rows, got))
    r0 = sampler({"a": 0.3, "b": 0.7}, rank=0, world_size=2).next_batch(3)[0]
    r1 = sampler({"a": 0.3, "b": 0.7}, rank=1, world_size=2).next_batch(3)[0]
    assert torch.equal(torch.cat([r0, r1]), sampler({"a": 0.3, "b": 0.7}).next_batch(6)[0])


def languages_config(*extra):
    return tiny_config(
        "data.source=mixture",
        "data.mixture=[{name: norra, weight: 3, synthetic: {world: languages, subset: norra, n_docs: 150}},"
        " {name: kalua, weight: 1, synthetic: {world: languages, subset: kalua, n_docs: 150}}]",
        *extra,
    )


def test_prepare_languages_mixture_with_shared_tokenizer():
    cfg = languages_config()
    dirs, tok = prepare_mixture_data(cfg)
    assert list(dirs) == ["norra", "kalua"]
    hashes = {load_manifest(d)["tokenizer_hash"] for d in dirs.values()}
    assert hashes == {tok.hash}
    assert all(len(TokenShards.open(d, "train")) > 100 for d in dirs.values())
    again, tok2 = prepare_mixture_data(cfg)  # cached
    assert again == dirs and tok2.hash == tok.hash


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.mixture=[]", "needs data.mixture"),
        ("data.mixture=[{name: a, weight: 1}]", "exactly one of synthetic or files"),
        ("data.mixture=[{name: a, weight: -1, files: [x.txt]}]", "weight=-1.0 must be > 0"),
        ("data.mixture=[{name: a, files: [x]}, {name: a, files: [y]}]", "must be unique"),
    ],
)
def test_bad_mixture_configs(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config("data.source=mixture", override)


# ----------------------------------------------------------------------------- Cooldown and upweighting (D23)


def planned(plan, names=("a", "b"), **kw):
    subs = {name: WindowSampler(Const(i), seq_len=4, seed=i) for i, name in enumerate(names)}
    return MixtureSampler(subs, dict(zip(names, plan.target(0))), plan=plan, **kw)


def test_cooldown_moves_the_shares_from_flat_to_natural():
    # weights 1:9; T goes 5 → 1 over 400 rows: early rows near 1^(1/5):9^(1/5) = 0.39:0.61, late rows 0.1:0.9
    plan = MixturePlan((1.0, 9.0), temperature=5.0, temperature_end=1.0, total_rows=400)
    assert plan.target(0) == pytest.approx(mixture_ratios([1, 9], 5.0))
    assert plan.target(399) == pytest.approx([0.1, 0.9])
    assert plan.target(200)[0] == pytest.approx(mixture_ratios([1, 9], 5.0 - 4.0 * 200 / 399)[0])
    s = planned(plan)
    sources = torch.cat([s.next_batch(8)[2] for _ in range(50)]).numpy()
    expected = np.cumsum([plan.target(n) for n in range(400)], axis=0)
    counts = np.stack([np.cumsum(sources == i) for i in (0, 1)], axis=1)
    assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9)  # within a row of the moving target at every prefix
    late = np.mean([plan.target(n)[0] for n in range(300, 400)])  # ≈ 0.17: T is 2 → 1 over these rows
    assert (sources[:100] == 0).mean() == pytest.approx(0.37, abs=0.03)
    assert (sources[300:] == 0).mean() == pytest.approx(late, abs=0.02)


def test_cooldown_resumes_exactly():
    plan = MixturePlan((1.0, 9.0), temperature=5.0, temperature_end=1.0, total_rows=120)
    ref = planned(plan)
    rows = [ref.next_batch(6)[2] for _ in range(20)]
    s = planned(plan)
    got = [s.next_batch(6)[2] for _ in range(7)]
    t = planned(plan)
    t.load_state_dict(s.state_dict())
    got += [t.next_batch(6)[2] for _ in range(13)]
    assert all(torch.equal(a, b) for a, b in zip(rows, got))


def test_upweighting_draws_by_size_and_weights_the_loss():
    # target 0.5:0.5, natural sizes 0.2:0.8 → rows 1:4, loss weights 0.5/0.2 = 2.5 and 0.5/0.8 = 0.625
    plan = MixturePlan((1.0, 1.0), total_rows=100, balance="upweight", natural=(0.2, 0.8))
    x, _, src, weights = planned(plan).next_batch(10)
    assert src.tolist().count(0) == 2
    assert weights.tolist() == pytest.approx([2.5 if i == 0 else 0.625 for i in src.tolist()])
    assert float(weights.mean()) == pytest.approx(1.0)  # E_q[p/q] = 1: the loss keeps its scale


def test_upweighted_loss_scales_each_source_by_hand():
    calls = []

    def loss_fn(model, batch):  # each row's "loss" is its first token; count = rows
        calls.append(batch["input_ids"].shape[0])
        rows = batch["input_ids"][:, 0].float()
        return LossOutput(rows.sum(), torch.tensor(float(len(rows))), {"ce": rows.sum()})

    batch = {
        "input_ids": torch.tensor([[1], [10], [2], [20]]),
        "labels": torch.zeros(4, 1, dtype=torch.long),
        "source_ids": torch.tensor([0, 1, 0, 1]),
        "loss_weights": torch.tensor([2.0, 0.5, 2.0, 0.5]),
    }
    out = upweighted_loss(loss_fn)(None, batch)
    assert float(out.loss_sum) == pytest.approx(2.0 * (1 + 2) + 0.5 * (10 + 20))
    assert float(out.count) == 4 and float(out.metrics["ce"]) == 33.0  # unweighted
    assert sorted(calls) == [2, 2]
    assert float(upweighted_loss(loss_fn)(None, {k: v for k, v in batch.items() if k != "loss_weights"}).loss_sum) == 33


def test_a_run_with_cooldown_and_upweighting_trains(tmp_path):
    cfg = languages_config(
        "data.mixture_temperature=3", "data.mixture_temperature_end=1", "data.mixture_by_size=true",
        "data.mixture_balance=upweight",
    )  # fmt: skip
    run_pretraining(cfg, tmp_path / "run", quiet=True)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["kind"] == "eval"][-1]
    assert math.isfinite(last["val_loss"]) and {"val_loss/norra", "val_loss/kalua"} <= set(last)


def test_mixture_options_need_a_mixture():
    with pytest.raises(ConfigError, match="data.mixture_balance applies to data.source=mixture"):
        tiny_config("data.mixture_balance=upweight")
    with pytest.raises(ConfigError, match="mixture_temperature_end"):
        languages_config("data.mixture_temperature_end=0")
