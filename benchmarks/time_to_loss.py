"""Time to a target validation loss: a plain PyTorch + AdamW loop vs lmlab's AdamW, Muon and best recipe.

The same model code (lmlab's ``Decoder``, seeded init), the same data (the ``stories`` world, the same
windows in the same order for every variant of a seed) and the same token budget, trained by

- **baseline**: a nanoGPT-style loop written here: ``F.cross_entropy`` on the logits, ``torch.optim.AdamW``
  (weight decay on every matrix, embeddings included, as nanoGPT does), linear warmup then cosine to
  0.1×, clipping at 1;
- **lmlab_adamw**: the product's ``Trainer.train_step`` with AdamW at the baseline's settings;
- **lmlab_muon**: the same with ``optim.name: muon`` (Muon on the block matrices, AdamW on the rest);
- **best**: lmlab's best recipe: Muon + qk-norm + a WSD schedule with a 1−sqrt cooldown + z-loss 1e-4,
  with its own (shorter) step horizon ``--best-horizon`` × the budget, as speedruns tune theirs; bf16
  autocast (``--best-precision``; the baseline keeps float32, as nanoGPT does on a CPU) and the fused
  head + loss (``objective.loss_impl=fused``).

Validation loss is measured every ``--eval-every`` steps on a fixed set, outside the timed region; wall
time counts only optimizer steps. The target defaults to the worst final baseline loss over the seeds,
so every baseline run reaches it; tokens and seconds to the target are interpolated linearly between
evaluations. Each variant's ratio to the baseline of the same seed is reported as mean ± 95% CI.

    python benchmarks/time_to_loss.py --seeds 0,1,2 --json time_to_loss.json
    python benchmarks/time_to_loss.py --lr-scan 1e-3,2e-3,4e-3,8e-3 --seeds 0   # pick the learning rates
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmlab.config import RunConfig, load_config  # noqa: E402
from lmlab.data.pipeline import prepare_run_data  # noqa: E402
from lmlab.data.sampler import WindowSampler, eval_batches  # noqa: E402
from lmlab.data.shards import TokenShards  # noqa: E402
from lmlab.errors import UserError  # noqa: E402
from lmlab.eval.perplexity import evaluate_lm  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.objectives.lm_objective import build_lm_loss  # noqa: E402
from lmlab.recipes.pretrain import LMBatches  # noqa: E402
from lmlab.train.loop import Trainer  # noqa: E402
from lmlab.train.schedule import lr_at  # noqa: E402

VARIANTS = ("baseline", "lmlab_adamw", "lmlab_muon", "best")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/time_to_loss.py", description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (init and data order)")
    p.add_argument("--steps", type=int, default=300, help="the token budget, in optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the world")
    p.add_argument("--docs", type=int, default=30000, help="documents of the stories world")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (every variant)")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="baseline and lmlab_adamw peak LR")
    p.add_argument("--muon-lr", type=float, default=3e-3, help="lmlab_muon and best: optim.lr (match_rms_adamw)")
    p.add_argument("--best-horizon", type=float, default=0.6, help="best recipe's steps as a fraction of --steps")
    p.add_argument(
        "--best-precision", choices=("bf16", "fp32"), default="bf16", help="best recipe's train.precision (autocast)"
    )
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--target", type=float, default=None, help="default: the worst final baseline loss")
    p.add_argument("--lr-scan", default=None, help="comma list of LRs: final loss of baseline and lmlab_muon per LR")
    p.add_argument("--speed-reps", type=int, default=7, help="interleaved repetitions timing the step (0: skip)")
    p.add_argument("--speed-steps", type=int, default=4, help="timed steps per repetition")
    p.add_argument("--speed-warmup", type=int, default=3, help="discarded steps before timing")
    p.add_argument("--from-json", default=None, help="reuse the curves of an earlier --json; only time the steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = common.parse_list(args.variants, VARIANTS, "variant")
    args.seeds = [int(s) for s in common.parse_list(args.seeds)]
    if args.steps < 2 or args.eval_every < 1 or not 0 < args.best_horizon <= 1:
        raise UserError("need --steps >= 2, --eval-every >= 1 and 0 < --best-horizon <= 1")
    return args


def run_config(args: argparse.Namespace, seed: int, *extra: str) -> RunConfig:
    """The lmlab config every variant shares (data, model, batch, schedule), plus ``extra`` overrides."""
    return load_config(
        None,
        [
            "data.source=synthetic", "data.synthetic.world=stories", f"data.synthetic.n_docs={args.docs}",
            "data.val_fraction=0.02", f"tokenizer.vocab_size={args.vocab}", "tokenizer.train_docs=5000",
            f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
            f"model.max_seq_len={args.seq_len}", "model.tie_embeddings=true",
            f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}", f"train.steps={args.steps}",
            f"train.seed={seed}", "train.device=cpu", "train.progress=false",
            f"optim.lr={args.adamw_lr}", "optim.weight_decay=0.1", "optim.grad_clip=1.0",
            "schedule.name=cosine", f"schedule.warmup_steps={args.warmup}", "schedule.min_lr_ratio=0.1",
            *([f"model.vocab_size={args.model_vocab}"] if getattr(args, "model_vocab", 0) else []),
            *extra,
        ],
    )  # fmt: skip


class Curve:
    """Validation loss against tokens and training seconds for one run."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def add(self, step: int, tokens: int, seconds: float, val_loss: float) -> None:
        self.points.append({"step": step, "tokens": tokens, "seconds": seconds, "val_loss": val_loss})

    def reach(self, target: float) -> dict[str, float] | None:
        """Tokens and seconds at which the loss first falls to ``target`` (linear between evaluations)."""
        for before, after in zip(self.points, self.points[1:]):
            if after["val_loss"] <= target < before["val_loss"]:
                f = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
                return {k: before[k] + f * (after[k] - before[k]) for k in ("tokens", "seconds")}
        return None


