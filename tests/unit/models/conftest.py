"""Fixtures shared by the Hugging Face interop tests (``test_hf.py``, ``test_hf_moe.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data.tokenizer import TextTokenizer

HF_VOCAB = 320
TEXTS = ["the quick brown fox jumps over the lazy dog", "a tiny model reads tiny stories"] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small byte-level BPE (``HF_VOCAB`` tokens) saved as tokenizer.json."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    TextTokenizer.train_bpe(TEXTS, vocab_size=HF_VOCAB, min_frequency=1).save(path)
    return path
