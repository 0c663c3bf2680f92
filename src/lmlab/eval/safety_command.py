"""``lmlab eval safety RUN``: refusals, over-refusal and correctness of a chat model on the safety world's prompts.

Each prompt (the safety world's test split, or ``--data`` records in its format) is rendered as a user turn with
the run's chat template and answered greedily; ``lmlab.data.synthetic.safety.judge`` says whether the reply
refused and, for a prompt to comply with, whether it is correct; ``lmlab.eval.safety`` turns the verdicts into
rates per category, POROver's F1 and, with ``--thresholds``, a refusal-threshold sweep with its ROC. Steering
flags (``--threshold``, ``--refusal-bias``, ...) force the control token at the first reply position
(``lmlab.eval.refusal_steering``); without them the model decodes its own first token. A reply after a given
forced token does not depend on the threshold, so a sweep generates each (prompt, token) reply once. Writes
``safety_eval.json`` and ``safety_eval.html`` into RUN (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from lmlab.data.chat import end_of_turn_id, has_chat_template, render_prompt
from lmlab.data.rows import read_rows
from lmlab.data.synthetic.safety import CATEGORIES, SafetyWorld, judge
from lmlab.data.tokenizer import CHAT_TOKENS
from lmlab.errors import DataError, UserError
from lmlab.eval.commands import require
from lmlab.eval.refusal_steering import (
    RefusalSteering,
    add_steering_options,
    check_threshold,
    choose_control_token,
    first_position_logits,
    steering_from_args,
    steering_tokens,
)
from lmlab.eval.safety import Judged, category_rates, roc_auc, safety_summary
from lmlab.models.generation import greedy_many
from lmlab.report.figures import Line, lines_png
from lmlab.report.html import Section, esc, figure, figures, kv_table, page, table
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_run_model, run_directory
from lmlab.train.runtime import resolve_device

DEFAULT_SWEEP = tuple(round(0.05 * i, 2) for i in range(21))
N_SAMPLES = 12


def read_safety_records(path: str) -> list[dict]:
    """Records in the safety world's format (``lmlab data safety``): a user turn, ``refuse``, ``category`` and,
    for prompts to comply with, ``facts``; a record that lacks them is a ``DataError`` naming its line."""
    out = []
    for where, obj in read_rows(path, what="safety data file"):
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user":
            raise DataError(f"{where}: a safety record needs 'messages' starting with a user turn")
        if not isinstance(obj.get("refuse"), bool) or not isinstance(obj.get("category"), str):
            raise DataError(f"{where}: a safety record needs a boolean 'refuse' and a string 'category'")
        facts = obj.get("facts") or []
        if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
            raise DataError(f"{where}: 'facts' must be a list of strings")
        group = obj.get("group") or CATEGORIES.get(obj["category"]) or ("harmful" if obj["refuse"] else "benign")
        out.append({**obj, "group": group, "facts": facts})
    if not out:
        raise DataError(f"{path}: no records")
    return out


def require_chat_template(tokenizer, run: str) -> None:
    """The world's prompts are chat turns: a tokenizer with neither a chat template nor lmlab's chat tokens cannot
    render them, and is a one-line error."""
    if not has_chat_template(tokenizer):
        raise UserError(
            f"{run}: its tokenizer has no chat template and no lmlab chat tokens ({', '.join(CHAT_TOKENS)}), so the "
            "safety world's chat prompts cannot be rendered; evaluate a chat model (an lmlab sft run, or an "
            "instruct model imported with its chat template)"
        )


class ReplyCache:
    """Greedy replies per (prompt, forced control token or None), each generated once."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stops = [end_of_turn_id(tokenizer), *tokenizer.stop_ids]
        self.limit = model.cfg.max_seq_len
        self.text: dict[tuple[int, int | None], str] = {}

    def replies(self, forced: list[int | None]) -> list[str]:
        """The reply to each prompt after its forced token (None: the model's own first token)."""
        keys = [(i, t) for i, t in enumerate(forced)]
        todo = [k for k in dict.fromkeys(keys) if k not in self.text]
        inputs = [self.prompts[i] + ([] if t is None else [t]) for i, t in todo]
        budgets = [max(0, min(self.max_new_tokens, self.limit - len(ids))) for ids in inputs]
        new = greedy_many(self.model, inputs, budgets, batch_size=self.batch_size, eos_id=self.stops)
        for key, ids in zip(todo, new):
            self.text[key] = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [self.text[k] for k in keys]


