"""End to end through the CLI, as a user runs it: the demo config with a reduced step count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "train.steps=30",
    "train.eval_every=15",
    "train.ckpt_every=15",
    "train.eval_tokens=4096",
    "data.synthetic.n_docs=1500",
    "tokenizer.vocab_size=512",
    "tokenizer.train_docs=500",
    "model.d_model=64",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.n_layers=2",
    "sample.max_new_tokens=12",
    "train.progress=false",
]


def lmlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = lmlab("train", "configs/demo.yaml", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_a_complete_run(demo_run):
    out, stdout = demo_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "samples.txt", "tokenizer.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 30
    assert "final validation loss" in stdout and "unigram entropy" in stdout
    assert summary["final_val_loss"] < 6.0  # learning happened (uniform over 512 tokens is 6.24)
    assert len((out / "samples.txt").read_text().split("---")) == 3


def test_generate_from_run(demo_run):
    out, _ = demo_run
    proc = lmlab("generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "10", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time")
    again = lmlab("generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "10", "--temperature", "0")
    assert again.stdout == proc.stdout  # greedy is deterministic


def test_eval_perplexity(demo_run):
    out, _ = demo_run
    proc = lmlab("eval", "perplexity", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert result["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_resume_a_finished_run_extends_it(demo_run, tmp_path):
    import shutil

    out, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = lmlab("train", "--resume", str(copy), "train.steps=35", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["steps"] == 35


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["train", "configs/nope.yaml"], 2, "config file not found"),
        (["train", "configs/demo.yaml", "optim.lrr=1"], 2, "optim.lrr"),
        (["train", "configs/demo.yaml", "model.n_heads=5"], 2, "must divide"),
        (["train", "--resume", "/nonexistent/run"], 1, "not a run directory"),
        (["generate", "/nonexistent/run"], 1, "does not exist"),
        (["frobnicate"], 2, "unknown command"),
    ],
)
def test_bad_input_is_one_clear_message(args, code, fragment, capsys):
    assert main(args) == code
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_foreign_checkpoint_refused_on_resume(demo_run, tmp_path, capsys):
    import shutil

    out, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["train", "--resume", str(copy), "model.d_model=96", "model.n_heads=2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint from another model" in err and "d_model" in err
