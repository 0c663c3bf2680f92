"""Palimpsestic membership inference (issue 11, item 5; docs/science.md §16): the query statistic and both p-values on
§16's test vectors, the exact permutation p-value against brute force, per-example NLL against each example alone,
the training-order log of an SFT run against the draws training really made, tiny models where a fine-tune of the
run tests positive and an independently trained one does not, and ``lmlab eval provenance``'s one-line errors."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from lmlab.cli import main
from lmlab.config import load_config
from lmlab.data.packing import Row, RowBatches
from lmlab.data.training_order import TRAINING_ORDER_FILE, read_training_order, served_draws
from lmlab.eval.provenance import example_nll, permutation_pvalue, query_statistic, spearman_pvalue
from lmlab.models.build import build_model
from lmlab.recipes.sft import run_sft

from helpers import model_cfg

# ----------------------------------------------------------------------------------------------- §16 test vectors


def test_perfect_inverse_vector():
    rho, p = query_statistic(range(5), [5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0)
    assert p < 1e-20
    # 5! = 120 orders, only the observed one reaches ρ = −1: the exact p-value is 1/120.
    assert permutation_pvalue(range(5), [5, 4, 3, 2, 1], n_permutations=120) == pytest.approx(1 / 120)
    assert permutation_pvalue(range(5), [1, 2, 3, 4, 5], n_permutations=120) == pytest.approx(1.0)


def test_t_distribution_vector():
    assert spearman_pvalue(-0.0778918, 100_000) == pytest.approx(2.32e-134, rel=2e-3)
    assert spearman_pvalue(-1.0, 10) == 0.0


def test_default_rng_vector_and_scipy_equals_the_t_formula():
    rng = np.random.default_rng(0)
    n = 1000
    t = np.arange(n)
    m = -0.002 * t / n + rng.normal(0, 0.01, n)
    rho, p = query_statistic(t, m)
    assert rho == pytest.approx(-0.106051, abs=1e-6)
    assert p == pytest.approx(7.83e-4, rel=1e-3)
    assert spearman_pvalue(rho, n) == pytest.approx(p, rel=1e-9)
    # The reference is subtracted: m − 0 is m, and adding the same per-example offset to both changes nothing.
    offset = rng.normal(0, 1, n)
    assert query_statistic(t, m + offset, offset)[0] == pytest.approx(rho)
    # One-sided: the Monte Carlo p-value is about half the two-sided one, and ≈ 1 the other way round.
    assert 1 / 2000 <= permutation_pvalue(t, m, 1999, seed=1) < 3e-3
    assert permutation_pvalue(t, -m, 999) > 0.99


def test_exact_permutation_pvalue_equals_brute_force_with_shared_positions():
    # Records packed in one row share a position; an order moves the row, so the 6 records have 4! orders.
    positions = [0, 0, 1, 2, 2, 3]
    scores = [0.3, 0.1, 0.5, -0.2, 0.0, -0.4]
    rho = stats.spearmanr(positions, scores).statistic
    values = [0, 1, 2, 3]
    group = [0, 0, 1, 2, 2, 3]
    null = [stats.spearmanr([perm[g] for g in group], scores).statistic for perm in itertools.permutations(values)]
    expected = sum(r <= rho + 1e-12 for r in null) / len(null)
    assert permutation_pvalue(positions, scores, n_permutations=24) == pytest.approx(expected)
    # Fewer re-drawn orders than orders: Monte Carlo (1 + #)/(K + 1), deterministic per seed.
    mc = permutation_pvalue(positions, scores, n_permutations=23, seed=3)
    assert mc == permutation_pvalue(positions, scores, n_permutations=23, seed=3)
    assert 1 / 24 <= mc <= 1


def test_statistic_refuses_bad_input():
    with pytest.raises(ValueError, match="one length"):
        query_statistic([0, 1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        query_statistic([0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="constant"):
        query_statistic([0, 1, 2], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_pvalue([0, 1, 2], [1.0, 2.0, 0.0], 0)


def test_example_nll_is_each_example_alone_over_its_targets():
    torch.manual_seed(0)
    model = build_model(model_cfg(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()
    examples = [
        ([1, 5, 7, 9, 2], [False, True, True, True, True]),
        ([3, 4], [False, True]),
        ([1, 8, 8, 6, 5, 4, 2], [False, False, False, True, True, True, True]),  # a prompt, then the answer
    ]
    got = example_nll(model, examples, batch_size=2)
    for (ids, mask), value in zip(examples, got):
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # [T, V]
        targets = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1]]
        assert value == pytest.approx(sum(targets) / len(targets), abs=1e-5)
    with pytest.raises(ValueError, match="target"):
        example_nll(model, [([1, 2], [False, False])])


# ----------------------------------------------------------------------------------------------- the training order


def test_served_draws_replays_the_epoch_orders():
    rows = [Row(sources=[0, 3]), Row(sources=[1]), Row(sources=[2])]
    orders = {0: [2, 0, 1], 1: [1, 2, 0]}
    first, last = served_draws(rows, orders.__getitem__, total_draws=5)  # epoch 0, then 2 rows of epoch 1
    assert first == {2: 0, 0: 1, 3: 1, 1: 2}
    assert last == {2: 4, 0: 1, 3: 1, 1: 3}


TINY_SFT = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "train.seq_len=32",
    "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=1000", "train.log_every=1000",
    "train.ckpt_every=1000", "train.progress=false", "train.device=cpu", "schedule.warmup_steps=0",
    "sample.max_new_tokens=1", "sample.prompts=[hi]", "tokenizer.vocab_size=300", "data.val_fraction=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A packed SFT run of 1.5 epochs (documents and conversations, one over-long record dropped) and the record
    indices of every row it drew, in order."""
    root = tmp_path_factory.mktemp("order")
    rng = random.Random(1)
    lines = [
        {"text": " ".join(rng.choice(["ab", "cd", "ef", "gh"]) for _ in range(rng.randint(2, 9)))} for _ in range(14)
    ]
    lines += [{"prompt": f"say {w}", "completion": f"{w} {w}"} for w in ("one", "two", "three")]
    lines.insert(5, {"text": "too long " * 40})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    drawn: list[list[int]] = []
    real = RowBatches.next_indices

    def spy(self, batch_size):
        picked = real(self, batch_size)
        drawn.extend(self.rows[i].sources for i in picked)
        return picked

    cfg = load_config(
        None, [*TINY_SFT, f"sft.train_file={root / 'train.jsonl'}", "sft.overlong=drop", "sft.epochs=1.5"]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RowBatches, "next_indices", spy)
        summary = run_sft(cfg, root / "run", quiet=True)
    return root / "run", len(lines), drawn, summary


