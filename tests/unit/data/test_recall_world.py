"""The recall world and its retrieval accuracy (issue 14 studies b and c)."""

from __future__ import annotations

import pytest

from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.recall import RecallWorld, recall_items
from lmlab.errors import ConfigError
from lmlab.eval.recall import evaluate_recall


def test_documents_are_a_pure_function_of_seed_and_index_and_answer_from_the_list():
    world = get_world("recall")
    docs = list(world.documents(3, 4))
    assert docs[2] == list(world.documents(3, 3))[2]
    listing, queries = docs[0].split(" ;")
    pairs = dict(p.split("=") for p in listing.split())
    assert len(pairs) == 40
    asked = [q.split("=") for q in queries.split()]
    assert len(asked) == 8 and all(pairs[k] == v for k, v in asked)


def test_items_cover_every_depth_and_come_from_a_held_out_stream():
    items = recall_items(80, pairs=40)
    assert {round(i.depth * 39) for i in items} == set(range(40))
    listing, question = items[0].prompt.split(" ; ")
    key = question.rstrip("=")
    assert dict(p.split("=") for p in listing.split())[key] == items[0].answer
    assert items[0].prompt.split(" ;")[0] not in set(d.split(" ;")[0] for d in RecallWorld().documents(0, 50))
    with pytest.raises(ConfigError, match="queries <= pairs"):
        RecallWorld(pairs=2, queries=3)
    short = next(RecallWorld().documents_for("pairs16", 0, 1))
    assert len(short.split(" ;")[0].split()) == 16 and len(short.split(" ;")[1].split()) == 8
    with pytest.raises(ConfigError, match="unknown recall subset 'x'; choose one of pairs8"):
        RecallWorld().documents_for("x", 0)


def test_accuracy_by_depth_with_a_scripted_model(monkeypatch):
    import lmlab.eval.recall as recall

    items = recall_items(20, pairs=10)
    answers = {item.prompt: (item.answer if item.depth < 0.5 else "99x") for item in items}

    class Tok:
        eos_id = None
        document_prefix: list[int] = []

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    def fake_generate(model, prompts, max_new_tokens, temperature, attention_topk):
        return [[ord(c) for c in answers["".join(chr(i) for i in p)] + " "] for p in prompts]

    monkeypatch.setattr(recall, "generate", fake_generate)
    out = evaluate_recall(None, Tok(), items, batch_size=7)
    assert out["n"] == 20 and out["accuracy"] == pytest.approx(sum(i.depth < 0.5 for i in items) / 20)
    assert out["by_depth"]["0.0-0.2"] == 1.0 and out["by_depth"]["0.8-1.0"] == 0.0
