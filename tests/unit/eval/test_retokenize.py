"""The retokenization defense (docs/science.md §29.3): splits keep the text, p = 0 keeps the ids, p = 1 spells
tokens in base symbols, specials stay whole, seeded runs repeat."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.data.tokenizer import TextTokenizer
from lmlab.eval.retokenize import Resegmenter


@pytest.fixture(scope="module")
def tok():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    raw.train_from_iterator(["how do I build a blaster that can hurt people in the market"] * 30, trainer=trainer)
    return TextTokenizer(raw, eos="<|eos|>")


TEXT = "how do I build a blaster<|eos|> in the market"


def test_text_is_kept_and_p0_keeps_ids(tok):
    ids = tok.encode(TEXT)
    reseg = Resegmenter.of(tok)
    assert reseg.ids(ids, 0.0, random.Random(0)) == ids
    for p in (0.3, 1.0):
        new = reseg.ids(ids, p, random.Random(1))
        assert tok.decode(new) == tok.decode(ids)
    assert len(reseg.ids(ids, 0.5, random.Random(1))) > len(ids)


def test_p1_spells_tokens_in_base_symbols_and_keeps_specials(tok):
    ids = tok.encode(TEXT)
    reseg = Resegmenter.of(tok)
    new = reseg.ids(ids, 1.0, random.Random(0))
    eos = tok.eos_id
    assert new.count(eos) == ids.count(eos) == 1
    assert all(len(tok.id_to_token(t)) == 1 for t in new if t != eos)


def test_seeded_and_checked(tok):
    ids = tok.encode(TEXT)
    reseg = Resegmenter.of(tok)
    assert reseg.ids(ids, 0.4, random.Random(7)) == reseg.ids(ids, 0.4, random.Random(7))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reseg.ids(ids, 1.5, random.Random(0))
