"""``sft.refusal_tokens``: replies start with [refuse] / [respond] or a category token (lmlab.data.refusal_tokens)."""

from __future__ import annotations

import pytest

from lmlab.data.chat import parse_record, render_conversation
from lmlab.data.refusal_tokens import (
    add_control_tokens,
    category_tokens,
    needed_tokens,
    require_tokens,
    with_control_tokens,
)
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError


def _rec(refuse, category=None, reply="ok", where="f.jsonl:1"):
    obj = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]}
    if refuse is not None:
        obj["refuse"] = refuse
    if category is not None:
        obj["category"] = category
    return parse_record(obj, where)


def test_labels_are_read_and_checked():
    assert _rec(True, "fraud").refuse is True and _rec(True, "fraud").category == "fraud"
    assert _rec(None).refuse is None
    with pytest.raises(DataError, match=r"f.jsonl:1: 'refuse' must be true or false, got 'yes'"):
        _rec("yes")
    with pytest.raises(DataError, match="'category' must be a non-empty string"):
        _rec(True, "")


def test_single_and_category_prefixes():
    records = [_rec(True, "fraud", "No."), _rec(False, "benign", "Yes.")]
    single = with_control_tokens(records, "single")
    assert [r.messages[1]["content"] for r in single] == ["[refuse]No.", "[respond]Yes."]
    assert [r.messages[0]["content"] for r in single] == ["q", "q"]  # user turns untouched
    cat = with_control_tokens(records, "category")
    assert [r.messages[1]["content"] for r in cat] == ["[fraud]No.", "[respond]Yes."]
    assert needed_tokens(records, "category") == ["[fraud]", "[respond]"]
    assert needed_tokens(records, "single") == ["[refuse]", "[respond]"]
    assert with_control_tokens(records, "none") == records


def test_missing_labels_name_the_record():
    with pytest.raises(DataError, match=r"f.jsonl:1: sft.refusal_tokens=single needs a boolean 'refuse'"):
        with_control_tokens([_rec(None)], "single")
    with pytest.raises(DataError, match=r"sft.refusal_tokens=category needs a 'category'"):
        with_control_tokens([_rec(True)], "category")
    with pytest.raises(DataError, match="collides"):
        with_control_tokens([_rec(True, "refuse")], "category")


def test_tokens_are_single_special_tokens_and_learned(sft_tokenizer):
    tok = TextTokenizer(type(sft_tokenizer.backend).from_str(sft_tokenizer.to_json()))  # a private copy
    with pytest.raises(DataError, match=r"has no token \[fraud\], which sft.refusal_tokens=category needs"):
        require_tokens(tok, ["[fraud]", "[respond]"], "sft.refusal_tokens=category")
    add_control_tokens(tok, ["[fraud]", "[respond]"])
    require_tokens(tok, ["[fraud]", "[respond]"], "x")
    assert category_tokens(tok) == {"fraud": tok.token_to_id("[fraud]")}
    rec = with_control_tokens([_rec(True, "fraud", "No.")], "category")[0]
    ids, mask = render_conversation(tok, list(rec.messages))
    fraud = tok.token_to_id("[fraud]")
    assert ids.count(fraud) == 1 and mask[ids.index(fraud)]  # one token, and the model learns to emit it
    assert ids[ids.index(fraud) - 1] == tok.token_to_id("<|assistant|>")  # the first response position


def test_sft_reads_the_safety_world_without_a_file():
    from lmlab.recipes.sft import load_records

    from helpers import tiny_config

    train, val = load_records(tiny_config("data.synthetic.world=safety", "data.synthetic.n_docs=50"))
    assert len(train) == 50 and len(val) == 5
    assert all(isinstance(r.refuse, bool) and r.category for r in train + val)
    assert not {r.messages[0]["content"] for r in train} & {r.messages[0]["content"] for r in val}
    assert with_control_tokens(train, "category")[0].messages[1]["content"].startswith("[")
