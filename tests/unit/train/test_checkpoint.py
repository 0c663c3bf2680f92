import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.models.decoder import Decoder
from lmlab.train import checkpoint as ck

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Decoder(cfg)


def test_save_load_round_trip_and_keep_last(tmp_path):
    m = make_model(0)
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, m, model_cfg=CFG, train_state={"step": step}, keep_last=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_0000002", "step_0000003"]
    m2 = make_model(1)
    ck.load_weights(ck.latest_checkpoint(tmp_path), m2, CFG)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert ck.load_train_state(ck.latest_checkpoint(tmp_path))["step"] == 3


def test_tied_weights_stored_once(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, make_model(), model_cfg=CFG)
    meta = json.loads((path / ck.META_FILE).read_text())
    assert "lm_head.weight" not in meta["shapes"] and "tok_embeddings.weight" in meta["shapes"]


def test_corrupted_checkpoint_detected_and_previous_intact(tmp_path):
    m = make_model()
    ck.save_checkpoint(tmp_path, 1, m, model_cfg=CFG, train_state={"step": 1})
    latest = ck.save_checkpoint(tmp_path, 2, m, model_cfg=CFG, train_state={"step": 2})
    data = bytearray((latest / ck.MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (latest / ck.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        ck.load_weights(latest, make_model(), CFG)
    ck.load_weights(ck.list_checkpoints(tmp_path)[0], make_model(), CFG)  # earlier one still loads


def test_foreign_checkpoint_detected(tmp_path):
    ck.save_checkpoint(tmp_path, 1, make_model(), model_cfg=CFG)
    other = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        ck.load_weights(ck.latest_checkpoint(tmp_path), Decoder(other), other)


def test_missing_run_dir_and_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.resolve_checkpoint(tmp_path)


def test_train_state_is_loaded_without_unpickling_code(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, make_model(), model_cfg=CFG, train_state={"step": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path / ck.STATE_FILE)
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.load_train_state(path)


WRITER = r"""
import sys, torch
from lmlab.config import ModelConfig
from lmlab.models.decoder import Decoder
from lmlab.train.checkpoint import save_checkpoint
cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=16)
model = Decoder(cfg)
opt_state = {"big": torch.randn(2_000_000)}
step = 1
print("ready", flush=True)
while True:
    save_checkpoint(sys.argv[1], step, model, model_cfg=cfg, train_state=opt_state, keep_last=2)
    step += 1
"""


@pytest.mark.parametrize("delay", [0.3, 0.9])
def test_sigkill_during_checkpoint_write_leaves_previous_loadable(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not ck.list_checkpoints(tmp_path) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = ck.list_checkpoints(tmp_path)
    assert ckpts, "no checkpoint completed before the kill"
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=16)
    ck.load_weights(ckpts[-1], Decoder(cfg), cfg)  # verifies checksums too
    assert ck.load_train_state(ckpts[-1])["big"].shape == (2_000_000,)
