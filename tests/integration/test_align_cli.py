"""``lmlab align`` and ``lmlab reward`` end to end on a tiny random model and the preference world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.cli import main
from lmlab.config import load_config, save_config
from lmlab.data.synthetic.preference_world import PreferenceWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.models.decoder import Decoder
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrained import load_model

MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=96", "train.seq_len=64"]


def make_run(run_dir: Path, tokenizer: TextTokenizer) -> Path:
    cfg = load_config(None, [*MODEL, f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(0)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 0, Decoder(cfg.model), model_cfg=cfg.model)
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_cli")
    world = PreferenceWorld()
    tok = TextTokenizer.train_bpe(list(world.documents(0, 300)), vocab_size=320)
    base = make_run(root / "base", tok)
    foreign_tok = TextTokenizer.train_bpe(["zebra quokka " * 20, "lorem ipsum dolor " * 20], vocab_size=300)
    foreign = make_run(root / "foreign", foreign_tok)
    train = world.write_pairs(root / "train.jsonl", 0, 40, "train")
    val = world.write_pairs(root / "val.jsonl", 1, 8, "test")
    ood = world.write_pairs(root / "ood.jsonl", 2, 8, "ood")
    config = {
        "init_from": str(base),
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {
            "steps": 4,
            "micro_batch_size": 4,
            "eval_every": 2,
            "log_every": 1,
            "ckpt_every": 4,
            "device": "cpu",
            "progress": False,
        },
        "sample": {"max_new_tokens": 6},
        "align": {
            "train_file": str(train),
            "val_file": str(val),
            "diagnostics_every": 2,
            "max_prompt_len": 48,
            "max_len": 96,
        },
    }
    cfg_path = root / "align.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return {"root": root, "cfg": cfg_path, "foreign": foreign, "ood": ood, "train": train, "val": val}


def test_dpo_run_logs_everything(setup, capsys):
    out = setup["root"] / "dpo"
    assert main(["align", str(setup["cfg"]), "--out", str(out), "--quiet"]) == 0
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "ref_logps/chosen",
        "ref_logps/rejected",
        "length/chosen",
        "length/rejected",
    ):
        assert key in train[0], key
    assert train[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    diag = [r for r in records if r["kind"] == "diagnostic"]
    assert [r["step"] for r in diag] == [0, 2, 4]
    assert all(-1.0 <= r["grad_cos"] <= 1.0 and r["grad_norm_chosen"] > 0 for r in diag)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and 0.0 <= evals[-1]["val_accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert summary["kl_to_reference"] is not None and summary["samples"] > 0
    assert summary["train_data"]["pairs"] == 40
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "policy_logp", "reference_logp", "tokens"} <= set(samples[0])
    model, cfg, tok = load_model(out)  # an align run is itself a run to start from
    assert cfg.align.loss == "dpo" and tok is not None


def test_precomputed_reference_matches_live_reference(setup):
    out = setup["root"] / "dpo_pre"
    args = ["align", str(setup["cfg"]), "--out", str(out), "--quiet", "align.precompute_reference=true"]
    assert main([*args, "train.steps=2", "align.loss=ln_dpo", "align.beta=5.0"]) == 0
    live = setup["root"] / "dpo_live"
    args = ["align", str(setup["cfg"]), "--out", str(live), "--quiet", "train.steps=2", "align.loss=ln_dpo"]
    assert main([*args, "align.beta=5.0"]) == 0
    assert (out / "reference_logps.pt").is_file()
    a = [r for r in read_metrics(out) if r["kind"] == "train"]
    b = [r for r in read_metrics(live) if r["kind"] == "train"]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["ref_logps/chosen"] == pytest.approx(rb["ref_logps/chosen"], abs=1e-4)


def test_simpo_runs_without_reference(setup):
    out = setup["root"] / "simpo"
    args = ["align", str(setup["cfg"]), "--out", str(out), "--quiet", "align.loss=simpo", "align.beta=2.0"]
    assert main([*args, "train.steps=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] is None and summary["kl_to_reference"] is not None


def test_bad_inputs_give_one_line_errors(setup, capsys):
    cfg = str(setup["cfg"])
    assert main(["align", cfg, "--out", str(setup["root"] / "b1"), "align.beta=0"]) == 2
    assert "align.beta=0.0 must be > 0" in capsys.readouterr().err
    code = main(["align", cfg, "--out", str(setup["root"] / "b2"), "--reference", str(setup["foreign"])])
    assert code == 1
    assert "uses a different tokenizer than the policy" in capsys.readouterr().err
    bad = setup["root"] / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": " a."}\n')
    assert main(["align", cfg, "--out", str(setup["root"] / "b3"), f"align.train_file={bad}"]) == 1
    assert f"{bad}:1: missing field 'rejected'" in capsys.readouterr().err
    same = setup["root"] / "same.jsonl"
    same.write_text(
        '{"prompt": "Q", "chosen": " a.", "rejected": " b."}\n{"prompt": "Q", "chosen": " a.", "rejected": " a."}\n'
    )
    args = ["align", cfg, "--out", str(setup["root"] / "b4"), f"align.train_file={same}", "align.identical_pairs=error"]
    assert main(args) == 1
    assert f"{same}:2: chosen and rejected are identical" in capsys.readouterr().err


def test_reward_train_and_score(setup, capsys, tmp_path):
    cfg = str(setup["cfg"])
    results = {}
    for name, weight in (("plain", 0.0), ("regularized", 0.5)):
        out = setup["root"] / f"rm_{name}"
        args = ["reward", "train", cfg, "--out", str(out), "--quiet", f"reward.lm_weight={weight}"]
        assert main([*args, f"reward.ood_file={setup['ood']}", "train.steps=3"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["kind"] == "reward"
        assert 0.0 <= summary["ood"]["accuracy"] <= 1.0 and summary["val"]["pairs"] == 8
        records = read_metrics(out)
        assert ("lm_nll" in records[0]) == (weight > 0)
        results[name] = out
    capsys.readouterr()
    scores = tmp_path / "scores.jsonl"
    assert main(["reward", "score", str(results["plain"]), "--data", str(setup["ood"]), "--out", str(scores)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 8 and 0.0 <= report["accuracy"] <= 1.0
    assert len(scores.read_text().splitlines()) == 8
    # a run that is not a reward model (the fixture's base run; no dependence on other tests' output)
    assert main(["reward", "score", str(setup["root"] / "base"), "--data", str(setup["ood"])]) == 1
    assert "not a reward-model run" in capsys.readouterr().err


def test_resume_continues_from_the_checkpoint(setup):
    out = setup["root"] / "resumed"
    common = ["--quiet", "align.precompute_reference=true", "train.ckpt_every=2", "align.diagnostics_every=0"]
    assert main(["align", str(setup["cfg"]), "--out", str(out), *common, "train.steps=2"]) == 0
    assert main(["align", "--resume", str(out), "train.steps=3", "--quiet"]) == 0
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_example_configs_load():
    root = Path(__file__).resolve().parents[2] / "examples" / "preference_study"
    assert load_config(root / "align.yaml").align.loss == "dpo"
    cfg = load_config(root / "reward.yaml")
    assert cfg.reward.ood_file and cfg.align.train_file
