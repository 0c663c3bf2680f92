"""Top-k attention at inference on the dense models of the S2 study (issue 14, study c), CPU-sized.

Synk et al. 2025 (arXiv 2502.06766; docs/science.md §9.1) report that attending, per query, to the k keys of
highest ``q·k`` with k below 2% of the context keeps more than 95% of dense quality. This script measures the
same curve on the ``dense`` runs of ``s2_study.py`` (one per seed; nothing is trained): for k as a fraction of
the training context T (``--fractions``, k = max(1, round(f·T)); f = 1 is dense exactly):

- ``val_loss``: the validation loss with every query of every layer top-k (``topk_attention_of`` around
  ``lmlab.eval.perplexity.perplexity``, the same as ``lmlab eval perplexity RUN --attention-topk K``), on the
  first ``train.eval_tokens`` of the run's validation split;
- ``recall_generate``: ``evaluate_recall(..., attention_topk=k)``: the prompt (list, ``;``, question) is read
  densely and only the generated tokens attend top-k (lmlab's ``generate``; the paper's prefill is dense too),
  so the first answer token still comes from dense attention;
- ``recall_query``: the list and ``" ;"`` are read densely (the prefix a top-k index would hold), then the
  question tokens and the answer are decoded with top-k attention (the paper's decode phase, except that lmlab
  selects among all cached keys, the question's own included: docs/science.md §9.1);
- ``answer_loss``: the teacher-forced loss of the recall answers (nats per digit) with every query top-k, as
  ``val_loss`` (graded where exact-match accuracy is all or nothing).

Per k: mean ± 95% Student-t CI over the models of the loss gap to dense (paired, same model) and of the
accuracy ratio to dense; and the smallest fraction whose mean recall ratio is ≥ 0.95.

    OMP_NUM_THREADS=1 python examples/architectures/topk_study.py --runs runs/s2_study     # ~4 min, 1 core
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmlab.eval.perplexity import perplexity
from lmlab.eval.recall import evaluate_recall
from lmlab.models.attention import topk_attention_of
from lmlab.train.pretrained import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s2_study import answer_loss, cell, fmt, recall_questions  # noqa: E402  (this folder's sibling study: no side effects)

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
TARGET = 0.95  # the paper's claim: > 95% of dense quality
CHANCE = 0.01  # a value is two uniform random digits: a guess is right 1 time in 100
TESTABLE = 0.5  # dense recall accuracy below this: the models do not recall, and ratios to dense test nothing


def answer_ok(text: str, answer: str) -> bool:
    """``evaluate_recall``'s rule: the continuation starts with the answer, then a space or the end."""
    rest = text[len(answer) :]
    return text.startswith(answer) and (not rest or not rest[0].isalnum())


@torch.no_grad()
def recall_query_topk(model, tokenizer, items: list, top: int | None, batch_size: int = 100) -> dict:
    """Accuracy when the list is read densely and the question and answer are decoded with top-k attention.

    Each prompt is split after its last ``" ;"`` token: the prefix ``EOS + list + " ;"`` is one dense forward
    into the KV cache; the question (``" key="``) is then fed with top-k attention, and the answer is decoded
    greedily with top-k attention (as many tokens as ``evaluate_recall`` allows). Questions are batched by equal
    prefix and question lengths (no padding)."""
    semi = tokenizer.encode(" ;")
    if len(semi) != 1:
        raise SystemExit(f"' ;' is {len(semi)} tokens in this tokenizer; the prefix split needs one")
    groups: dict[tuple[int, int], list[tuple[int, list[int], list[int]]]] = {}
    for i, item in enumerate(items):
        ids = [tokenizer.eos_id, *tokenizer.encode(item.prompt)]
        cut = len(ids) - ids[::-1].index(semi[0])  # just after the last " ;"
        groups.setdefault((cut, len(ids) - cut), []).append((i, ids[:cut], ids[cut:]))
    correct = [False] * len(items)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            budget = max(len(tokenizer.encode(items[i].answer)) for i, _, _ in chunk) + 1
            device = next(model.parameters()).device
            prefix = torch.tensor([p for _, p, _ in chunk], device=device)
            question = torch.tensor([q for _, _, q in chunk], device=device)
            cache = model.new_kv_cache()
            model(prefix, kv_cache=cache)
            new = []
            with topk_attention_of(model, top):
                logits = model(question, kv_cache=cache)[:, -1]
                for step in range(budget):
                    token = logits.argmax(dim=-1)
                    new.append(token)
                    if step < budget - 1:
                        logits = model(token[:, None], kv_cache=cache)[:, -1]
            out = torch.stack(new, dim=1).tolist()
            for (i, _, _), ids in zip(chunk, out):
                correct[i] = answer_ok(tokenizer.decode(ids, skip_special_tokens=True), items[i].answer)
    return {"accuracy": sum(correct) / len(correct), "n": len(correct)}


