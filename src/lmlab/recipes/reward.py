"""Reward models (``lmlab reward train`` / ``lmlab reward score``): Bradley–Terry, plain or regularised.

Model: ``lmlab.models.reward_head.RewardModel`` (the decoder of ``init_from`` plus a scalar head on
the final hidden state of the last non-pad token). Loss per pair, with r = the model's reward:

    L_BT  = −log σ(r(x, y_w) − r(x, y_l))                    Bradley–Terry (Ouyang et al. 2022, Eq. 1)
    L     = L_BT + w · NLL(y_w | x)/|y_w|                    regularised variant (Yang et al. 2024, arXiv 2406.10216)

The regularised variant is the SFT-regulariser of Yang et al. 2024 ("Regularizing hidden states
enables learning generalizable reward model for LLMs", GRM; docs/science.md §7.2): the LM head stays and
keeps predicting the chosen answer from the *same* hidden states the reward head reads, which stops
those states from collapsing onto features that only separate the training pairs and improves
out-of-distribution pairwise accuracy. ``w = reward.lm_weight``; 0 gives the plain reward model.

Data: preference JSONL as for ``lmlab align`` (``align.train_file`` / ``align.val_file``, the same
loader and masks); ``reward.ood_file`` is an optional out-of-distribution split. Evaluation and the
summary report pairwise accuracy (r_w > r_l) on both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import RewardConfig, RunConfig, from_dict, load_yaml
from lmlab.data.preference import PreferenceBatches, PreferenceData, iterate_batches, load_preference_file, pad_id_of
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import CheckpointError, ConfigError, UserError
from lmlab.objectives.base import LossOutput
from lmlab.recipes.launch import run_command
from lmlab.train.engine import Job, Plan, execute
from lmlab.train.pretrained import inherit_from_init, load_run_model, require_init_from, run_directory, run_head
from lmlab.train.runtime import resolve_device

LEGACY_REWARD_FILE = "reward.yaml"  # where runs of earlier versions kept the reward section

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

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        b = batch["pair_index"].numel()
        if lm_weight > 0:
            rewards, logits = model(batch["input_ids"], batch["lengths"], lm_rows=b)
        else:
            rewards = model(batch["input_ids"], batch["lengths"])
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
            nll = chosen_nll(logits, batch["input_ids"][:b], batch["completion_mask"][:b])
            losses = losses + lm_weight * nll
            metrics["lm_nll"] = nll.detach().sum()
        count = torch.tensor(b, device=losses.device)
        return LossOutput(loss_sum=losses.sum(), count=count, metrics=metrics)

    return loss_fn


@torch.no_grad()
def score_pairs(model: nn.Module, data: PreferenceData, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] rewards of every pair's chosen and rejected answer."""
    out = torch.zeros(len(data), 2)
    for batch in iterate_batches(data, pad_id, batch_size):
        b = batch["pair_index"].numel()
        rewards = model(batch["input_ids"].to(device), batch["lengths"].to(device)).float().cpu()
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


# --------------------------------------------------------------------------- the recipe


class RewardRecipe:
    name = "reward"

    def setup(self, job: Job) -> Plan:
        require_init_from(job.requested, "reward train")
        cfg = inherit_from_init(job.requested)
        a, r = cfg.align, cfg.reward
        if not a.train_file:
            raise ConfigError("align.train_file is required (a preference JSONL with prompt, chosen, rejected)")
        if a.max_len > cfg.model.max_seq_len:
            raise ConfigError(f"align.max_len={a.max_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
        # The saved config must reload (train.seq_len <= model.max_seq_len): record the longest pair instead.
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=a.max_len))
        tokenizer = TextTokenizer.load(cfg.tokenizer.path)
        load_args = dict(
            max_prompt_len=a.max_prompt_len, max_len=a.max_len, identical_pairs=a.identical_pairs, columns=a.columns
        )
        train = load_preference_file(a.train_file, tokenizer, **load_args)
        splits = {}
        if a.val_file:
            splits["val"] = load_preference_file(a.val_file, tokenizer, **load_args)
        if r.ood_file:
            splits["ood"] = load_preference_file(r.ood_file, tokenizer, **load_args)
        model = job.start_model(cfg, head="reward")
        pad_id, mb, ctx, device = pad_id_of(tokenizer), cfg.train.micro_batch_size, job.ctx, job.device

        def eval_fn(m: nn.Module) -> dict[str, float]:
            out = {}
            for name, data in splits.items():
                metrics = pairwise_metrics(score_pairs(m, data, pad_id, mb, device))
                out[f"{name}_accuracy"], out[f"{name}_margin"] = metrics["accuracy"], metrics["margin"]
            return out

        batches = PreferenceBatches(
            train, pad_id, cfg.data.seed + cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.train, self.splits, self.pad_id, self.mb = train, splits, pad_id, mb
        return Plan(
            cfg,
            model,
            batches,
            build_reward_loss(r.lm_weight),
            tokenizer,
            eval_fn=eval_fn if splits else None,
            summary={"lm_weight": r.lm_weight, "train_data": train.summary()},
            extra_params=cfg.model.d_model,  # the reward head
        )

    def finish(self, job: Job, trainer, result) -> None:
        model = job.plain_model(trainer)
        if model is None:
            return
        model.eval()
        score = lambda data: pairwise_metrics(score_pairs(model, data, self.pad_id, self.mb, job.device))  # noqa: E731
        job.summary.extra["train_accuracy"] = score(self.train)["accuracy"]
        for name, data in self.splits.items():
            job.summary.extra[name] = score(data)

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        parts = [f"train {summary['train_accuracy']:.3f}"]
        parts += [f"{name} {summary[name]['accuracy']:.3f}" for name in self.splits]
        print(
            f"reward model ({summary['steps']} steps): pairwise accuracy {', '.join(parts)}; run directory: {job.run.path}"
        )


# --------------------------------------------------------------------------- runs and commands


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, cfg, reward_cfg, tokenizer)`` of a reward run directory (or one of its checkpoints)."""
    root = run_directory(path)
    if run_head(root) != "reward":
        raise CheckpointError(f"{root}: not a reward-model run (run.json says another kind; no {LEGACY_REWARD_FILE})")
    loaded = load_run_model(path, device, head="reward")
    cfg = loaded.cfg
    if (root / LEGACY_REWARD_FILE).is_file():
        cfg = dataclasses.replace(cfg, reward=from_dict(RewardConfig, load_yaml(root / LEGACY_REWARD_FILE), "reward."))
    return loaded.model, cfg, cfg.reward, loaded.tokenizer


def run_reward(cfg: RunConfig, run_dir, **options) -> dict[str, Any]:
    """Train a reward model on ``cfg.align.train_file`` from ``cfg.init_from``; returns the summary."""
    return execute(RewardRecipe(), cfg, run_dir, **options)


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
        return run_command(
            RewardRecipe(),
            ["reward", "train"],
            rest,
            "Train a Bradley–Terry reward model from init_from on align.train_file (reward.lm_weight, "
            "reward.ood_file). Overrides: dotted key=value after the config (e.g. reward.lm_weight=0.1).",
            out_required=True,
        )
    if action != "score":
        print(f"lmlab reward: unknown action {action!r}\n{usage}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="lmlab reward score", description="Score pairs with a reward model.")
    p.add_argument("run_dir", help="reward-model run directory")
    p.add_argument("--data", required=True, help="preference JSONL (prompt, chosen, rejected)")
    p.add_argument("--out", help="write per-pair rewards here as JSONL")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(rest)
    device = resolve_device(args.device, "--device", UserError)
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
