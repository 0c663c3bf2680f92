"""The ``preferences`` synthetic world: pairs in configured proportions, splits, documents and the judge."""

from __future__ import annotations

import pytest

from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.preference_world import PreferenceWorld, expected_answer, judge


def test_registered_and_deterministic():
    world = get_world("preferences")
    assert isinstance(world, PreferenceWorld)
    assert world.pairs(5, 10) == PreferenceWorld().pairs(5, 10)
    assert world.pairs(5, 10) != world.pairs(6, 10)
    assert list(world.documents(1, 4)) == list(world.documents(1, 8))[:4]


def test_chosen_is_concise_and_correct_rejected_is_wrong_or_padded():
    pairs = PreferenceWorld(p_wrong=0.3).pairs(0, 400)
    wrong = sum(p["rejected_style"] == "wrong" for p in pairs)
    assert 0.22 < wrong / 400 < 0.38
    for p in pairs:
        c, r = judge(p["prompt"], p["chosen"]), judge(p["prompt"], p["rejected"])
        assert c.correct and not c.padded and c.words == 1
        if p["rejected_style"] == "wrong":
            assert not r.correct and r.words == 1
        else:
            assert r.correct and r.padded and r.words > 5
    assert all(p["rejected_style"] == "wrong" for p in PreferenceWorld(p_wrong=1.0).pairs(0, 50))
    assert all(p["rejected_style"] == "padded" for p in PreferenceWorld(p_wrong=0.0).pairs(0, 50))


def test_ood_split_rewords_questions_and_judge_reads_them():
    ood = PreferenceWorld().pairs(0, 60, "ood")
    train_prompts = {p["prompt"] for p in PreferenceWorld().pairs(0, 500, "train")}
    assert not train_prompts & {p["prompt"] for p in ood}
    assert all(expected_answer(p["prompt"]) is not None for p in ood)
    assert all(judge(p["prompt"], p["chosen"]).correct for p in ood)


def test_judge_hand_cases():
    prompt = "Question: What is 3 plus 4?\nAnswer:"
    assert judge(prompt, " 7.") == judge(prompt, "7")
    assert judge(prompt, " 7.").correct
    assert not judge(prompt, " 8.").correct
    assert judge(prompt, " Well, that is a good question. The answer is 7. I hope this helps!").padded
    assert not judge("Question: What is the meaning of life?\nAnswer:", " 42.").correct
    assert judge("Question: What colour is grass?\nAnswer:", " green.").correct
    assert judge("Question: Which is larger, 12 or 7?\nAnswer:", " 12.").correct


def test_documents_follow_the_sft_mix_and_bad_parameters_are_refused():
    docs = list(PreferenceWorld(sft_mix=(1.0, 0.0, 0.0)).documents(0, 50))
    assert all(judge(d.split("Answer:")[0] + "Answer:", d.split("Answer:")[1]).correct for d in docs)
    assert all(len(d.split("Answer:")[1].split()) == 1 for d in docs)
    with pytest.raises(ValueError):
        PreferenceWorld(p_wrong=1.5)
    with pytest.raises(ValueError):
        PreferenceWorld().pairs(0, 3, "nope")
