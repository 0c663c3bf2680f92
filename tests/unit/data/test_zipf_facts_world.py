"""The ``zipf_facts`` world: exact probabilities (a small world enumerated whole), determinism, Zipf popularity,
and the exact entropy floor carried through data preparation into evaluation."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from lmlab.data.prepare import VAL_DOC_NLL, Document, prepare_shards
from lmlab.data.shards import TokenShards
from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.zipf_facts import FactDocument, ZipfFactsWorld
from lmlab.eval.perplexity import complete_document_mask, document_floor, evaluate_lm
from lmlab.recipes.pretrain import run_pretraining
from lmlab.science.curves import load_curves
from lmlab.science.results import run_row

from helpers import tiny_config


def _every_document(world: ZipfFactsWorld):
    """Every possible document of a small world as (text, probability)."""
    for entity in range(world.n_entities):
        for m in range(1, world.max_facts + 1):
            for relations in itertools.permutations(range(world.n_relations), m):
                for frames in itertools.product(range(len(world.frame_p)), repeat=m):
                    for fillers in itertools.product(range(-1, len(world.filler_p)), repeat=m):
                        nll = world.nll(entity, relations, frames, fillers)
                        yield world.render(FactDocument(entity, relations, frames, fillers, nll)), math.exp(-nll)


def test_small_world_enumerated_probabilities_sum_to_one_and_texts_are_distinct():
    world = ZipfFactsWorld(n_entities=3, n_relations=3, max_facts=2, n_frames=4, n_fillers=2)
    docs = list(_every_document(world))
    texts = [t for t, _ in docs]
    assert len(set(texts)) == len(texts)  # distinct choices → distinct texts: −log p(text) is the choices' nll
    assert math.fsum(p for _, p in docs) == pytest.approx(1.0, abs=1e-12)
    entropy = -math.fsum(p * math.log(p) for _, p in docs)
    assert world.entropy_per_document() == pytest.approx(entropy, rel=1e-12)
    # the sampler draws with those probabilities: empirical frequencies of 20k documents
    counts = Counter(world.render(world.draw(0, i)) for i in range(20000))
    prob = dict(docs)
    top = counts.most_common(5)
    for text, n in top:
        assert n / 20000 == pytest.approx(prob[text], abs=4 * math.sqrt(prob[text] / 20000))


def test_documents_are_a_pure_function_of_seed_and_index():
    world = get_world("zipf_facts")
    assert world.n_entities == 2**22 and world.n_relations == 32
    first = list(world.documents(3, 50))
    assert first[:20] == list(world.documents(3, 20))
    assert list(itertools.islice(world.documents(3), 50)) == first  # endless stream
    assert first != list(world.documents(4, 50))
    with_nll = list(world.documents_with_nll(3, 50))
    assert [t for t, _ in with_nll] == first
    assert [n for _, n in with_nll] == [world.draw(3, i).nll for i in range(50)]


def test_facts_are_fixed_per_entity_and_only_the_first_sentence_names_it():
    world = ZipfFactsWorld()
    seen: dict[tuple[int, int], str] = {}
    for i in range(3000):
        doc = world.draw(0, i)
        text = world.render(doc)
        name = world.entity_name(doc.entity)
        assert text.count(name) == 1 and len(text.split()) < 60  # short: a document fits a 128-token window
        for rel in doc.relations:
            value = world.values[rel][world.fact_value(doc.entity, rel)]
            assert seen.setdefault((doc.entity, rel), value) == value
    assert len({world.entity_name(r) for r in range(0, 2**22, 37)}) == len(range(0, 2**22, 37))


def test_entity_popularity_is_zipf():
    world = ZipfFactsWorld()
    n = 30000
    counts = Counter(world.draw(1, i).entity for i in range(n))
    for rank in (0, 1, 9):
        p = float(world.entity_p[rank])
        assert counts[rank] / n == pytest.approx(p, abs=4 * math.sqrt(p / n))
    assert world.entity_p[0] / world.entity_p[9] == pytest.approx((20 / 11) ** (10 / 7))  # (k + 10)^(−s)


# ----------------------------------------------------------------------------- the floor through the pipeline


def test_prepared_manifest_stores_the_exact_floor(bpe, tmp_path):
    world = ZipfFactsWorld()
    records = list(world.documents_with_nll(0, 300))
    docs = [Document(t, "synthetic:zipf_facts", i, nll=n) for i, (t, n) in enumerate(records)]
    m = prepare_shards(docs, bpe, tmp_path / "prep", val_fraction=0.2, seed=0)
    val_nll = np.load(tmp_path / "prep" / VAL_DOC_NLL)
    assert len(val_nll) == m["splits"]["val"]["documents"]
    total = math.fsum(n for _, n in records)
    floors = m["splits"]["train"]["entropy_floor"] * m["splits"]["train"]["tokens"]
    assert floors + m["splits"]["val"]["entropy_floor"] * m["splits"]["val"]["tokens"] == pytest.approx(total)
    assert m["splits"]["val"]["entropy_floor"] == pytest.approx(val_nll.sum() / m["splits"]["val"]["tokens"])
    # documents without a known nll (another world, files): no floor, no file
    plain = prepare_shards([Document(t, "x", i) for i, (t, _) in enumerate(records)], bpe, tmp_path / "plain")
    assert "entropy_floor" not in plain["splits"]["val"] and not (tmp_path / "plain" / VAL_DOC_NLL).exists()
    assert "entropy_floor" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["splits"]["train"]


def test_complete_document_mask_by_hand():
    # EOS = 0. Window inputs cut a document at both ends: [7 8 | 0 | 5 6 0 | 4 0 | 9]
    inputs = torch.tensor([[7, 8, 0, 5, 6, 0, 4, 0, 9]])
    labels = torch.tensor([[8, 0, 5, 6, 0, 4, 0, 9, 3]])
    mask = complete_document_mask(inputs, labels, 0)
    # scored: the labels 5 6 0 (document "5 6") and 4 0 (document "4"), predicted from position 2 on
    assert mask.tolist() == [[False, False, True, True, True, True, True, False, False]]


def test_document_floor_matches_the_windows_by_hand(abc, tmp_path):
    texts = ["a b", "c", "a a b", "b", "c c", "a"]  # tokens per document incl. EOS: 3 2 4 2 3 2
    nll = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    docs = [Document(t, "m", i, split="val", nll=n) for i, (t, n) in enumerate(zip(texts, nll))]
    docs.append(Document("a", "m", 6, split="train", nll=0.5))
    prepare_shards(docs, abc, tmp_path / "p", val_fraction=0.0)
    val = TokenShards.open(tmp_path / "p", "val")
    stream = val.read(0, len(val)).tolist()
    assert stream == [1, 2, 0, 3, 0, 1, 1, 2, 0, 2, 0, 3, 3, 0, 1, 0]
    doc_nll = np.load(tmp_path / "p" / VAL_DOC_NLL)
    # seq_len 7: window 0 = inputs stream[0:7], labels stream[1:8]: EOS at 2 (input), 4 (label) → document 1 ("c")
    # window 1 = inputs stream[7:14], labels [8:15]: EOS 8 (input) … 13 (label) → documents 3 ("b") and 4 ("c c")
    floor = document_floor(val, doc_nll, seq_len=7, budget_tokens=14, eos_id=0)
    assert floor == pytest.approx((2.0 + 4.0 + 5.0) / (2 + 2 + 3))


class _Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., 0] = math.log(3.0)  # EOS three times as likely as each other token
        return logits


def test_evaluate_lm_reports_the_loss_on_whole_documents():
    inputs = torch.tensor([[7, 8, 0, 5, 6, 0, 4, 0, 9]])
    labels = torch.tensor([[8, 0, 5, 6, 0, 4, 0, 9, 3]])
    out = evaluate_lm(_Uniform(10), [(inputs, labels)], torch.device("cpu"), eos_id=0)
    log_z = math.log(12.0)  # 9 tokens of weight 1, EOS of weight 3
    eos, other = log_z - math.log(3.0), log_z
    assert out["val_loss_docs"] == pytest.approx((3 * other + 2 * eos) / 5)  # labels 5 6 0 4 0
    assert out["val_loss"] == pytest.approx((6 * other + 3 * eos) / 9)
    assert "val_loss_docs" not in evaluate_lm(_Uniform(10), [(inputs, labels)], torch.device("cpu"))


def test_a_run_on_the_world_logs_its_loss_on_whole_documents_and_the_floor(tmp_path):
    cfg = tiny_config("data.synthetic.world=zipf_facts", "data.synthetic.n_docs=600", "train.seq_len=64")
    run_pretraining(cfg, tmp_path / "run", quiet=True)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[0]["val_floor"] == evals[1]["val_floor"]
    assert 0.5 < evals[-1]["val_floor"] < evals[-1]["val_loss_docs"]  # nothing beats the Bayes-optimal model
    row = run_row(tmp_path / "run")
    assert row["val_loss_docs"] == evals[-1]["val_loss_docs"] and row["val_floor"] == evals[-1]["val_floor"]
    (curve,), _ = load_curves(tmp_path / "run", metric="val_loss_docs")  # the annealing fit's points
    assert curve.losses.tolist() == [r["val_loss_docs"] for r in evals]
