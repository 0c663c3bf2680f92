"""``lmlab eval passk RUN --problems FILE --checker NAME``: pass@k of a run's sampled answers, checked by a program.

Problems are JSONL rows with ``"prompt"`` (a string: one user turn, as in SFT prompt/completion records; or a
list of messages) or ``"messages"`` (a conversation; trailing assistant turns, e.g. the reference answer, are
dropped), an optional ``"answer"`` and anything else a checker wants. Prompts are rendered with the run's chat
template and answers end at its end-of-turn token; ``--prompt-format text`` instead continues the raw prompt
after EOS, as ``lmlab generate`` does (pretrained runs such as the ``preferences`` world).

A checker is ``check(problem, response) -> bool`` (``lmlab.eval.pass_at_k.Checker``): one of ``CHECKERS`` or a
``module:function`` the user names (imported from ``PYTHONPATH``). The estimate is §20's unbiased pass@k.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.chat import end_of_turn_id, render_prompt, resolve_template, validate_messages
from lmlab.data.synthetic.facts import answer_is_correct, normalize_answer
from lmlab.data.synthetic.preference_world import judge
from lmlab.data.textio import iter_lines, json_lines
from lmlab.errors import DataError, UserError
from lmlab.eval.commands import require
from lmlab.eval.pass_at_k import Checker, Problem, sample_pass_at_k
from lmlab.eval.user_code import import_function
from lmlab.safe_io import refuse_symlink, write_text_atomic
from lmlab.train.pretrained import load_model
from lmlab.train.runtime import resolve_device

# --------------------------------------------------------------------------- checkers


def prompt_text(problem: dict[str, Any]) -> str:
    """The question a problem asks: its string ``prompt``, else the content of its last user message."""
    if isinstance(problem.get("prompt"), str):
        return problem["prompt"]
    turns = problem.get("messages") or problem.get("prompt") or []
    users = [m["content"] for m in turns if m.get("role") == "user"]
    return users[-1] if users else ""


def facts_checker(problem: dict[str, Any], response: str) -> bool:
    """The facts world's exact-answer check: the attribute value appears in the reply as whole words."""
    return answer_is_correct(response, str(problem["answer"]))


def preferences_checker(problem: dict[str, Any], response: str) -> bool:
    """The preferences world's judge: the first number or colour of the reply answers the question."""
    return judge(prompt_text(problem), response).correct


def exact_checker(problem: dict[str, Any], response: str) -> bool:
    """The whole reply equals ``answer`` up to case, punctuation and spacing."""
    return normalize_answer(response) == normalize_answer(str(problem["answer"]))


@dataclass(frozen=True)
class BuiltinChecker:
    check: Checker
    needs_answer: bool
    help: str


CHECKERS: dict[str, BuiltinChecker] = {
    "facts": BuiltinChecker(facts_checker, True, "facts world: the answer's words appear in the reply"),
    "preferences": BuiltinChecker(preferences_checker, False, "preferences world: the judge of the question"),
    "exact": BuiltinChecker(exact_checker, True, "the normalised reply equals the normalised answer"),
}


def resolve_checker(name: str) -> tuple[Checker, bool]:
    """``(check, needs_answer)`` for a built-in name or a user's ``module:function``."""
    if name in CHECKERS:
        return CHECKERS[name].check, CHECKERS[name].needs_answer
    if ":" not in name:
        raise UserError(f"--checker {name!r} is unknown; use one of {', '.join(CHECKERS)} or module:function")
    check = import_function(name, "--checker")
    return check, False


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ProblemRow:
    line: int
    data: dict[str, Any]


