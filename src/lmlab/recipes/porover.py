"""POROver's data stages (Karaman et al. 2025, arXiv 2410.12999; docs/science.md §29.5): overgenerate replies from a
teacher and keep the ones the safety world's judge approves (an SFT set), then pair approved with disapproved
replies for preference optimization.

``lmlab safety overgenerate TEACHER --out DIR``: N replies per prompt sampled at a temperature from the teacher (an
lmlab run or an imported HF model), decoded with the teacher's own tokenizer. A reply is *approved* when it does
what the prompt needs: a refusal for a prompt to refuse, a compliant and correct answer for a benign or look-alike
one (``lmlab.data.synthetic.safety.judge``). Writes ``samples.jsonl`` (every reply with its verdict), ``sft.jsonl``
(one chat record per distinct approved reply, in the format ``lmlab sft`` reads, with ``refuse``/``category`` so
refusal tokens work) and ``overgenerate.json`` (keep rates per group).

``lmlab safety pairs SAMPLES --out pairs.jsonl``: for each prompt, (approved ≻ disapproved) pairs: comply ≻ refuse
on benign and look-alike prompts, refuse ≻ comply on prompts to refuse, in the conversational
``prompt``/``chosen``/``rejected`` format ``lmlab align`` reads. A prompt with approved replies but no disapproved
one pairs them with ``--fallback-refusal`` when it should be answered (the over-refusal POROver removes); a prompt
with no approved reply uses the world's reference reply as the chosen one.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

from lmlab.data.chat import end_of_turn_id, has_chat_template, render_prompt
from lmlab.data.refusal_tokens import tagged_reply
from lmlab.data.rows import read_rows
from lmlab.data.synthetic.safety import SafetyWorld, judge
from lmlab.errors import DataError, UserError
from lmlab.eval.safety_command import read_safety_records, require_chat_template
from lmlab.models.generation import generate
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import check_same_tokenizer, load_run_model, run_tokenizer
from lmlab.train.runtime import resolve_device

FALLBACK_REFUSAL = "I can't help with that."


def sample_replies(model, tokenizer, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                   batch_size: int, seed: int) -> list[list[str]]:  # fmt: skip
    """``n`` sampled replies to each prompt, decoded to text with ``tokenizer`` (special tokens dropped)."""
    stops = [end_of_turn_id(tokenizer), *tokenizer.stop_ids]
    generator = torch.Generator().manual_seed(seed)
    rows = [i for i in range(len(prompts)) for _ in range(n)]
    out: list[list[str]] = [[] for _ in prompts]
    limit = model.cfg.max_seq_len
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        budget = max(1, min(max_new_tokens, limit - max(len(prompts[i]) for i in chunk)))
        new = generate(model, [prompts[i] for i in chunk], budget, temperature=temperature, eos_id=stops,
                       generator=generator)  # fmt: skip
        for i, ids in zip(chunk, new):
            out[i].append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def approved(record: dict, reply: str) -> bool:
    """Whether ``reply`` does what ``record``'s prompt needs: refuse, or comply correctly."""
    verdict = judge(reply, record["refuse"], record["facts"])
    return verdict.refused if record["refuse"] else bool(verdict.correct)


def overgenerate(records: list[dict], replies: list[list[str]]) -> tuple[list[dict], list[dict], dict]:
    """``(samples, sft_records, stats)`` from each record's sampled replies (module docstring)."""
    samples, sft, kept = [], [], Counter()
    seen = Counter()
    for rec, mine in zip(records, replies):
        user = rec["messages"][0]
        seen[rec["group"]] += len(mine)
        ok = [approved(rec, r) for r in mine]
        samples.append({"prompt": user["content"], "group": rec["group"], "category": rec["category"],
                        "refuse": rec["refuse"], "facts": rec["facts"], "reference": rec["messages"][-1]["content"]
                        if len(rec["messages"]) > 1 else None, "replies": mine, "approved": ok})  # fmt: skip
        for reply in dict.fromkeys(r for r, good in zip(mine, ok) if good):
            kept[rec["group"]] += 1
            sft.append({"messages": [user, {"role": "assistant", "content": reply}], "refuse": rec["refuse"],
                        "category": rec["category"], "group": rec["group"], "facts": rec["facts"]})  # fmt: skip
    stats = {g: {"samples": seen[g], "kept_distinct": kept[g]} for g in sorted(seen)}
    return samples, sft, stats


