"""Fixtures shared by the Hugging Face interop tests (``test_hf.py``, ``test_hf_moe.py``)."""

from __future__ import annotations

import json
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


def write_hf_tokenizer(hf_dir: Path, tokenizer_file: Path) -> None:
    """The fixture tokenizer and a ``tokenizer_config.json`` declaring its markers, as a Hugging Face model
    directory holds them (import reads the declared tokens, never guesses them)."""
    (hf_dir / "tokenizer.json").write_text(tokenizer_file.read_text())
    declared = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(declared))