def test_sft_run_logs_when_each_record_was_trained(logged_run):
    run, n_records, drawn, summary = logged_run
    rows = [json.loads(line) for line in (run / TRAINING_ORDER_FILE).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(n_records))  # every record once, in file order
    assert all(r["where"].endswith(f"train.jsonl:{r['index'] + 1}") for r in rows)
    assert rows[5]["position"] is rows[5]["step"] is rows[5]["last_position"] is None  # dropped as over-long
    assert "text" in rows[0] and rows[-1]["messages"][-1] == {"role": "assistant", "content": "three three"}
    assert rows[-1]["n_context"] == 1

    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for draw, sources in enumerate(drawn):
        for s in sources:
            first.setdefault(s, draw)
            last[s] = draw
    per_step = 2 * 2  # micro-batch × grad_accum
    assert len(drawn) == summary["steps"] * per_step
    for r in rows:
        assert r["position"] == first.get(r["index"])
        assert r["last_position"] == last.get(r["index"])
        if r["position"] is not None:
            assert r["step"] == r["position"] // per_step
    # Epoch 0 serves each packed row once: the positions are 0 .. rows − 1, shared by the records of one row.
    n_rows = summary["data"]["train_rows"]
    assert sorted({r["position"] for r in rows if r["position"] is not None}) == list(range(n_rows))
    assert n_rows < n_records - 1  # rows hold several records
    assert any(r["last_position"] != r["position"] for r in rows if r["position"] is not None)  # a second epoch

    read = read_training_order(run / TRAINING_ORDER_FILE)
    assert [t.position for t in read] == [r["position"] for r in rows]
    assert read[-1].record.n_context == 1 and read[0].record.text == rows[0]["text"]


# ----------------------------------------------------------------------------------------------- tiny provenance
# Documents of 10 random words over 60 made-up words. ``base`` learns that distribution; ``alice`` continues from
# it for 2 epochs over 200 documents (constant LR, so her last-trained documents are her freshest memories);
# ``bob`` fine-tunes alice briefly on other documents at a tenth of her LR; ``indep`` trains from ``base`` on
# alice's documents in another order. The reference is ``base``: it knows how hard each document is, not the order.

