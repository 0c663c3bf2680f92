"""The record formats people's datasets come in: SFT as messages, ShareGPT, Alpaca or prompt/completion, and
preference pairs in TRL's three formats (explicit prompt, implicit prompt, conversational), each read into the
same conversation; bad records name the file, the line and what is missing."""

from __future__ import annotations

import json

import pytest

from lmlab.data.chat import parse_record
from lmlab.data.preference import load_preference_file, split_implicit_prompt
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError

TEXTS = ["What is two plus two? It is four. Tell me a joke. No thanks."] * 20


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train_bpe(TEXTS, 320)


def test_sharegpt_and_alpaca_read_as_conversations():
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is two plus two?"},
            {"from": "gpt", "value": "Four."},
        ]
    }
    record = parse_record(sharegpt, "f.jsonl:1")
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant"]
    assert record.messages[2]["content"] == "Four." and record.n_context == 0
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
    record = parse_record(alpaca, "f.jsonl:2")
    assert record.messages == ({"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                               {"role": "assistant", "content": "4"})  # fmt: skip
    assert record.n_context == 1  # only the output is learned
    no_input = parse_record({"instruction": "Say hi.", "input": "", "output": "hi"}, "f.jsonl:3")
    assert no_input.messages[0]["content"] == "Say hi."


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"from": "robot", "value": "x"}]}, r"f.jsonl:4: ShareGPT turn 0 has unknown 'from'"),
        ({"conversations": [{"from": "human"}]}, r"f.jsonl:4: ShareGPT turn 0 needs 'from' and 'value'"),
        ({"instruction": "Say hi."}, r"f.jsonl:4: an Alpaca record needs 'output'"),
    ],
)
def test_bad_records_name_the_line_and_what_is_missing(record, message):
    with pytest.raises(DataError, match=message):
        parse_record(record, "f.jsonl:4")


def test_implicit_prompt_is_the_common_beginning():
    """TRL's convention: the prompt is the longest common prefix; a space before the answers stays with them."""
    assert split_implicit_prompt("Q: 2+2? A: four", "Q: 2+2? A: five") == ("Q: 2+2? A:", " four", " five")
    user = {"role": "user", "content": "2+2?"}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    assert split_implicit_prompt([user, good], [user, bad]) == ([user], [good], [bad])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_three_trl_preference_formats_give_the_same_pairs(tmp_path, tok):
    user = {"role": "user", "content": "What is two plus two?"}
    explicit = [{"prompt": [user], "chosen": "It is four.", "rejected": "No thanks."}]
    conversational = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "It is four."}],
         "rejected": [{"role": "assistant", "content": "No thanks."}]}
    ]  # fmt: skip
    implicit = [
        {"chosen": [user, {"role": "assistant", "content": "It is four."}],
         "rejected": [user, {"role": "assistant", "content": "No thanks."}]}
    ]  # fmt: skip
    loaded = [
        load_preference_file(_write(tmp_path / f"{i}.jsonl", records), tok, chat_template="builtin").pairs[0]
        for i, records in enumerate((explicit, conversational, implicit))
    ]
    for pair in loaded[1:]:
        assert (pair.chosen_ids, pair.chosen_start, pair.rejected_ids) == (
            loaded[0].chosen_ids, loaded[0].chosen_start, loaded[0].rejected_ids,
        )  # fmt: skip
    text = load_preference_file(
        _write(tmp_path / "t.jsonl", [{"chosen": "What is two? It is four.", "rejected": "What is two? No thanks."}]),
        tok,
    ).pairs[0]
    assert tok.decode(text.chosen_ids[: text.chosen_start]).endswith("What is two?")
    assert tok.decode(text.chosen_ids[text.chosen_start :]) == " It is four.<|eos|>"


def test_preference_records_that_cannot_be_read(tmp_path, tok):
    f = _write(tmp_path / "a.jsonl", [{"chosen": "It is four.", "rejected": "No thanks."}])
    with pytest.raises(DataError, match=rf"{f}:1: missing field 'prompt'.*share no beginning"):
        load_preference_file(f, tok)
    two_turns = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    f = _write(tmp_path / "b.jsonl", [{"prompt": "Q", "chosen": two_turns, "rejected": "x"}])
    with pytest.raises(DataError, match=rf"{f}:1: field 'chosen' must be a string or one assistant message"):
        load_preference_file(f, tok)
