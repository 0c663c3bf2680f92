"""``lmlab eval compare``: judge runs' answers to the same prompts in pairs; win rates and a Bradley-Terry table.

Each contestant is a run directory (its answers are generated here) or a file of ready answers
(``--generations NAME=FILE``: JSONL rows with ``prompt`` and ``response``/``completion``, e.g. an align run's
``samples.jsonl`` or any other model's outputs). Every compared pair is judged in both orders
(``pairwise.combine_orders``). Two contestants give the first one's win rate with a Wilson interval;
three or more give Bradley-Terry scores with intervals and the win-rate matrix. ``--pairs-per-prompt`` and
``--comparisons`` judge an incomplete design, so many runs can be ranked from few judgements.

Prompts are text (``{"prompt": "..."}``: continued after EOS, like ``lmlab generate``) or chat
(``{"messages": [...]}`` or a list-valued ``prompt``: rendered with the run's chat template, a trailing
assistant turn dropped), the conventions of ``lmlab.data.preference``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.data.chat import end_of_turn_id, render_prompt
from lmlab.data.textio import read_text
from lmlab.errors import UserError
from lmlab.eval.answer_files import Prompt, PromptItem, read_generations, read_prompts, shared_prompts
from lmlab.eval.commands import require
from lmlab.eval.judges import COMPARISON_TEMPLATE, check_template, load_judge
from lmlab.eval.pairwise import bradley_terry, combine_orders, comparison_design, position_bias, win_matrix, win_rate
from lmlab.models.generation import generate
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_model
from lmlab.train.runtime import resolve_device


@dataclass(frozen=True)
class Contestant:
    name: str
    run_dir: Path | None = None
    answers: dict[tuple[str, int], str] | None = None  # PromptItem.key -> answer, for --generations


def parse_contestants(
    runs: Sequence[str], generations: Sequence[str]
) -> tuple[list[Contestant], list[list[PromptItem]]]:
    """Contestants in command-line order (runs, then generations files), and each file's prompts."""
    contestants: list[Contestant] = []
    file_prompts: list[list[PromptItem]] = []
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            raise UserError(f"run directory not found: {run}")
        contestants.append(Contestant(path.name or str(path), run_dir=path))
    if len({c.name for c in contestants}) < len(contestants):  # same basename: tell them apart by the path
        contestants = [Contestant(str(c.run_dir), run_dir=c.run_dir) for c in contestants]
    for spec in generations:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise UserError(f"--generations {spec!r}: expected NAME=FILE.jsonl")
        items, answers = read_generations(file)
        contestants.append(Contestant(name, answers=answers))
        file_prompts.append(items)
    names = [c.name for c in contestants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"contestant name {duplicates[0]!r} is used twice; give --generations files other names")
    if len(contestants) < 2:
        raise UserError("give at least two contestants: run directories and/or --generations NAME=FILE.jsonl")
    return contestants, file_prompts


# --------------------------------------------------------------------------- answers


