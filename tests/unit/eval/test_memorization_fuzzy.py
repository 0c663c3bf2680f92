"""Extraction beyond exact match: edit similarity by hand, the model's own embedding similarity (hook vs
``forward_hidden``, padded vs alone), the counts on a hand-built model, and more extractions than exact
matching on a model SFT'd until it partly memorises its training documents."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import load_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.errors import DataError, UserError
from lmlab.eval.commands import eval_main
from lmlab.eval.memorization import (
    edit_distance,
    embedding_similarity,
    mean_hidden_states,
    memorization_eval,
    normalized_edit_similarity,
    token_match,
)
from lmlab.models.decoder import Decoder
from lmlab.recipes.sft import run_sft
from lmlab.train.pretrained import load_model

from helpers import model_cfg


def test_edit_distance_and_similarity_by_hand():
    assert edit_distance([1, 2, 3, 4], [1, 2, 4, 4]) == 1  # one substitution
    assert normalized_edit_similarity([1, 2, 3, 4], [1, 2, 4, 4]) == 0.75
    assert normalized_edit_similarity([1, 2, 3], [1, 2, 3, 4]) == 0.75  # one insertion over max length 4
    # kitten -> sitting: k->s, e->i, insert g: 3 edits over 7
    kitten, sitting = [11, 9, 20, 20, 5, 14], [19, 9, 20, 20, 9, 14, 7]
    assert edit_distance(kitten, sitting) == edit_distance(sitting, kitten) == 3
    assert normalized_edit_similarity(kitten, sitting) == pytest.approx(4 / 7)
    # a copy shifted by one scores 0 by token match, 1 − 2/4 here (drop the first, append the last)
    assert token_match([2, 3, 4, 5], [1, 2, 3, 4]) == 0.0
    assert normalized_edit_similarity([2, 3, 4, 5], [1, 2, 3, 4]) == 0.5
    assert normalized_edit_similarity([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)  # keep the 2, substitute 2
    assert normalized_edit_similarity([], []) == 1.0
    assert normalized_edit_similarity([], [1, 2]) == normalized_edit_similarity([1, 2], []) == 0.0
    assert normalized_edit_similarity([7, 8], [1, 2]) == 0.0


@pytest.fixture(scope="module")
def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(model_cfg(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()


def test_embedding_similarity_of_a_fixed_tiny_model(tiny_decoder):
    model, prefix = tiny_decoder, [0]
    a, b = [5, 6, 7, 8, 9], [5, 6, 7, 30, 31, 32, 33]
    assert embedding_similarity(model, a, a, prefix) == 1.0
    assert embedding_similarity(model, [], [1]) == 0.0
    # the hooked final-norm output is Decoder.forward_hidden's: the hidden states the LM head reads
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([prefix + b]))[0, 1:]  # [7, d]
    pooled = mean_hidden_states(model, [a, b], prefix)  # [2, d]; a is right-padded
    torch.testing.assert_close(pooled[1], hidden.mean(0))
    torch.testing.assert_close(pooled[0], mean_hidden_states(model, [a], prefix)[0])  # padding changes nothing
    cosine = embedding_similarity(model, a, b, prefix)
    assert cosine == pytest.approx(float(torch.cosine_similarity(pooled[0], pooled[1], dim=0)), abs=1e-6)
    assert cosine == pytest.approx(embedding_similarity(model, b, a, prefix), abs=1e-6) and -1 <= cosine < 1
    twin = mean_hidden_states(model, [a, a], prefix)
    torch.testing.assert_close(twin[0], twin[1])


class SuccessorModel(torch.nn.Module):
    """Predicts token ``id + 1``; its final hidden state is the one-hot of the input token, so a mean-pooled
    embedding is a text's bag of tokens and the embedding cosine can be counted by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.norm = torch.nn.Identity()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self):
        return None

    def forward(self, ids, **_):
        hidden = self.norm(torch.nn.functional.one_hot(ids, self.vocab).float())  # [B, T, V]
        return hidden.roll(1, dims=-1)  # logits peaked at id + 1


class IdTokenizer:
    """Whitespace-separated ids; documents start with id 0."""

    document_prefix = [0]

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def _doc(ids) -> str:
    return " ".join(map(str, ids))


