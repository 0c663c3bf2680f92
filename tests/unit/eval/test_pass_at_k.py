"""Unbiased pass@k (docs/science.md §20; Chen et al. 2021, arXiv 2107.03374): the test vectors, the binomial form,
the naive estimator's bias, unbiasedness, sampling from a model, and ``lmlab eval passk`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig, load_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError, UserError
from lmlab.eval.pass_at_k import Problem, mean_pass_at_k, pass_at_k, sample_pass_at_k
from lmlab.eval.pass_at_k_command import passk_main, preferences_checker, prompt_text, resolve_checker
from lmlab.models.decoder import Decoder
from lmlab.recipes.sft import run_sft

VECTORS = [  # docs/science.md §20: (n, c, k) -> pass@k
    (10, 3, 1, 0.3),
    (10, 3, 5, 0.9166667),
    (10, 0, 5, 0.0),
    (10, 8, 5, 1.0),
    (200, 10, 10, 0.4085479),
    (200, 10, 100, 0.9992290),
    (1000, 1, 100, 0.1),
]


@pytest.mark.parametrize("n,c,k,expected", VECTORS)
def test_science_vectors(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=5e-8)


def test_product_form_equals_the_binomial_ratio():
    for n in (1, 5, 17, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_the_naive_estimator_is_biased_low():
    n, c, k = 10, 3, 5
    naive = 1 - (1 - c / n) ** k
    assert naive == pytest.approx(0.831930, abs=1e-6)
    assert pass_at_k(n, c, k) == pytest.approx(11 / 12, abs=1e-12)  # 1 − C(7,5)/C(10,5) = 1 − 21/252


def test_unbiased_over_the_binomial_distribution_of_c():
    """E_c[pass@k(n, c, k)] = 1 − (1 − q)^k when c ~ Binomial(n, q): the estimator is exactly unbiased."""
    for n, k, q in [(10, 5, 0.3), (20, 1, 0.05), (16, 16, 0.1), (64, 8, 0.02)]:
        expected = sum(math.comb(n, c) * q**c * (1 - q) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
        assert expected == pytest.approx(1 - (1 - q) ** k, rel=1e-10)


def test_limits_are_enforced():
    with pytest.raises(ValueError, match="k=11"):
        pass_at_k(10, 3, 11)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(10, 3, 0)
    with pytest.raises(ValueError, match="c=11"):
        pass_at_k(10, 11, 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
    assert mean_pass_at_k([(10, 3), (10, 0), (4, 4)], 1) == pytest.approx((0.3 + 0.0 + 1.0) / 3)


# --------------------------------------------------------------------------- sampling from a model


class DigitTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _decoder():
    torch.manual_seed(0)
    return Decoder(ModelConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()


def test_sampling_counts_what_the_checker_accepts():
    model, tok = _decoder(), DigitTokenizer()
    problems = [Problem([1, 2, 3], {"want": 5}), Problem([4], {"want": 7}), Problem([9, 9], {"want": 0})]

    def first_token(problem, response):
        return response.split()[0] == str(problem["want"])

    out = sample_pass_at_k(
        model, tok, problems, first_token, n=40, ks=[1, 4, 40], max_new_tokens=3, stop_id=None, seed=3, batch_size=16
    )
    assert out.summary["n"] == 40 and out.summary["problems"] == 3
    rows = out.per_problem
    assert [r["index"] for r in rows] == [0, 1, 2] and all(0 <= r["c"] <= 40 for r in rows)
    for k in (1, 4, 40):
        assert out.summary[f"pass@{k}"] == pytest.approx(sum(pass_at_k(40, r["c"], k) for r in rows) / 3)
    assert out.summary["pass@1"] <= out.summary["pass@4"] <= out.summary["pass@40"]
    # c/n estimates the model's own probability of the checked first token
    with torch.no_grad():
        p5 = torch.softmax(model(torch.tensor([[1, 2, 3]]))[0, -1], -1)[5].item()
    assert abs(rows[0]["c"] / 40 - p5) < 4 * math.sqrt(p5 * (1 - p5) / 40) + 1e-9
    again = sample_pass_at_k(
        model, tok, problems, first_token, n=40, ks=[1, 4, 40], max_new_tokens=3, stop_id=None, seed=3, batch_size=16
    )
    assert again.per_problem == rows  # one seeded generator: reproducible


def test_every_sample_correct_or_none():
    model, tok = _decoder(), DigitTokenizer()
    problems = [Problem([1], {}), Problem([2, 3], {})]
    ok = sample_pass_at_k(model, tok, problems, lambda p, r: True, n=5, ks=[1, 5], max_new_tokens=2, stop_id=None)
    bad = sample_pass_at_k(model, tok, problems, lambda p, r: False, n=5, ks=[1, 5], max_new_tokens=2, stop_id=None)
    assert ok.summary["pass@1"] == ok.summary["pass@5"] == 1.0 and bad.summary["pass@5"] == 0.0
    with pytest.raises(ValueError, match="k=6"):
        sample_pass_at_k(model, tok, problems, lambda p, r: True, n=5, ks=[6], max_new_tokens=2, stop_id=None)


def test_builtin_checkers():
    q = {"prompt": "Question: What is 2 plus 3?\nAnswer:"}
    assert preferences_checker(q, " 5.") and not preferences_checker(q, " 6.")
    chat = {"messages": [{"role": "user", "content": "What is 4 plus 4?"}, {"role": "assistant", "content": "8"}]}
    assert prompt_text(chat) == "What is 4 plus 4?" and preferences_checker(chat, "8")
    facts, needs = resolve_checker("facts")
    assert needs and facts({"answer": "Dunmar"}, "She was born in Dunmar.") and not facts({"answer": "Dun"}, "Dunmar")
    exact, _ = resolve_checker("exact")
    assert exact({"answer": "C b a"}, " c, b a. ") and not exact({"answer": "c"}, "c b")
    user, needs = resolve_checker("lmlab.eval.pass_at_k_command:exact_checker")
    assert user is exact and not needs
    for name, match in [("nope", "unknown"), ("no_such_mod:f", "cannot import"), ("json:nothing", "no function")]:
        with pytest.raises(UserError, match=match):
            resolve_checker(name)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    """A 2-step SFT run on the facts world and a problems file of its held-out questions."""
    d = tmp_path_factory.mktemp("passk")
    convs = FactsWorld().qa_conversations(0, 10, "heldout")[:4]
    texts = [m["content"] for c in FactsWorld().qa_conversations(0, 10, "train") for m in c["messages"]] * 3
    tok = TextTokenizer.train_bpe(texts, 340).save(d / "tok" / "tokenizer.json")
    cfg = load_config(
        None,
        [
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=96", "train.seq_len=96",
            "train.steps=2", "train.micro_batch_size=4", "train.eval_every=2", "train.ckpt_every=2",
            "train.progress=false", "train.device=cpu", "sample.max_new_tokens=2", "sample.prompts=[hi]",
            f"tokenizer.path={tok}", "data.synthetic.world=facts", "data.synthetic.n_docs=10",
        ],
    )  # fmt: skip
    run_sft(cfg, d / "run", quiet=True)
    problems = d / "problems.jsonl"
    problems.write_text("".join(json.dumps({"messages": c["messages"], "answer": c["answer"]}) + "\n" for c in convs))
    return d / "run", problems


def test_passk_command_prints_the_summary_and_writes_per_problem(facts_run, tmp_path, capsys):
    run, problems = facts_run
    out = tmp_path / "per_problem.jsonl"
    args = [str(run), "--problems", str(problems), "--checker", "facts", "--n", "8", "--k", "1,8"]
    assert passk_main([*args, "--max-new-tokens", "6", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 8 and summary["problems"] == 4 and 0 <= summary["pass@1"] <= summary["pass@8"] <= 1
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and {"c", "pass@1", "pass@8", "example"} <= set(rows[0])
    assert main(["eval", "passk", *args, "--max-new-tokens", "6", "--limit", "2"]) == 0  # through the CLI map
    assert json.loads(capsys.readouterr().out)["problems"] == 2


def test_passk_user_errors_are_one_line(facts_run, tmp_path, capsys):
    run, problems = facts_run
    base = [str(run), "--problems", str(problems)]
    with pytest.raises(UserError, match="--k 16 exceeds --n 8"):
        passk_main([*base, "--checker", "facts", "--n", "8", "--k", "1,16"])
    with pytest.raises(UserError, match="no such file"):
        passk_main([str(run), "--problems", str(tmp_path / "missing.jsonl"), "--checker", "facts"])
    with pytest.raises(UserError, match="unknown"):
        passk_main([*base, "--checker", "oracle"])
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "Where was Ann born?"}) + "\n")
    with pytest.raises(DataError, match=r"no_answer\.jsonl:1: .*'answer'"):
        passk_main([str(run), "--problems", str(no_answer), "--checker", "facts"])
    assert main(["eval", "passk", *base, "--checker", "facts", "--n", "2", "--k", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "lmlab eval: error: --k 4 exceeds --n 2: pass@k needs at least k samples per problem"
