"""Models that come from run directories: the starting point of a run (``init_from``) and frozen models
(a preference reference, a distillation teacher, a base to compare with).

A run directory is anything lmlab wrote or imported (``lmlab import-hf``): ``config.yaml``,
``tokenizer.json`` and checkpoints, single-file or sharded. Every load verifies the checkpoint
(checksums, no unlisted files, the model config) before reading weights; frozen models must share the
tokenizer of the run that uses them, because log-prob ratios and distillation compare token by token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.config import RunConfig, load_config, model_config_diff
from lmlab.data.tokenizer import TextTokenizer, digit_token_ids
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.models.build import Head, build_model
from lmlab.models.lora import merge_adapters
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.adapters import attach_adapters, check_base

RUN_FILE = "run.json"


class ModelMismatchError(DataError):
    """A frozen or starting model that cannot be used with this run (tokenizer or vocabulary differs)."""


@dataclass
class RunModel:
    """A model read from a run directory, with where it came from."""

    model: nn.Module
    cfg: RunConfig
    tokenizer: TextTokenizer | None
    checkpoint: Path

    @property
    def step(self) -> int:
        return int(ckpt_io.read_meta(self.checkpoint).get("step", 0))

    def describe(self) -> dict:
        """What was loaded, for logs and ``summary.json``."""
        return {"path": str(self.checkpoint.parent.parent), "checkpoint": str(self.checkpoint), "step": self.step}


def run_directory(path: str | Path, what: str = "run directory") -> Path:
    """The run directory of ``path`` (a run directory or one of its checkpoints), checked to hold a config."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} does not exist: {p}")
    root = p.parent.parent if (p / ckpt_io.META_FILE).is_file() else p
    if not (root / "config.yaml").is_file():
        raise CheckpointError(f"{p}: not a run directory (config.yaml is missing)")
    return root


def run_tokenizer(path: str | Path) -> TextTokenizer | None:
    """The run's ``tokenizer.json``, or None when it has none."""
    tok = run_directory(path) / "tokenizer.json"
    return TextTokenizer.load(tok) if tok.is_file() else None


def run_head(path: str | Path) -> Head:
    """``reward`` for a reward-model run (its run.json kind, or the reward.yaml of older versions), else ``lm``."""
    root = run_directory(path)
    if (root / RUN_FILE).is_file():
        try:
            if json.loads((root / RUN_FILE).read_text()).get("kind") == "reward":
                return "reward"
        except (OSError, ValueError):
            pass
    return "reward" if (root / "reward.yaml").is_file() else "lm"


def load_run_model(
    path: str | Path, device: str | torch.device = "cpu", *, head: Head | None = None, merged: bool = True
) -> RunModel:
    """The model of a run directory (its latest checkpoint) or of one checkpoint directory, in eval mode. An
    adapter run's model is its base with the adapters added: merged into the weights, or, with ``merged=False``,
    as separate modules (for a PEFT export)."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    root = run_directory(ckpt)
    cfg = load_config(root / "config.yaml")
    head = head or run_head(root)
    if cfg.adapter.enabled:
        ckpt_io.verify_checkpoint(ckpt, cfg.model)  # before the base is read
        model, base = adapter_model(cfg, head)
        check_base(ckpt, base)
    else:
        model = build_model(cfg.model, head)
    ckpt_io.load_weights(ckpt, model, cfg.model, verified=cfg.adapter.enabled)  # verified above
    if cfg.adapter.enabled and merged:
        merge_adapters(model).requires_grad_(True)
    model.to(device).eval()
    return RunModel(model, cfg, run_tokenizer(root), ckpt)


def adapter_model(cfg: RunConfig, head: Head = "lm") -> tuple[nn.Module, Path]:
    """An adapter run's model before its own weights are read: ``init_from``'s weights, frozen, wrapped in the
    run's adapters; and the base checkpoint that was read."""
    model = build_model(cfg.model, head)
    base = load_init_weights(model.decoder if head == "reward" else model, cfg.init_from, cfg)
    attach_adapters(model, cfg)
    return model, base.checkpoint


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, cfg, tokenizer)`` of a run directory or one of its checkpoints (the latest by default)."""
    loaded = load_run_model(path, device)
    return loaded.model, loaded.cfg, loaded.tokenizer


def load_frozen(
    path: str | Path,
    device: str | torch.device,
    *,
    role: str,
    tokenizer: TextTokenizer,
    against: str = "policy",
    vocab_size: int | None = None,
    key: str | None = None,
) -> RunModel:
    """A frozen model (``role``: reference, teacher, base) in eval mode with gradients off, after checking it
    uses ``tokenizer`` (and, when given, the model vocabulary ``vocab_size``) of the run it serves. ``key``
    names the config setting that chose it, for messages."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{key or role}: run directory does not exist: {p}")
    loaded = load_run_model(p, device, head="lm")
    check_same_tokenizer(loaded.tokenizer, tokenizer, f"{role} model {p}", against)
    if vocab_size is not None and loaded.cfg.model.vocab_size != vocab_size:
        raise ModelMismatchError(
            f"{role} model {p} has model.vocab_size={loaded.cfg.model.vocab_size} but the {against} has "
            f"{vocab_size}; set model.vocab_size={loaded.cfg.model.vocab_size} for the {against}"
        )
    loaded.model.requires_grad_(False)
    return loaded


