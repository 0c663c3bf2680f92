"""Bad distributed input stops with one clear message (issue 6 item 8): NCCL without GPUs, a world
size that does not divide the global batch, a checkpoint from another model or a corrupted shard."""

from __future__ import annotations

import pytest
import torch
from unit.distributed.dist_harness import RankBatches, config, loss_fn, train

from lmlab.cli import main as cli_main
from lmlab.config import save_config
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.decoder import Decoder
from lmlab.train import checkpoint as ck
from lmlab.train.distributed import check_world, setup_distributed
from lmlab.train.engine import keep_global_batch
from lmlab.train.loop import Trainer

from helpers import tiny_config

TWO_RANKS = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def test_nccl_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for env in (TWO_RANKS, {}):
        cfg = tiny_config("distributed.backend=nccl", "distributed.strategy=ddp", "train.device=auto")
        with pytest.raises(ConfigError, match="distributed.backend=nccl needs CUDA GPUs.*CUDA is not available"):
            setup_distributed(cfg, env=env)


def test_nccl_without_gpus_stops_before_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_config(tiny_config(), tmp_path / "c.yaml")
    args = ["train", str(tmp_path / "c.yaml"), "--nproc", "2", "distributed.strategy=ddp", "distributed.backend=nccl"]
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab train: error: distributed.backend=nccl needs CUDA GPUs") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_world_size_must_divide_global_batch():
    cfg = tiny_config("train.micro_batch_size=4", "distributed.strategy=ddp")
    cfg.train.global_batch_size = 12  # rows per optimizer step
    with pytest.raises(ConfigError, match=r"train.global_batch_size=12 is not divisible by .*micro_batch_size=4 .* 8"):
        check_world(cfg, 2)
    assert check_world(cfg, 3).train.grad_accum == 1
    cfg.train.global_batch_size = 24
    assert check_world(cfg, 2).train.grad_accum == 3  # global = micro × accum × world
    assert check_world(cfg, 1).train.grad_accum == 6


def test_resume_on_a_world_size_that_does_not_divide_the_saved_batch():
    cfg = tiny_config("train.micro_batch_size=4", "distributed.strategy=ddp")
    assert keep_global_batch(cfg, 16, 2).train.grad_accum == 2  # same global batch, new world size
    with pytest.raises(ConfigError, match="global batch of 12 rows.*world size 2 = 8 does not divide"):
        keep_global_batch(cfg, 12, 2)


def test_several_processes_need_a_strategy():
    with pytest.raises(ConfigError, match="2 processes were started but distributed.strategy=none"):
        setup_distributed(tiny_config(), env=TWO_RANKS)


def test_bf16_parameters_need_fsdp():
    with pytest.raises(ConfigError, match="mixed_precision_param=bf16 needs distributed.strategy=fsdp"):
        setup_distributed(tiny_config("distributed.mixed_precision_param=bf16", "distributed.strategy=ddp"), env={})


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A run whose checkpoints are sharded (FSDP2 on a one-member group)."""
    run = tmp_path_factory.mktemp("sharded")
    cfg = config(1, "distributed.strategy=fsdp", "train.steps=5")
    ctx = setup_distributed(cfg)
    try:
        train(cfg, run, ctx)
    finally:
        ctx.close()
    return run


def test_sharded_checkpoint_from_another_model(sharded_run, tmp_path):
    other = config(1, "model.d_model=16").model
    ckpt = ck.latest_checkpoint(sharded_run)
    with pytest.raises(CheckpointError, match="checkpoint from another model .*d_model: checkpoint 32 vs run 16"):
        ck.load_weights(ckpt, Decoder(other), other)
    cfg = config(1, "model.d_model=16")
    trainer = Trainer(cfg, tmp_path, Decoder(cfg.model), RankBatches(), loss_fn, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match="checkpoint from another model"):
        trainer.resume(ckpt)


def test_corrupted_shard_detected(sharded_run, tmp_path):
    import shutil

    ckpt = tmp_path / "checkpoints" / "step_0000005"
    shutil.copytree(ck.latest_checkpoint(sharded_run), ckpt)
    shard = ckpt / ck.DCP_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = config(1)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: corrupted \(checksum mismatch\)"):
        ck.load_weights(ckpt, Decoder(cfg.model), cfg.model)


def test_unfinished_sharded_save_is_invisible(sharded_run, tmp_path):
    """A job killed while saving leaves a temporary directory that is never taken for a checkpoint."""
    import shutil

    shutil.copytree(sharded_run / "checkpoints", tmp_path / "checkpoints")
    partial = tmp_path / "checkpoints" / ".tmp_step_0000010_sharded"
    shutil.copytree(ck.latest_checkpoint(tmp_path), partial)
    (partial / ck.META_FILE).unlink()
    assert ck.latest_checkpoint(tmp_path).name == "step_0000005"