def read_problem_rows(path: str | Path, needs_answer: bool) -> list[ProblemRow]:
    """The JSONL problems of ``path``, each checked for a prompt (and an ``answer`` when the checker reads one)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--problems {p}: no such file")
    rows = []
    for line, obj in json_lines(iter_lines(p), p):
        where = f"{p}:{line}"
        if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
            raise DataError(f"{where}: a problem is a JSON object with 'prompt' or 'messages'")
        if needs_answer and "answer" not in obj:
            raise DataError(f"{where}: the checker compares against 'answer', which this problem lacks")
        rows.append(ProblemRow(line, obj))
    if not rows:
        raise DataError(f"{p}: no problems (one JSON object per line)")
    return rows


def render_problem(row: ProblemRow, path: str | Path, tokenizer, template, prompt_format: str) -> Problem:
    """The prompt token ids of one problem: chat (the run's template, generation prompt opened) or raw text."""
    where, obj = f"{path}:{row.line}", row.data
    if prompt_format == "text":
        if not isinstance(obj.get("prompt"), str):
            raise DataError(f"{where}: --prompt-format text needs a string 'prompt'")
        return Problem(tokenizer.encode_document(obj["prompt"]), obj)
    turns = obj.get("messages", obj.get("prompt"))
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    turns = validate_messages(turns, where, need_assistant=False)
    while turns and turns[-1]["role"] == "assistant":  # the reference answer is not part of the prompt
        turns = turns[:-1]
    if not turns:
        raise DataError(f"{where}: the conversation has no turn before its answer")
    return Problem(render_prompt(tokenizer, turns, template), obj)


# --------------------------------------------------------------------------- the command


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--k must be comma-separated integers such as 1,8,64, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--k must be integers >= 1, got {text!r}")
    return ks


def passk_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval passk",
        description="Sample n answers per problem from a run, check each with a program, report unbiased pass@k.",
    )
    p.add_argument("run_dir", help="a run directory or one of its checkpoints (the latest by default)")
    p.add_argument("--problems", required=True, help="JSONL: 'prompt' or 'messages', optional 'answer'")
    p.add_argument(
        "--checker", required=True, help=f"{', '.join(CHECKERS)}, or module:function (check(problem, reply) -> bool)"
    )
    p.add_argument("--n", type=int, default=64, help="samples per problem")
    p.add_argument("--k", default="1", help="comma-separated k values, each <= n (default 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-format", choices=("chat", "text"), default="chat")
    p.add_argument("--batch-size", type=int, default=64, help="answers sampled together")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="per-problem results JSONL (n, c, pass@k, the first answer)")
    args = p.parse_args(argv)
    ks = parse_ks(args.k)
    require(args.n >= 1, "--n", args.n, ">= 1")
    if ks[-1] > args.n:
        raise UserError(f"--k {ks[-1]} exceeds --n {args.n}: pass@k needs at least k samples per problem")
    require(math.isfinite(args.temperature) and args.temperature >= 0, "--temperature", args.temperature, ">= 0")
    require(0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    require(args.top_k >= 0, "--top-k", args.top_k, ">= 0 (0 = off)")
    require(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, ">= 1")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    require(args.limit >= 0, "--limit", args.limit, ">= 0")
    if args.out:
        require(not Path(args.out).is_dir(), "--out", args.out, "a .jsonl file path, not a directory")
        refuse_symlink(args.out)
    check, needs_answer = resolve_checker(args.checker)
    rows = read_problem_rows(args.problems, needs_answer)
    rows = rows[: args.limit] if args.limit else rows
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded
    model, cfg, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    chat = args.prompt_format == "chat"
    template = resolve_template(tokenizer, cfg.sft.chat_template) if chat else None
    problems = [render_problem(r, args.problems, tokenizer, template, args.prompt_format) for r in rows]
    for row, problem in zip(rows, problems):
        if len(problem.prompt_ids) >= cfg.model.max_seq_len:
            raise DataError(
                f"{args.problems}:{row.line}: the prompt has {len(problem.prompt_ids)} tokens, which leaves no room "
                f"in the model's context of {cfg.model.max_seq_len}; shorten it or drop the problem"
            )
    result = sample_pass_at_k(
        model, tokenizer, problems, _guarded(check, args.checker), n=args.n, ks=ks,
        max_new_tokens=args.max_new_tokens, stop_id=end_of_turn_id(tokenizer) if chat else tokenizer.eos_id,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    summary = dict(result.summary)
    if args.out:
        lines = [json.dumps({"line": rows[r["index"]].line, **r}) + "\n" for r in result.per_problem]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        summary["per_problem"] = str(write_text_atomic(args.out, "".join(lines)))
    print(json.dumps(summary))
    return 0


def _guarded(check: Checker, name: str) -> Callable[[dict[str, Any], str], bool]:
    """A checker whose own ``KeyError`` (a field the problem lacks) is a user error naming it."""

    def run(problem: dict[str, Any], response: str) -> bool:
        try:
            return bool(check(problem, response))
        except KeyError as err:
            raise UserError(f"--checker {name} needs the field {err} in every problem") from None

    return run
