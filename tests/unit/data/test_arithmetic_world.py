"""The ``arithmetic`` world (its problems, answers, checker and held-out items) and the digit-splitting tokenizer."""

from __future__ import annotations

import itertools
import json
import random
import re
import types
from collections import Counter

import pytest

from lmlab.config import load_config
from lmlab.data import pipeline
from lmlab.data.synthetic import get_world, world_names
from lmlab.data.synthetic.arithmetic import (
    HELDOUT_ARITHMETIC_SEED,
    SUBSETS,
    ArithmeticWorld,
    Problem,
    answer_is_correct,
    eval_items,
    format_number,
    parse_answer,
)
from lmlab.data.tokenizer import DIGITS, TextTokenizer, digit_token_ids, whitespace_separable
from lmlab.errors import ConfigError, DataError

DOC = re.compile(r"([1-9][0-9]*)([+*])([1-9][0-9]*)=([0-9]+)")


def _solve(doc: str, reverse: bool = False) -> tuple[int, str, int, int]:
    """``(a, op, b, answer)`` of a document, read back with Python ints (reversed numbers un-reversed)."""
    flip = (lambda s: s[::-1]) if reverse else (lambda s: s)
    m = re.fullmatch(r"([0-9]+)([+*])([0-9]+)=([0-9]+)", doc)
    assert m, doc
    return int(flip(m[1])), m[2], int(flip(m[3])), int(flip(m[4]))


@pytest.fixture(scope="module")
def digit_tok() -> TextTokenizer:
    docs = list(ArithmeticWorld(operations="+*", max_digits=12).documents(0, 300))
    return TextTokenizer.train_bpe([*docs, "the cat sat on 42 mats, 3.14 times."] * 2, 300, split_digits=True)


# ----------------------------------------------------------------------------- world


def test_registered_with_the_training_defaults():
    assert "arithmetic" in world_names()
    world = get_world("arithmetic")
    assert isinstance(world, ArithmeticWorld) and world.name == "arithmetic" and world.version == 1
    assert (world.operations, world.min_digits, world.max_digits, world.reverse) == (("+",), 1, 20, False)
    assert Problem(123, 4056, "+").document == "123+4056=4179"
    assert Problem(123, 4056, "+").text == "123+4056="


def test_documents_are_a_pure_function_of_seed_and_index():
    w = ArithmeticWorld(operations="+*")
    few, many = list(w.documents(3, 20)), list(w.documents(3, 200))
    assert few == many[:20]
    assert few != list(w.documents(4, 20))
    assert w.problem(3, 57).document == many[57] == ArithmeticWorld(operations="+*").problem(3, 57).document
    stream = w.documents(3)
    assert isinstance(stream, types.GeneratorType)
    assert list(itertools.islice(stream, 200)) == many  # n_docs=None streams endlessly


@pytest.mark.parametrize("ops", ["+", "*", "+*"])
def test_answers_are_exact(ops):
    docs = list(ArithmeticWorld(operations=ops, min_digits=1, max_digits=30).documents(0, 400))
    seen = set()
    for doc in docs:
        assert DOC.fullmatch(doc), doc  # no spaces, no leading zeros
        a, op, b, c = _solve(doc)
        assert c == (a + b if op == "+" else a * b)
        seen.add(op)
    assert seen == set(ops)


def test_reversed_format_writes_every_number_least_significant_first():
    p = Problem(123, 4056, "+", reverse=True)
    assert p.document == "321+6504=9714" and p.answer == "9714" and p.value == 4179
    assert format_number(1200, reverse=True) == "0021" and format_number(1200) == "1200"
    natural, flipped = ArithmeticWorld(operations="+*"), ArithmeticWorld(operations="+*", reverse=True)
    for i in range(200):
        n, r = natural.problem(0, i), flipped.problem(0, i)
        assert (n.a, n.b, n.op) == (r.a, r.b, r.op)  # the same problems, written the other way round
        assert _solve(r.document, reverse=True) == _solve(n.document)
        assert parse_answer(r.answer, reverse=True) == r.value == parse_answer(n.answer)


