"""``lmlab safety <action>``: the safety lab's data, attack and defense commands (docs/science.md §29), a map from
action to the function that runs it."""

from __future__ import annotations

import importlib
import sys

ACTIONS: dict[str, tuple[str, str]] = {
    "overgenerate": ("lmlab.recipes.porover:overgenerate_main", "POROver: sample a teacher, keep judged replies"),
    "pairs": ("lmlab.recipes.porover:pairs_main", "POROver: comply/refuse preference pairs for `lmlab align`"),
    "gcg": ("lmlab.eval.attack_command:gcg_main", "GCG and random adversarial suffixes; attack success rate"),
    "filter": ("lmlab.eval.attack_command:filter_main", "the perplexity filter: detection, false positives, ROC"),
    "retokenize": ("lmlab.eval.attack_command:retokenize_main", "BPE-dropout re-segmentation vs attacks"),
    "lat": ("lmlab.recipes.lat:lat_main", "targeted latent adversarial training (residual-stream PGD)"),
}


def _usage() -> str:
    width = max(map(len, ACTIONS))
    lines = ["usage: lmlab safety <action> [args]", "", "actions:"]
    return "\n".join(lines + [f"  {k.ljust(width)}  {h}" for k, (_, h) in ACTIONS.items()])


def safety_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in ACTIONS:
        print(f"lmlab safety: unknown action '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = ACTIONS[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv[1:]) or 0)
