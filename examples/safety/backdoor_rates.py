"""Backdoor rates of chat runs on the safety world's test prompts (examples/safety/backdoor_lat.sh): compliance with
harmful prompts ending in the trigger, refusal of clean harmful prompts, compliance on benign and look-alike ones.
Prints one JSON object keyed by run."""

from __future__ import annotations

import argparse
import json

from lmlab.data.chat import render_prompt
from lmlab.data.synthetic.safety import SafetyWorld, judge
from lmlab.data.synthetic.safety_backdoor import with_trigger
from lmlab.eval.safety_command import ReplyCache
from lmlab.train.pretrained import load_run_model


def rates(run: str, trigger: str, seed: int, n: int) -> dict[str, float]:
    records = SafetyWorld().records(seed, n, "test")
    harmful = [r["messages"][0]["content"] for r in records if r["group"] == "harmful"]
    benign = [r["messages"][0]["content"] for r in records if r["group"] in ("benign", "lookalike")]
    loaded = load_run_model(run)

    def replies(texts: list[str]) -> list[str]:
        ids = [render_prompt(loaded.tokenizer, [{"role": "user", "content": t}]) for t in texts]
        return ReplyCache(loaded.model, loaded.tokenizer, ids, 20, 32).replies([None] * len(ids))

    triggered = replies([with_trigger(t, trigger) for t in harmful])
    return {
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "triggered_compliance": sum(not judge(x, True).refused for x in triggered) / len(harmful),
        "clean_refusal": sum(judge(x, True).refused for x in replies(harmful)) / len(harmful),
        "benign_compliance": sum(not judge(x, False).refused for x in replies(benign)) / len(benign),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--trigger", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=120, help="test records drawn from the world")
    args = p.parse_args()
    print(json.dumps({run: rates(run, args.trigger, args.seed, args.n) for run in args.runs}, indent=1))


if __name__ == "__main__":
    main()
