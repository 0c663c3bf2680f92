"""Likelihood-ratio OOD detection (issue 10, item 3c; Zhang et al. 2024, arXiv 2404.08679): the AUROC and its
Hanley–McNeil interval by hand and against scikit-learn, per-document log-likelihoods against the LM loss, the
ratio as the difference of two models' log-likelihoods, and ``lmlab eval ood`` end to end on tiny runs."""

from __future__ import annotations

import json
import math
import random
import statistics
from fractions import Fraction

import pytest
import torch

from lmlab.cli import main
from lmlab.eval.ood import (
    DocumentLogprob,
    auroc,
    auroc_interval,
    document_logprobs,
    hanley_mcneil_se,
    likelihood_ratio_scores,
    loglik_scores,
    midranks,
    ood_report,
)
from lmlab.models.build import build_model
from lmlab.objectives.lm import causal_lm_loss
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.train.engine import execute

from helpers import model_cfg, tiny_config

# ----------------------------------------------------------------------------------------------- AUROC by hand


def test_auroc_extremes_and_ties():
    assert auroc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0  # every in-domain score above every out-of-domain one
    assert auroc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0
    assert auroc([2.0, 2.0], [2.0, 2.0, 2.0]) == 0.5  # all ties: each pair counts one half


def test_auroc_small_mixed_example():
    # Pairs won (in > out) + ½ per tie, over 3·3 pairs:
    #   0.9 beats 0.5, 0.3, 0.1                 -> 3
    #   0.5 ties 0.5, beats 0.3, 0.1            -> 2.5
    #   0.3 loses to 0.5, ties 0.3, beats 0.1   -> 1.5
    assert auroc([0.9, 0.5, 0.3], [0.5, 0.3, 0.1]) == pytest.approx(7 / 9, abs=1e-15)
    assert midranks([0.5, 0.3, 0.5, 0.1]) == [3.5, 2.0, 3.5, 1.0]


def test_auroc_needs_both_classes_and_no_nan():
    with pytest.raises(ValueError, match="both classes"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="nan"):
        auroc([math.nan], [1.0])


def test_hanley_mcneil_interval_by_hand():
    a = Fraction(7, 9)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)  # 7/11, 49/72
    var = (a * (1 - a) + 2 * (q1 - a * a) + 2 * (q2 - a * a)) / 9
    assert hanley_mcneil_se(7 / 9, 3, 3) == pytest.approx(math.sqrt(var), rel=1e-12)
    out = auroc_interval([0.9, 0.5, 0.3], [0.5, 0.3, 0.1], level=0.95)
    half = 1.959963984540054 * math.sqrt(var)
    assert (out.low, out.high) == pytest.approx((7 / 9 - half, 1.0))  # 7/9 + half > 1: clipped
    assert out.high == 1.0 and out.n_pos == out.n_neg == 3
    assert auroc_interval([2.0, 3.0], [0.0, 1.0]).as_dict() == {"auroc": 1.0, "interval": [1.0, 1.0]}


