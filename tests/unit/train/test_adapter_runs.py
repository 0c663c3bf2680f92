"""Adapter runs in every recipe (issue 13 item 4): LoRA / DoRA trained on the frozen weights of ``init_from``.

What must hold: checkpoints hold only the adapters (and a reward head) with optimizer state for those alone; the
base is untouched and read from its own run on every load, refused when it changed; an interrupted run resumes
to the same weights; generation and evaluation see the adapters merged; a DPO run's reference is the policy with
its adapters off (no second model is loaded), so its first-step reference log-probs equal the policy's.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.lora import LoRALinear
from lmlab.recipes.align import AlignRecipe
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.recipes.reward import RewardRecipe
from lmlab.recipes.sft import SFTRecipe
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.engine import execute
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrained import load_run_model

from helpers import tiny_config, write_pairs_and_chat

LORA = ["adapter.kind=lora", "adapter.rank=4", "adapter.alpha=8", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    grow = ["train.steps=20", "optim.lr=3e-3", "model.max_seq_len=96"]
    execute(PretrainRecipe(), tiny_config(*grow), root / "base", quiet=True)
    write_pairs_and_chat(root, 24)
    return root


def child(root, recipe: str, *extra: str, parent: str = "base"):
    common = [f"init_from={root / parent}", "train.steps=4", "train.log_every=1", "train.eval_every=100",
              "schedule.warmup_steps=0", "model.max_seq_len=96", "train.ckpt_every=2", "train.keep_last=5"]  # fmt: skip
    pairs = [f"align.train_file={root / 'pairs.jsonl'}", "align.max_len=64", "align.max_prompt_len=32"]
    by_recipe = {
        "pretrain": [],
        "sft": [f"sft.train_file={root / 'chat.jsonl'}"],
        "align": [*pairs, "align.diagnostics_every=0"],
        "reward": [*pairs],
    }
    return tiny_config(*common, *by_recipe[recipe], *LORA, *extra)


RECIPES = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "align": AlignRecipe, "reward": RewardRecipe}


def base_weights(root):
    return load_file(str(ckpt_io.latest_checkpoint(root / "base") / ckpt_io.MODEL_FILE))


@pytest.mark.parametrize("recipe", ["pretrain", "sft", "align", "reward"])
def test_checkpoints_hold_only_the_adapters(world, recipe):
    run = world / f"{recipe}-lora"
    summary = execute(RECIPES[recipe](), child(world, recipe), run, quiet=True)
    assert summary["status"] == "finished"
    ckpt = ckpt_io.latest_checkpoint(run)
    weights = load_file(str(ckpt / ckpt_io.MODEL_FILE))
    extra = {"head.weight"} if recipe == "reward" else set()
    assert weights and all(".lora_" in k for k in set(weights) - extra) and extra <= set(weights)
    n_layers = 2 * 7  # tiny_config: 2 blocks, the 7 default target projections each
    assert len([k for k in weights if ".lora_" in k]) == 2 * n_layers
    # Adam keeps two moments for each trained tensor and nothing for the frozen base
    state = ckpt_io.load_train_state(ckpt)["optimizer"]["state"]
    assert len(state) == len(weights)
    assert sum(v.numel() for v in weights.values()) == summary["trainable_params"]
    meta = ckpt_io.read_meta(ckpt)
    assert meta["adapter_base"]["run"] == str((world / "base").resolve())
    # the base is untouched, and the merged model differs from it
    merged = load_run_model(run).model
    base = load_run_model(world / "base").model
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    if recipe != "reward":
        ids = torch.randint(0, base.cfg.vocab_size, (1, 12))
        assert not torch.allclose(merged(ids), base(ids))
    assert all(torch.equal(v, base_weights(world)[k]) for k, v in base.state_dict().items() if k in base_weights(world))


def test_resume_continues_to_the_same_weights(world):
    """Continuing from the step-2 checkpoint (base re-read, adapters and their optimizer state restored)
    reaches the uninterrupted run's step-4 adapters."""
    import shutil

    whole = world / "sft-whole"
    execute(SFTRecipe(), child(world, "sft"), whole, quiet=True)
    cut = world / "sft-cut"
    shutil.copytree(whole, cut)
    execute(SFTRecipe(), child(world, "sft"), cut, resume=cut / "checkpoints" / "step_0000002", quiet=True)
    a = load_file(str(ckpt_io.latest_checkpoint(whole) / ckpt_io.MODEL_FILE))
    b = load_file(str(ckpt_io.latest_checkpoint(cut) / ckpt_io.MODEL_FILE))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_adapter_run_as_init_from_stacks(world):
    """An SFT adapter run as the base of an align adapter run: the parent is loaded merged."""
    sft = world / "stack-sft"
    execute(SFTRecipe(), child(world, "sft"), sft, quiet=True)
    run = world / "stack-align"
    execute(AlignRecipe(), child(world, "align", parent="stack-sft"), run, quiet=True)
    parent = load_run_model(sft).model
    first = next(r for r in read_metrics(run) if r["kind"] == "train" and r["step"] == 1)
    assert first["logps/chosen"] == pytest.approx(first["ref_logps/chosen"], abs=1e-4)
    assert load_run_model(run).model is not parent  # loads through two levels of adapters


def test_dpo_reference_is_the_base_without_a_second_model(world, monkeypatch):
    import lmlab.recipes.align as align

    def no_second_model(*args, **kwargs):
        raise AssertionError("an adapter DPO run must not load a reference model")

    monkeypatch.setattr(align, "load_reference_model", no_second_model)
    run = world / "dpo-implicit"
    summary = execute(AlignRecipe(), child(world, "align", "train.steps=3"), run, quiet=True)
    assert summary["reference_is_base_without_adapters"] is True
    train = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    # step 1: LoRA's B starts at zero, so the policy is its base and DPO's loss is log 2
    assert train[1]["logps/chosen"] == pytest.approx(train[1]["ref_logps/chosen"], abs=1e-4)
    assert train[1]["loss"] == pytest.approx(0.6931, abs=1e-3)
    # later steps: the reference log-probs are still the base's, the policy's moved
    assert train[3]["logps/chosen"] != pytest.approx(train[3]["ref_logps/chosen"], abs=1e-4)
    assert "kl_to_reference" in summary


def test_base_changed_is_refused(world, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(world / "base", base)
    run = tmp_path / "lora"
    execute(SFTRecipe(), child(tmp_path, "sft", f"sft.train_file={world / 'chat.jsonl'}"), run, quiet=True)
    execute(PretrainRecipe(), tiny_config("train.steps=2", "model.max_seq_len=96"), base, overwrite=True, quiet=True)
    with pytest.raises(CheckpointError, match="weights have changed"):
        load_run_model(run)


def test_adapters_need_a_base():
    with pytest.raises(ConfigError, match="init_from"):
        tiny_config("adapter.kind=lora")


def test_dora_run_trains_magnitudes(world):
    run = world / "sft-dora"
    execute(SFTRecipe(), child(world, "sft", "adapter.kind=dora", "train.steps=2"), run, quiet=True)
    weights = load_file(str(ckpt_io.latest_checkpoint(run) / ckpt_io.MODEL_FILE))
    assert any(k.endswith("lora_magnitude_vector") for k in weights)
