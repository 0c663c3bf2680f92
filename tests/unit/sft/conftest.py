"""Fixtures for the SFT tests: one tiny lmlab tokenizer shared by the whole session."""

from __future__ import annotations

import pytest

from lmlab.data.tokenizer import TextTokenizer

TEXTS = [
    "Where was Tomas Varek born? Tomas Varek was born in Ostrelle.",
    "hello there, how are you today? I am fine, thank you.",
    "The Kelvar Institute is based in Dunmar and works on glass.",
] * 20


@pytest.fixture(scope="session")
def sft_tokenizer() -> TextTokenizer:
    return TextTokenizer.train_bpe(TEXTS, 340)
