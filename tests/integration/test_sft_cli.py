"""``lmlab sft`` and ``lmlab eval memorization`` through the CLI, as a user runs them (tiny settings)."""

from __future__ import annotations

import json

import pytest

from lmlab.cli import main
from lmlab.data.synthetic.facts import FactsWorld

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.steps=4",
    "train.micro_batch_size=4",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.progress=false",
    "train.device=cpu",
    "schedule.warmup_steps=0",
    "tokenizer.vocab_size=400",
    "sample.max_new_tokens=4",
]


def lmlab(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (the same entry point as the ``lmlab`` script): exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftcli")
    convs = FactsWorld().qa_conversations(0, 20, "train")
    (d / "train.jsonl").write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in convs))
    (d / "config.yaml").write_text("name: sft-test\nsft:\n  loss_on: assistant\n  packing: true\n")
    (d / "bios.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in FactsWorld().documents(0, 6)))
    return d


def test_sft_then_memorization_eval(files, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = lmlab(
        capsys,
        "sft",
        str(files / "config.yaml"),
        f"sft.train_file={files / 'train.jsonl'}",
        *TINY,
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["data"]["train_examples"] > 0
    assert (out / "loss.png").is_file() and (out / "samples.txt").is_file()

    code, stdout, err = lmlab(
        capsys,
        "eval",
        "memorization",
        str(out),
        "--data",
        str(files / "bios.jsonl"),
        "--prefix-tokens",
        "8",
        "--new-tokens",
        "8",
    )
    assert code == 0, err[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["evaluated"] == 6 and 0.0 <= result["rouge_l"] <= 1.0
    rows = [json.loads(x) for x in (out / "memorization.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"exact_match", "token_match", "rouge_l", "generated", "reference"} <= set(rows[0])

    code, _, err = lmlab(capsys, "sft", "--resume", str(out), "train.steps=6", "--quiet")
    assert code == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_bad_conversation_is_one_line_error_with_file_and_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n"
    )
    code, _, err = lmlab(
        capsys, "sft", str(files / "config.yaml"), f"sft.train_file={bad}", *TINY, "--out", str(tmp_path / "r")
    )
    assert code == 1
    assert (
        err.strip()
        == f"lmlab sft: error: {bad}:1: message 1 has unknown role 'bot'; valid roles: system, user, assistant"
    )