@torch.no_grad()
def generate_answers(
    run_dir: Path, prompts: Sequence[Prompt], *, device, max_new_tokens: int, temperature: float, seed: int
) -> tuple[list[str], int]:
    """The run's answer to each prompt (text prompts after EOS, stopping at EOS; chat prompts in its chat
    template, stopping at the end of the turn), and how many prompts were cut from the left to fit."""
    model, cfg, tokenizer = load_model(run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{run_dir}: the run has no tokenizer.json")
    limit = cfg.model.max_seq_len
    budget = min(max_new_tokens, limit - 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    answers, truncated = [], 0
    for prompt in prompts:
        if isinstance(prompt, str):
            ids, stop = tokenizer.encode_document(prompt), tokenizer.eos_id
        else:
            ids, stop = render_prompt(tokenizer, prompt), end_of_turn_id(tokenizer)
        if len(ids) + budget > limit:
            ids = ids[len(ids) + budget - limit :]
            truncated += 1
        new = generate(model, ids, max_new_tokens=budget, temperature=temperature, eos_id=stop, generator=gen)
        if new and new[-1] == stop:
            new = new[:-1]
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers, truncated


# --------------------------------------------------------------------------- judging and summary


def judge_design(judge, prompts: Sequence[PromptItem], answers, design, names: Sequence[str]) -> list[dict]:
    """One row per ``(prompt, i, j)`` of ``design``: the two answers, P(first better) in each order and the
    combined verdict; ``answers[c][p]`` is contestant c's answer to prompt p."""
    rows = []
    for p, i, j in design:
        a, b = answers[i][p], answers[j][p]
        text = prompts[p].text
        p_ab, p_ba = float(judge(text, a, b)), float(judge(text, b, a))
        verdict = combine_orders(p_ab, p_ba)
        rows.append(
            {
                "prompt_index": p,
                "prompt": prompts[p].prompt,
                "a": names[i],
                "b": names[j],
                "answer_a": a,
                "answer_b": b,
                "p_first_ab": p_ab,
                "p_first_ba": p_ba,
                "p_a": verdict.p_a,
                "outcome": verdict.outcome,
                "consistent": verdict.consistent,
            }
        )
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def summarize(names: Sequence[str], rows: Sequence[dict], *, confidence: float, prior: float) -> dict[str, Any]:
    """The JSON summary: position bias; the first contestant's win rate over the second (two contestants) or
    the Bradley-Terry table and win-rate matrix (three or more)."""
    index = {n: k for k, n in enumerate(names)}
    bias = position_bias([(r["p_first_ab"], r["p_first_ba"]) for r in rows])
    # two identical answers can only be judged by position: they say nothing about consistency
    different = [(r["p_first_ab"], r["p_first_ba"]) for r in rows if r["answer_a"] != r["answer_b"]]
    out: dict[str, Any] = {
        "comparisons": len(rows),
        "judgements": 2 * len(rows),
        "identical_answers": len(rows) - len(different),
        "position_bias": {
            "first_wins": _r(bias.first_wins),
            "second_wins": _r(bias.second_wins),
            "ties": _r(bias.ties),
            "mean_p_first": _r(bias.mean_p_first),
            "consistency": _r(position_bias(different).consistency) if different else None,
        },
    }
    if len(names) == 2:
        # design pairs are (i < j), so every row has a = names[0]
        wr = win_rate([r["outcome"] for r in rows], confidence)
        out["win_rate"] = {
            "of": names[0],
            "over": names[1],
            "rate": _r(wr.rate),
            "interval": [_r(wr.low), _r(wr.high)],
            "confidence": confidence,
            "interval_method": "wilson (ties as half wins)",
            "wins": wr.wins,
            "ties": wr.ties,
            "losses": wr.losses,
            "mean_p": _r(sum(r["p_a"] for r in rows) / len(rows)),
        }
        return out
    comparisons = [(index[r["a"]], index[r["b"]], r["outcome"]) for r in rows]
    bt = bradley_terry(len(names), comparisons, prior=prior, confidence=confidence)
    rates, counts = win_matrix(len(names), comparisons)
    out["bradley_terry"] = {
        "reference": names[0],
        "prior": prior,
        "confidence": confidence,
        "interval_method": "wald, fisher information",
        "table": sorted(
            (
                {
                    "name": n,
                    "score": _r(bt.scores[k]),
                    "interval": [_r(bt.low[k]), _r(bt.high[k])],
                    "rank": int(bt.ranks[k]),
                    "comparisons": int(counts[k].sum()),
                }
                for k, n in enumerate(names)
            ),
            key=lambda row: row["rank"],
        ),
    }
    out["win_rates"] = {
        a: {b: {"rate": _r(rates[i, j]), "n": int(counts[i, j])} for j, b in enumerate(names) if j != i}
        for i, a in enumerate(names)
    }
    return out


# --------------------------------------------------------------------------- the command


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval compare",
        description="Judge runs' answers to the same prompts in pairs, each pair in both orders: the win rate of "
        "RUN1 over RUN2 with a Wilson interval, or with three or more a Bradley-Terry ranking. Prints a JSON "
        "summary.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories whose answers are generated here")
    p.add_argument(
        "--generations",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="ready answers of another contestant: JSONL with 'prompt' and 'response' (or 'completion'); repeatable",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="JSONL of prompts: 'prompt' (text or messages) or 'messages'; required with RUN directories "
        "(default with only --generations: the prompts every file answers)",
    )
    p.add_argument(
        "--judge",
        required=True,
        metavar="SPEC",
        help="'preferences' (the preferences world's judge), module:function (function(prompt, answer) -> score, "
        "higher better) or a run directory used as an LM judge (a Hugging Face model imported with "
        "'lmlab import-hf' is one)",
    )
    p.add_argument(
        "--judge-template",
        metavar="FILE",
        help="text file of the LM judge's prompt with {prompt}, {answer_a}, {answer_b}",
    )
    p.add_argument(
        "--pairs-per-prompt",
        type=int,
        metavar="K",
        help="judge this many pairs of contestants per prompt (default: all)",
    )
    p.add_argument(
        "--comparisons", type=int, metavar="N", help="judge a random N of the (prompt, pair) comparisons (default: all)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling and the choice of comparisons")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the intervals")
    p.add_argument("--prior", type=float, default=1.0, help="Bradley-Terry prior: virtual half-won games per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", metavar="FILE", help="per-comparison rows (JSONL)")
    args = p.parse_intermixed_args(argv)  # run directories may come after options
    require(
        math.isfinite(args.temperature) and args.temperature >= 0, "--temperature", args.temperature, "finite and >= 0"
    )
    require(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, ">= 1")
    require(
        args.pairs_per_prompt is None or args.pairs_per_prompt >= 1, "--pairs-per-prompt", args.pairs_per_prompt, ">= 1"
    )
    require(args.comparisons is None or args.comparisons >= 1, "--comparisons", args.comparisons, ">= 1")
    require(0 < args.confidence < 1, "--confidence", args.confidence, "in (0, 1)")
    require(math.isfinite(args.prior) and args.prior > 0, "--prior", args.prior, "finite and > 0")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; give a .jsonl file path")
    template = COMPARISON_TEMPLATE
    if args.judge_template:
        if not Path(args.judge_template).is_file():
            raise UserError(f"--judge-template file not found: {args.judge_template}")
        template = read_text(args.judge_template)
        check_template(template, f"--judge-template {args.judge_template}")
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded

    contestants, file_prompts = parse_contestants(args.runs, args.generations)
    names = [c.name for c in contestants]
    if args.prompts:
        prompts, left_out = read_prompts(args.prompts), 0
    elif any(c.run_dir is not None for c in contestants):
        raise UserError("--prompts FILE.jsonl is required to generate the answers of run directories")
    else:
        prompts, left_out = shared_prompts(file_prompts)
    design = comparison_design(len(names), len(prompts), args.pairs_per_prompt, args.comparisons, args.seed)
    answers, truncated = collect_answers(contestants, prompts, design, args, device)
    judge = load_judge(args.judge, device, template)
    rows = judge_design(judge, prompts, answers, design, names)
    summary = {
        "judge": judge.name,
        "contestants": names,
        "prompts": len(prompts),
        **({"prompts_not_in_every_file": left_out} if left_out else {}),
        **({"truncated_prompts": truncated} if truncated else {}),
        **({"judge_truncated_prompts": judge.truncated} if getattr(judge, "truncated", 0) else {}),
        **summarize(names, rows, confidence=args.confidence, prior=args.prior),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def collect_answers(contestants, prompts, design, args, device) -> tuple[list[dict[int, str]], dict[str, int]]:
    """``answers[c][p]`` for every (contestant, prompt) the design compares: looked up in a generations file
    or generated by the run; and, per run, how many prompts were cut to fit its context."""
    needed: list[set[int]] = [set() for _ in contestants]
    for p, i, j in design:
        needed[i].add(p)
        needed[j].add(p)
    answers: list[dict[int, str]] = []
    truncated: dict[str, int] = {}
    for c, want in zip(contestants, needed, strict=True):
        order = sorted(want)
        if c.answers is not None:
            missing = [prompts[p] for p in order if prompts[p].key not in c.answers]
            if missing:
                raise UserError(f"--generations {c.name}: no answer to the prompt at {missing[0].where}")
            answers.append({p: c.answers[prompts[p].key] for p in order})
            continue
        texts, cut = generate_answers(
            c.run_dir,
            [prompts[p].prompt for p in order],
            device=device,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        answers.append(dict(zip(order, texts, strict=True)))
        if cut:
            truncated[c.name] = cut
    return answers, truncated