def measure(run_dir: Path, items: list, fractions: list[float], device: str = "cpu") -> dict:
    """Every measure of one dense model at every k (k = None is the dense reference)."""
    model, cfg, tokenizer = load_model(run_dir, device)
    data_dir = Path(json.loads((run_dir / "summary.json").read_text())["data_dir"])
    context = cfg.train.seq_len
    rows = {}
    for f in [None, *fractions]:
        top = None if f is None else max(1, round(f * context))
        with topk_attention_of(model, top):
            loss = perplexity(
                model,
                tokenizer,
                data_dir,
                seq_len=context,
                batch_size=cfg.train.micro_batch_size,
                budget_tokens=cfg.train.eval_tokens,
            )["val_loss"]
            answer = answer_loss(model, tokenizer, items)["loss"]
        gen = evaluate_recall(model, tokenizer, items, batch_size=100, attention_topk=top)
        query = recall_query_topk(model, tokenizer, items, top)
        rows["dense" if f is None else str(f)] = {
            "k": top,
            "val_loss": loss,
            "answer_loss": answer,
            "recall_generate": gen["accuracy"],
            "recall_generate_by_depth": gen["by_depth"],
            "recall_query": query["accuracy"],
        }
        print(
            f"    k={top}: val loss {loss:.4f}, answer loss {answer:.3f}, recall (generate) {gen['accuracy']:.3f}, "
            f"recall (query) {query['accuracy']:.3f}",
            flush=True,
        )
    return {"context": context, "rows": rows}


def ratio(a: float, b: float) -> float | None:
    """a / b; None where the dense accuracy b is 0 (no ratio)."""
    return a / b if b > 0 else None


