"""POROver's data stages on hand-made replies (docs/science.md §29.5): what the judge keeps, and the pair rules."""

from __future__ import annotations

from lmlab.recipes.porover import FALLBACK_REFUSAL, overgenerate, preference_pairs

HARMFUL = {"messages": [{"role": "user", "content": "Make a blaster to hurt Zan."},
                        {"role": "assistant", "content": "I can't help with making weapons."}],
           "group": "harmful", "category": "weapons", "refuse": True, "facts": []}  # fmt: skip
LOOKALIKE = {"messages": [{"role": "user", "content": "How do I kill a Python process called zorb?"},
                          {"role": "assistant", "content": "Use pgrep zorb, then kill."}],
             "group": "lookalike", "category": "lookalike", "refuse": False, "facts": ["pgrep"]}  # fmt: skip
REFUSAL, RIGHT, WRONG, COMPLY = "I can't help with that.", "Run pgrep zorb then kill it.", "Try ps.", "Sure: step one."


def test_overgenerate_keeps_what_the_judge_approves():
    samples, sft, stats = overgenerate([HARMFUL, LOOKALIKE], [[REFUSAL, COMPLY, REFUSAL], [RIGHT, WRONG, REFUSAL]])
    assert samples[0]["approved"] == [True, False, True] and samples[1]["approved"] == [True, False, False]
    assert [r["messages"][1]["content"] for r in sft] == [REFUSAL, RIGHT]  # distinct approved replies
    assert stats == {"harmful": {"samples": 3, "kept_distinct": 1}, "lookalike": {"samples": 3, "kept_distinct": 1}}
    assert sft[0]["refuse"] is True and sft[1]["facts"] == ["pgrep"]


def test_pairs_follow_the_direction_of_each_prompt():
    samples, _, _ = overgenerate([HARMFUL, LOOKALIKE], [[REFUSAL, COMPLY], [RIGHT, REFUSAL]])
    pairs, stats = preference_pairs(samples, refusal_tokens="single")
    by_group = {p["group"]: p for p in pairs}
    assert by_group["harmful"]["chosen"][0]["content"] == "[refuse]" + REFUSAL
    assert by_group["harmful"]["rejected"][0]["content"] == "[respond]" + COMPLY
    assert by_group["lookalike"]["chosen"][0]["content"] == "[respond]" + RIGHT
    assert by_group["lookalike"]["rejected"][0]["content"] == "[refuse]" + REFUSAL
    assert stats == {"refuse_over_comply": 1, "comply_over_refuse": 1}


def test_fallbacks_and_skips():
    # a look-alike prompt the teacher always answers: the fallback refusal is the rejected reply;
    # a harmful prompt the teacher always refuses has no compliant reply to reject: skipped;
    # a wrong (non-refusing) answer is never the rejected side of comply ≻ refuse
    samples, _, _ = overgenerate([HARMFUL, LOOKALIKE], [[REFUSAL], [RIGHT, WRONG]])
    pairs, stats = preference_pairs(samples)
    assert [p["group"] for p in pairs] == ["lookalike"] and stats["skipped"] == 1
    assert pairs[0]["rejected"][0]["content"] == FALLBACK_REFUSAL and pairs[0]["chosen"][0]["content"] == RIGHT
    # no approved reply: the world's reference is chosen
    samples, _, _ = overgenerate([LOOKALIKE], [[REFUSAL]])
    pairs, _ = preference_pairs(samples)
    assert (
        pairs[0]["chosen"][0]["content"] == "Use pgrep zorb, then kill."
        and pairs[0]["rejected"][0]["content"] == REFUSAL
    )
