"""Shared fixtures of the data tests: a tiny trained tokenizer, a word-level tokenizer with a known
vocabulary (for hand-computed numbers), and an isolated ``LMLAB_CACHE``."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmlab.data.synthetic import get_world
from lmlab.data.tokenizer import TextTokenizer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def story_docs() -> list[str]:
    return list(get_world("stories").documents(seed=0, n_docs=120))


@pytest.fixture(scope="session")
def bpe(story_docs) -> TextTokenizer:
    return TextTokenizer.train_bpe(story_docs, vocab_size=320)


def _word_level(words: list[str], eos: str = "</s>", extra: tuple[str, ...] = ()) -> TextTokenizer:
    """A whitespace word-level tokenizer whose ids are the positions in ``[eos, *extra, *words]``."""
    vocab = {w: i for i, w in enumerate([eos, *extra, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(tok)


@pytest.fixture
def word_level():
    """Factory of word-level tokenizers with known ids (see ``_word_level``)."""
    return _word_level


@pytest.fixture
def abc() -> TextTokenizer:
    """Vocabulary: </s>=0, a=1, b=2, c=3."""
    return _word_level(["a", "b", "c"])
