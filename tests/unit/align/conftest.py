"""Fixtures for the alignment tests: tiny lmlab run directories built in memory (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.config import load_config, save_config
from lmlab.data.synthetic.preference_world import PreferenceWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.models.decoder import Decoder
from lmlab.train.checkpoint import save_checkpoint

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_seq_len=96",
    "train.seq_len=64",
    "train.device=cpu",
    "train.progress=false",
]


def make_run(run_dir: Path, tokenizer: TextTokenizer, seed: int = 0) -> Path:
    """A run directory holding a randomly initialised tiny decoder (step 0) and ``tokenizer``."""
    cfg = load_config(None, [*TINY_MODEL, f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(seed)
    model = Decoder(cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 0, model, model_cfg=cfg.model)
    return run_dir


@pytest.fixture(scope="session")
def world() -> PreferenceWorld:
    return PreferenceWorld()


@pytest.fixture(scope="session")
def tokenizer(world) -> TextTokenizer:
    return TextTokenizer.train_bpe(list(world.documents(0, 300)), vocab_size=320)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer) -> Path:
    return make_run(tmp_path_factory.mktemp("align_base") / "base", tokenizer)


@pytest.fixture(scope="session")
def foreign_run(tmp_path_factory) -> Path:
    """A run whose tokenizer differs from ``tokenizer`` (trained on other text)."""
    tok = TextTokenizer.train_bpe(["zebra quokka " * 20, "lorem ipsum dolor sit amet " * 20], vocab_size=300)
    return make_run(tmp_path_factory.mktemp("align_foreign") / "foreign", tok)


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory, world) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align_pairs")
    return {
        "train": world.write_pairs(root / "train.jsonl", 0, 48, "train"),
        "val": world.write_pairs(root / "val.jsonl", 1, 12, "test"),
        "ood": world.write_pairs(root / "ood.jsonl", 2, 12, "ood"),
    }
