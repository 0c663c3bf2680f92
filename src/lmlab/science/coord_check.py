"""The μP coordinate check (``lmlab coord-check``): do activation sizes stay flat as the model widens?

Yang et al. 2022 (Tensor Programs V, arXiv 2203.03466, its "coordinate check"; docs/science.md §25): train
models that differ only in width (d_head fixed, more heads) for a few Adam steps at one learning rate and record
the mean |coordinate| of the embedding output, every attention and MLP output and the logits at each step. Under
μP every curve is flat in width; under the standard parametrization (constant init std, one LR) they grow, the
logits fastest. lmlab's pass criterion (a heuristic, not the paper's): |slope of log mean|act| vs log width| < 0.1
at the last step, the slope fitted by least squares over the widths after averaging over seeds.

The models train on the bytes of a synthetic world (vocabulary 256, no tokenizer to train), with lmlab's own
model and optimizer builders, so the check covers the same init, multipliers and per-layer learning rates as a
real run. ``train_widths`` is also the short training loop of the μP learning-rate transfer study
(examples/mup/run_study.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig, OptimConfig, ScheduleConfig
from lmlab.data.synthetic import get_world
from lmlab.errors import UserError
from lmlab.models.build import build_model
from lmlab.models.mlp import SwiGLUConfig
from lmlab.models.mup import MuPConfig, mup_width_mult
from lmlab.science.plots import plot_coord_check
from lmlab.train.optim import build_optimizer
from lmlab.train.schedule import lr_at

PARAMETRIZATIONS = ("standard", "mup")
BYTE_VOCAB = 256


@dataclass
class WidthSetup:
    """The models of a width sweep: everything but ``d_model`` (and the heads, ``d_model / head_dim``) is fixed."""

    head_dim: int = 16
    n_layers: int = 2
    seq_len: int = 64
    base_width: int = 32  # μP's d_base (unused under the standard parametrization)
    init_std: float = 0.02
    tie_embeddings: bool = False
    ffn_ratio: float = 8 / 3  # the SwiGLU width d_ff = ffn_ratio·d_model, so it grows in proportion

    def model_config(self, width: int, parametrization: str) -> ModelConfig:
        if width % self.head_dim:
            raise UserError(f"width {width} is not a multiple of the head dimension {self.head_dim}")
        cfg = ModelConfig(
            vocab_size=BYTE_VOCAB,
            d_model=width,
            n_layers=self.n_layers,
            n_heads=width // self.head_dim,
            max_seq_len=self.seq_len,
            tie_embeddings=self.tie_embeddings,
            init_std=self.init_std,
            ffn=SwiGLUConfig(hidden=round(self.ffn_ratio * width)),
            parametrization=parametrization,
            mup=MuPConfig(base_width=self.base_width) if parametrization == "mup" else MuPConfig(),
        )
        cfg.validate()
        return cfg


@dataclass
class TrainSetup:
    """A short AdamW run: TP5's coordinate-check settings by default (lr 1e-2, β (0.9, 0.95), wd 0.1, clip 1)."""

    steps: int = 10
    lr: float = 1e-2
    batch_size: int = 8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant"))

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip)


def byte_tokens(world: str = "stories", n_docs: int = 400, seed: int = 0) -> torch.Tensor:
    """The UTF-8 bytes of ``n_docs`` documents of a synthetic world, newline-separated: a 1-D int64 tensor."""
    text = "\n".join(get_world(world).documents(seed, n_docs))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens: [B, T + 1]."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