class Variant:
    """A freshly initialised model, its number of steps and ``step(i)``, one optimizer update."""

    def __init__(self, model: torch.nn.Module, steps: int, step: Callable[[int], Any], close=lambda: None):
        self.model, self.steps, self.step, self.close = model, steps, step, close


def baseline_variant(args, cfg: RunConfig, data_dir: Path, seed: int) -> Variant:
    """A nanoGPT-style loop: cross-entropy, AdamW (wd on matrices), warmup + cosine, clip 1."""
    torch.manual_seed(seed)
    model = Decoder(cfg.model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.adamw_lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    sampler = WindowSampler(TokenShards.open(data_dir, "train"), args.seq_len, cfg.data.seed + seed)

    def step(i: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, args.steps, args.adamw_lr, cfg.schedule)
        x, y = sampler.next_batch(args.batch)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(model, args.steps, step)


def lmlab_variant(args, cfg: RunConfig, data_dir: Path, seed: int) -> Variant:
    """The product's ``Trainer.train_step`` with the LM objective of ``cfg``."""
    torch.manual_seed(seed)
    model = Decoder(cfg.model)
    sampler = WindowSampler(TokenShards.open(data_dir, "train"), args.seq_len, cfg.data.seed + seed)
    run_dir = tempfile.TemporaryDirectory()  # never written: nothing is checkpointed
    trainer = Trainer(
        cfg, Path(run_dir.name), model, LMBatches(sampler), build_lm_loss(cfg.objective), device=torch.device("cpu")
    )
    return Variant(model, cfg.train.steps, lambda i: trainer.train_step(), run_dir.cleanup)


def build_variant(name: str, args, seed: int, data_dir: Path, lr: float | None = None) -> Variant:
    if name == "baseline":
        if lr is not None:
            args = argparse.Namespace(**{**vars(args), "adamw_lr": lr})
        return baseline_variant(args, run_config(args, seed), data_dir, seed)
    if name == "lmlab_adamw":
        return lmlab_variant(args, run_config(args, seed), data_dir, seed)
    muon = ["optim.name=muon", f"optim.lr={lr if lr is not None else args.muon_lr}"]
    if name == "lmlab_muon":
        return lmlab_variant(args, run_config(args, seed, *muon), data_dir, seed)
    return lmlab_variant(args, run_config(args, seed, *best_overrides(args)), data_dir, seed)


def best_overrides(args: argparse.Namespace) -> list[str]:
    """lmlab's best recipe, as config overrides on top of ``run_config``."""
    steps = max(args.warmup + 1, round(args.best_horizon * args.steps))
    return [
        "optim.name=muon", f"optim.lr={args.muon_lr}", "model.attention.qk_norm=true", "objective.z_loss=1e-4",
        f"train.steps={steps}", "schedule.name=wsd", "schedule.decay_fraction=0.4", "schedule.decay_shape=sqrt",
        "schedule.min_lr_ratio=0.0", f"train.precision={args.best_precision}", "objective.loss_impl=fused",
    ]  # fmt: skip


def run_variant(name: str, args, seed: int, data_dir: Path, lr: float | None = None) -> Curve:
    """Train one variant for its steps, evaluating every ``--eval-every`` steps (outside the timed region)."""
    variant = build_variant(name, args, seed, data_dir, lr)
    val = list(eval_batches(TokenShards.open(data_dir, "val"), args.seq_len, args.batch, args.eval_tokens))
    curve, seconds, model = Curve(), 0.0, variant.model

    def evaluate(i: int) -> None:
        model.eval()
        with torch.no_grad():
            loss = evaluate_lm(model, val, torch.device("cpu"))["val_loss"]
        model.train()
        curve.add(i, i * args.batch * args.seq_len, seconds, loss)

    try:
        evaluate(0)
        for i in range(variant.steps):
            start = time.perf_counter()
            variant.step(i)
            seconds += time.perf_counter() - start
            if (i + 1) % args.eval_every == 0 or i + 1 == variant.steps:
                evaluate(i + 1)
    finally:
        variant.close()
    return curve


def step_seconds(names: list[str], args, data_dir: Path) -> dict[str, list[float]]:
    """Seconds per optimizer step of each variant, timed in interleaved repetitions (A B C D A B C D …).

    Each repetition times ``--speed-steps`` steps of every variant in turn, after ``--speed-warmup`` discarded
    ones, so a machine shared with other work slows all of them alike; the median is what the time-to-target
    figures use.
    """
    variants = {name: build_variant(name, args, 0, data_dir) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for variant in variants.values():
            for i in range(args.speed_warmup):
                variant.step(i)
        for rep in range(args.speed_reps):
            for name, variant in variants.items():
                first = args.speed_warmup + rep * args.speed_steps
                start = time.perf_counter()
                for i in range(first, first + args.speed_steps):
                    variant.step(i)
                times[name].append((time.perf_counter() - start) / args.speed_steps)
    finally:
        for variant in variants.values():
            variant.close()
    return times


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def lr_scan(args, data_dir: Path) -> dict[str, Any]:
    lrs = [float(x) for x in common.parse_list(args.lr_scan)]
    rows, out = [], {}
    for name in ("baseline", "lmlab_muon"):
        for lr in lrs:
            losses = [run_variant(name, args, seed, data_dir, lr).points[-1]["val_loss"] for seed in args.seeds]
            out[f"{name}@{lr:g}"] = losses
            rows.append([name, f"{lr:g}", f"{statistics.fmean(losses):.4f}"])
            print(f"{name} lr={lr:g}: final val loss {statistics.fmean(losses):.4f}", file=sys.stderr, flush=True)
    print(common.markdown_table(["variant", "lr", "final val loss"], rows))
    return {"lr_scan": out}


def load_curves(path: str) -> dict[str, dict[int, Curve]]:
    """The curves of an earlier run's ``--json`` (to time the steps again without retraining)."""
    curves: dict[str, dict[int, Curve]] = {}
    for name, by_seed in json.loads(Path(path).read_text())["curves"].items():
        for seed, points in by_seed.items():
            curve = curves.setdefault(name, {})[int(seed)] = Curve()
            curve.points = points
    return curves


def summarise(curves: dict[str, dict[int, Curve]], target: float, step_time: dict[str, float], tokens_per_step: int):
    """Per variant: final loss, tokens to target, and time to target = steps to target × median step time
    (``time_ratio``), next to the raw cumulative step time of the run itself (``raw_time_ratio``)."""
    rows, summary = [], {}
    for name, by_seed in curves.items():
        reached = {s: c.reach(target) for s, c in by_seed.items()}
        finals = [c.points[-1]["val_loss"] for c in by_seed.values()]
        entry: dict[str, Any] = {"final_val_loss": mean_ci(finals), "reached": reached}
        ok = [s for s, r in reached.items() if r is not None]
        seconds = {s: reached[s]["tokens"] / tokens_per_step * step_time[name] for s in ok} if name in step_time else {}
        entry["seconds_to_target"] = seconds
        if "baseline" in curves and ok:
            base = {s: curves["baseline"][s].reach(target) for s in ok}
            both = [s for s in ok if base[s] is not None]
            entry["token_ratio"] = mean_ci([reached[s]["tokens"] / base[s]["tokens"] for s in both])
            entry["raw_time_ratio"] = mean_ci([reached[s]["seconds"] / base[s]["seconds"] for s in both])
            if seconds and "baseline" in step_time:
                speed = step_time[name] / step_time["baseline"]
                entry["time_ratio"] = mean_ci([reached[s]["tokens"] / base[s]["tokens"] * speed for s in both])
        summary[name] = entry
        tokens = [r["tokens"] for r in reached.values() if r]
        ratio = "{:.2f}× ± {:.2f}".format
        rows.append([
            name, f"{len(ok)}/{len(by_seed)}", "{:.4f} ± {:.4f}".format(*entry["final_val_loss"]),
            f"{statistics.fmean(tokens):,.0f}" if tokens else "-",
            f"{1000 * step_time[name]:.0f}" if name in step_time else "-",
            f"{statistics.fmean(seconds.values()):.1f}" if seconds else "-",
            ratio(*entry["token_ratio"]) if "token_ratio" in entry else "-",
            ratio(*entry["time_ratio"]) if "time_ratio" in entry else "-",
            ratio(*entry["raw_time_ratio"]) if "raw_time_ratio" in entry else "-",
        ])  # fmt: skip
    headers = ["variant", "reached", "final val loss", "tokens to target", "ms / step (interleaved median)",
               "seconds to target", "tokens vs baseline", "time vs baseline", "raw run time vs baseline"]  # fmt: skip
    return summary, common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir, tokenizer = prepare_run_data(run_config(args, 0))
    args.model_vocab = tokenizer.vocab_size
    result: dict[str, Any] = {"command": common.command_line(), "args": {k: v for k, v in vars(args).items()}}
    if args.lr_scan:
        result.update(lr_scan(args, data_dir))
        common.write_json(args.json, result)
        return 0
    if args.from_json:
        curves = load_curves(args.from_json)
    else:
        curves = {name: {} for name in args.variants}
        for seed in args.seeds:
            for name in args.variants:  # interleaved: one run of each variant per seed
                curves[name][seed] = run_variant(name, args, seed, data_dir)
                last = curves[name][seed].points[-1]
                print(f"seed {seed} {name}: val {last['val_loss']:.4f} after {last['seconds']:.1f} s", file=sys.stderr)
    if args.target is not None:
        target = args.target
    elif "baseline" in curves:
        target = max(c.points[-1]["val_loss"] for c in curves["baseline"].values())
    else:
        raise UserError("give --target when the baseline is not among --variants")
    times = step_seconds(list(curves), args, data_dir) if args.speed_reps > 0 else {}
    step_time = {name: statistics.median(t) for name, t in times.items()}
    summary, table = summarise(curves, target, step_time, args.batch * args.seq_len)
    result.update(target=target, step_seconds=times, summary=summary)
    result["curves"] = {n: {s: c.points for s, c in by_seed.items()} for n, by_seed in curves.items()}
    print(
        f"target validation loss {target:.4f} ({len(next(iter(curves.values())))} seeds; ± is the 95% CI of the mean)"
    )
    print(table)
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
