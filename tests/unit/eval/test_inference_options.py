"""The inference switches on the command line (issue 14): ``--attention-topk`` and ``--iterations`` for
``lmlab generate``, ``lmlab eval perplexity`` and ``lmlab eval arithmetic``, with one message for what a
model cannot use."""

from __future__ import annotations

import json

import pytest

from lmlab.cli import main
from lmlab.recipes.pretrain import run_pretraining

from helpers import tiny_config

RECURRENT = ("data.synthetic.world=arithmetic", "tokenizer.split_digits=true", "model.n_layers=3",
             "model.recurrence.enabled=true", "model.recurrence.mean_iterations=2", "train.steps=3")  # fmt: skip


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "recurrent"
    run_pretraining(tiny_config(*RECURRENT), run, quiet=True)
    return run


def perplexity(run, *flags, capsys) -> float:
    assert main(["eval", "perplexity", str(run), "--tokens", "256", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]


def test_iterations_and_topk_change_the_perplexity_and_topk_over_the_context_does_not(recurrent_run, capsys):
    base = perplexity(recurrent_run, capsys=capsys)
    assert perplexity(recurrent_run, "--iterations", "2", capsys=capsys) == base  # the default: round(mean)
    assert perplexity(recurrent_run, "--iterations", "5", capsys=capsys) != base
    assert perplexity(recurrent_run, "--attention-topk", "4096", capsys=capsys) == base
    assert perplexity(recurrent_run, "--attention-topk", "2", capsys=capsys) != base


def test_generate_and_arithmetic_take_the_switches(recurrent_run, capsys, tmp_path):
    assert main(["generate", str(recurrent_run), "--prompt", "12+34=", "--max-new-tokens", "4", "--temperature", "0",
                 "--attention-topk", "3", "--iterations", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("12+34=")
    out = tmp_path / "arith.json"
    assert main(["eval", "arithmetic", str(recurrent_run), "--n", "6", "--max-digits", "3", "--iterations", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n"] == 6 and set(result["by_digits"]) == {"1", "2", "3"} and result["iterations"] == 3
    assert 0.0 <= result["accuracy"] <= 1.0


def test_what_a_model_cannot_use_is_one_message(recurrent_run, tmp_path, capsys):
    dense = tmp_path / "dense"
    run_pretraining(tiny_config("train.steps=2"), dense, quiet=True)
    cases = [
        (["generate", str(recurrent_run), "--attention-topk", "0"], "--attention-topk=0 must be >= 1"),
        (["eval", "perplexity", str(recurrent_run), "--iterations", "0"], "--iterations=0 must be >= 1"),
        (["eval", "perplexity", str(dense), "--iterations", "3"], "--iterations needs a recurrent-depth model"),
    ]
    for argv, message in cases:
        assert main(argv) == 1  # a UserError
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