@contextmanager
def activation_probe(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, the dict holds the mean |coordinate| of the last forward's embedding output (with μP's
    α_in), each block's attention and MLP output (``layers.{i}.attn`` / ``.mlp``) and the logits."""
    sizes: dict[str, float] = {}
    handles = []

    def record(name: str, mult: float | None = None):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            sizes[name] = float(output.detach().abs().mean()) * (1.0 if mult is None else mult)

        return hook

    handles.append(model.tok_embeddings.register_forward_hook(record("embedding", model.input_mult)))
    for i, block in enumerate(model.layers):
        handles.append(block.attn.register_forward_hook(record(f"layers.{i}.attn")))
        handles.append(block.mlp.register_forward_hook(record(f"layers.{i}.mlp")))
    handles.append(model.register_forward_hook(record("logits")))
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def train_width(
    cfg: ModelConfig,
    tokens: torch.Tensor,
    train: TrainSetup,
    seed: int = 0,
    eval_tokens: torch.Tensor | None = None,
) -> dict:
    """Train one model of ``cfg`` for ``train.steps`` AdamW steps on random windows of ``tokens``.

    Returns ``sizes`` (per step, the activation sizes of that step's forward, before its update: step 1 is the
    initialisation), ``losses`` (per step) and, with ``eval_tokens`` [N, T + 1], ``eval_loss`` after training."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    optim = build_optimizer(
        model, train.optim_config(), torch.device("cpu"), mup_width_mult(cfg), scale_eps=cfg.mup.scale_eps
    )
    gen = torch.Generator().manual_seed(seed + 1)
    sizes, losses = [], []
    with activation_probe(model) as probe:
        for step in range(train.steps):
            lr = lr_at(step, train.steps, train.lr, train.schedule)
            for group in optim.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batch = windows(tokens, train.batch_size, cfg.max_seq_len, gen)
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            sizes.append(dict(probe))
            losses.append(float(loss.detach()))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optim.step()
    out = {"sizes": sizes, "losses": losses}
    if eval_tokens is not None:
        out["eval_loss"] = evaluate(model, eval_tokens)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batch: torch.Tensor) -> float:
    """Mean next-token loss (nats) of ``model`` on ``batch`` [N, T + 1]."""
    model.eval()
    logits = model(batch[:, :-1])
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


def log_slope(widths: Sequence[int], values: Sequence[float]) -> float:
    """The least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(
    widths: Sequence[int],
    setup: WidthSetup,
    train: TrainSetup,
    parametrizations: Sequence[str] = PARAMETRIZATIONS,
    seeds: Sequence[int] = (0,),
    tokens: torch.Tensor | None = None,
) -> dict:
    """Activation sizes per parametrization, width and step (averaged over ``seeds``) and their log-log slopes
    against width at the last step: ``{"widths", "steps", "results": {parametrization: {"sizes": {name:
    [step][width]}, "slopes": {name: slope}}}}``."""
    if len(widths) < 2:
        raise UserError("a coordinate check needs at least two widths")
    tokens = byte_tokens() if tokens is None else tokens
    results = {}
    for parametrization in parametrizations:
        runs = {
            w: [train_width(setup.model_config(w, parametrization), tokens, train, s) for s in seeds] for w in widths
        }
        names = list(runs[widths[0]][0]["sizes"][0])
        sizes = {
            name: [
                [float(np.mean([run["sizes"][step][name] for run in runs[w]])) for w in widths]
                for step in range(train.steps)
            ]
            for name in names
        }
        slopes = {name: log_slope(widths, per_step[-1]) for name, per_step in sizes.items()}
        results[parametrization] = {"sizes": sizes, "slopes": slopes}
    return {"widths": list(widths), "steps": train.steps, "seeds": list(seeds), "results": results}


def coord_check_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab coord-check",
        description="μP coordinate check: activation sizes across widths after a few Adam steps (docs/science.md §25).",
    )
    p.add_argument("--out", required=True, help="directory for coord_check.json and coord_check.png")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512], help="d_model values")
    p.add_argument("--base-width", type=int, help="μP's d_base (default: the smallest width)")
    p.add_argument("--head-dim", type=int, default=32, help="fixed head width; heads = width / head_dim")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged per width")
    p.add_argument("--tied", action="store_true", help="tie the embedding and the output head")
    p.add_argument("--parametrization", choices=(*PARAMETRIZATIONS, "both"), default="both")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    for name in ("steps", "seeds", "layers", "head_dim", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = sorted(args.widths)
    setup = WidthSetup(
        head_dim=args.head_dim,
        n_layers=args.layers,
        seq_len=args.seq_len,
        base_width=args.base_width or widths[0],
        tie_embeddings=args.tied,
    )
    train = TrainSetup(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    chosen = PARAMETRIZATIONS if args.parametrization == "both" else (args.parametrization,)
    report = coord_check(widths, setup, train, chosen, seeds=range(args.seeds))
    report["setup"] = {**vars(setup), "steps": train.steps, "lr": train.lr, "batch_size": train.batch_size}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(report, indent=2))
    plot_coord_check(out / "coord_check.png", report)
    for parametrization, result in report["results"].items():
        worst = max(result["slopes"].items(), key=lambda kv: abs(kv[1]))
        flat = all(abs(s) < 0.1 for s in result["slopes"].values())
        print(
            f"{parametrization}: logits slope {result['slopes']['logits']:+.3f}, largest |slope| {worst[0]} "
            f"{worst[1]:+.3f} ({'flat' if flat else 'not flat'}: |slope| < 0.1 at step {train.steps})"
        )
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
    return 0
