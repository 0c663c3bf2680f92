"""Continual pre-training with replay (``data.replay_fraction``): rows from the parent's data, and the parent's
validation loss logged at every evaluation; bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.checkpoint import latest_checkpoint, load_train_state

from helpers import tiny_config


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    run = tmp_path_factory.mktemp("parent") / "run"
    run_pretraining(tiny_config(), run, quiet=True)  # stories
    return run


def evals(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def child(parent, *extra):
    return tiny_config(f"init_from={parent}", "data.synthetic.world=facts", "schedule.warmup_steps=2", *extra)


def test_replay_mixes_the_parents_rows_and_tracks_its_loss(parent, tmp_path):
    run_pretraining(child(parent, "data.replay_fraction=0.25"), tmp_path / "cpt", quiet=True)
    records = evals(tmp_path / "cpt")
    assert all("val_loss/parent" in r and r["val_loss/parent"] > 0 for r in records)
    state = load_train_state(latest_checkpoint(tmp_path / "cpt"))
    counts = dict(zip(state["batches"]["names"], state["batches"]["counts"]))
    assert counts["parent"] / sum(counts.values()) == pytest.approx(0.25, abs=1 / sum(counts.values()))
    # the parent's own final validation loss is where the child starts on that data
    first_parent = json.loads((parent / "summary.json").read_text())["final_val_loss"]
    assert records[0]["val_loss/parent"] != first_parent  # measured after training on new data


def test_fraction_zero_only_tracks_the_parents_loss(parent, tmp_path):
    run_pretraining(child(parent, "data.replay_fraction=0"), tmp_path / "cpt0", quiet=True)
    assert all("val_loss/parent" in r for r in evals(tmp_path / "cpt0"))
    state = load_train_state(latest_checkpoint(tmp_path / "cpt0"))
    assert "names" not in state["batches"]  # a plain window sampler: no replayed rows


def test_bad_replay_inputs(parent, tmp_path):
    with pytest.raises(ConfigError, match="set init_from"):
        tiny_config("data.replay_fraction=0.1")
    with pytest.raises(ConfigError, match=r"replay_fraction=1.0 must be in \[0, 1\)"):
        child(parent, "data.replay_fraction=1")
    with pytest.raises(ConfigError, match="data.replay_fraction is not"):
        child(parent, f"data.replay_dir={tmp_path}")
    # a replay directory tokenized with another tokenizer
    other = tmp_path / "other"
    run_pretraining(tiny_config("tokenizer.vocab_size=300"), other, quiet=True)
    other_data = json.loads((other / "summary.json").read_text())["data_dir"]
    with pytest.raises(DataError, match="replayed data must use this run's tokenizer"):
        run_pretraining(
            child(parent, "data.replay_fraction=0.1", f"data.replay_dir={other_data}"), tmp_path / "x", quiet=True
        )
    # a parent that records no data (an imported model): one message naming the way out
    summary = json.loads((parent / "summary.json").read_text())
    imported = tmp_path / "imported"
    imported.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (imported / name).write_bytes((parent / name).read_bytes())
    shutil.copytree(parent / "checkpoints", imported / "checkpoints")
    (imported / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "data_dir"}))
    with pytest.raises(DataError, match="name a prepared data directory with data.replay_dir"):
        run_pretraining(tiny_config(f"init_from={imported}", "data.replay_fraction=0.1"), tmp_path / "y", quiet=True)