def judge_all(records: list[dict], replies: list[str]) -> list[Judged]:
    """The world's judge on every reply."""
    out = []
    for rec, reply in zip(records, replies):
        v = judge(reply, rec["refuse"], rec["facts"])
        out.append(Judged(rec["category"], rec["group"], rec["refuse"], v.refused, v.correct))
    return out


def evaluate(records, cache: ReplyCache, steering: RefusalSteering | None, tokens, logits) -> dict[str, Any]:
    """Summary, per-category rates, forced-token shares and sample replies of one steering setting."""
    forced: list[int | None] = [None] * len(records)
    if steering is not None:
        forced = choose_control_token(logits, tokens, steering).token.tolist()
    replies = cache.replies(forced)
    rows = judge_all(records, replies)
    result: dict[str, Any] = {"summary": safety_summary(rows), "per_category": category_rates(rows)}
    if steering is not None:
        refusal_ids = set(tokens.refuse)
        result["forced_refusal_token_rate"] = sum(t in refusal_ids for t in forced) / len(forced)
    result["samples"] = [
        {"category": r.category, "prompt": rec["messages"][0]["content"], "reply": reply, "refused": r.refused,
         "correct": r.correct}
        for rec, reply, r in list(zip(records, replies, rows))[:N_SAMPLES]
    ]  # fmt: skip
    return result


def sweep(records, cache, base: RefusalSteering, thresholds: list[float], tokens, logits) -> dict[str, Any]:
    """The evaluation at each threshold (the other knobs as ``base``): rates per category, and the ROC."""
    points = []
    for t in thresholds:
        result = evaluate(records, cache, dataclasses.replace(base, threshold=t), tokens, logits)
        s = result["summary"]
        points.append(
            {
                "threshold": t,
                "tpr": s["tpr"],
                "fpr": s["fpr"],
                "f1": s["f1"],
                "benign_compliance_rate": None if s["fpr"] is None else 1.0 - s["fpr"],
                "forced_refusal_token_rate": result["forced_refusal_token_rate"],
                **{f"refusal_rate.{c}": v["refusal_rate"] for c, v in result["per_category"].items()},
            }
        )
    valid = [(p["fpr"], p["tpr"]) for p in points if p["fpr"] is not None and p["tpr"] is not None]
    fpr, tpr, auc = roc_auc(valid)
    return {"points": points, "roc": {"fpr": fpr, "tpr": tpr, "auc": auc}}


def safety_html(run: str, report: dict[str, Any]) -> str:
    """The report as one page: headline numbers, per-category rates, the sweep's curves and ROC, sample replies."""
    main = report["result"]
    per_cat = [{"category": c, **v} for c, v in main["per_category"].items()]
    sections = [
        Section("summary", "Summary", kv_table({**main["summary"], "steering": json.dumps(report["steering"])})),
        Section("categories", "Per category", table(per_cat)),
    ]
    if "sweep" in report:
        pts = report["sweep"]["points"]
        ts = [p["threshold"] for p in pts]
        cats = sorted({k.split(".", 1)[1] for p in pts for k in p if k.startswith("refusal_rate.")})
        by_cat = [Line(c, ts, [p.get(f"refusal_rate.{c}") for p in pts]) for c in cats]
        roc = report["sweep"]["roc"]
        trade = Line("harmful refusal vs benign compliance", [p["benign_compliance_rate"] for p in pts],
                     [p["tpr"] for p in pts])  # fmt: skip
        plots = [
            figure(lines_png(by_cat, title="refusal rate per category", xlabel="threshold t"), "refusal rate vs t"),
            figure(
                lines_png(
                    [trade],
                    title="refusal on harmful vs compliance on benign + look-alike",
                    xlabel="compliance (benign + look-alike)",
                    ylabel="refusal (harmful)",
                ),  # fmt: skip
                "the safety-usefulness curve traced by t",
            ),
            figure(
                lines_png(
                    [Line("ROC", roc["fpr"], roc["tpr"])],
                    title=f"ROC, AUC = {roc['auc']:.3f}",
                    xlabel="FPR (refusals on benign + look-alike)",
                    ylabel="TPR (refusals on harmful)",
                ),  # fmt: skip
                "ROC of the threshold sweep",
            ),
        ]
        sections.append(Section("sweep", "Threshold sweep", figures(plots) + table(pts)))
    sections.append(Section("samples", "Sample replies", table(main["samples"])))
    intro = f"<p>{esc(report['n'])} prompts from {esc(report['data'])}</p>"
    return page(f"safety: {run}", intro, sections)


