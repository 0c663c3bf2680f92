"""Small builders shared by tests."""

from __future__ import annotations

import csv

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


def model_cfg(base=None, **settings):
    """A ``ModelConfig`` from keyword settings on top of ``base``; component settings may be given flat
    (``qk_norm=True``, ``attn_bias=True``, ``ffn_hidden=100``, ``ffn_multiple_of=16``), as YAML may."""
    from lmlab.config import ModelConfig, from_dict, to_dict

    data = to_dict(base) if base is not None else {}
    settings = ModelConfig.upgrade(settings)
    for section in ("attention", "ffn"):
        if section in settings:
            data[section] = {**data.get(section, {}), **settings.pop(section)}
    data.update(settings)
    return from_dict(ModelConfig, data)


def train_records(run_dir) -> dict[int, dict]:
    """The train records of a run's metrics.jsonl, by step."""
    from lmlab.train.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "train"}


def crash_and_resume(cfg: RunConfig, run_dir, crash_at: int, monkeypatch) -> None:
    """Pretrain ``cfg`` into ``run_dir``, crash before step ``crash_at``, then resume it to the end."""
    import pytest

    from lmlab.recipes.pretrain import run_pretraining
    from lmlab.train.loop import Trainer

    real_step = Trainer.train_step

    def crashing(self, *args, **kwargs):
        if self.step == crash_at:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(cfg, run_dir, quiet=True)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run_pretraining(cfg, run_dir, resume=True, quiet=True)


def write_pairs_and_chat(root, n: int = 24):
    """``root/pairs.jsonl``: ``n`` preference pairs of the preference world; ``root/chat.jsonl``: their prompts
    with the chosen answers as completions (SFT records). Returns both paths."""
    import json

    from lmlab.data.synthetic.preference_world import PreferenceWorld

    pairs = PreferenceWorld().write_pairs(root / "pairs.jsonl", 0, n, "train")
    chat = root / "chat.jsonl"
    with open(chat, "w") as f:
        for line in pairs.read_text().splitlines():
            pair = json.loads(line)
            f.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"]}) + "\n")
    return pairs, chat


def write_csv(path, rows):
    """``rows`` (dicts with the same keys) as a CSV file at ``path``; returns the path."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