def check_same_tokenizer(theirs: TextTokenizer | None, ours: TextTokenizer, who: str, against: str) -> None:
    """Refuse a model whose tokenizer is missing or differs (by ``TextTokenizer.hash``) from ours."""
    if theirs is None:
        raise ModelMismatchError(f"{who} has no tokenizer.json, so its vocabulary cannot be checked")
    if theirs.hash != ours.hash:
        raise ModelMismatchError(
            f"{who} uses a different tokenizer than the {against} (vocabulary {theirs.vocab_size}, hash "
            f"{theirs.hash[:12]} vs {ours.vocab_size}, {ours.hash[:12]} from {ours.source}); "
            "log-prob ratios and distillation need the same tokenization"
        )


def load_init_weights(model: nn.Module, path: str | Path, cfg: RunConfig) -> RunModel:
    """Load the weights of ``path`` (``init_from``: a run, a sharded run, an imported HF model, or one of
    their checkpoints) into ``model``, refusing a checkpoint of another architecture; returns what was read."""
    root = run_directory(path, "init_from run directory")
    ckpt = ckpt_io.resolve_checkpoint(path)
    try:
        parent_cfg = load_config(root / "config.yaml")
        if parent_cfg.adapter.enabled:  # the parent's adapters merged into its base
            diffs = model_config_diff(parent_cfg.model, cfg.model)
            if diffs:
                raise CheckpointError(f"{ckpt}: checkpoint from another model ({'; '.join(diffs)})")
            parent = load_run_model(ckpt, head="lm")
            model.load_state_dict(parent.model.state_dict())
        else:
            ckpt_io.load_weights(ckpt, model, cfg.model)
    except CheckpointError as err:
        raise CheckpointError(f"init_from={path}: {err}") from None
    return RunModel(model, cfg, None, ckpt)


def inherit_from_init(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a run starting from ``cfg.init_from`` must be: the parent's architecture (its whole model
    section) and, unless ``tokenizer.path`` names one, the parent's tokenizer."""
    if not cfg.init_from:
        return cfg
    root = run_directory(cfg.init_from, "init_from run directory")
    tokenizer = cfg.tokenizer
    if not tokenizer.path:
        path = root / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"init_from={cfg.init_from}: the run has no tokenizer.json")
        tokenizer = dataclasses.replace(tokenizer, path=str(path))
    return dataclasses.replace(cfg, model=load_config(root / "config.yaml").model, tokenizer=tokenizer)


def fit_vocabulary(cfg: RunConfig, tokenizer: TextTokenizer) -> RunConfig:
    """``cfg`` with ``model.vocab_size`` taken from the tokenizer when it is 0; a model whose embedding table is
    smaller than the tokenizer's vocabulary is refused (a ``ConfigError`` for the user's own setting, a
    ``ModelMismatchError`` for the architecture of ``init_from``)."""
    cfg = with_digit_ids(cfg, tokenizer)
    vocab = cfg.model.vocab_size
    if vocab == 0 and not cfg.init_from:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if tokenizer.vocab_size <= vocab:
        return cfg
    if not cfg.init_from:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
            "set model.vocab_size=0 to take it from the tokenizer"
        )
    raise ModelMismatchError(
        f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model of init_from={cfg.init_from} "
        f"(vocab_size) is {vocab}; the model and the tokenizer must come from the same run"
    )


def with_digit_ids(cfg: RunConfig, tokenizer: TextTokenizer) -> RunConfig:
    """``cfg`` with ``model.abacus.digit_ids`` from the tokenizer when digit-place embeddings are on and the ids
    are not set (a ``ConfigError`` when the tokenizer has no single token per digit)."""
    abacus = cfg.model.abacus
    if not abacus.enabled or abacus.digit_ids is not None:
        return cfg
    ids = list(digit_token_ids(tokenizer))
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, abacus=dataclasses.replace(abacus, digit_ids=ids))
    )


def require_init_from(cfg: RunConfig, command: str) -> str:
    """``cfg.init_from`` for recipes that start from a model (alignment, reward models)."""
    if not cfg.init_from:
        raise ConfigError(f"lmlab {command} needs init_from: the run directory of the model to start from")
    return cfg.init_from
