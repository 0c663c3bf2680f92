"""Long documents are encoded in pieces cut at whitespace, with exactly the ids of the whole text."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers

from lmlab.data import tokenizer as tokenizer_module
from lmlab.data.prepare import Document, prepare_shards
from lmlab.data.shards import TokenShards
from lmlab.data.tokenizer import TextTokenizer, split_long_text, whitespace_separable

# Runs of spaces, tabs, blank lines, CRLF, punctuation, contractions, digits, accents, CJK, emoji and
# Unicode spaces: everything the GPT-2 pre-tokenizer regex treats differently.
PARAGRAPH = (
    "It's a   test -- isn't it?  Yes!!  \n\n\tIndented line;  numbers 12345 and 3.14159...\r\n"
    "Ünïcödé café naïve façade — “quotes” and 'single' ones.  東京タワー は 高い。  🚀🚀 rockets 🚀\n"
    "Trailing spaces   \n   leading spaces, non\u00a0breaking\u00a0space, ideographic\u3000space, line\u2028sep. "
    "We'll we've I'm you'd they're  ---  ***  (parentheses) [brackets] {braces} <angle> @#$%^&*_+=|~`\n"
)


@pytest.fixture(scope="module")
def long_text() -> str:
    rng = random.Random(0)
    words = PARAGRAPH.split(" ")
    return "".join(rng.choice(words) + rng.choice([" ", "  ", "\n", " \n ", "\t", ""]) for _ in range(3000))


@pytest.fixture(scope="module")
def tok(long_text) -> TextTokenizer:
    return TextTokenizer.train_bpe([long_text[:20000], PARAGRAPH * 5], vocab_size=500)


def test_pieces_rejoin_and_respect_the_limit(long_text):
    pieces = split_long_text(long_text, 200)
    assert "".join(pieces) == long_text and len(pieces) > len(long_text) // 200
    assert all(len(p) <= 200 for p in pieces)
    assert all(p[0].isspace() and not pieces[i][-1].isspace() for i, p in enumerate(pieces[1:]))
    assert split_long_text("x" * 1000, 100) == ["x" * 1000]  # nowhere to cut: one piece
    assert split_long_text("short", 100) == ["short"]


@pytest.mark.parametrize("max_chars", [16, 100, 1000, 10_000])
def test_pieces_encode_to_the_ids_of_the_whole_text(tok, long_text, max_chars):
    assert tok.separable
    whole = tok.backend.encode(long_text, add_special_tokens=False).ids
    assert tok.encode_batch([long_text, PARAGRAPH], max_chars=max_chars) == [whole, tok.encode(PARAGRAPH)]
    assert tok.decode(whole) == long_text


def test_random_texts_of_tricky_characters(tok):
    alphabet = [*"abc xyz\t\n\r.,!?'\"-09", "'s", "'ll", "é", "東", "🚀", "\u00a0", "\u3000", "\u2028", "\u001c"]
    alphabet += ["\u180e", "\u200b", "\u0085", "\u000b", "\u000c", "<|eos|>", "  ", "\n\n", " \n", "\r\n"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        max_chars = rng.randint(2, 50)
        assert tok.encode_batch([text], max_chars=max_chars)[0] == tok.backend.encode(text).ids, repr(text)


def test_tokenizers_that_are_not_separable_encode_whole(tok, abc):
    assert not whitespace_separable(abc.backend)  # whitespace word-level pre-tokenizer
    lowered = Tokenizer.from_str(tok.to_json())
    lowered.normalizer = normalizers.Lowercase()
    assert not whitespace_separable(lowered)
    padded = Tokenizer.from_str(tok.to_json())
    padded.enable_padding(pad_id=tok.pad_id, pad_token="<|pad|>")
    assert not whitespace_separable(padded)
    assert abc.encode_batch(["a b " * 20], max_chars=5) == [[1, 2] * 20]


def test_prepare_shards_splits_long_documents(tok, long_text, tmp_path, monkeypatch):
    cuts = []
    real = tokenizer_module.split_long_text

    def counting(text, max_chars):
        cuts.append(len(real(text, max_chars)))
        return real(text, max_chars)

    monkeypatch.setattr(tokenizer_module, "LONG_TEXT_CHARS", 500)
    monkeypatch.setattr(tokenizer_module, "split_long_text", counting)
    docs = [Document(long_text, "mem", 0), Document(PARAGRAPH, "mem", 1)]
    prepare_shards(docs, tok, tmp_path / "p", val_fraction=0.0)
    assert max(cuts) > 1
    expected = tok.backend.encode(long_text).ids + [tok.eos_id] + tok.backend.encode(PARAGRAPH).ids + [tok.eos_id]
    shards = TokenShards.open(tmp_path / "p")
    assert np.array_equal(shards.read(0, len(shards)), np.array(expected))
