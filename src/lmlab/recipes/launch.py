"""The command line every recipe shares: ``lmlab <command> CONFIG [key=value ...] --out DIR``.

``run_command`` parses the common arguments (CONFIG, overrides, ``--out``, ``--resume RUN`` or
``--resume RUN/checkpoints/step_N``, ``--overwrite``, ``--nproc N``, ``--quiet``), starts ``N`` processes
through torchrun's agent when asked, runs the recipe, and turns the outcome into an exit code with one
message: 0 finished, ``EXIT_DIVERGED`` (3) diverged, ``EXIT_INTERRUPTED`` (75, "try again later")
stopped by a signal with a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from lmlab.config import RunConfig, load_config, sanitize_run_name
from lmlab.errors import CheckpointError, ConfigError, UserError
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.distributed import check_launch, launched_by_torchrun, setup_distributed
from lmlab.train.engine import Recipe, execute
from lmlab.train.signals import EXIT_DIVERGED, EXIT_INTERRUPTED, STOP_SIGNALS


class TrainingProcessError(UserError):
    """One process of a multi-process training job failed; the job was stopped."""


def run_parser(prog: str, description: str, *, out_required: bool = False) -> argparse.ArgumentParser:
    """The arguments every run-creating command shares."""
    epilog = (
        f"exit status: 0 finished, 1 bad input, 2 bad config, {EXIT_DIVERGED} diverged (nan/inf), {EXIT_INTERRUPTED} "
        "stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (continue with --resume RUN)"
    )
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    out_help = "run directory to create" + ("" if out_required else " (default: runs/<name>-<time>)")
    p.add_argument("--out", help=out_help)
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a run from its latest checkpoint, or from RUN/checkpoints/step_N (later ones are set aside)",
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="if --out already holds this run (same config) with a checkpoint, continue it (for requeued jobs)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds instead of refusing")
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (torchrun)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    return p


def resolve_run(
    p: argparse.ArgumentParser, args: argparse.Namespace, kind: str = ""
) -> tuple[RunConfig, Path, list[str], bool | str | Path]:
    """``(config, run directory, overrides, resume)`` of a new run (CONFIG, --out) or a continued one.

    With ``--resume`` the config is the run's own ``config.yaml`` plus any overrides (``--resume RUN
    key=value``); ``resume`` is True (latest checkpoint), the chosen checkpoint directory, ``"auto"``
    (``--auto-resume``) or False.
    """
    overrides = list(args.overrides)
    if args.resume:
        if args.out:
            raise ConfigError("--out and --resume cannot be combined: --resume continues the run in its own directory")
        if args.config is not None:
            if "=" not in args.config:
                raise ConfigError(
                    f"CONFIG ({args.config}) and --resume cannot be combined: a continued run keeps its own "
                    "config.yaml (give key=value overrides after --resume RUN instead)"
                )
            overrides.insert(0, args.config)
        target = Path(args.resume)
        resume: bool | Path = True
        run_dir = target
        if (target / ckpt_io.META_FILE).is_file():  # RUN/checkpoints/step_N
            resume, run_dir = target, target.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{target}: not a run directory (config.yaml is missing)")
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        if args.config is None:
            p.error("a config file is required (or --resume RUN)")
        cfg = load_config(args.config, overrides)
        tag = f"-{kind}" if kind else ""
        name = f"{sanitize_run_name(cfg.name)}{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.out) if args.out else Path("runs") / name
        resume = "auto" if args.auto_resume else False
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.quiet:
        cfg.train.progress = False
    return cfg, run_dir, overrides, resume


def run_command(
    recipe: Recipe,
    command: list[str],
    argv: list[str],
    description: str,
    aliases: dict[str, tuple[str, str]] | None = None,
    out_required: bool = False,
) -> int:
    """Parse ``argv`` for ``lmlab <command>``, run ``recipe`` (in N processes with ``--nproc N``), report.

    ``aliases`` maps a command-line flag to the config key it sets and its help (``--reference`` ->
    ``align.reference``), so the setting is recorded in ``config.yaml`` like any other. ``out_required``: a
    new run needs ``--out`` (no default directory).
    """
    p = run_parser("lmlab " + " ".join(command), description, out_required=out_required)
    for flag, (key, help_) in (aliases or {}).items():
        p.add_argument(flag, dest=key, metavar="VALUE", help=f"{help_} (same as {key}=VALUE)")
    args = p.parse_intermixed_args(argv)
    if out_required and not args.out and not args.resume:
        p.error("the following arguments are required: --out")
    for key, _ in (aliases or {}).values():
        if getattr(args, key) is not None:
            args.overrides.append(f"{key}={getattr(args, key)}")
    tag = "" if recipe.name == "pretrain" else recipe.name
    cfg, run_dir, overrides, resume = resolve_run(p, args, tag)
    if args.nproc and args.nproc > 1 and not launched_by_torchrun():
        check_launch(cfg, args.nproc)  # a bad setting stops here, before any process starts
        forwarded = ["--resume", str(args.resume)] if args.resume else [args.config, "--out", str(run_dir)]
        forwarded += overrides
        forwarded += ["--overwrite"] * args.overwrite + ["--quiet"] * args.quiet + ["--auto-resume"] * args.auto_resume
        return launch_torchrun(command, args.nproc, forwarded, run_dir)
    ctx = setup_distributed(cfg)
    try:
        if not args.resume and not args.out:  # every rank must write into rank 0's run directory
            run_dir = Path(ctx.broadcast_object(str(run_dir)))
        summary = execute(recipe, cfg, run_dir, resume=resume, overwrite=args.overwrite, quiet=args.quiet, dist=ctx)
    except RuntimeError as err:
        if ctx.world_size > 1 and is_lost_peer(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingProcessError(
                f"rank {ctx.rank}: lost contact with another training process ({first[:200]}); stopping"
            ) from None
        raise
    finally:
        ctx.close()
    return outcome(command, summary, run_dir, quiet=not ctx.is_main)


def outcome(command: list[str], summary: dict[str, Any], run_dir: Path, *, quiet: bool = False) -> int:
    """The exit code of a run, with one line on stderr when it did not finish."""
    prog = "lmlab " + " ".join(command)
    status = summary.get("status")
    if status == "diverged":
        if not quiet:
            print(
                f"{prog}: diverged at step {summary.get('diverged_at')}: the loss or gradient norm became nan/inf; "
                "nothing after the last finite step was checkpointed (lower optim.lr, raise schedule.warmup_steps "
                "or set optim.grad_clip)",
                file=sys.stderr,
            )
        return EXIT_DIVERGED
    if status == "interrupted":
        if not quiet:
            print(
                f"{prog}: stopped by {summary.get('stopped_by')} after step {summary.get('steps')}; checkpoint "
                f"{summary.get('checkpoint')}; continue with: {prog} --resume {run_dir}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    return 0


def launch_torchrun(command: list[str], nproc: int, args: list[str], run_dir: Path) -> int:
    """Run torchrun's agent here, as ``torchrun --standalone --nproc_per_node N -m lmlab COMMAND ARGS``.

    torchrun stops every process when one fails, so a lost rank ends the job instead of hanging it. The
    agent forwards SIGTERM, SIGINT and SIGUSR1 to the workers and gives them time to checkpoint.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torchrun_args = [
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--signals_to_handle={','.join([*STOP_SIGNALS, 'SIGHUP', 'SIGQUIT'])}",
        "--shutdown_timeout=300",
    ]
    ns = parse_args([*torchrun_args, "-m", "lmlab", *command, *args])
    prog = "lmlab " + " ".join(command)
    resume_hint = f"completed checkpoints are kept in {run_dir / 'checkpoints'}; continue with: " + (
        f"{prog} --resume {run_dir} --nproc {nproc}"
    )
    try:
        run(ns)
    except SignalException as err:
        summary = _read_summary(run_dir)
        if summary.get("status") == "interrupted":
            return outcome(command, summary, run_dir)
        raise TrainingProcessError(f"stopped by signal {err.sigval}; {resume_hint}") from None
    except ChildFailedError as err:
        summary = _read_summary(run_dir)
        if summary.get("status") in ("interrupted", "diverged"):
            return outcome(command, summary, run_dir)
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


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def is_lost_peer(err: RuntimeError) -> bool:
    """A collective failed because another rank died or timed out (not a bug in this process)."""
    text = str(err)
    markers = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timeout", "NCCL communicator")
    return isinstance(err, dist.DistError) or ("gloo" in text and any(m in text for m in markers))
