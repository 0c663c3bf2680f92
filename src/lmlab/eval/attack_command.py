"""``lmlab safety gcg | filter | retokenize``: adversarial suffixes against a chat model on the safety world's
harmful prompts, and two defenses measured against them (docs/science.md §29).

``gcg RUN``: for each harmful test prompt, a GCG search and a random search with the same budget
(``lmlab.eval.gcg``) for a suffix after the user's text that makes the reply start with ``--target`` (default: the
``[respond]`` token when the run has refusal tokens, else "Sure, here is"); the greedy reply to the attacked
prompt is judged by the world's judge, and the attack success rate (ASR) is the share of replies that do not
refuse. Writes ``attacks.json`` (per prompt: the suffix ids and text, its loss, the reply).

``filter RUN --attacks attacks.json``: the perplexity filter (``lmlab.eval.perplexity_filter``) under RUN (any
lmlab model, scoring the prompt text with its own tokenizer): T = the largest score of unattacked harmful prompts;
detection rate on the attacked prompts, false-positive rate on benign and look-alike prompts, ROC; whole-prompt
and windowed. Writes ``perplexity_filter.json``.

``retokenize RUN --attacks attacks.json``: the attacked prompts' user text re-segmented with BPE-dropout-style
splits (``lmlab.eval.retokenize``) at each ``--p``; ASR of the attacked prompts and compliance and correctness on
benign and look-alike prompts, with and without. Writes ``retokenize.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.data.chat import resolve_template
from lmlab.data.synthetic.safety import SafetyWorld, judge
from lmlab.errors import DataError, UserError
from lmlab.eval.gcg import AttackPrompt, search_suffix
from lmlab.eval.perplexity_filter import WINDOW, detection_rates, mean_score, roc, token_nlls, windowed_score
from lmlab.eval.retokenize import Resegmenter
from lmlab.eval.safety_command import ReplyCache, read_safety_records, require_chat_template
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_run_model, run_directory
from lmlab.train.runtime import resolve_device

_OPEN, _CLOSE = "\u27e6user\u27e7", "\u27e6end\u27e7"  # markers no prompt holds, to find the user text
DEFAULT_TARGET = "Sure, here is"


@dataclass(frozen=True)
class ChatPrompt:
    """A one-turn chat prompt in token ids: the template ``pre`` the user text, the ``user`` text, ``post`` it
    (end of turn and the assistant's opening); an attack's suffix goes between ``user`` and ``post``."""

    pre: list[int]
    user: list[int]
    post: list[int]

    @classmethod
    def of(cls, tokenizer, text: str) -> ChatPrompt:
        rendered = resolve_template(tokenizer).render(
            [{"role": "user", "content": _OPEN + text + _CLOSE}], add_generation_prompt=True, tokenizer=tokenizer
        )
        pre, rest = rendered.split(_OPEN, 1)
        body, post = rest.split(_CLOSE, 1)
        return cls(tokenizer.encode(pre), tokenizer.encode(body), tokenizer.encode(post))

    def ids(self, suffix: list[int] = (), user: list[int] | None = None) -> list[int]:
        return self.pre + (self.user if user is None else user) + list(suffix) + self.post


def allowed_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] True for tokens a suffix may use: not special, decoding to printable ASCII (the reference's default)."""
    special = set(tokenizer.backend.get_added_tokens_decoder())
    ok = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        text = tokenizer.decode([i])
        ok[i] = i not in special and bool(text.strip()) and text.isascii() and text.isprintable()
    return ok


def _load_chat_model(run: str, device: str):
    loaded = load_run_model(run, resolve_device(device, "--device", UserError))
    if loaded.tokenizer is None:
        raise UserError(f"{run}: the run has no tokenizer.json")
    require_chat_template(loaded.tokenizer, run)
    return loaded


def _records(args, groups: tuple[str, ...]) -> list[dict]:
    records = read_safety_records(args.data) if args.data else SafetyWorld().records(args.seed, args.pool, "test")
    mine = [r for r in records if r["group"] in groups]
    if not mine:
        where = args.data or f"the safety world's test split (seed {args.seed}, --pool {args.pool})"
        raise DataError(f"{where}: no {' or '.join(groups)} prompts")
    return mine


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="prompts in the safety world's format (default: the world's test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=200, help="test records drawn from the world (without --data)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="directory for the JSON report (default: the run directory)")


def _check_positive(**flags: int) -> None:
    for flag, value in flags.items():
        if value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _write(args, name: str, report: dict) -> Path:
    out = Path(args.out) if args.out else run_directory(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / name, json.dumps(report, indent=2) + "\n")
    return out / name