def test_operand_lengths_are_uniform_within_bounds():
    w = ArithmeticWorld(min_digits=3, max_digits=7)
    lengths = Counter()
    for i in range(3000):
        p = w.problem(1, i)
        lengths.update([len(str(p.a)), len(str(p.b))])
    assert set(lengths) == {3, 4, 5, 6, 7}
    assert all(abs(count / 6000 - 0.2) < 0.03 for count in lengths.values())  # uniform over lengths
    leading = Counter(str(w.problem(1, i).a)[0] for i in range(3000))
    assert set(leading) == set("123456789")  # never a leading zero; every nonzero digit leads
    assert {len(str(ArithmeticWorld(min_digits=1, max_digits=1).problem(0, i).a)) for i in range(50)} == {1}


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="operations"):
        ArithmeticWorld(operations="-")
    with pytest.raises(ConfigError, match="operations"):
        ArithmeticWorld(operations=())
    with pytest.raises(ConfigError, match="min_digits <= max_digits"):
        ArithmeticWorld(min_digits=5, max_digits=4)
    with pytest.raises(ConfigError, match="min_digits"):
        ArithmeticWorld(min_digits=0)
    with pytest.raises(ConfigError, match="unknown arithmetic subset 'nope'.*addition_reversed"):
        next(ArithmeticWorld().documents_for("nope", 0, 1))


def test_subsets_stream_their_option_sets():
    w = ArithmeticWorld()
    for name, options in SUBSETS.items():
        assert list(w.documents_for(name, 2, 5)) == list(ArithmeticWorld(**options).documents(2, 5))
    assert list(w.documents_for("addition", 2, 5)) == list(w.documents(2, 5))
    for doc in w.documents_for("multiplication_reversed", 0, 50):
        a, op, b, c = _solve(doc, reverse=True)
        assert op == "*" and c == a * b and max(len(str(a)), len(str(b))) <= 15


# ----------------------------------------------------------------------------- answer checking


def test_parse_answer():
    assert parse_answer("4179") == 4179
    assert parse_answer("4179<|eos|>junk 12") == 4179
    assert parse_answer("9714", reverse=True) == 4179
    assert parse_answer("") is None and parse_answer(" 4179") is None and parse_answer("x1") is None
    assert parse_answer("²3") is None  # ASCII digits only


def test_answer_checker_on_hand_made_strings():
    p = Problem(123, 4056, "+")
    assert answer_is_correct("4179", p)
    assert answer_is_correct("4179\n12+3=15", p)  # trailing text after the answer is ignored
    assert answer_is_correct("4179<|eos|>", p)
    assert not answer_is_correct("4178", p)
    assert not answer_is_correct("41790", p)  # a digit too many
    assert not answer_is_correct("417", p)  # one too few
    assert not answer_is_correct("04179", p)  # a leading zero
    assert not answer_is_correct(" 4179", p)  # the answer starts right after "="
    assert not answer_is_correct("", p)
    r = Problem(123, 4056, "+", reverse=True)
    assert answer_is_correct("9714", r) and answer_is_correct("9714 and more", r)
    assert not answer_is_correct("4179", r)  # the natural order is wrong in the reversed format
    big = Problem(10**59, 10**59, "*")
    assert answer_is_correct("1" + "0" * 118, big) and not answer_is_correct("1" + "0" * 117, big)


# ----------------------------------------------------------------------------- held-out items


def test_eval_items_are_held_out_and_honour_lengths():
    items = eval_items(n=60, min_digits=40, max_digits=60)
    assert items == eval_items(HELDOUT_ARITHMETIC_SEED, 60, 40, 60, "+", False)  # the default seed
    assert items[:10] == eval_items(n=10, min_digits=40, max_digits=60)  # prefix-stable
    assert [p.digits for p in items[:21]] == list(range(40, 61))  # every length in turn, an equal share each
    assert all(len(str(p.a)) == len(str(p.b)) == p.digits for p in items)
    assert all(p.op == "+" and not p.reverse and p.document == f"{p.a}+{p.b}={p.a + p.b}" for p in items)
    training = {ArithmeticWorld(min_digits=40, max_digits=60).problem(0, i) for i in range(200)}
    assert not training & set(items)
    assert HELDOUT_ARITHMETIC_SEED not in (0, 1, 2)  # training configs use small seeds
    assert eval_items(n=20) != eval_items(seed=0, n=20)


