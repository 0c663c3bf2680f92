"""``TextTokenizer``: training, round trips, special tokens, loading foreign tokenizers, hashing."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmlab.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from lmlab.errors import DataError


def test_trained_bpe_round_trips_any_text(bpe):
    assert bpe.vocab_size == 320
    for text in ["Once upon a time", '  tabs\tand\nnewlines  "quotes" ', "ünïcödé 日本語 🙂", ""]:
        assert bpe.decode(bpe.encode(text)) == text
    # the merges learnt something: common story words take fewer tokens than bytes
    assert len(bpe.encode(" the")) == 1


def test_special_tokens_and_no_automatic_bos_eos(bpe):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(tok) == i
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert len(SPECIAL_TOKENS) == 3 + 4 + 2 + 8
    ids = bpe.encode("hello")
    assert bpe.bos_id not in ids and bpe.eos_id not in ids
    # special tokens written in text map to their single id, and decode back verbatim
    assert bpe.encode("<|user|>") == [bpe.token_to_id("<|user|>")]
    assert bpe.encode(" [refuse]")[-1] == bpe.token_to_id("[refuse]")
    assert bpe.decode([bpe.eos_id]) == "<|eos|>"


def test_encode_batch_matches_encode(bpe):
    texts = ["a cat", "the red kite that Mia found", "x"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_training_is_deterministic(story_docs, bpe):
    again = TextTokenizer.train_bpe(story_docs, vocab_size=320)
    assert again.hash == bpe.hash


def test_vocab_too_small_is_an_error(story_docs):
    with pytest.raises(DataError, match="at least 273"):
        TextTokenizer.train_bpe(story_docs, vocab_size=200)


def test_save_load_keeps_hash(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    loaded = TextTokenizer.load(path)
    assert loaded.hash == bpe.hash and len(bpe.hash) == 64
    assert TextTokenizer.load(tmp_path / "tok").hash == bpe.hash  # a directory works too
    assert loaded.encode("the moral of the story") == bpe.encode("the moral of the story")
    # the hash ignores JSON formatting but not content
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert TextTokenizer.load(pretty).hash == bpe.hash


def test_load_missing_or_malformed_names_the_path(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found: .*nope.json"):
        TextTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: not a valid tokenizer.json"):
        TextTokenizer.load(bad)


def _foreign(tmp_path, tokens: list[str]):
    vocab = {t: i for i, t in enumerate([*tokens, "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_foreign_tokenizer_special_ids_by_common_names(tmp_path):
    path = _foreign(tmp_path, ["<unk>", "<s>", "</s>", "<pad>"])
    tok = TextTokenizer.load(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode("hello world") == [4, 5]


def test_foreign_tokenizer_llama3_names_and_explicit_override(tmp_path):
    path = _foreign(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok = TextTokenizer.load(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    tok = TextTokenizer.load(path, eos="<|eot_id|>", pad="<|end_of_text|>")
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    with pytest.raises(DataError, match="no eos token '<nope>'"):
        TextTokenizer.load(path, eos="<nope>")


def test_foreign_tokenizer_without_eos_is_an_error(tmp_path):
    path = _foreign(tmp_path, ["<unk>"])
    with pytest.raises(DataError, match=r"has no eos token .*pass it explicitly"):
        TextTokenizer.load(path)


def test_padding_and_truncation_of_a_tokenizer_file_are_turned_off(bpe, tmp_path):
    backend = Tokenizer.from_str(bpe.to_json())
    backend.enable_padding(pad_id=bpe.pad_id, pad_token="<|pad|>")
    backend.enable_truncation(4)
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    loaded = TextTokenizer.load(path)
    long = "once upon a time there was a small cat who liked to sleep in the sun"
    assert loaded.encode_batch(["a", long]) == [bpe.encode("a"), bpe.encode(long)]
    assert loaded.encode(long) == bpe.encode(long) and loaded.hash == bpe.hash
