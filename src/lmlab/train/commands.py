"""CLI entry points for training-related commands: ``train``, ``config``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lmlab.config import RunConfig, dump_yaml, load_config
from lmlab.errors import CheckpointError, UserError


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every run-creating command shares: CONFIG, overrides, --out, --resume, --quiet."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--out", help="run directory to create (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    return p


def resolve_run(
    p: argparse.ArgumentParser, args: argparse.Namespace, kind: str = ""
) -> tuple[RunConfig, Path, list[str]]:
    """``(config, run directory, overrides)`` of a new run (CONFIG, --out) or a resumed one (--resume DIR).

    On resume the config is the run's own ``config.yaml`` plus any overrides (``lmlab X --resume DIR key=value``:
    the positional is then an override). ``kind`` tags the default run directory's name.
    """
    overrides = list(args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if args.config is not None:
            overrides.insert(0, args.config)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{run_dir}: not a run directory (config.yaml is missing)")
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        if args.config is None:
            p.error("a config file is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides)
        tag = f"-{kind}" if kind else ""
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quiet:
        cfg.train.progress = False
    return cfg, run_dir, overrides


def train_main(argv: list[str]) -> int:
    p = run_parser(
        "lmlab train",
        "Pretrain a decoder from a YAML config. Overrides: dotted key=value after the config "
        "(e.g. optim.lr=3e-4 train.steps=200). Several processes: --nproc N, or run under torchrun "
        "(torchrun --nproc_per_node N -m lmlab train CONFIG ...); see docs/distributed.md.",
    )
    p.add_argument(
        "--nproc", type=int, metavar="N", help="train with N processes on this machine (runs torchrun --standalone)"
    )
    args = p.parse_intermixed_args(argv)

    from lmlab.train.distributed import check_launch, launched_by_torchrun, setup_distributed
    from lmlab.train.pretrain import run_pretraining

    cfg, run_dir, overrides = resolve_run(p, args)
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and not launched_by_torchrun():
        check_launch(cfg, args.nproc)  # a bad setting stops here, before any process starts
        forwarded = ["--resume", str(run_dir)] if args.resume else [args.config, "--out", str(run_dir)]
        forwarded += overrides
        if args.quiet:
            forwarded.append("--quiet")
        return launch_torchrun(args.nproc, forwarded, run_dir)
    ctx = setup_distributed(cfg)
    try:
        if not args.resume and not args.out:  # every rank must write into rank 0's run directory
            run_dir = Path(ctx.broadcast_object(str(run_dir)))
        summary = run_pretraining(cfg, run_dir, resume=bool(args.resume), quiet=args.quiet, dist=ctx)
    except RuntimeError as err:
        if ctx.world_size > 1 and is_lost_peer(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingProcessError(
                f"rank {ctx.rank}: lost contact with another training process ({first[:200]}); stopping"
            ) from None
        raise
    finally:
        ctx.close()
    return 3 if summary["status"] == "diverged" else 0


def launch_torchrun(nproc: int, train_args: list[str], run_dir: Path) -> int:
    """Run torchrun's agent here, as ``torchrun --standalone --nproc_per_node N -m lmlab train ARGS``.

    torchrun stops every process when one fails, so a lost rank ends the job instead of hanging
    it; the checkpoints already written are complete (atomic) and the run resumes from the latest.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "lmlab", "train", *train_args])
    resume_hint = f"completed checkpoints are kept in {run_dir / 'checkpoints'}; continue with: " + (
        f"lmlab train --resume {run_dir} --nproc {nproc}"
    )
    try:
        run(args)
    except SignalException as err:
        raise TrainingProcessError(f"stopped by signal {err.sigval}; {resume_hint}") from None
    except ChildFailedError as err:
        # The root cause: a process killed by a signal other than the SIGTERM torchrun sends the rest.
        killed = [(r, f) for r, f in sorted(err.failures.items()) if f.exitcode < 0 and f.exitcode != -15]
        rank, failure = killed[0] if killed else err.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        )
        raise TrainingProcessError(
            f"a training process failed: rank {rank} {how} (see its message above, if any), and the job of "
            f"{nproc} processes was stopped; {resume_hint}"
        ) from None
    return 0


def is_lost_peer(err: RuntimeError) -> bool:
    """A collective failed because another rank died or timed out (not a bug in this process)."""
    import torch.distributed as dist

    text = str(err)
    markers = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timeout", "NCCL communicator")
    return isinstance(err, dist.DistError) or ("gloo" in text and any(m in text for m in markers))


class TrainingProcessError(UserError):
    """One process of a multi-process training job failed; the job was stopped."""


def config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab config", description="Show or validate a resolved config.")
    sub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("show", "print the resolved config as YAML"), ("validate", "check a config; exit 2 if bad")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config")
        s.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.action == "show":
        print(dump_yaml(cfg), end="")
    else:
        print(f"{args.config}: ok")
    return 0
