"""``lmlab unlearn bench prepare --out DIR``: build the unlearning benchmark, models included.

Writes the data (``lmlab.data.unlearning_bench``), trains one BPE tokenizer on the target's training text, then
fine-tunes, with the shipped recipe ``unlearn_bench_model.yaml`` (or ``--config``) and fixed seeds, the
target model on every trained person and one gold model per forget split on everyone else, each from scratch
with the same tokenizer and settings. A model whose run already finished is kept, so an interrupted prepare
continues where it stopped (``--retrain`` trains them again). ``bench.json`` records the data, the models and
their answer accuracy on the forget and retain questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from lmlab.config import RunConfig, load_config
from lmlab.data.synthetic.facts import answer_is_correct
from lmlab.data.tokenizer import TextTokenizer
from lmlab.data.unlearning_bench import FORGET_SPLITS, BenchData, build_bench_data
from lmlab.errors import UserError
from lmlab.eval.samples import chat_responder
from lmlab.recipes.sft import run_sft
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_model

BENCH_CONFIG = Path(__file__).with_name("unlearn_bench_model.yaml")  # shipped with the package


def bench_tokenizer(out: Path, cfg: RunConfig) -> Path:
    """A BPE trained on the target's training text (questions, answers, biographies), saved as ``tokenizer.json``."""
    texts = []
    for line in (out / "data" / "train_target.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts.append(row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"]))
    t = cfg.tokenizer
    path = out / "tokenizer.json"
    TextTokenizer.train_bpe(texts, t.vocab_size, t.min_frequency, split_digits=t.split_digits).save(path)
    return path


def model_config(base: RunConfig, out: Path, role: str, tokenizer: Path) -> RunConfig:
    """The SFT config of one benchmark model: the shared recipe on its training file."""
    train_file = out / "data" / ("train_target.jsonl" if role == "target" else f"train_{role}.jsonl")
    sft = dataclasses.replace(base.sft, train_file=str(train_file))
    tok = dataclasses.replace(base.tokenizer, path=str(tokenizer))
    return dataclasses.replace(base, name=f"bench-{role}", sft=sft, tokenizer=tok)


def answer_accuracy(run: Path, items: list[dict[str, Any]], max_new_tokens: int) -> float:
    """Fraction of questions whose greedy answer contains the true value (the facts world's answer check)."""
    model, _, tokenizer = load_model(run)
    respond = chat_responder(model, tokenizer, max_new_tokens=max_new_tokens)
    hits = [answer_is_correct(respond([{"role": "user", "content": it["question"]}]), it["value"]) for it in items]
    return sum(hits) / len(hits)


def _finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"


def prepare_bench(
    out: str | Path,
    *,
    seed: int = 0,
    n_people: int = 400,
    n_holdout: int = 100,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    splits: list[str] | None = None,
    retrain: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build the benchmark in ``out`` (see the module docstring); returns the manifest."""
    out = Path(out)
    splits = splits or list(FORGET_SPLITS)
    base = load_config(config or BENCH_CONFIG, list(overrides or []))
    previous = json.loads((out / "bench.json").read_text()).get("models", {}) if (out / "bench.json").is_file() else {}
    manifest = build_bench_data(out, seed=seed, n_people=n_people, n_holdout=n_holdout)
    tokenizer = out / "tokenizer.json"
    if retrain or not tokenizer.is_file():
        bench_tokenizer(out, base)
    manifest["models"] = {} if retrain else previous  # a kept model keeps its measured accuracy
    write_text_atomic(out / "bench.json", json.dumps(manifest, indent=2) + "\n")
    bench = BenchData.open(out)
    for role in ["target", *(f"gold_{s}" for s in splits)]:
        run = out / "models" / role
        split = splits[-1] if role == "target" else role.removeprefix("gold_")
        if retrain or not _finished(run):
            run_sft(model_config(base, out, role, tokenizer), run, overwrite=True, quiet=quiet)
        elif manifest["models"].get(role, {}).get("forget_split") == split:
            continue
        manifest["models"][role] = {
            "run": f"models/{role}",
            "forget_accuracy": answer_accuracy(run, bench.items(split), base.sample.max_new_tokens),
            "forget_split": split,
            "retain_accuracy": answer_accuracy(run, bench.items("retain_eval")[:120], base.sample.max_new_tokens),
        }
        write_text_atomic(out / "bench.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] != "prepare":
        raise UserError("usage: lmlab unlearn bench prepare --out DIR [options] (see --help)")
    prep = argparse.ArgumentParser(
        prog="lmlab unlearn bench prepare",
        description="Build the unlearning benchmark: write the data and train the target and gold models.",
    )
    prep.add_argument("overrides", nargs="*", help="dotted key=value overrides of the models' SFT config")
    prep.add_argument("--out", required=True, help="the benchmark directory")
    prep.add_argument("--seed", type=int, default=0, help="the facts world's seed")
    prep.add_argument("--people", type=int, default=400, help="trained people (forget01 is 1%% of them)")
    prep.add_argument("--holdout", type=int, default=100, help="never-trained people (membership non-members)")
    prep.add_argument("--config", help=f"the models' SFT config (default: {BENCH_CONFIG.name}, shipped with lmlab)")
    prep.add_argument("--splits", default=",".join(FORGET_SPLITS), help="forget splits that get a gold model")
    prep.add_argument("--retrain", action="store_true", help="train every model again even if it finished")
    prep.add_argument("--quiet", action="store_true")
    args = prep.parse_intermixed_args(argv[1:])
    splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in splits if s not in FORGET_SPLITS]
    if unknown:
        raise UserError(f"--splits: unknown split {', '.join(unknown)}; choose from {', '.join(FORGET_SPLITS)}")
    manifest = prepare_bench(
        args.out, seed=args.seed, n_people=args.people, n_holdout=args.holdout, config=args.config,
        overrides=args.overrides, splits=splits, retrain=args.retrain, quiet=args.quiet,
    )  # fmt: skip
    print(json.dumps({"bench": args.out, "counts": manifest["counts"], "models": manifest["models"]}, indent=2))
    return 0
