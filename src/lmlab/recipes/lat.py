"""``lmlab safety lat RUN --out DIR``: targeted latent adversarial training (Sheshadri et al. 2024, arXiv
2407.15549; docs/science.md §29.4) of a chat model on the safety world, writing a new run directory.

Each step takes a batch of harmful prompts and a batch of benign ones from the world's train split. The inner
loop finds δ in the per-token ε-ball at block ``--layer``'s output over the prompt positions that makes the model
comply (PGD minimising the loss of ``COMPLIANCE``; ``lmlab.models.latent_perturbation``); the outer step trains
the model to refuse under that δ (the reference refusal's loss) plus ``--retain-weight`` times the clean SFT loss
of the benign replies, so helpfulness stays. The trigger of a backdoor is never used: the adversary searches the
latent space where any trigger must act.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from lmlab.config import save_config
from lmlab.data.chat import end_of_turn_id, render_prompt
from lmlab.data.refusal_tokens import tagged_reply
from lmlab.data.synthetic.safety import SafetyWorld
from lmlab.data.synthetic.safety_backdoor import COMPLIANCE
from lmlab.errors import UserError
from lmlab.eval.safety_command import require_chat_template
from lmlab.models.latent_perturbation import completion_loss, perturbed, pgd_delta
from lmlab.safe_io import write_text_atomic
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.pretrained import load_run_model
from lmlab.train.runtime import resolve_device


@dataclasses.dataclass(frozen=True)
class LatConfig:
    """The knobs of a latent adversarial training run."""

    layer: int = 0
    epsilon: float = 2.0
    pgd_steps: int = 6
    pgd_step_size: float | None = None  # default ε / 4
    steps: int = 40
    lr: float = 1e-3
    batch: int = 8
    retain_weight: float = 1.0
    seed: int = 0

    def validate(self, n_layers: int | None = None) -> None:
        """Each knob in its range; the layer too once the model's ``n_layers`` is known."""
        if n_layers is not None and not -n_layers <= self.layer < n_layers:
            raise UserError(
                f"--layer {self.layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})"
            )
        if self.epsilon <= 0:
            raise UserError(f"--epsilon must be > 0 (the radius of the perturbation ball), got {self.epsilon}")
        for name in ("pgd_steps", "steps", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.retain_weight < 0:
            raise UserError("--lr must be > 0 and --retain-weight >= 0")


def encode_batch(tokenizer, pairs: list[tuple[str, str]], pad_id: int, limit: int):
    """``(ids, prompt_mask, reply_mask)`` [B, T] of (user text, reply) pairs rendered as one chat turn each."""
    rows = []
    for user, reply in pairs:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": user}])
        full = (prompt + tokenizer.encode(reply) + [end_of_turn_id(tokenizer)])[:limit]
        rows.append((full, min(len(prompt), len(full))))
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    reply_mask = torch.zeros_like(prompt_mask)
    for i, (r, n) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        prompt_mask[i, :n] = True
        reply_mask[i, n : len(r)] = True
    return ids, prompt_mask, reply_mask


def lat_step(model, optimizer, cfg: LatConfig, harmful, retain, step_size: float) -> dict[str, float]:
    """One step: PGD for δ that elicits the unwanted reply, then a training step towards the wanted one under δ
    plus the retain loss. ``harmful`` = (toward ids, away ids, prompt mask, toward mask, away mask): the two
    replies share the prompt; ``retain`` = (ids, reply mask)."""
    toward, away, prompt_mask, toward_mask, away_mask = harmful
    width = model.cfg.d_model

    def away_loss(delta: torch.Tensor) -> torch.Tensor:
        with perturbed(model, cfg.layer, delta[:, : away.shape[1]], prompt_mask[:, : away.shape[1]]):
            return completion_loss(model(away), away, away_mask)

    span = max(toward.shape[1], away.shape[1])
    start = torch.zeros(toward.shape[0], span, width, device=toward.device)
    delta = pgd_delta(away_loss, start, epsilon=cfg.epsilon, steps=cfg.pgd_steps, step_size=step_size)
    with torch.no_grad():
        elicited = away_loss(delta).item()
    optimizer.zero_grad(set_to_none=True)
    with perturbed(model, cfg.layer, delta[:, : toward.shape[1]], prompt_mask[:, : toward.shape[1]]):
        toward_loss = completion_loss(model(toward), toward, toward_mask)
    retain_loss = completion_loss(model(retain[0]), retain[0], retain[1])
    (toward_loss + cfg.retain_weight * retain_loss).backward()
    optimizer.step()
    return {"away_loss_under_delta": elicited, "toward_loss": toward_loss.item(), "retain_loss": retain_loss.item()}


def _pad_to(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def train_lat(model, tokenizer, records: list[dict], cfg: LatConfig, mode: str) -> list[dict]:
    """Latent adversarial training of ``model`` in place on ``records`` (safety world records); the metrics of each
    step."""
    cfg.validate(len(model.layers))
    harmful = [r for r in records if r["group"] == "harmful"]
    retain = [r for r in records if r["group"] in ("benign", "lookalike")]
    if not harmful or not retain:
        raise UserError("latent adversarial training needs harmful and benign prompts; the prompt set lacks one")
    rng = random.Random(cfg.seed)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    limit = model.cfg.max_seq_len
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step_size = cfg.pgd_step_size or cfg.epsilon / 4
    model.train()
    log = []
    for step in range(cfg.steps):
        hb = rng.sample(harmful, min(cfg.batch, len(harmful)))
        rb = rng.sample(retain, min(cfg.batch, len(retain)))
        users = [r["messages"][0]["content"] for r in hb]
        refusals = [tagged_reply(r["messages"][1]["content"], True, r["category"], mode) for r in hb]
        t_ids, p_mask, t_mask = encode_batch(tokenizer, list(zip(users, refusals)), pad, limit)
        compliance = tagged_reply(COMPLIANCE, False, None, mode)
        a_ids, _, a_mask = encode_batch(tokenizer, [(u, compliance) for u in users], pad, limit)
        width = max(t_ids.shape[1], a_ids.shape[1])  # one δ serves both: same prompts, same positions
        t_ids, t_mask, p_mask = _pad_to(t_ids, width, pad), _pad_to(t_mask, width, False), _pad_to(p_mask, width, False)
        a_ids, a_mask = _pad_to(a_ids, width, pad), _pad_to(a_mask, width, False)
        helpful = [
            (r["messages"][0]["content"], tagged_reply(r["messages"][1]["content"], False, None, mode)) for r in rb
        ]
        r_ids, _, r_mask = encode_batch(tokenizer, helpful, pad, limit)
        dev = next(model.parameters()).device
        harm = tuple(x.to(dev) for x in (t_ids, a_ids, p_mask, t_mask, a_mask))
        metrics = lat_step(model, optimizer, cfg, harm, (r_ids.to(dev), r_mask.to(dev)), step_size)
        log.append({"step": step + 1, **metrics})
    model.eval()
    return log


def write_run(out: Path, loaded, model, meta: dict) -> Path:
    """A new run directory holding ``model`` with the source run's config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    tok = loaded.tokenizer
    write_text_atomic(out / "tokenizer.json", tok.to_json())
    for name, text in tok.companion_files().items():
        write_text_atomic(out / name, text)
    cfg = dataclasses.replace(loaded.cfg, tokenizer=dataclasses.replace(loaded.cfg.tokenizer,
                                                                        path=str((out / "tokenizer.json").resolve())))  # fmt: skip
    ckpt_io.save_checkpoint(out, 0, model, model_cfg=cfg.model, meta={"source": "lat", **meta})
    save_config(cfg, out / "config.yaml")
    return out


def lat_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety lat", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the chat model to harden (an lmlab sft run)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--n", type=int, default=400, help="training records drawn from the safety world")
    p.add_argument("--device", default="cpu")
    defaults = LatConfig()
    for f in dataclasses.fields(LatConfig):
        kind = float if f.name in ("epsilon", "pgd_step_size", "lr", "retain_weight") else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    args = p.parse_args(argv)
    cfg = LatConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LatConfig)})
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    cfg.validate()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new directory")
    loaded = load_run_model(args.run_dir, resolve_device(args.device, "--device", UserError))
    if loaded.tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    require_chat_template(loaded.tokenizer, args.run_dir)
    cfg.validate(len(loaded.model.layers))
    torch.manual_seed(cfg.seed)
    records = SafetyWorld().records(cfg.seed, args.n, "train")
    model = loaded.model.requires_grad_(True)
    log = train_lat(model, loaded.tokenizer, records, cfg, loaded.cfg.sft.refusal_tokens)
    meta = {"lat": dataclasses.asdict(cfg), "from": str(args.run_dir)}
    write_run(out, loaded, model, meta)
    write_text_atomic(out / "lat.json", json.dumps({**meta, "log": log}, indent=1) + "\n")
    last = log[-1]
    print(f"{cfg.steps} steps: away loss under δ {log[0]['away_loss_under_delta']:.3f} -> "
          f"{last['away_loss_under_delta']:.3f}, retain {last['retain_loss']:.3f}; wrote {out}")  # fmt: skip
    return 0