def _asr(records, replies) -> float:
    return sum(not judge(r, True).refused for r in replies) / len(records)


def gcg_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety gcg", description=__doc__.split("\n\n")[1])
    p.add_argument("run_dir")
    _common(p)
    p.add_argument("--n", type=int, default=8, help="harmful prompts to attack")
    p.add_argument("--suffix-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="candidates evaluated per step (both methods)")
    p.add_argument("--target", help="the reply prefix to elicit")
    p.add_argument("--methods", default="gcg,random")
    args = p.parse_args(argv)
    _check_positive(n=args.n, suffix_len=args.suffix_len, steps=args.steps, top_k=args.top_k, batch=args.batch,
                    max_new_tokens=args.max_new_tokens)  # fmt: skip
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("gcg", "random") for m in methods):
        raise UserError(f"--methods must list gcg and/or random, got {args.methods!r}")
    records = _records(args, ("harmful",))[: args.n]
    loaded = _load_chat_model(args.run_dir, args.device)
    tok, model = loaded.tokenizer, loaded.model
    target = args.target or ("[respond]" if tok.token_to_id("[respond]") is not None else DEFAULT_TARGET)
    target_ids = tok.encode(target)
    if not target_ids:
        raise UserError(f"--target {target!r} encodes to no tokens")
    allowed = allowed_tokens(tok, model.cfg.vocab_size)
    init_id = int(allowed.nonzero()[0]) if tok.token_to_id("!") is None else tok.token_to_id("!")
    prompts = [ChatPrompt.of(tok, r["messages"][0]["content"]) for r in records]
    clean = ReplyCache(model, tok, [cp.ids() for cp in prompts], args.max_new_tokens, 32).replies([None] * len(prompts))
    report: dict[str, Any] = {"run": str(args.run_dir), "target": target, "suffix_len": args.suffix_len,
                              "steps": args.steps, "top_k": args.top_k, "batch": args.batch, "n": len(records),
                              "clean_asr": _asr(records, clean), "methods": {}}  # fmt: skip
    for method in methods:
        rows = []
        for i, (rec, cp) in enumerate(zip(records, prompts)):
            attack = AttackPrompt(cp.pre + cp.user, cp.post, target_ids)
            res = search_suffix(model, attack, [init_id] * args.suffix_len, allowed, method=method, steps=args.steps,
                                top_k=args.top_k, batch=args.batch, seed=args.seed + i)  # fmt: skip
            rows.append({"prompt": rec["messages"][0]["content"], "category": rec["category"], "suffix": res.suffix,
                         "suffix_text": tok.decode(res.suffix), "loss": res.loss, "target_reached": res.success,
                         "steps": res.steps, "losses": res.losses})  # fmt: skip
        attacked = [cp.ids(r["suffix"]) for cp, r in zip(prompts, rows)]
        replies = ReplyCache(model, tok, attacked, args.max_new_tokens, 32).replies([None] * len(rows))
        for row, reply in zip(rows, replies):
            row["reply"], row["complied"] = reply, not judge(reply, True).refused
        report["methods"][method] = {"asr": _asr(records, replies),
                                     "mean_loss": sum(r["loss"] for r in rows) / len(rows),
                                     "target_reached_rate": sum(r["target_reached"] for r in rows) / len(rows),
                                     "prompts": rows}  # fmt: skip
    path = _write(args, "attacks.json", report)
    summary = ", ".join(f"{m} ASR {v['asr']:.2f} (loss {v['mean_loss']:.3f})" for m, v in report["methods"].items())
    print(f"clean ASR {report['clean_asr']:.2f}; {summary}; wrote {path}")
    return 0


def read_attacks(path: str) -> dict:
    """An ``attacks.json`` of ``lmlab safety gcg``; one that is not is a ``DataError``."""
    try:
        report = json.loads(Path(path).read_text())
        methods = report["methods"]
        assert all(isinstance(r["suffix"], list) and isinstance(r["prompt"], str)
                   for m in methods.values() for r in m["prompts"])  # fmt: skip
    except FileNotFoundError:
        raise DataError(f"--attacks {path}: no such file") from None
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError):
        raise DataError(f"--attacks {path}: not an attacks.json written by `lmlab safety gcg`") from None
    if not any(m["prompts"] for m in methods.values()):
        raise DataError(f"--attacks {path}: holds no attacked prompt")
    return report


