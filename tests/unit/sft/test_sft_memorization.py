"""Memorization metrics: LCS / RougeL by hand, and extraction of a document the model was forced to copy."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import DataError
from lmlab.eval.memorization import lcs_length, memorization_eval, read_documents, rouge_l, token_match


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length([1, 2, 3, 4], [2, 4]) == 2
    assert lcs_length([1, 3, 4, 1, 2], [3, 1, 2, 4]) == 3  # 3,1,2
    assert lcs_length([], [1]) == 0
    # gen 5 tokens, ref 4 tokens, LCS 3: P = 3/5, R = 3/4, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    assert rouge_l([1, 3, 4, 1, 2], [3, 1, 2, 4]) == pytest.approx(2 / 3)
    assert rouge_l([7, 8], [1, 2]) == 0.0
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0


def test_token_match_counts_aligned_positions():
    assert token_match([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert token_match([2, 3, 4, 5], [1, 2, 3, 4]) == 0.0  # shifted copies do not count


class CopyModel(torch.nn.Module):
    """At absolute position t predicts ``text_ids[t + 1]``: a perfect memorizer of one document."""

    def __init__(self, text_ids: list[int], vocab: int):
        super().__init__()
        self.text_ids = text_ids
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self):
        return {"length": 0}

    def forward(self, ids, kv_cache=None):
        past = kv_cache["length"]
        kv_cache["length"] += ids.shape[1]
        logits = torch.zeros(*ids.shape, self.vocab)
        for t in range(ids.shape[1]):
            target = self.text_ids[min(past + t + 1, len(self.text_ids) - 1)]
            logits[:, t, target] = 1.0
        return logits


def test_a_memorizing_model_has_full_extraction(sft_tokenizer):
    tok = sft_tokenizer
    doc = "Where was Tomas Varek born? Tomas Varek was born in Ostrelle."
    other = "hello there, how are you today? I am fine, thank you."
    model = CopyModel([tok.eos_id, *tok.encode(doc)], tok.vocab_size)
    summary, rows = memorization_eval(model, tok, [doc, other, "hi"], prefix_tokens=4, new_tokens=4)
    assert rows[0]["exact_match"] and rows[0]["rouge_l"] == 1.0 and rows[0]["token_match"] == 1.0
    assert not rows[1]["exact_match"]  # the model only knows the first document
    assert rows[2] == {"doc": 2, "skipped": True, "tokens": len(tok.encode("hi"))}
    assert summary["evaluated"] == 2 and summary["skipped_short"] == 1 and summary["exact_match_rate"] == 0.5


def test_read_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\n\nsecond doc\n")
    assert read_documents(tmp_path / "a.txt") == ["one doc", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"nope": 1}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2"):
        read_documents(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_documents(tmp_path / "missing.jsonl")


def test_prefix_zero_prompts_with_all_but_the_last_n_tokens(sft_tokenizer):
    tok = sft_tokenizer
    doc = "Where was Tomas Varek born? Tomas Varek was born in Ostrelle."
    ids = tok.encode(doc)
    model = CopyModel([tok.eos_id, *ids], tok.vocab_size)
    summary, rows = memorization_eval(model, tok, [doc], prefix_tokens=0, new_tokens=5)
    assert rows[0]["prefix_tokens"] == len(ids) - 5 and rows[0]["exact_match"]
    assert rows[0]["reference"] == tok.decode(ids[-5:]) and summary["rouge_l_words"] == 1.0


def test_word_level_rouge_uses_rouge_score_tokenization():
    from lmlab.eval.memorization import words

    assert words("Born in Ostrelle, 1924!") == ["born", "in", "ostrelle", "1924"]
    # LCS of [a b c d] and [a c d e] is 3: P = R = 3/4
    assert rouge_l(words("a b c d"), words("A, c; d e")) == pytest.approx(0.75)
