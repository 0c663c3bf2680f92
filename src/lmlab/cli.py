"""``lmlab <command>``: a map from subcommand to a plain function.

Each entry names ``module:function``; the function takes the remaining argv and returns
an exit code. Modules are imported only when their command runs, so ``lmlab --help``
stays fast and optional dependencies stay optional. A ``UserError`` becomes one line on
stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from lmlab.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lmlab.recipes.pretrain:train_main", "train a model from a config (pretraining)"),
    "generate": ("lmlab.eval.commands:generate_main", "sample text from a run directory"),
    "eval": ("lmlab.eval.commands:eval_main", "evaluate a run: perplexity, memorization, harness, ood, safety, ..."),
    "config": ("lmlab.config_command:config_main", "show or validate a resolved config"),
    "tokenizer": ("lmlab.data.commands:tokenizer_main", "train a byte-level BPE tokenizer"),
    "data": ("lmlab.data.commands:data_main", "tokenize local files into memmap shards"),
    "sft": ("lmlab.recipes.sft:sft_main", "supervised fine-tuning on chat / prompt-completion data"),
    "align": ("lmlab.recipes.align:align_main", "preference optimization (DPO, IPO, SimPO, LN-DPO, ORPO)"),
    "safety": (
        "lmlab.recipes.safety_commands:safety_main",
        "safety lab: POROver overgenerate/pairs, GCG attacks, perplexity filter, retokenize, latent adv. training",
    ),
    "reward": ("lmlab.recipes.reward:reward_main", "train or score a reward model"),
    "unlearn": (
        "lmlab.recipes.unlearn:unlearn_main",
        "unlearn a benchmark split (NPO, GA, SimNPO, RMU, FLAT, ...); bench prepare",
    ),
    "import-hf": ("lmlab.recipes.hf_commands:import_main", "import a local Hugging Face checkpoint as a run"),
    "export-hf": ("lmlab.recipes.hf_commands:export_main", "export a run in Hugging Face format"),
    "export": ("lmlab.train.export:export_main", "consolidate a run's checkpoint into one safetensors file"),
    "merge": ("lmlab.recipes.merge_command:merge_main", "merge runs: model soups, SLERP, task arithmetic, TIES"),
    "sweep": ("lmlab.science.commands:sweep_main", "run a sweep of configs; collect results"),
    "fit": ("lmlab.science.commands:fit_main", "fit a scaling law to sweep results"),
    "predict": ("lmlab.science.commands:predict_main", "predict from a fitted law"),
    "report": ("lmlab.report.commands:report_main", "write an HTML report for a run or sweep"),
    "coord-check": ("lmlab.science.coord_check:coord_check_main", "μP coordinate check: activation sizes vs width"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lmlab <command> [args]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'lmlab <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from lmlab import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmlab: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserError as err:
        print(f"lmlab {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"lmlab {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