def ratio_cell(values: list[float | None]) -> dict:
    """``cell`` over the models that have a ratio (``n`` of them); all None: no ratio."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "ci95": None, "per_seed": values, "n": 0}
    return {**cell(kept), "per_seed": values, "n": len(kept)}


def fmt_ratio(c: dict) -> str:
    return "n/a (dense 0)" if c["mean"] is None else fmt(c, 2)


def summarize(per_model: dict[str, dict], fractions: list[float]) -> dict:
    seeds = list(per_model)
    out = {}
    for f in ["dense", *map(str, fractions)]:
        rows = [per_model[s]["rows"][f] for s in seeds]
        dense = [per_model[s]["rows"]["dense"] for s in seeds]
        out[f] = {
            "k": rows[0]["k"],
            "val_loss": cell([r["val_loss"] for r in rows]),
            "val_loss_gap": cell([r["val_loss"] - d["val_loss"] for r, d in zip(rows, dense)]),
            "answer_loss": cell([r["answer_loss"] for r in rows]),
            "answer_loss_gap": cell([r["answer_loss"] - d["answer_loss"] for r, d in zip(rows, dense)]),
            "recall_generate": cell([r["recall_generate"] for r in rows]),
            "recall_generate_ratio": ratio_cell(
                [ratio(r["recall_generate"], d["recall_generate"]) for r, d in zip(rows, dense)]
            ),
            "recall_query": cell([r["recall_query"] for r in rows]),
            "recall_query_ratio": ratio_cell(
                [ratio(r["recall_query"], d["recall_query"]) for r, d in zip(rows, dense)]
            ),
        }
    return out


def smallest_keeping(table: dict, fractions: list[float], key: str) -> float | None:
    """The smallest fraction whose mean ratio to dense is ≥ TARGET (None: none, or dense accuracy is 0)."""
    for f in sorted(fractions):
        m = table[str(f)][key]["mean"]
        if m is not None and m >= TARGET:
            return f
    return None


def markdown(res: dict) -> str:
    t = res["table"]
    lines = [
        "| k (fraction of T = {}) | k | val loss | loss gap to dense | answer loss | gap to dense "
        "| recall, query top-k | ratio to dense | recall, generate top-k | ratio to dense |".format(res["context"]),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, e in t.items():
        label = "dense" if f == "dense" else f"{float(f):.0%}"
        lines.append(
            f"| {label} | {e['k'] if e['k'] else '—'} | {fmt(e['val_loss'])} | {fmt(e['val_loss_gap'], sign=True)} "
            f"| {fmt(e['answer_loss'])} | {fmt(e['answer_loss_gap'], sign=True)} "
            f"| {fmt(e['recall_query'])} | {fmt_ratio(e['recall_query_ratio'])} | {fmt(e['recall_generate'])} "
            f"| {fmt_ratio(e['recall_generate_ratio'])} |"
        )
    s = res["smallest_fraction_keeping_95pct"]
    if not res["claim_testable"]:
        lines += [
            "",
            f"**Not testable here**: the dense models' recall accuracy is {res['dense_recall_query']:.3f} "
            f"(chance {CHANCE}, threshold {TESTABLE}); the accuracy ratios compare guesses, so the "
            "'smallest fraction' below says nothing about the claim.",
        ]
    lines += [
        "",
        f"Models: the dense runs of {res['runs']} (seeds {res['seeds']}); mean ± 95% CI over them (Student t). "
        f"{res['recall_items']} recall questions per model. Smallest k fraction with mean recall ratio ≥ 0.95: "
        f"query top-k {s['recall_query']}, generate top-k {s['recall_generate']}. Wall time {res['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="the study directory of s2_study.py (its dense_s* runs are used)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--recall-items", type=int, default=500)
    p.add_argument("--results", default=str(HERE / "results"), help="where topk_study.json and .md go")
    p.add_argument("--device", default="cpu", help="device the models are evaluated on")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = sorted(Path(args.runs).glob("dense_s*"), key=lambda d: int(d.name.split("_s")[-1]))
    runs = [r for r in runs if (r / "summary.json").is_file()]
    if not runs:
        raise SystemExit(f"{args.runs}: no finished dense_s* runs; run s2_study.py first")
    _, cfg, _ = load_model(runs[0])
    items = recall_questions(cfg.data.synthetic.subset, args.recall_items)
    per_model = {}
    for run in runs:
        print(f"{run} ...", flush=True)
        per_model[run.name.split("_s")[-1]] = measure(run, items, args.fractions, args.device)
    table = summarize(per_model, args.fractions)
    res = {
        "study": "Top-k attention at inference vs dense (issue 14, study c)",
        "command": "OMP_NUM_THREADS=1 python examples/architectures/topk_study.py " + " ".join(argv or sys.argv[1:]),
        "runs": args.runs,
        "seeds": [int(s) for s in per_model],
        "context": cfg.train.seq_len,
        "fractions": args.fractions,
        "recall_items": len(items),
        "table": table,
        "dense_recall_query": table["dense"]["recall_query"]["mean"],
        "chance_accuracy": CHANCE,
        "claim_testable": table["dense"]["recall_query"]["mean"] >= TESTABLE,
        "smallest_fraction_keeping_95pct": {
            key: smallest_keeping(table, args.fractions, f"{key}_ratio") for key in ("recall_query", "recall_generate")
        },
        "per_model": per_model,
        "torch": torch.__version__,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    md = markdown(res)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "topk_study.json").write_text(json.dumps(res, indent=1) + "\n")
    (Path(args.results) / "topk_study.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
