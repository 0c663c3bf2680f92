"""``lmlab eval safety`` inputs: safety records, a tokenizer without a chat template, threshold lists."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError, UserError
from lmlab.eval.safety_command import parse_thresholds, read_safety_records, require_chat_template


def _plain_tokenizer() -> TextTokenizer:
    """A byte-level BPE with an EOS but no chat tokens and no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello there"] * 5, trainer=trainer)
    return TextTokenizer(tok, source="plain/tokenizer.json")


def test_a_tokenizer_without_a_chat_template_is_one_message():
    with pytest.raises(UserError, match=r"runs/base: its tokenizer has no chat template and no lmlab chat tokens"):
        require_chat_template(_plain_tokenizer(), "runs/base")
    require_chat_template(_plain_tokenizer().with_chat_template("{{ messages[0]['content'] }}"), "runs/base")


def test_a_tokenizer_without_control_tokens_cannot_be_steered():
    from lmlab.eval.refusal_steering import ControlTokens

    with pytest.raises(UserError, match=r"runs/base: the tokenizer has no \[respond\] / \[refuse\] tokens"):
        ControlTokens.of(_plain_tokenizer(), "runs/base")


def test_safety_records_are_checked(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}], "refuse": False, "category": "benign", "facts": ["x"]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "refuse": "no"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: a safety record needs a boolean 'refuse'"):
        read_safety_records(str(path))
    path.write_text(json.dumps({**good, "category": "fraud", "refuse": True}) + "\n")
    assert read_safety_records(str(path))[0]["group"] == "harmful"  # the world's group of a known category


def test_threshold_lists():
    assert parse_thresholds("0, 0.5,1,-1") == [0.0, 0.5, 1.0, -1.0]
    with pytest.raises(UserError, match="comma-separated numbers"):
        parse_thresholds("0,a")
    with pytest.raises(UserError, match=r"--thresholds must be in \[0, 1\]"):
        parse_thresholds("0.5,1.01")
