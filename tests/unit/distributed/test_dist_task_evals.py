"""Downstream tasks during training on several ranks (issue 10 item 2): under FSDP2 each of 2 gloo ranks scores a
shard of the documents and rank 0 logs the gathered metrics, equal to one process's; generation (lm-eval pads the
ranks' request counts, and no rank stops early) does not hang."""

from __future__ import annotations

import json

import pytest
import torch
from unit.distributed.dist_harness import spawn
from unit.distributed.recipe_harness import recipe_worker

from lmlab.config import load_config, save_config
from lmlab.data.synthetic.preference_world import PreferenceWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.models.decoder import Decoder
from lmlab.recipes.sft import SFTRecipe
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.engine import execute
from lmlab.train.metrics import read_metrics

pytest.importorskip("lm_eval")

STEPS = 4
# 13 and 3 documents: neither splits evenly over 2 ranks, so lm-eval pads one rank's requests
EVALS = (
    "train.evals=[{task: lmlab_preferences_judge, limit: 13, every: 2}, {task: lmlab_stories_ppl, limit: 5},"
    " {task: lmlab_facts_qa, limit: 3, metadata: {n_people: 60}}]"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_task_evals")
    world = PreferenceWorld()
    tok = TextTokenizer.train_bpe(list(world.documents(0, 300)), vocab_size=320)
    base_cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=96", "train.seq_len=64",
                                  f"model.vocab_size={tok.vocab_size}"])  # fmt: skip
    base = root / "base"
    base.mkdir()
    torch.manual_seed(0)
    save_config(base_cfg, base / "config.yaml")
    tok.save(base / "tokenizer.json")
    save_checkpoint(base, 0, Decoder(base_cfg.model), model_cfg=base_cfg.model)
    with open(root / "chat.jsonl", "w") as f:
        for pair in world.pairs(0, 32):
            f.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"]}) + "\n")
    config = {
        "init_from": str(base),
        "sft": {"train_file": str(root / "chat.jsonl")},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"steps": STEPS, "eval_every": STEPS, "log_every": 1, "ckpt_every": STEPS, "device": "cpu",
                  "progress": False, "seq_len": 64},
        "sample": {"max_new_tokens": 4},
    }  # fmt: skip
    (root / "sft.yaml").write_text(json.dumps(config))
    execute(SFTRecipe(), load_config(root / "sft.yaml", ["train.micro_batch_size=4", EVALS]), root / "one", quiet=True)
    two = [{"name": "two", "recipe": "sft", "config": str(root / "sft.yaml"),
            "overrides": ["train.micro_batch_size=2", "distributed.strategy=fsdp", EVALS]}]  # fmt: skip
    spawn(recipe_worker, 2, str(root), json.dumps(two), timeout_s=420)
    return root


def _task_evals(run):
    return {r["step"]: r for r in read_metrics(run) if r["kind"] == "task_eval"}


@pytest.mark.slow
def test_two_ranks_log_one_processes_task_metrics(runs):
    one, two = _task_evals(runs / "one"), _task_evals(runs / "two")
    assert sorted(one) == sorted(two) == [2, 4]  # every 2 steps and at the last
    assert "lmlab_stories_ppl/word_perplexity" not in one[2]  # its cadence is train.eval_every (4)
    for step in (2, 4):
        for key, value in one[step].items():
            if "/" in key:
                assert two[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{key} at step {step}"
    assert {"lmlab_preferences_judge/acc", "lmlab_facts_qa/exact_answer", "lmlab_stories_ppl/bits_per_byte"} <= set(
        two[4]
    )
    assert two[4]["eval_seconds"] > 0 and two[4]["eval_cost_pct"] > 0
