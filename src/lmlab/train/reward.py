"""``lmlab reward train`` / ``lmlab reward score``: Bradley–Terry reward models, plain or regularised.

Model: ``lmlab.models.reward_head.RewardModel`` (the decoder of ``init_from`` plus a scalar head on
the final hidden state of the last non-pad token). Loss per pair, with r = the model's reward:

    L_BT  = −log σ(r(x, y_w) − r(x, y_l))                    Bradley–Terry (Ouyang et al. 2022, Eq. 1)
    L     = L_BT + w · NLL(y_w | x)/|y_w|                    regularised variant (PAPERS.md C01)

The regularised variant is the SFT-regulariser of Yang et al. 2024 ("Regularizing hidden states
enables learning generalizable reward model for LLMs", GRM): the LM head stays and keeps predicting
the chosen answer from the *same* hidden states the reward head reads, which stops those states from
collapsing onto features that only separate the training pairs and improves out-of-distribution
pairwise accuracy. ``w = reward.lm_weight``; 0 gives the plain reward model.

Data: preference JSONL as for ``lmlab align`` (``align.train_file`` / ``align.val_file``, the same
loader and masks); ``reward.ood_file`` is an optional out-of-distribution split. Evaluation and the
summary report pairwise accuracy (r_w > r_l) on both. The reward settings live in their own YAML
section ``reward:`` (``RewardConfig`` below), written to ``reward.yaml`` in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import RunConfig, apply_overrides, from_dict, load_yaml, save_config, to_dict, validate
from lmlab.data.preference import (
    PreferenceBatches,
    PreferenceData,
    iterate_batches,
    load_preference_file,
    pad_id_of,
)
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.reward_head import RewardModel
from lmlab.objectives.base import LossOutput

REWARD_FILE = "reward.yaml"


@dataclass
class RewardConfig:
    """The ``reward:`` section of a reward-model config."""

    lm_weight: float = 0.0  # weight w of the chosen-answer text-generation loss (0: plain reward model)
    ood_file: str | None = None  # optional out-of-distribution preference JSONL for pairwise accuracy

    def validate(self) -> None:
        if not (self.lm_weight >= 0 and math.isfinite(self.lm_weight)):
            raise ConfigError(f"reward.lm_weight={self.lm_weight} must be >= 0")


def load_reward_config(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, RewardConfig]:
    """Read a YAML whose ``reward:`` section is a ``RewardConfig`` and the rest a ``RunConfig``."""
    data = apply_overrides(load_yaml(path), list(overrides))
    rcfg = from_dict(RewardConfig, data.pop("reward", None), "reward.")
    rcfg.validate()
    cfg = validate(from_dict(RunConfig, data))
    return cfg, rcfg


# --------------------------------------------------------------------------- loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``−log σ(r_w − r_l)`` [B]."""
    return -F.logsigmoid(chosen - rejected)


def chosen_nll(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean NLL of each row's completion [N] (the text-generation regulariser)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_nll * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def build_reward_loss(lm_weight: float):
    """``loss_fn(model, batch) -> LossOutput`` (count = pairs); metrics: accuracy, margin, BT and LM parts."""

    def loss_fn(model: RewardModel, batch: dict[str, torch.Tensor]) -> LossOutput:
        b = batch["pair_index"].numel()
        hidden = model.hidden(batch["input_ids"])
        rewards = model.score(hidden, batch["lengths"])
        chosen, rejected = rewards[:b], rewards[b:]
        bt = bradley_terry_loss(chosen, rejected)
        losses = bt
        metrics = {
            "bt_loss": bt.detach().sum(),
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).detach().sum(),
            "reward/chosen": chosen.detach().sum(),
            "reward/rejected": rejected.detach().sum(),
        }
        if lm_weight > 0:
            logits = model.lm_logits(hidden[:b])
            nll = chosen_nll(logits, batch["input_ids"][:b], batch["completion_mask"][:b])
            losses = losses + lm_weight * nll
            metrics["lm_nll"] = nll.detach().sum()
        count = torch.tensor(b, device=losses.device)
        return LossOutput(loss_sum=losses.sum(), count=count, metrics=metrics)

    return loss_fn


