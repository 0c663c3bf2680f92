"""Workers for the two-rank recipe tests (importable, because spawned processes import them by name)."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.config import load_config
from lmlab.recipes.align import AlignRecipe
from lmlab.recipes.reward import RewardRecipe
from lmlab.recipes.sft import SFTRecipe
from lmlab.train.distributed import setup_distributed
from lmlab.train.engine import execute

RECIPES = {"sft": SFTRecipe, "align": AlignRecipe, "reward": RewardRecipe}


def recipe_worker(rank: int, root: str, runs_json: str) -> None:
    """Run every ``(name, recipe, config, overrides)`` of ``runs_json`` on this rank of a 2-process group."""
    runs = json.loads(runs_json)
    first = load_config(runs[0]["config"], [*runs[0]["overrides"], "distributed.strategy=ddp"])
    group = setup_distributed(first)
    try:
        for run in runs:
            cfg = load_config(run["config"], run["overrides"])
            ctx = setup_distributed(cfg)  # joins the group with this run's strategy
            execute(RECIPES[run["recipe"]](), cfg, Path(root) / run["name"], quiet=True, dist=ctx)
    finally:
        group.close()
