"""``lmlab eval unlearning RUN --bench DIR [--split S]``: the unlearning benchmark's metrics of one model.

Scores RUN (an unlearning run, the benchmark's target, any model with the benchmark's tokenizer) on one forget
split (default: the run's own ``unlearn.split``, else forget05) against that split's gold model
(``lmlab.eval.unlearning``), prints the headline and writes ``unlearning_eval.json`` and ``unlearning_eval.html``
(per split: probability, ROUGE-L recall, truth ratio, KnowMem; forget quality, model utility, extraction strength,
VerbMem, PrivLeak, fluency and sample answers) into RUN, or ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmlab.config import load_config
from lmlab.data.unlearning_bench import BenchData
from lmlab.errors import UserError
from lmlab.eval.commands import require
from lmlab.eval.unlearning import BenchScorer, headline
from lmlab.report.html import Section, esc, kv_table, page, table
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import check_same_tokenizer, load_frozen, load_run_model, run_directory, run_tokenizer
from lmlab.train.runtime import resolve_device

SPLITS = ("forget", "retain", "world")


def unlearning_html(run: str, split: str, report: dict[str, Any]) -> str:
    """The report as one page: the headline numbers, a table of the per-split metrics, the sample answers."""
    top = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    metrics = sorted({k for s in SPLITS for k, v in report[s].items() if isinstance(v, (int, float))})
    rows = [{"split": s, **{k: report[s].get(k) for k in metrics}} for s in SPLITS]
    fluency = report["forget"].get("fluency", {})
    samples = report["forget"].get("samples", [])
    return page(
        f"unlearning: {run}",
        f"<p>forget split <b>{esc(split)}</b>: {esc(headline(report))}</p>",
        [
            Section("summary", "Summary", kv_table({**top, **{f"fluency.{k}": v for k, v in fluency.items()}})),
            Section("splits", "Per split", table(rows, ["split", *metrics])),
            Section("samples", "Forget-set answers", table(samples) if samples else ""),
        ],
    )


def unlearning_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval unlearning",
        description="TOFU / MUSE metrics of a model on the unlearning benchmark (lmlab unlearn bench prepare).",
    )
    p.add_argument("run_dir", help="the run directory (or one of its checkpoints)")
    p.add_argument("--bench", required=True, help="the benchmark directory")
    p.add_argument("--split", help="forget01 | forget05 | forget10 (default: the run's unlearn.split, else forget05)")
    p.add_argument(
        "--items",
        type=int,
        default=0,
        help="retain, world and holdout items scored (0: all; the forget split is always scored whole)",
    )
    p.add_argument("--no-generation", action="store_true", help="skip greedy decoding (ROUGE, KnowMem, VerbMem)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="directory for unlearning_eval.json / .html (default: the run directory)")
    args = p.parse_args(argv)
    require(args.items >= 0, "--items", args.items, ">= 0 (0: all)")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    device = resolve_device(args.device, "--device", UserError)
    bench = BenchData.open(args.bench)
    method = load_config(run_directory(args.run_dir) / "config.yaml").unlearn.method
    # ULD's unlearned model is its base minus its adapters: they stay separate modules
    loaded = load_run_model(args.run_dir, device, merged=not method.needs_adapters)
    if loaded.tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    split = args.split or (loaded.cfg.unlearn.split if loaded.cfg.unlearn.bench else "forget05")
    bench.check_split(split)
    gold_path = bench.model(f"gold_{split}")
    check_same_tokenizer(run_tokenizer(gold_path), loaded.tokenizer, f"gold model {gold_path}", f"run {args.run_dir}")
    scorer = BenchScorer(
        bench, split, loaded.tokenizer, limit=args.items, batch_size=args.batch_size,
        max_new_tokens=loaded.cfg.sample.max_new_tokens, device=device,
    )  # fmt: skip
    gold = load_frozen(gold_path, device, role="gold", tokenizer=loaded.tokenizer, key="--bench").model
    gold_report = scorer.evaluate(gold, generation=False)
    report = scorer.evaluate(method.eval_model(loaded.model), gold_report, generation=not args.no_generation)
    report.update(run=str(args.run_dir), bench=str(bench.root), split=split)
    out = Path(args.out) if args.out else run_directory(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "unlearning_eval.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "unlearning_eval.html", unlearning_html(str(args.run_dir), split, report))
    print(f"{split}: {headline(report)}")
    print(f"wrote {out / 'unlearning_eval.json'} and {out / 'unlearning_eval.html'}")
    return 0
