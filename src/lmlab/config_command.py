"""``lmlab config show|validate CONFIG [key=value ...]``: the resolved config, or whether it is valid."""

from __future__ import annotations

import argparse

from lmlab.config import dump_yaml, load_config


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