@torch.no_grad()
def score_pairs(model: RewardModel, data: PreferenceData, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] rewards of every pair's chosen and rejected answer."""
    model.eval()
    out = torch.zeros(len(data), 2)
    for batch in iterate_batches(data, pad_id, batch_size):
        b = batch["pair_index"].numel()
        rewards = model(batch["input_ids"].to(device), batch["lengths"].to(device)).cpu()
        out[batch["pair_index"], 0] = rewards[:b]
        out[batch["pair_index"], 1] = rewards[b:]
    return out


def pairwise_metrics(scores: torch.Tensor) -> dict[str, float]:
    """Accuracy (r_w > r_l), mean margin and mean rewards of an [N, 2] score table."""
    return {
        "pairs": int(scores.shape[0]),
        "accuracy": float((scores[:, 0] > scores[:, 1]).float().mean()),
        "margin": float((scores[:, 0] - scores[:, 1]).mean()),
        "reward_chosen": float(scores[:, 0].mean()),
        "reward_rejected": float(scores[:, 1].mean()),
    }


# --------------------------------------------------------------------------- runs


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, cfg, reward_cfg, tokenizer)`` of a reward run directory (or one of its checkpoints)."""
    from lmlab.config import load_config
    from lmlab.data.tokenizer import TextTokenizer
    from lmlab.train import checkpoint as ckpt_io

    ckpt = ckpt_io.resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    if not (run_dir / REWARD_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a reward-model run ({REWARD_FILE} is missing)")
    cfg = load_config(run_dir / "config.yaml")
    rcfg = from_dict(RewardConfig, load_yaml(run_dir / REWARD_FILE), "reward.")
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    model = RewardModel(cfg.model)
    ckpt_io.load_weights(ckpt, model, cfg.model)
    return model.to(device).eval(), cfg, rcfg, tokenizer


def run_reward(cfg: RunConfig, rcfg: RewardConfig, run_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train a reward model on ``cfg.align.train_file`` from ``cfg.init_from``; returns the summary."""
    from lmlab.models.counting import count_params
    from lmlab.train.loop import Trainer, fit_logged
    from lmlab.train.pretrain import _write_summary, prepare_run_dir
    from lmlab.train.runtime import environment, start_from_run

    a = cfg.align
    if cfg.init_from and not a.train_file:
        raise ConfigError("align.train_file is required (a preference JSONL with prompt, chosen, rejected)")
    device, decoder, init_cfg, tokenizer = start_from_run(cfg, "reward train")
    if a.max_len > init_cfg.model.max_seq_len:
        raise ConfigError(f"align.max_len={a.max_len} exceeds the model's max_seq_len={init_cfg.model.max_seq_len}")
    # The saved config must reload (train.seq_len <= model.max_seq_len): record the longest pair instead.
    cfg = dataclasses.replace(cfg, model=init_cfg.model, train=dataclasses.replace(cfg.train, seq_len=a.max_len))
    model = RewardModel(cfg.model, decoder).to(device)
    load_args = dict(max_prompt_len=a.max_prompt_len, max_len=a.max_len, identical_pairs=a.identical_pairs)
    train = load_preference_file(a.train_file, tokenizer, **load_args)
    splits = {}
    if a.val_file:
        splits["val"] = load_preference_file(a.val_file, tokenizer, **load_args)
    if rcfg.ood_file:
        splits["ood"] = load_preference_file(rcfg.ood_file, tokenizer, **load_args)

    run_dir = prepare_run_dir(Path(run_dir), False)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / REWARD_FILE).write_text(json.dumps(to_dict(rcfg)))  # JSON is YAML
    tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1))
    pad_id = pad_id_of(tokenizer)
    mb = cfg.train.micro_batch_size

    def eval_fn(m: nn.Module) -> dict[str, float]:
        out = {}
        for name, data in splits.items():
            metrics = pairwise_metrics(score_pairs(m, data, pad_id, mb, device))
            out[f"{name}_accuracy"], out[f"{name}_margin"] = metrics["accuracy"], metrics["margin"]
        m.train()
        return out

    batches = PreferenceBatches(train, pad_id, cfg.data.seed + cfg.train.seed)
    trainer = Trainer(
        cfg,
        run_dir,
        model,
        batches,
        build_reward_loss(rcfg.lm_weight),
        device=device,
        eval_fn=eval_fn if splits else None,
    )
    params = count_params(cfg.model)
    summary: dict[str, Any] = {
        "status": "running",
        "kind": "reward",
        "lm_weight": rcfg.lm_weight,
        "params": params["total"] + cfg.model.d_model,
        "init_from": str(cfg.init_from),
        "train_data": train.summary(),
    }
    _write_summary(run_dir, summary)
    result, fields = fit_logged(trainer, run_dir)
    summary.update(fields)
    summary["train_accuracy"] = pairwise_metrics(score_pairs(model, train, pad_id, mb, device))["accuracy"]
    for name, data in splits.items():
        summary[name] = pairwise_metrics(score_pairs(model, data, pad_id, mb, device))
    _write_summary(run_dir, summary)
    if not quiet:
        parts = [f"train {summary['train_accuracy']:.3f}"]
        parts += [f"{name} {summary[name]['accuracy']:.3f}" for name in splits]
        print(
            f"reward model ({summary['steps']} steps): pairwise accuracy {', '.join(parts)}; run directory: {run_dir}"
        )
    return summary