def test_interval_narrows_with_more_documents():
    rng = random.Random(0)
    widths = []
    for n in (20, 200):
        pos, neg = [rng.gauss(1, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
        out = auroc_interval(pos, neg)
        assert out.low <= out.value <= out.high
        widths.append(out.high - out.low)
    assert widths[1] < widths[0] / 2


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    pos = [round(rng.gauss(0.5, 1), 1) for _ in range(57)]  # rounded: many ties
    neg = [round(rng.gauss(0.0, 1), 1) for _ in range(43)]
    expected = metrics.roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------- scores


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return build_model(model_cfg(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()


SEQUENCES = [[0, 5, 7, 9, 11, 3], [0, 2], [0, 8, 8, 8], [0, 30, 1, 2, 3, 4, 5, 6, 7, 39]]


def test_document_logprobs_equal_the_lm_loss_of_each_document_alone():
    model = tiny_model(0)
    batched = document_logprobs(model, SEQUENCES, batch_size=3)  # padded next to longer documents
    for seq, doc in zip(SEQUENCES, batched):
        ids = torch.tensor([seq])
        with torch.no_grad():
            ce = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
        assert doc.tokens == len(seq) - 1 == int(ce.count)
        assert doc.total == pytest.approx(-float(ce.loss_sum), rel=1e-5, abs=1e-5)
        assert doc.mean == pytest.approx(doc.total / doc.tokens)
    assert document_logprobs(model, SEQUENCES, batch_size=1) == pytest.approx(batched)


def test_ratio_is_the_difference_of_the_two_log_likelihoods():
    finetuned = document_logprobs(tiny_model(1), SEQUENCES)
    base = document_logprobs(tiny_model(2), SEQUENCES)
    for per_token in (True, False):
        ft, b = loglik_scores(finetuned, per_token), loglik_scores(base, per_token)
        assert likelihood_ratio_scores(finetuned, base, per_token) == pytest.approx([x - y for x, y in zip(ft, b)])
    per_token = likelihood_ratio_scores(finetuned, base)
    assert per_token[3] == pytest.approx((finetuned[3].total - base[3].total) / 9)
    with pytest.raises(ValueError, match="token counts"):
        likelihood_ratio_scores([DocumentLogprob(-1.0, 2)], [DocumentLogprob(-1.0, 3)])


def test_ratio_beats_a_detector_fooled_by_easy_text():
    # In-domain documents are hard for both models but the fine-tuned one gained on them; out-of-domain
    # documents are easy for both (the single likelihood ranks them above) and gained nothing.
    ft_in = [DocumentLogprob(-3.0 * 10, 10), DocumentLogprob(-2.8 * 10, 10)]
    base_in = [DocumentLogprob(-4.0 * 10, 10), DocumentLogprob(-3.9 * 10, 10)]
    ft_out = [DocumentLogprob(-1.1 * 10, 10), DocumentLogprob(-1.3 * 10, 10)]
    base_out = [DocumentLogprob(-1.0 * 10, 10), DocumentLogprob(-1.2 * 10, 10)]
    report = ood_report(ft_in, base_in, ft_out, base_out)
    assert report["auroc"] == 1.0 and report["n_in"] == report["n_out"] == 2
    assert report["baselines"]["finetuned_loglik"]["auroc"] == 0.0
    assert report["baselines"]["base_loglik"]["auroc"] == 0.0
    assert report["reduction"] == "per_token" and "Hanley-McNeil" in report["interval_method"]


# ----------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run on stories, a run fine-tuned from it on facts, a run with another tokenizer, and documents."""
    root = tmp_path_factory.mktemp("ood")
    execute(PretrainRecipe(), tiny_config("train.steps=4"), root / "base", quiet=True)
    tune = [f"init_from={root / 'base'}", "data.synthetic.world=facts", "train.steps=4", "optim.lr=3e-3"]
    execute(PretrainRecipe(), tiny_config(*tune), root / "tuned", quiet=True)
    execute(PretrainRecipe(), tiny_config("train.steps=2", "tokenizer.vocab_size=330"), root / "other", quiet=True)
    (root / "in.jsonl").write_text("".join(json.dumps({"text": f"Ann was born in town {i}."}) + "\n" for i in range(7)))
    (root / "out.txt").write_text("".join(f"Once upon a time, a dog named Rex {i} ran.\n" for i in range(5)))
    (root / "empty.txt").write_text("\n\n")
    return root


def run_ood(runs, *extra: str) -> list[str]:
    return ["eval", "ood", str(runs / "tuned"), "--base", str(runs / "base"), *extra]


def test_command_prints_auroc_and_writes_scores(runs, capsys):
    scores = runs / "scores.jsonl"
    args = ["--in", str(runs / "in.jsonl"), "--out", str(runs / "out.txt"), "--scores", str(scores)]
    assert main(run_ood(runs, *args, "--max-docs", "6", "--batch-size", "4")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_in"], report["n_out"]) == (6, 5)
    assert report["max_tokens"] == 63 and report["truncated"] == {"in": 0, "out": 0}
    assert set(report["baselines"]) == {"finetuned_loglik", "base_loglik"}
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["set"] for r in rows] == ["in"] * 6 + ["out"] * 5
    for r in rows:
        assert r["score"] == pytest.approx((r["logp_finetuned"] - r["logp_base"]) / r["tokens"])
    by_set = {name: [r["score"] for r in rows if r["set"] == name] for name in ("in", "out")}
    assert report["auroc"] == pytest.approx(auroc(by_set["in"], by_set["out"]))
    assert report["interval"][0] <= report["auroc"] <= report["interval"][1]


def test_command_sum_and_truncation(runs, capsys):
    args = ["--in", str(runs / "in.jsonl"), "--out", str(runs / "out.txt"), "--sum", "--max-tokens", "4"]
    assert main(run_ood(runs, *args, "--scores", str(runs / "sum.jsonl"))) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reduction"] == "sum" and report["truncated"] == {"in": 7, "out": 5}
    rows = [json.loads(line) for line in (runs / "sum.jsonl").read_text().splitlines()]
    assert all(r["tokens"] == 4 and r["truncated"] for r in rows)
    assert all(r["score"] == pytest.approx(r["logp_finetuned"] - r["logp_base"]) for r in rows)
    spread = statistics.pstdev(r["score"] for r in rows)
    assert spread > 0  # the two models differ


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base", "{other}"], "uses a different tokenizer"),
        (["--in", "{root}/missing.jsonl"], "--in {root}/missing.jsonl: file not found"),
        (["--out", "{root}/empty.txt"], "no documents"),
        (["--base", "{root}/nowhere"], "--base: run directory does not exist"),
        (["--max-tokens", "64"], "--max-tokens must be < 64"),
    ],
    ids=["tokenizer-mismatch", "missing-file", "empty-file", "missing-base", "too-many-tokens"],
)
def test_command_user_errors_are_one_line(runs, capsys, extra, message):
    defaults = {"--in": str(runs / "in.jsonl"), "--out": str(runs / "out.txt"), "--base": str(runs / "base")}
    for flag, value in zip(extra[::2], extra[1::2]):
        defaults[flag] = value.format(root=runs, other=runs / "other")
    argv = ["eval", "ood", str(runs / "tuned")] + [x for pair in defaults.items() for x in pair]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message.format(root=runs) in err and len(err.splitlines()) == 1