def preference_pairs(samples: list[dict], *, per_prompt: int = 1, refusal_tokens: str = "none",
                     fallback_refusal: str = FALLBACK_REFUSAL, seed: int = 0) -> tuple[list[dict], dict]:  # fmt: skip
    """``(pairs, stats)``: up to ``per_prompt`` (approved ≻ disapproved) pairs per sample row (module docstring).
    With ``refusal_tokens`` (``single``/``category``) each reply starts with its control token, as SFT wrote them."""
    rng = random.Random(seed)
    pairs, stats = [], Counter()
    for row in samples:
        good = [r for r, ok in zip(row["replies"], row["approved"]) if ok] or (
            [row["reference"]] if row.get("reference") else []
        )
        bad = [r for r, ok in zip(row["replies"], row["approved"]) if not ok]
        if not row["refuse"]:
            bad = [r for r in bad if judge(r, False).refused] or [fallback_refusal]  # comply ≻ refuse
        else:
            bad = [r for r in bad if not judge(r, True).refused]  # refuse ≻ comply
        if not good or not bad:
            stats["skipped"] += 1
            continue
        for _ in range(per_prompt):
            chosen, rejected = rng.choice(good), rng.choice(bad)
            pairs.append({
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": tagged_reply(chosen, row["refuse"], row["category"],
                                                                    refusal_tokens)}],
                "rejected": [{"role": "assistant", "content": tagged_reply(rejected, not row["refuse"],
                                                                      row["category"], refusal_tokens)}],
                "group": row["group"], "category": row["category"], "refuse": row["refuse"],
            })  # fmt: skip
            stats["comply_over_refuse" if not row["refuse"] else "refuse_over_comply"] += 1
    return pairs, dict(stats)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def overgenerate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety overgenerate", description=__doc__.split("\n\n")[1])
    p.add_argument("teacher", help="the teacher's run directory (an lmlab run or an `lmlab import-hf` model)")
    p.add_argument("--out", required=True, help="directory for samples.jsonl, sft.jsonl, overgenerate.json")
    p.add_argument("--data", help="prompts in the safety world's format (default: the world's train split)")
    p.add_argument("--n", type=int, default=200, help="prompts drawn from the world (without --data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4, help="replies sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--student", help="the run that will train on the data: its tokenizer must be the teacher's")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for flag, value in (("--n", args.n), ("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 to sample several replies, got {args.temperature}")
    records = read_safety_records(args.data) if args.data else SafetyWorld().records(args.seed, args.n, "train")
    loaded = load_run_model(args.teacher, resolve_device(args.device, "--device", UserError))
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.teacher}: the teacher has no tokenizer.json")
    require_chat_template(tokenizer, args.teacher)
    if args.student:
        student = run_tokenizer(args.student)
        if student is None:
            raise UserError(f"--student {args.student}: the run has no tokenizer.json")
        check_same_tokenizer(tokenizer, student, f"teacher {args.teacher}", f"student {args.student}")
        if not has_chat_template(student):
            raise UserError(f"--student {args.student}: its tokenizer has no chat template")
    prompts = [render_prompt(tokenizer, [rec["messages"][0]]) for rec in records]
    replies = sample_replies(loaded.model, tokenizer, prompts, args.samples, args.temperature, args.max_new_tokens,
                             args.batch_size, args.seed)  # fmt: skip
    samples, sft, stats = overgenerate(records, replies)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "samples.jsonl", _jsonl(samples))
    write_text_atomic(out / "sft.jsonl", _jsonl(sft))
    report = {"teacher": str(args.teacher), "prompts": len(records), "samples_per_prompt": args.samples,
              "temperature": args.temperature, "kept": len(sft), "per_group": stats}  # fmt: skip
    write_text_atomic(out / "overgenerate.json", json.dumps(report, indent=2) + "\n")
    print(f"{len(records)} prompts x {args.samples} samples: kept {len(sft)} distinct approved replies; wrote {out}")
    return 0


def read_samples(path: str) -> list[dict]:
    """``samples.jsonl`` rows of ``lmlab safety overgenerate``; a malformed row is a ``DataError`` naming it."""
    rows = []
    for where, obj in read_rows(path, what="samples file"):
        need = ("prompt", "refuse", "category", "replies", "approved")
        if any(k not in obj for k in need) or len(obj["replies"]) != len(obj["approved"]):
            raise DataError(f"{where}: a samples row needs {', '.join(need)} (replies and approved of one length)")
        rows.append({"group": obj.get("group", ""), **obj})
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def pairs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety pairs", description=__doc__.split("\n\n")[2])
    p.add_argument("samples", help="samples.jsonl written by `lmlab safety overgenerate`")
    p.add_argument("--out", required=True, help="the preference JSONL to write")
    p.add_argument("--per-prompt", type=int, default=1)
    p.add_argument("--refusal-tokens", choices=("none", "single", "category"), default="none",
                   help="start each reply with its control token (as the student's sft.refusal_tokens)")  # fmt: skip
    p.add_argument("--fallback-refusal", default=FALLBACK_REFUSAL)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.per_prompt < 1:
        raise UserError(f"--per-prompt must be >= 1, got {args.per_prompt}")
    pairs, stats = preference_pairs(read_samples(args.samples), per_prompt=args.per_prompt,
                                    refusal_tokens=args.refusal_tokens, fallback_refusal=args.fallback_refusal,
                                    seed=args.seed)  # fmt: skip
    if not pairs:
        raise DataError(f"{args.samples}: no prompt gave a pair (every prompt lacks an approved or a rejected reply)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, _jsonl(pairs))
    print(f"wrote {len(pairs)} pairs to {out}: {json.dumps(stats)}")
    return 0
