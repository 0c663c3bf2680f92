"""``init_from`` in every recipe (issue 9 item 4): the first step of a run started from a parent is computed
with the parent's weights — its logged loss (or, where the loss cannot tell, the logged metric that can) equals
the parent model's on the same batch, and differs from a fresh start's. Parents: a plain run and a sharded
(FSDP) run. What was loaded is recorded in ``summary.json``."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import load_config
from lmlab.models.reward_head import RewardModel
from lmlab.recipes.align import AlignRecipe
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.recipes.reward import RewardRecipe
from lmlab.recipes.sft import SFTRecipe
from lmlab.train.distributed import DistContext
from lmlab.train.engine import Job, execute
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrained import load_model
from lmlab.train.run import Run

from helpers import tiny_config, write_pairs_and_chat

TOL = 1e-6


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    grow = ["train.steps=30", "optim.lr=3e-3", "model.max_seq_len=96"]  # trained enough to differ from a fresh init
    execute(PretrainRecipe(), tiny_config(*grow), root / "plain", quiet=True)
    execute(PretrainRecipe(), tiny_config(*grow, "distributed.strategy=fsdp"), root / "sharded", quiet=True)
    write_pairs_and_chat(root, 24)
    return root


def child_config(root, recipe: str, parent: str, *extra: str):
    common = [f"init_from={root / parent}", "train.steps=1", "train.log_every=1", "train.eval_every=100",
              "schedule.warmup_steps=0"]  # fmt: skip
    pairs = [f"align.train_file={root / 'pairs.jsonl'}", "align.max_len=64", "align.max_prompt_len=32"]
    by_recipe = {
        "pretrain": [],
        "sft": [f"sft.train_file={root / 'chat.jsonl'}"],
        "align": [*pairs, "align.diagnostics_every=0"],
        "reward": [*pairs, "reward.lm_weight=1.0"],
    }
    return tiny_config("model.max_seq_len=96", *common, *by_recipe[recipe], *extra)


RECIPES = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "align": AlignRecipe, "reward": RewardRecipe}
# The metric that shows which weights computed step 1: DPO's loss is log 2 for any policy equal to its
# reference, so its policy log-probs; a reward model's head is new, so its LM regulariser on the chosen answer.
METRIC = {"pretrain": "loss", "sft": "loss", "align": "logps/chosen", "reward": "lm_nll"}


def parent_value(recipe: str, cfg, root, parent: str) -> float:
    """The step-1 metric computed with the parent's own model on the child's first batch."""
    probe = Run(root / f"probe-{recipe}-{parent}", recipe, DistContext(), quiet=True)
    probe.path.mkdir(exist_ok=True)
    plan = RECIPES[recipe]().setup(Job(cfg, probe, DistContext(), quiet=True))
    batch = plan.batches.next_batch(cfg.train.micro_batch_size)
    model, _, _ = load_model(root / parent)
    if recipe == "reward":
        model = RewardModel(plan.cfg.model, model)
    with torch.no_grad():
        out = plan.loss_fn(model.train(), batch)
    value = out.loss_sum if METRIC[recipe] == "loss" else out.metrics[METRIC[recipe]]
    return float(value / out.count)


def step_one(run) -> float:
    return next(r for r in read_metrics(run) if r["kind"] == "train" and r["step"] == 1)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("parent", ["plain", "sharded"])
def test_first_step_uses_the_parent_weights(parents, tmp_path, recipe, parent):
    cfg = child_config(parents, recipe, parent)
    summary = execute(RECIPES[recipe](), cfg, tmp_path / "child", quiet=True)
    got = step_one(tmp_path / "child")[METRIC[recipe]]
    want = parent_value(recipe, cfg, parents, parent)
    assert got == pytest.approx(want, abs=TOL)
    loaded = summary["init_from"]
    assert loaded["path"] == str(parents / parent) and loaded["step"] == 30
    assert loaded["checkpoint"].endswith("step_0000030")


def test_pretrain_init_from_differs_from_a_fresh_start(parents, tmp_path):
    """Continued pretraining loads something (it silently loaded nothing before): step 1 differs from a fresh
    model's with the same architecture, tokenizer and data."""
    continued = execute(PretrainRecipe(), child_config(parents, "pretrain", "plain"), tmp_path / "c", quiet=True)
    parent_cfg = load_config(parents / "plain" / "config.yaml")
    fresh_cfg = tiny_config("model.max_seq_len=96", "train.steps=1", "train.log_every=1", "train.eval_every=100",
                            "schedule.warmup_steps=0",
                            f"tokenizer.path={parents / 'plain' / 'tokenizer.json'}")  # fmt: skip
    assert fresh_cfg.model.d_model == parent_cfg.model.d_model
    execute(PretrainRecipe(), fresh_cfg, tmp_path / "f", quiet=True)
    assert continued["init_from"] is not None
    assert step_one(tmp_path / "c")["loss"] < step_one(tmp_path / "f")["loss"] - 0.1


def test_resumed_child_does_not_reload_init_from(parents, tmp_path):
    cfg = child_config(parents, "sft", "plain", "train.steps=2", "train.ckpt_every=1", "schedule.warmup_steps=0")
    execute(SFTRecipe(), cfg, tmp_path / "full", quiet=True)
    run = tmp_path / "run"
    execute(SFTRecipe(), child_config(parents, "sft", "plain", "train.ckpt_every=1"), run, quiet=True)
    summary = execute(SFTRecipe(), cfg, run, resume=True, quiet=True)
    assert summary["init_from"]["step"] == 30  # recorded from the first start
    assert step_one(run)["loss"] == step_one(tmp_path / "full")["loss"]
