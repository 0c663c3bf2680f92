import numpy as np
import pytest
import torch

from lmlab.data.mixture import MixtureSampler, mixture_ratios, prepare_mixture_data
from lmlab.data.sampler import WindowSampler
from lmlab.data.shards import TokenShards, load_manifest
from lmlab.errors import ConfigError

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