def reward_main(argv: list[str]) -> int:
    usage = "usage: lmlab reward {train CONFIG --out DIR [key=value ...] | score RUN_DIR --data FILE}"
    if not argv or argv[0] in ("-h", "--help"):
        print(
            usage + "\n\n  train  train a reward model from init_from on align.train_file\n"
            "  score  score preference pairs with a trained reward model"
        )
        return 0
    action, rest = argv[0], argv[1:]
    if action == "train":
        p = argparse.ArgumentParser(prog="lmlab reward train", description="Train a Bradley–Terry reward model.")
        p.add_argument("config", help="YAML config: init_from, align.train_file/val_file, reward.lm_weight/ood_file")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. reward.lm_weight=0.1)")
        p.add_argument("--out", required=True, help="run directory to create")
        p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    elif action == "score":
        p = argparse.ArgumentParser(prog="lmlab reward score", description="Score pairs with a reward model.")
        p.add_argument("run_dir", help="reward-model run directory")
        p.add_argument("--data", required=True, help="preference JSONL (prompt, chosen, rejected)")
        p.add_argument("--out", help="write per-pair rewards here as JSONL")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    else:
        print(f"lmlab reward: unknown action {action!r}\n{usage}", file=sys.stderr)
        return 2
    args = p.parse_intermixed_args(rest)
    args.action = action
    if args.action == "train":
        cfg, rcfg = load_reward_config(args.config, args.overrides)
        if args.quiet:
            cfg.train.progress = False
        summary = run_reward(cfg, rcfg, args.out, quiet=args.quiet)
        return 3 if summary["status"] == "diverged" else 0
    from lmlab.train.runtime import resolve_device

    device = resolve_device(args.device)
    model, cfg, _, tokenizer = load_reward_model(args.run_dir, device)
    a = cfg.align
    data = load_preference_file(
        args.data, tokenizer, max_prompt_len=a.max_prompt_len, max_len=a.max_len, identical_pairs=a.identical_pairs
    )
    scores = score_pairs(model, data, pad_id_of(tokenizer), cfg.train.micro_batch_size, device)
    if args.out:
        with open(args.out, "w") as f:
            for pair, (rw, rl) in zip(data.pairs, scores.tolist()):
                f.write(json.dumps({"line": pair.line, "chosen_reward": rw, "rejected_reward": rl}) + "\n")
    result = {"data": str(args.data), **pairwise_metrics(scores), "identical_skipped": data.identical}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0
