"""The unlearning benchmark, the ``lmlab unlearn`` recipe and ``lmlab eval unlearning`` on a tiny benchmark."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.data.unlearning_bench import build_bench_data, forget_people
from lmlab.train.pretrained import load_model

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=128",
    "tokenizer.vocab_size=400",
    "sft.epochs=2",
    "train.micro_batch_size=8",
    "train.seq_len=128",
    "sample.max_new_tokens=8",
]
RUN = [
    "unlearn.epochs=2",
    "unlearn.eval_items=6",
    "train.micro_batch_size=4",
    "train.eval_every=2",
    "train.log_every=1",
    "train.progress=false",
    "optim.lr=1e-3",
    "schedule.name=constant",
    "sample.max_new_tokens=6",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A 100-person benchmark with its target and the forget01 / forget05 gold models (about 20 s)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(
        ["unlearn", "bench", "prepare", "--out", str(out), "--people", "100", "--holdout", "12",
         "--splits", "forget01,forget05", "--quiet", *TINY_MODEL]
    )  # fmt: skip
    assert code == 0
    return out


def config(tmp_path: Path, text: str = "name: u\n") -> str:
    path = tmp_path / "u.yaml"
    path.write_text(text)
    return str(path)


def unlearn(tmp_path, bench, *overrides, out="run") -> int:
    return main(["unlearn", config(tmp_path), "--bench", str(bench), "--out", str(tmp_path / out), *RUN, *overrides])


# --------------------------------------------------------------------------- the data


def test_bench_data_splits_are_nested_and_deterministic(tmp_path):
    a = build_bench_data(tmp_path / "a", n_people=200, n_holdout=10)
    b = build_bench_data(tmp_path / "b", n_people=200, n_holdout=10)
    assert (
        a == b
        and (tmp_path / "a/data/forget05.jsonl").read_bytes() == (tmp_path / "b/data/forget05.jsonl").read_bytes()
    )
    people = forget_people(0, 200)
    assert [len(people[s]) for s in ("forget01", "forget05", "forget10")] == [2, 10, 20]
    assert set(people["forget01"]) < set(people["forget05"]) < set(people["forget10"])
    assert a["counts"]["forget05"] == 60  # six questions per person
    items = [json.loads(line) for line in (tmp_path / "a/data/forget05.jsonl").read_text().splitlines()]
    for it in items:
        assert it["value"] in it["answer"] and it["value"] in it["paraphrased_answer"]
        assert it["paraphrased_answer"] != it["answer"]
        assert len(set(it["perturbed_answers"])) == 5
        assert all(it["value"] not in p for p in it["perturbed_answers"])


def test_gold_training_data_leaves_out_exactly_the_forget_people(tmp_path):
    build_bench_data(tmp_path, n_people=100, n_holdout=5)
    data = tmp_path / "data"
    forget = [json.loads(x) for x in (data / "forget05.jsonl").read_text().splitlines()]
    gold = (data / "train_gold_forget05.jsonl").read_text()
    target = (data / "train_target.jsonl").read_text()
    for it in forget:
        assert json.dumps(it["question"])[1:-1] in target and json.dumps(it["question"])[1:-1] not in gold
    retain = [json.loads(x) for x in (data / "retain_eval.jsonl").read_text().splitlines()]
    assert all(json.dumps(it["question"])[1:-1] in gold for it in retain)
    holdout = [json.loads(x) for x in (data / "holdout.jsonl").read_text().splitlines()]
    assert all(json.dumps(it["question"])[1:-1] not in target for it in holdout)


# --------------------------------------------------------------------------- runs


def test_bench_prepare_writes_the_manifest_and_models(bench):
    manifest = json.loads((bench / "bench.json").read_text())
    assert set(manifest["models"]) == {"target", "gold_forget01", "gold_forget05"}
    for role in manifest["models"]:
        assert (bench / "models" / role / "summary.json").is_file()
    # a second prepare keeps the finished models
    before = (bench / "models/target/summary.json").stat().st_mtime_ns
    assert main(["unlearn", "bench", "prepare", "--out", str(bench), "--people", "100", "--holdout", "12",
                 "--splits", "forget01,forget05", "--quiet", *TINY_MODEL]) == 0  # fmt: skip
    assert (bench / "models/target/summary.json").stat().st_mtime_ns == before


def test_gradient_ascent_lowers_the_forget_answers_probability(tmp_path, bench):
    assert unlearn(tmp_path, bench, "unlearn.method.kind=ga", "unlearn.split=forget05", "optim.lr=3e-3") == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    report = json.loads((tmp_path / "run/unlearning.json").read_text())
    assert report["forget"]["probability"] < summary["start"]["forget/probability"]
    assert 0.0 <= report["forget_quality"] <= 1.0 and 0.0 <= report["model_utility"] <= 1.0
    evals = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("kind") == "eval"]
    assert evals[0]["step"] == 0 and len(evals) >= 2 and "forget_quality" in evals[-1]


@pytest.mark.parametrize("kind", ["npo", "simnpo", "idk_dpo", "idk_nll", "flat"])
def test_each_method_runs_and_logs_its_terms(tmp_path, bench, kind):
    assert unlearn(tmp_path, bench, f"unlearn.method.kind={kind}", "unlearn.split=forget01") == 0
    train = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    last = [r for r in train if r.get("kind") == "train"][-1]
    assert "forget" in last and any(k.startswith("nll/") for k in last)


def test_rmu_trains_only_the_chosen_down_projections(tmp_path, bench):
    assert unlearn(tmp_path, bench, "unlearn.method.kind=rmu", "unlearn.method.layer=1", "unlearn.split=forget01") == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["frozen_parameters"] > 0 and summary["method"]["layer"] == 1


def test_wagle_mask_keeps_the_unselected_weights_fixed(tmp_path, bench):
    assert unlearn(tmp_path, bench, "unlearn.method.kind=grad_diff", "unlearn.split=forget01", "optim.weight_decay=0",
                   "unlearn.weight_mask.kind=wagle", "unlearn.weight_mask.keep=0.25") == 0  # fmt: skip
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["weight_mask_kept"] == pytest.approx(0.25, abs=1e-3)
    masks = torch.load(tmp_path / "run/weight_mask.pt", weights_only=True)
    before = load_model(bench / "models/target")[0].state_dict()
    after = load_model(tmp_path / "run")[0].state_dict()
    moved = frozen = 0
    for name, mask in masks.items():
        delta = (after[name] - before[name]).abs()
        assert delta[~mask].sum().item() == 0.0, name  # outside the mask nothing moves
        moved += int((delta[mask] > 0).sum())
        frozen += int((~mask).sum())
    assert moved > 0 and frozen > 0


def test_uld_trains_an_adapter_assistant_and_evaluates_the_logit_difference(tmp_path, bench, capsys):
    uld = ["unlearn.method.kind=uld", "unlearn.split=forget01"]
    assert unlearn(tmp_path, bench, *uld, out="r0") == 2
    assert "set adapter.kind=lora" in capsys.readouterr().err
    assert unlearn(tmp_path, bench, *uld, "adapter.kind=lora", "adapter.rank=4", "optim.lr=1e-2") == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["forget_items"] == 2 * 6  # each forget answer and its paraphrase
    report = json.loads((tmp_path / "run/unlearning.json").read_text())
    assert report["forget"]["probability"] != summary["start"]["forget/probability"]
    out = tmp_path / "eval"
    assert main(["eval", "unlearning", str(tmp_path / "run"), "--bench", str(bench), "--items", "6",
                 "--no-generation", "--out", str(out)]) == 0  # fmt: skip
    evaluated = json.loads((out / "unlearning_eval.json").read_text())
    assert evaluated["split"] == "forget01" and "forget_quality" in evaluated


def test_eval_unlearning_writes_json_and_html(tmp_path, bench):
    out = tmp_path / "eval"
    code = main(["eval", "unlearning", str(bench / "models/target"), "--bench", str(bench), "--split", "forget01",
                 "--items", "6", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "unlearning_eval.json").read_text())
    assert {"forget_quality", "model_utility", "privleak", "verbmem"} <= set(report)
    assert {"probability", "rouge_l_recall", "truth_ratio", "knowmem", "extraction_strength"} <= set(report["forget"])
    assert "<table" in (out / "unlearning_eval.html").read_text()


# --------------------------------------------------------------------------- bad input


def test_split_not_in_the_benchmark(tmp_path, bench, capsys):
    assert unlearn(tmp_path, bench, "unlearn.split=forget10") == 1  # no gold model was trained for it
    assert "no gold_forget10 model" in capsys.readouterr().err
    assert unlearn(tmp_path, bench, "unlearn.split=forget33", out="r2") == 1
    assert "no forget split 'forget33'" in capsys.readouterr().err


def test_not_a_benchmark_and_missing_gold(tmp_path, bench, capsys):
    assert unlearn(tmp_path, tmp_path, out="r1") == 1
    assert "not an unlearning benchmark (no bench.json)" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(bench, copy)
    shutil.rmtree(copy / "models/gold_forget01")
    assert unlearn(tmp_path, copy, "unlearn.split=forget01", out="r2") == 1
    assert "no gold_forget01 model" in capsys.readouterr().err


def test_target_and_gold_with_different_tokenizers(tmp_path, bench, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(bench, copy)
    other = json.loads((copy / "models/gold_forget01/tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)  # a different vocabulary
    (copy / "models/gold_forget01/tokenizer.json").write_text(json.dumps(other))
    assert unlearn(tmp_path, copy, "unlearn.split=forget01") == 1
    assert "different tokenizer" in capsys.readouterr().err


def test_empty_forget_split(tmp_path, bench, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(bench, copy)
    (copy / "data/forget01.jsonl").write_text("")
    assert unlearn(tmp_path, copy, "unlearn.split=forget01") == 1
    assert "forget01.jsonl: empty split" in capsys.readouterr().err


def test_options_of_another_method(tmp_path, bench, capsys):
    assert unlearn(tmp_path, bench, "unlearn.method.kind=flat", "unlearn.method.beta=0.1") == 2
    assert "unlearn.method.beta is an option of" in capsys.readouterr().err
    assert main(["unlearn", config(tmp_path), "--out", str(tmp_path / "r2"), *RUN]) == 2
    assert "needs unlearn.bench" in capsys.readouterr().err


def test_speed_benchmark_smoke(tmp_path, bench):
    """``benchmarks/unlearn_vs_hf.py`` at its smallest: both sides run and see the same tokens per step."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "unlearn_vs_hf.py"
    out = tmp_path / "speed.json"
    argv = [str(script), "--bench", str(bench), "--split", "forget01", "--steps", "3", "--warmup", "1", "--reps", "1",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    subprocess.run([sys.executable, *argv], check=True, capture_output=True)
    median = json.loads(out.read_text())["median"]
    for side in ("lmlab", "hf"):
        assert median[side]["steps_per_s"] > 0
    tokens_per_step = [median[s]["tokens_per_s"] / median[s]["steps_per_s"] for s in ("lmlab", "hf")]
    assert tokens_per_step[0] == pytest.approx(tokens_per_step[1], rel=1e-6)
    assert math.isfinite(median["ratio_lmlab_over_hf"])


def test_a_continued_run_keeps_its_start_and_its_weight_mask(tmp_path, bench):
    args = ["unlearn.method.kind=ga", "unlearn.split=forget05", "train.ckpt_every=3", "train.keep_last=3",
            "unlearn.weight_mask.kind=wagle", "unlearn.weight_mask.keep=0.5"]  # fmt: skip
    assert unlearn(tmp_path, bench, *args) == 0
    run = tmp_path / "run"
    first = json.loads((run / "summary.json").read_text())
    mask = (run / "weight_mask.pt").read_bytes()
    earliest = sorted((run / "checkpoints").glob("step_*"))[0]
    assert earliest.name != f"step_{first['steps']:07d}"
    assert main(["unlearn", "--resume", str(earliest)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["start"] == first["start"] and again["steps"] == first["steps"]
    assert (run / "weight_mask.pt").read_bytes() == mask
    assert json.loads((run / "unlearning.json").read_text())["forget_quality"] >= 0