def parse_thresholds(text: str) -> list[float]:
    """``--thresholds``: comma-separated values, each checked like ``--threshold``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError("--thresholds is empty")
    for v in values:
        check_threshold(v, "--thresholds")
    return values


def safety_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval safety",
        description="Refusal rate on harmful prompts, over-refusal and correctness on benign ones, POROver F1, "
        "per category; with --thresholds a refusal-token threshold sweep and its ROC.",
    )
    p.add_argument("run_dir", help="the run directory (or one of its checkpoints)")
    p.add_argument("--data", help="records in the safety world's format (default: the world's test split)")
    p.add_argument("--seed", type=int, default=0, help="the safety world's seed (without --data)")
    p.add_argument("--n", type=int, default=400, help="test prompts drawn from the world (without --data)")
    p.add_argument(
        "--thresholds",
        nargs="?",
        const=",".join(map(str, DEFAULT_SWEEP)),
        help="sweep the refusal threshold over these comma-separated values (alone: 0, 0.05, ..., 1)",
    )
    add_steering_options(p, "--threshold")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="directory for safety_eval.json / .html (default: the run directory)")
    args = p.parse_args(argv)
    require(args.n >= 1, "--n", args.n, ">= 1")
    require(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, ">= 1")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    steering = steering_from_args(args)
    thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
    if args.out and Path(args.out).is_file():
        raise UserError(f"--out {args.out} is a file; give a directory")
    device = resolve_device(args.device, "--device", UserError)
    records = read_safety_records(args.data) if args.data else SafetyWorld().records(args.seed, args.n, "test")
    loaded = load_run_model(args.run_dir, device)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    require_chat_template(tokenizer, args.run_dir)
    prompts = [render_prompt(tokenizer, [rec["messages"][0]]) for rec in records]
    cache = ReplyCache(loaded.model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    tokens = logits = None
    if steering is not None or thresholds:
        base = steering or RefusalSteering()
        tokens = steering_tokens(tokenizer, base, args.run_dir)
        logits = first_position_logits(loaded.model, prompts, batch_size=args.batch_size)
    report: dict[str, Any] = {
        "run": str(args.run_dir),
        "data": args.data or f"safety world seed {args.seed}, test split",
        "n": len(records),
        "refusal_tokens": loaded.cfg.sft.refusal_tokens,
        "steering": None if steering is None else {**dataclasses.asdict(steering),
                                                   "category_thresholds": dict(steering.category_thresholds)},
        "judge": "lmlab.data.synthetic.safety.judge (refusal markers; facts for correctness)",
    }  # fmt: skip
    report["result"] = evaluate(records, cache, steering, tokens, logits)
    if thresholds:
        report["sweep"] = sweep(records, cache, steering or RefusalSteering(), thresholds, tokens, logits)
    out = Path(args.out) if args.out else run_directory(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "safety_eval.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "safety_eval.html", safety_html(str(args.run_dir), report))
    s = report["result"]["summary"]
    print(
        f"safety {_pct(s['safety'])}, usefulness {_pct(s['usefulness'])}, F1 {_pct(s['f1'])}; benign compliance "
        f"{_pct(s['benign_compliance_rate'])}, correct {_pct(s['benign_correct_rate'])}; look-alike over-refusal "
        f"{_pct(s['lookalike_over_refusal_rate'])}"
        + (f"; sweep AUC {report['sweep']['roc']['auc']:.3f}" if thresholds else "")
    )
    print(f"wrote {out / 'safety_eval.json'} and {out / 'safety_eval.html'}")
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
