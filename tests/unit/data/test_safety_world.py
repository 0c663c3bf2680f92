"""The ``safety`` world: deterministic records, disjoint splits, reference replies its own judge accepts."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.safety import (
    CATEGORIES,
    GROUPS,
    REFUSAL_CATEGORIES,
    SafetyWorld,
    is_refusal,
    judge,
    split_of,
)


def test_registered_and_deterministic():
    world = get_world("safety")
    assert isinstance(world, SafetyWorld)
    assert world.records(3, 40, "train") == SafetyWorld().records(3, 40, "train")
    assert world.records(3, 40, "train") != world.records(4, 40, "train")
    assert world.records(3, 10, "test") == world.records(3, 30, "test")[:10]  # a prefix: the same however many
    assert list(world.documents(3, 5)) == list(world.documents(3, 9))[:5]


def test_every_group_and_category_appears_with_its_behaviour():
    recs = SafetyWorld().records(0, 600, "train")
    assert {r["group"] for r in recs} == set(GROUPS)
    assert {r["category"] for r in recs} == set(CATEGORIES)
    for r in recs:
        assert r["group"] == CATEGORIES[r["category"]]
        assert r["refuse"] == (r["category"] in REFUSAL_CATEGORIES)
        assert (r["mimics"] is not None) == (r["group"] == "lookalike")
    share = Counter(r["group"] for r in recs)
    assert share["harmful"] > share["noncompliance"] > 0


def test_splits_hold_distinct_prompts_and_never_share_one():
    world = SafetyWorld()
    prompts = {s: [r["messages"][0]["content"] for r in world.records(0, n, s)] for s, n in
               (("train", 500), ("val", 60), ("test", 60))}  # fmt: skip
    for split, items in prompts.items():
        assert len(set(items)) == len(items)
        assert all(split_of(0, p) == split for p in items)
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["val"]) and not set(prompts["val"]) & set(prompts["test"])


def test_reference_replies_pass_the_judge():
    for r in SafetyWorld().records(1, 400, "test"):
        verdict = judge(r["messages"][1]["content"], r["refuse"], r["facts"])
        assert verdict.refused == r["refuse"], r
        if not r["refuse"]:
            assert verdict.correct, r


def test_lookalikes_share_words_with_harmful_prompts_but_get_help():
    looks = [r for r in SafetyWorld().records(0, 400, "train") if r["group"] == "lookalike"]
    text = " ".join(r["messages"][0]["content"].lower() for r in looks)
    for word in ("kill", "shoot", "attack", "steal", "track", "phone number"):
        assert word in text
    assert not any(is_refusal(r["messages"][1]["content"]) for r in looks)


def test_judge_by_hand():
    assert judge("I can't help with making or using weapons.", True) == judge("I can\u2019t HELP with it", True)
    assert judge("I can't help with that.", True).refused
    assert judge("Sure, here it is.", True).refused is False
    assert judge("Grass is green.", False, ["green"]).correct
    assert judge("Grass is blue.", False, ["green"]).correct is False
    assert judge("I can't help with that; grass is green.", False, ["green"]).correct is False  # a refusal
    assert judge("Your request seems to be missing the word.", True).refused


def test_bad_split_and_write_splits(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        SafetyWorld().records(0, 3, "dev")
    paths = SafetyWorld().write_splits(tmp_path, 0, {"train": 20, "test": 5})
    rows = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["messages"][1]["role"] == "assistant" and "refuse" in rows[0]


def test_data_safety_command_writes_splits_sft_can_read(tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.data.chat import read_records

    argv = ["data", "safety", "--out", str(tmp_path / "sw"), "--train", "30", "--val", "5", "--test", "8"]
    assert main(argv) == 0
    records = read_records(tmp_path / "sw" / "train.jsonl")
    assert len(records) == 30 and all(r.messages[-1]["role"] == "assistant" for r in records)
    assert len((tmp_path / "sw" / "test.jsonl").read_text().splitlines()) == 8
    with pytest.raises(SystemExit):
        main(["data", "safety", "--out", str(tmp_path / "x"), "--train", "0"])
    assert "--train must be > 0" in capsys.readouterr().err
