"""CLI entry points for training-related commands: ``train``, ``config``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmlab.config import dump_yaml, load_config
from lmlab.errors import CheckpointError


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab train",
        description="Pretrain a decoder from a YAML config. Overrides: dotted key=value after the config "
        "(e.g. optim.lr=3e-4 train.steps=200).",
    )
    p.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--out", help="run directory to create (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    args = p.parse_intermixed_args(argv)

    from lmlab.train.pretrain import run_pretraining

    overrides = list(args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if args.config is not None:  # `lmlab train --resume DIR key=value`: the positional is an override
            overrides.insert(0, args.config)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise CheckpointError(f"{run_dir}: not a run directory (config.yaml is missing)")
        cfg = load_config(config_path, overrides)
    else:
        if args.config is None:
            p.error("a config file is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quiet:
        cfg.train.progress = False
    summary = run_pretraining(cfg, run_dir, resume=bool(args.resume), quiet=args.quiet)
    return 3 if summary["status"] == "diverged" else 0


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