_R0 = random.Random(99)
WORDS = sorted({"".join(_R0.choice("bcdfghklmnprstvz") + _R0.choice("aeiou") for _ in range(2)) for _ in range(60)})
ARCH = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=64",
    "train.eval_every=100000", "train.log_every=100000", "train.ckpt_every=100000", "train.progress=false",
    "train.device=cpu", "schedule.warmup_steps=0", "optim.weight_decay=0", "data.val_fraction=0",
    "sample.max_new_tokens=1", "sample.prompts=[hi]", "tokenizer.vocab_size=300", "sft.packing=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    rng = random.Random(0)
    for name, n in (("world", 1000), ("alice", 200), ("bob", 200)):
        docs = (" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n))
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def sft(name: str, *overrides: str) -> None:
        run_sft(load_config(None, [*ARCH, *overrides]), root / name, quiet=True)

    constant = ["schedule.name=constant", "train.micro_batch_size=4"]
    sft("base", f"sft.train_file={root / 'world.jsonl'}", "train.steps=200", "train.micro_batch_size=16",
        "optim.lr=3e-3", "schedule.name=cosine")  # fmt: skip
    sft("alice", f"init_from={root / 'base'}", f"sft.train_file={root / 'alice.jsonl'}", "sft.epochs=2",
        "optim.lr=1e-3", "data.seed=0", *constant)  # fmt: skip
    sft("bob", f"init_from={root / 'alice'}", f"sft.train_file={root / 'bob.jsonl'}", "train.steps=10",
        "optim.lr=1e-4", "data.seed=5", "sft.training_order=false", *constant)  # fmt: skip
    sft("indep", f"init_from={root / 'base'}", f"sft.train_file={root / 'alice.jsonl'}", "sft.epochs=2",
        "optim.lr=1e-3", "data.seed=1", *constant)  # fmt: skip
    return root


def provenance(capsys, *argv: str) -> dict:
    assert main(["eval", "provenance", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_fine_tune_of_the_run_tests_positive_and_an_independent_model_does_not(lineage, capsys, tmp_path):
    order = ["--order", str(lineage / "alice"), "--reference", str(lineage / "base"), "--permutations", "999"]
    out = tmp_path / "bob.json"
    bob = provenance(capsys, str(lineage / "bob"), *order, "--out", str(out))
    indep = provenance(capsys, str(lineage / "indep"), *order)
    alice = provenance(capsys, str(lineage / "alice"), *order)
    print({name: (r["rho"], r["p_value"], r["p_permutation"]) for name, r in (("bob", bob), ("indep", indep))})
    assert bob["n"] == indep["n"] == 200
    assert alice["rho"] < 0 and alice["p_permutation"] < 0.01
    assert bob["rho"] < 0 and bob["p_value"] < 0.05 and bob["p_permutation"] < 0.05
    assert bob["verdict"] == "derived"
    assert indep["p_value"] > 0.05 and indep["p_permutation"] > 0.05
    assert indep["verdict"] == "not shown"
    assert json.loads(out.read_text()) == bob


def test_bad_input_is_one_line(lineage, logged_run, capsys, tmp_path):
    alice, base = str(lineage / "alice"), str(lineage / "base")

    def fails(*argv: str, match: str) -> None:
        assert main(["eval", "provenance", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        assert match in err, err

    unlogged = tmp_path / "unlogged"
    shutil.copytree(lineage / "alice", unlogged)
    (unlogged / TRAINING_ORDER_FILE).unlink()
    fails(alice, "--order", str(unlogged), match="train RUN again with this version")
    assert not (lineage / "bob" / TRAINING_ORDER_FILE).exists()  # bob trained with sft.training_order=false
    fails(alice, "--order", str(lineage / "bob"), match="unless sft.training_order=false")
    (unlogged / TRAINING_ORDER_FILE).write_text("\n")
    fails(alice, "--order", str(unlogged), match="lists no record")
    fails(str(logged_run[0]), "--order", alice, match="uses a different tokenizer")
    fails(str(tmp_path / "nowhere"), "--order", alice, match="SUSPECT")
    fails(alice, "--order", alice, "--reference", alice, match="the suspect itself")
    fails(base, "--order", alice, "--permutations", "0", match="--permutations must be >= 1")
