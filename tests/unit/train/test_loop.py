"""Equivalence classes of the training loop (docs/design.md, principle 7)."""

import json
import os
from pathlib import Path

import pytest
import torch

from lmlab.models.decoder import Decoder
from lmlab.objectives.lm import causal_lm_loss
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.loop import Trainer
from lmlab.train.metrics import read_metrics

from helpers import tiny_config

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "tiny_losses.json"


class FixedBatches:
    """A fixed stream of rows with ragged label masks (so token normalisation matters)."""

    def __init__(self, n_rows=8, seq=12, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n_rows, seq), generator=g)
        self.y = torch.randint(0, vocab, (n_rows, seq), generator=g)
        for i in range(n_rows):  # row i keeps only its first 2 + i targets
            self.y[i, 2 + i :] = -100
        self.pos = 0

    def next_batch(self, b):
        rows = slice(self.pos, self.pos + b)
        self.pos += b
        return {"input_ids": self.x[rows], "labels": self.y[rows]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def loss_fn(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def grads_of_first_step(tmp_path, micro, accum):
    cfg = tiny_config(
        "model.vocab_size=64", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", "optim.grad_clip=0"
    )
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    trainer = Trainer(cfg, tmp_path, model, FixedBatches(), loss_fn, device=torch.device("cpu"))
    captured = {}
    original = trainer.optimizer.step

    def capture(*a, **k):
        captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        return original(*a, **k)

    trainer.optimizer.step = capture
    metrics = trainer.train_step()
    return captured, metrics["loss"]


def test_grad_accumulation_matches_one_batch(tmp_path):
    one, loss_one = grads_of_first_step(tmp_path / "a", micro=8, accum=1)
    for micro, accum in ((4, 2), (2, 4), (1, 8)):
        many, loss_many = grads_of_first_step(tmp_path / f"b{accum}", micro=micro, accum=accum)
        assert loss_many == pytest.approx(loss_one, abs=1e-6)
        for name, g in one.items():
            torch.testing.assert_close(many[name], g, atol=1e-6, rtol=0, msg=name)


def test_mean_of_means_would_differ(tmp_path):
    """Guard: the ragged masks make per-micro-batch averaging visibly wrong, so the test above has teeth."""
    b = FixedBatches()
    torch.manual_seed(0)
    model = Decoder(tiny_config("model.vocab_size=64").model)
    with torch.no_grad():
        halves = [loss_fn(model, b.next_batch(4)) for _ in range(2)]
    mean_of_means = sum(float(h.loss_sum / h.count) for h in halves) / 2
    token_mean = sum(float(h.loss_sum) for h in halves) / sum(int(h.count) for h in halves)
    assert abs(mean_of_means - token_mean) > 1e-3


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_resume_is_bitwise_identical(tmp_path, monkeypatch):
    overrides = ("train.steps=8", "train.ckpt_every=4", "train.eval_every=4")
    full = tmp_path / "full"
    run_pretraining(tiny_config(*overrides), full, quiet=True)

    crashed = tmp_path / "crashed"
    real_step = Trainer.train_step

    def crash_at_6(self, *args, **kwargs):
        if self.step == 6:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(tiny_config(*overrides), crashed, quiet=True)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert max(train_losses(crashed)) == 6  # steps 5, 6 were logged after the step-4 checkpoint
    run_pretraining(tiny_config(*overrides), crashed, resume=True, quiet=True)

    a, b = train_losses(full), train_losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}  # bitwise
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((crashed / "summary.json").read_text())
    assert sa["final_val_loss"] == sb["final_val_loss"]


def test_new_run_refuses_existing_checkpoints(tmp_path):
    from lmlab.errors import UserError

    run_pretraining(tiny_config("train.steps=3"), tmp_path / "r", quiet=True)
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_pretraining(tiny_config("train.steps=3"), tmp_path / "r", quiet=True)


def test_run_directory_is_self_describing(tmp_path):
    run = tmp_path / "r"
    summary = run_pretraining(tiny_config(), run, quiet=True)
    for name in (
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "summary.json",
        "env.json",
        "loss.png",
        "samples.txt",
    ):
        assert (run / name).is_file(), name
    assert summary["status"] == "finished" and summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["flops"] > 6 * summary["non_embedding_params"] * summary["tokens"]


def test_golden_losses(tmp_path):
    """First 20 losses of a fixed tiny config. Regenerate with LMLAB_UPDATE_GOLDEN=1 and say why in the commit."""
    cfg = tiny_config("train.steps=20", "train.eval_every=20", "train.ckpt_every=20")
    run_pretraining(cfg, tmp_path / "g", quiet=True)
    losses = [train_losses(tmp_path / "g")[s] for s in range(1, 21)]
    if os.environ.get("LMLAB_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "tests/helpers.py tiny_config + steps=20", "losses": losses}, indent=1))
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(expected, abs=1e-5)
