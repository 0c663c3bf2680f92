"""Exact-answer arithmetic evaluation (``evaluate_arithmetic``) and the ``lmlab_arithmetic`` task's functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lmlab.data.synthetic.arithmetic import ArithmeticWorld, Problem, eval_items, parse_answer
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.arithmetic import evaluate_arithmetic
from lmlab.eval.tasks import worlds
from lmlab.eval.world_tasks import arithmetic, arithmetic_items, arithmetic_score
from lmlab.models.build import build_model

from helpers import model_cfg

TASK = Path(__file__).resolve().parents[3] / "src/lmlab/eval/tasks/lmlab_arithmetic.yaml"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    docs = list(ArithmeticWorld(operations="+*", max_digits=8).documents(0, 200))
    return TextTokenizer.train_bpe(docs, 300, split_digits=True)


class _History:
    """The oracle's "KV cache": the tokens each row has seen (``generate`` sets ``key_mask`` when it pads)."""

    def __init__(self) -> None:
        self.rows: list[list[int]] | None = None
        self.key_mask = None


class Oracle(nn.Module):
    """A stub model that reads the problem from its context and emits the true answer digit by digit, then EOS.

    Problems longer than ``good_digits`` get a wrong first digit, so per-length accuracy is known in advance.
    """

    def __init__(self, tok: TextTokenizer, reverse: bool = False, good_digits: int = 10**9) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # generate() reads the device from the parameters
        self.tok, self.reverse, self.good_digits = tok, reverse, good_digits
        self.prompts: list[list[int]] = []

    def new_kv_cache(self, max_len: int | None = None) -> _History:
        return _History()

    def forward(self, ids: torch.Tensor, position_ids=None, kv_cache: _History | None = None) -> torch.Tensor:
        rows = ids.tolist()  # [B, T]
        if kv_cache.rows is None:
            mask = kv_cache.key_mask.tolist() if kv_cache.key_mask is not None else [[True] * len(r) for r in rows]
            self.prompts += [[t for t, real in zip(r, m) if real] for r, m in zip(rows, mask)]
            kv_cache.rows = [list(r) for r in rows]
        else:
            kv_cache.rows = [h + r for h, r in zip(kv_cache.rows, rows)]
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.tok.vocab_size)  # [B, T, V]
        for b, seen in enumerate(kv_cache.rows):
            logits[b, -1, self._next(seen)] = 1.0
        return logits

    def _next(self, seen: list[int]) -> int:
        text = self.tok.decode(seen, skip_special_tokens=True)
        a, op, b, done = re.fullmatch(r"([0-9]+)([+*])([0-9]+)=([0-9]*)", text).groups()
        problem = Problem(parse_answer(a, self.reverse), parse_answer(b, self.reverse), op, self.reverse)
        answer = problem.answer
        if problem.digits > self.good_digits:
            answer = str((int(answer[0]) + 1) % 10) + answer[1:]
        if len(done) == len(answer):
            return self.tok.eos_id
        return self.tok.token_to_id(answer[len(done)])


def test_an_oracle_scores_one_and_sees_eos_then_the_prompt(tok):
    items = eval_items(n=24, min_digits=1, max_digits=12, op="*")
    oracle = Oracle(tok)
    out = evaluate_arithmetic(oracle, tok, items, batch_size=5)
    assert out == {"accuracy": 1.0, "by_digits": {d: 1.0 for d in range(1, 13)}, "n": 24}
    assert sorted(oracle.prompts) == sorted([tok.eos_id, *tok.encode(p.text)] for p in items)


def test_per_length_accuracy_and_reversed_answers(tok):
    items = eval_items(n=30, min_digits=1, max_digits=6, reverse=True)
    out = evaluate_arithmetic(Oracle(tok, reverse=True, good_digits=4), tok, items, batch_size=7)
    assert out["by_digits"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0, 6: 0.0}
    assert out["accuracy"] == pytest.approx(20 / 30) and out["n"] == 30
    # an oracle reading natural-order problems as reversed ones is wrong wherever a carry crosses digits
    natural = eval_items(n=12, min_digits=5, max_digits=6)
    assert evaluate_arithmetic(Oracle(tok), tok, natural)["accuracy"] == 1.0
    assert evaluate_arithmetic(Oracle(tok, reverse=True), tok, natural)["accuracy"] < 1.0


def test_a_tiny_random_model_gives_a_valid_report(tok):
    torch.manual_seed(0)
    model = build_model(model_cfg(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=64))
    items = eval_items(n=8, min_digits=1, max_digits=4)
    one = evaluate_arithmetic(model, tok, items, max_new_tokens=6, batch_size=1, device="cpu")
    assert set(one) == {"accuracy", "by_digits", "n"} and one["n"] == 8
    assert 0.0 <= one["accuracy"] <= 1.0 and set(one["by_digits"]) == {1, 2, 3, 4}
    assert all(0.0 <= acc <= 1.0 for acc in one["by_digits"].values())
    assert evaluate_arithmetic(model, tok, items, max_new_tokens=6, batch_size=8) == one  # batching changes nothing


def test_bad_arguments(tok):
    with pytest.raises(DataError, match="no problems"):
        evaluate_arithmetic(Oracle(tok), tok, [])
    with pytest.raises(ConfigError, match="batch_size >= 1"):
        evaluate_arithmetic(Oracle(tok), tok, eval_items(n=2), batch_size=0)


def test_task_rows_and_score():
    rows = arithmetic_items(n=6, min_digits=40, max_digits=41, op="*", reverse=True)
    assert [r["digits"] for r in rows] == [40, 41] * 3
    for row in rows:
        assert isinstance(row["a"], str) and row["prompt"].endswith("=")  # big operands stay exact as strings
        assert arithmetic_score(row, [row["answer"] + "\n"]) == {"exact_answer": 1.0}
        assert arithmetic_score(row, [row["answer"][:-1]]) == {"exact_answer": 0.0}
        assert arithmetic_score(row, [" " + row["answer"]]) == {"exact_answer": 0.0}


def test_task_yaml_points_at_exported_functions():
    text = TASK.read_text()
    spec = yaml.safe_load(re.sub(r"!function ", "", text))
    assert spec["task"] == "lmlab_arithmetic" and spec["output_type"] == "generate_until"
    assert spec["custom_dataset"] == "worlds.arithmetic" and spec["process_results"] == "worlds.arithmetic_score"
    meta = spec["metadata"]
    assert (meta["min_digits"], meta["max_digits"], meta["op"], meta["reverse"]) == (1, 20, "+", False)
    assert worlds.arithmetic is arithmetic and worlds.arithmetic_score is arithmetic_score


def test_task_dataset_takes_metadata_as_lm_eval_passes_it():
    pytest.importorskip("datasets")
    test = arithmetic(seed="7", n="4", min_digits="3", max_digits="4", op="+", reverse="true", version=1.0)["test"]
    assert len(test) == 4 and [r["digits"] for r in test] == [3, 4, 3, 4]
    assert all(r["reverse"] for r in test) and list(test) == arithmetic_items(7, 4, 3, 4, "+", True)
