"""Mixture of experts under data parallelism (issue 14 item 1): 2 gloo ranks × B/2 give the losses and gradient
norms of 1 process × B within 1e-5 for 10 steps under DDP, FSDP2 and FSDP2 with activation checkpointing, with
DeepSeek-V3's selection bias moving (its expert loads are all-reduced, so every rank routes alike); a sharded
two-rank MoE checkpoint (bias included) resumes in one process on the same trajectory."""

from __future__ import annotations

import json

import pytest
from unit.distributed.dist_harness import MOE, MOE_RUNS, STEPS, assert_same, config, moe_worker, spawn, train

from lmlab.train import checkpoint as ck


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_moe")
    reference = train(config(1, *MOE), root / "ref")
    spawn(moe_worker, 2, str(root))
    return root, reference, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("name", list(MOE_RUNS))
def test_two_ranks_match_one_process(runs, name):
    _, reference, results = runs
    losses = [loss for _, loss, _ in reference]
    assert losses[-1] < losses[0] - 0.1
    assert_same(results[name], reference, range(1, STEPS + 1))


def test_the_selection_bias_is_in_play(runs, tmp_path):
    _, reference, _ = runs
    without = train(config(1, *MOE, "model.ffn.bias_update_rate=0"), tmp_path / "no_bias")
    assert max(abs(a[1] - b[1]) for a, b in zip(reference, without)) > 1e-4  # the bias changes the routing


def test_sharded_moe_checkpoint_resumes_in_one_process(runs, tmp_path):
    root, reference, _ = runs
    ckpt = root / "moe_fsdp" / "checkpoints" / "step_0000005"
    assert ck.is_sharded(ckpt)
    assert_same(train(config(1, *MOE), tmp_path / "r", resume_from=ckpt), reference, range(6, STEPS + 1))