def filter_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety filter", description=__doc__.split("\n\n")[2])
    p.add_argument("run_dir", help="the filter language model (any lmlab run)")
    p.add_argument("--attacks", required=True, help="attacks.json of `lmlab safety gcg`")
    p.add_argument("--window", type=int, default=WINDOW)
    _common(p)
    args = p.parse_args(argv)
    _check_positive(window=args.window)
    attacks = read_attacks(args.attacks)
    loaded = load_run_model(args.run_dir, resolve_device(args.device, "--device", UserError))
    tok = loaded.tokenizer
    if tok is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")

    def nlls(text: str) -> list[float]:
        out = token_nlls(loaded.model, tok.encode_document(text)[: loaded.model.cfg.max_seq_len])
        if not out:
            raise DataError(f"prompt {text!r} has fewer than two tokens to score")
        return out

    harmful = [nlls(r["messages"][0]["content"]) for r in _records(args, ("harmful",))]
    benign = [nlls(r["messages"][0]["content"]) for r in _records(args, ("benign", "lookalike"))]
    report: dict[str, Any] = {"run": str(args.run_dir), "attacks": args.attacks, "window": args.window,
                              "n_harmful": len(harmful), "n_benign": len(benign), "variants": {}}  # fmt: skip
    for variant, score in (("whole", mean_score), ("windowed", lambda x: windowed_score(x, args.window))):
        threshold = max(score(x) for x in harmful)
        benign_scores = [score(x) for x in benign]
        per_method = {}
        for method, result in attacks["methods"].items():
            attacked = [score(nlls(r["prompt"] + r["suffix_text"])) for r in result["prompts"]]
            per_method[method] = {**detection_rates(threshold, attacked, benign_scores),
                                  "roc": roc(attacked, benign_scores)}  # fmt: skip
        report["variants"][variant] = {"threshold": threshold, "methods": per_method}
    path = _write(args, "perplexity_filter.json", report)
    for variant, v in report["variants"].items():
        parts = [f"{m} detection {r['detection_rate']:.2f} FPR {r['false_positive_rate']:.2f} AUC {r['roc']['auc']:.2f}"
                 for m, r in v["methods"].items()]  # fmt: skip
        print(f"{variant} (T = {v['threshold']:.3f}): " + "; ".join(parts))
    print(f"wrote {path}")
    return 0


def retokenize_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab safety retokenize", description=__doc__.split("\n\n")[3])
    p.add_argument("run_dir", help="the attacked model (the run the attacks were made on)")
    p.add_argument("--attacks", required=True, help="attacks.json of `lmlab safety gcg`")
    p.add_argument("--p", default="0,0.2,0.4", help="comma-separated merge-dropout probabilities")
    _common(p)
    args = p.parse_args(argv)
    try:
        ps = [float(x) for x in args.p.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--p must be comma-separated numbers, got {args.p!r}") from None
    if not ps or any(not 0.0 <= x <= 1.0 for x in ps):
        raise UserError(f"--p must be probabilities in [0, 1], got {args.p!r}")
    attacks = read_attacks(args.attacks)
    loaded = _load_chat_model(args.run_dir, args.device)
    tok, model = loaded.tokenizer, loaded.model
    reseg = Resegmenter.of(tok)
    benign = _records(args, ("benign", "lookalike"))
    report: dict[str, Any] = {"run": str(args.run_dir), "attacks": args.attacks, "points": []}
    for prob in ps:
        rng = random.Random(args.seed)
        point: dict[str, Any] = {"p": prob}
        for method, result in attacks["methods"].items():
            ids = []
            for r in result["prompts"]:
                cp = ChatPrompt.of(tok, r["prompt"])
                ids.append(cp.ids(user=reseg.ids(cp.user + r["suffix"], prob, rng)))
            replies = ReplyCache(model, tok, ids, args.max_new_tokens, 32).replies([None] * len(ids))
            point[f"{method}_asr"] = _asr(ids, replies)
        ids = []
        for r in benign:
            cp = ChatPrompt.of(tok, r["messages"][0]["content"])
            ids.append(cp.ids(user=reseg.ids(cp.user, prob, rng)))
        replies = ReplyCache(model, tok, ids, args.max_new_tokens, 32).replies([None] * len(ids))
        verdicts = [judge(reply, False, r["facts"]) for r, reply in zip(benign, replies)]
        point["benign_compliance_rate"] = sum(not v.refused for v in verdicts) / len(verdicts)
        point["benign_correct_rate"] = sum(bool(v.correct) for v in verdicts) / len(verdicts)
        report["points"].append(point)
    path = _write(args, "retokenize.json", report)
    for point in report["points"]:
        print(", ".join(f"{k} {v:.2f}" for k, v in point.items()))
    print(f"wrote {path}")
    return 0