def test_eval_items_options():
    rev = eval_items(n=10, min_digits=3, max_digits=3, op="*", reverse=True)
    assert all(p.op == "*" and p.reverse and p.digits == 3 for p in rev)
    assert all(_solve(p.document, reverse=True)[3] == p.a * p.b for p in rev)
    with pytest.raises(ConfigError, match="operations"):
        eval_items(op="+*")
    with pytest.raises(ConfigError, match="n >= 1"):
        eval_items(n=0)


# ----------------------------------------------------------------------------- digit tokenizer


def test_split_digits_gives_one_token_per_digit(digit_tok):
    ids = digit_tok.encode("123+4056=4179")
    assert len(ids) == 13  # 11 digits, "+", "="
    pieces = [digit_tok.decode([i]) for i in ids]
    assert "".join(pieces) == "123+4056=4179" and all(len(p) == 1 for p in pieces)
    number = "".join(random.Random(0).choice(DIGITS) for _ in range(500))
    assert len(digit_tok.encode(number)) == 500
    assert len(digit_tok.encode(" 42 mats")) == len(digit_tok.encode(" ")) + 2 + len(digit_tok.encode(" mats"))


@pytest.mark.parametrize(
    "text",
    ["123+4056=4179", "Once upon a time, 3.14159 cats", "ünïcödé 日本語 🙂 ²³ ١٢٣", "  tabs\tand\n9\n", "", "<|eos|>7"],
)
def test_split_digits_round_trips(digit_tok, text):
    assert digit_tok.decode(digit_tok.encode(text)) == text


def test_split_digits_long_texts_encode_in_exact_pieces(digit_tok):
    assert whitespace_separable(digit_tok.backend) and digit_tok.separable
    alphabet = [*"abc xyz\t\n\r.,!?'\"-+=", *DIGITS, "é", "東", "🚀", "\u00a0", "²", "١", "  ", "\n\n", " 12", "3 "]
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        assert digit_tok.encode_batch([text], max_chars=rng.randint(2, 50))[0] == digit_tok.backend.encode(text).ids


def test_digit_token_ids(digit_tok, bpe):
    ids = digit_token_ids(digit_tok)
    assert sorted(ids.values()) == list(range(10))
    assert all(digit_tok.decode([i]) == str(d) for i, d in ids.items())
    assert [ids[i] for i in digit_tok.encode("9081726354")] == [9, 0, 8, 1, 7, 2, 6, 3, 5, 4]
    merged = TextTokenizer.train_bpe(["1234 5678 9012 " * 50, "0123456789 " * 50], 300)
    with pytest.raises(ConfigError, match="one token per digit.*split_digits: true"):
        digit_token_ids(merged)


def test_digit_token_ids_needs_a_token_per_digit(word_level):
    with pytest.raises(ConfigError, match="no single token for the digit '0'.*split_digits"):
        digit_token_ids(word_level(["1", "2"]))


def test_split_digits_reaches_the_cache_key_and_the_tokenizer(tmp_path):
    tiny = ["data.synthetic.world=arithmetic", "data.synthetic.n_docs=60", "tokenizer.vocab_size=300"]
    tiny += ["tokenizer.train_docs=60", "data.num_workers=1"]
    plain_dir, plain = pipeline.prepare_run_data(load_config(None, tiny), tmp_path / "a")
    split_dir, split = pipeline.prepare_run_data(
        load_config(None, [*tiny, "tokenizer.split_digits=true"]), tmp_path / "b"
    )
    assert plain_dir != split_dir and plain.hash != split.hash
    assert json.loads(split.to_json())["pre_tokenizer"]["type"] == "Sequence"
    assert json.loads(plain.to_json())["pre_tokenizer"]["type"] == "ByteLevel"
    assert len(split.encode("31415926")) == 8 and len(digit_token_ids(split)) == 10


def test_vocab_floor_still_applies_with_split_digits():
    with pytest.raises(DataError, match="at least 273"):
        TextTokenizer.train_bpe(["1+1=2"], 200, split_digits=True)
