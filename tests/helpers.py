"""Small builders shared by tests."""

from __future__ import annotations

from lmlab.config import RunConfig, load_config

TINY_OVERRIDES = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=64",
    "tokenizer.vocab_size=320",
    "tokenizer.train_docs=200",
    "data.synthetic.n_docs=300",
    "data.val_fraction=0.1",
    "data.num_workers=1",
    "train.steps=6",
    "train.micro_batch_size=4",
    "train.seq_len=32",
    "train.eval_every=3",
    "train.eval_tokens=256",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.progress=false",
    "train.device=cpu",
    "schedule.warmup_steps=2",
    "sample.max_new_tokens=8",
]


def tiny_config(*overrides: str) -> RunConfig:
    """A ~50k-parameter run on 300 synthetic stories: trains in a second on one core."""
    return load_config(None, [*TINY_OVERRIDES, *overrides])