def test_counts_of_exact_fuzzy_and_embedding_matches_by_hand():
    prompt, truth = list(range(1, 9)), list(range(9, 41))  # the model continues 1..8 with 9..40
    one_slip = [99 if t == 20 else t for t in truth]  # edit similarity 31/32, cosine 31/32
    reversed_ = truth[::-1]  # the same bag of tokens: cosine 1; 32 substitutions, no cheaper with indels: 0
    half = truth[:16] + list(range(60, 76))  # edit similarity 16/32, cosine 16/32
    docs = [_doc(prompt + t) for t in (truth, one_slip, reversed_, half)] + ["1 2 3"]
    summary, rows = memorization_eval(SuccessorModel(100), IdTokenizer(), docs, prefix_tokens=8, new_tokens=32)
    assert [r["exact_match"] for r in rows[:4]] == [True, False, False, False]
    assert [r["edit_similarity"] for r in rows[:4]] == pytest.approx([1.0, 31 / 32, 0.0, 0.5])
    assert [r["embedding_similarity"] for r in rows[:4]] == pytest.approx([1.0, 31 / 32, 1.0, 0.5])
    assert [r["fuzzy_match"] for r in rows[:4]] == [True, True, False, False]
    assert [r["embedding_match"] for r in rows[:4]] == [True, True, True, False]
    assert [r["approximate_match"] for r in rows[:4]] == [True, True, True, False]
    assert rows[4] == {"doc": 4, "skipped": True, "tokens": 3}
    counts = {k: summary[k] for k in ("exact_matches", "fuzzy_matches", "embedding_matches", "approximate_matches")}
    assert counts == {"exact_matches": 1, "fuzzy_matches": 2, "embedding_matches": 3, "approximate_matches": 3}
    assert summary["extra_over_exact"] == 2 and summary["fuzzy_threshold"] == 0.9
    strict, _ = memorization_eval(
        SuccessorModel(100), IdTokenizer(), docs, prefix_tokens=8, new_tokens=32, fuzzy_threshold=0.97
    )
    assert strict["fuzzy_matches"] == 1 and strict["approximate_matches"] == 3  # doc 1 still passes by embedding
    json.dumps(rows)  # the per-document rows are JSON


def test_thresholds_outside_zero_one_are_refused():
    with pytest.raises(DataError, match="threshold"):
        memorization_eval(
            SuccessorModel(10), IdTokenizer(), ["1 2 3"], prefix_tokens=1, new_tokens=1, fuzzy_threshold=2
        )
    for flag, value in (("--fuzzy-threshold", "1.5"), ("--embedding-threshold", "-0.1"), ("--fuzzy-threshold", "nan")):
        with pytest.raises(UserError, match=rf"^{flag} must be in \[0, 1\], got {value}$"):
            eval_main(["memorization", "no-run", "--data", "x.jsonl", flag, value])


# SFT on plain biography documents (every token a target) with a constant learning rate: at 110 steps the
# model reproduces some biographies verbatim and others with a few slips (a date, a name fragment); at 160 it
# has them all, at 80 none (measured on seeds 0 and 1).
SFT = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.steps=110",
    "train.micro_batch_size=8",
    "train.eval_every=110",
    "train.ckpt_every=110",
    "train.progress=false",
    "train.device=cpu",
    "schedule.name=constant",
    "schedule.warmup_steps=0",
    "optim.lr=3e-3",
    "tokenizer.vocab_size=400",
    "sample.max_new_tokens=4",
    "data.val_fraction=0",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("memfuzzy")
    bios = list(FactsWorld().documents(0, 40))
    (d / "train.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in bios[:24]))
    (d / "unseen.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in bios[24:]))
    run_sft(load_config(None, [*SFT, f"sft.train_file={d / 'train.jsonl'}"]), d / "run", quiet=True)
    return d


def _texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_approximate_matching_counts_more_extractions_of_sft_data(sft_run, capsys):
    model, _, tok = load_model(sft_run / "run")
    seen, _ = memorization_eval(model, tok, _texts(sft_run / "train.jsonl"), prefix_tokens=8, new_tokens=32)
    unseen, _ = memorization_eval(model, tok, _texts(sft_run / "unseen.jsonl"), prefix_tokens=8, new_tokens=32)
    assert seen["evaluated"] == 24 and unseen["evaluated"] == 16
    assert 0 < seen["exact_matches"] < seen["approximate_matches"] < 24  # partly memorised: 8 < 16 measured
    assert seen["extra_over_exact"] == seen["approximate_matches"] - seen["exact_matches"] > 0
    assert unseen["exact_matches"] == 0 and unseen["approximate_matches"] <= 1  # 0 measured

    out = sft_run / "m.jsonl"
    argv = ["memorization", str(sft_run / "run"), "--data", str(sft_run / "train.jsonl"), "--out", str(out)]
    assert eval_main([*argv, "--prefix-tokens", "8", "--new-tokens", "32"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["extra_over_exact"] == seen["extra_over_exact"]
    row = json.loads(out.read_text().splitlines()[0])
    assert {"edit_similarity", "embedding_similarity", "fuzzy_match", "embedding_match", "approximate_match"} <= set(
        row
    )
