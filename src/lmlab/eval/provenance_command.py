"""``lmlab eval provenance SUSPECT --order RUN``: was SUSPECT derived from RUN's training? The query test of
palimpsestic membership inference (Kuditipudi et al. 2025, arXiv 2510.19796; docs/science.md §16).

Reads RUN's ``training_order.jsonl`` (``lmlab.data.training_order``, written by ``lmlab sft``), scores every record
RUN trained on under SUSPECT (and ``--reference REF``) as RUN trained it — RUN's tokenizer and chat template, the
tokens of its ``sft.loss_on``, cut to its ``train.seq_len`` — and prints as JSON Spearman's ρ between each record's
place in RUN's order and SUSPECT's mean token NLL (minus REF's), scipy's two-sided p-value, the exact one-sided
permutation p-value and the verdict: ``derived`` when the permutation p-value is at most ``--alpha`` (SUSPECT's loss
falls with RUN's order, as a model that continued from RUN's weights would show), else ``not shown``.
``lmlab.eval.provenance`` holds the statistic. A good reference knows the data's distribution but not RUN's order:
the model RUN started from, or one trained on the same kind of data. SUSPECT and REF must use RUN's tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.config import load_config
from lmlab.data.chat import resolve_template
from lmlab.data.packing import fit_examples
from lmlab.data.training_order import TRAINING_ORDER_FILE, read_training_order
from lmlab.errors import UserError
from lmlab.eval.commands import require
from lmlab.eval.provenance import example_nll, permutation_pvalue, query_statistic
from lmlab.safe_io import write_text_atomic
from lmlab.train.pretrained import load_frozen, run_directory, run_tokenizer
from lmlab.train.runtime import resolve_device


def provenance_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval provenance",
        description="Palimpsestic membership inference: does SUSPECT's loss fall with RUN's training order?",
    )
    p.add_argument("suspect", help="the model to test: a run directory or one of its checkpoints")
    p.add_argument("--order", required=True, help="the run whose training order is tested (its training_order.jsonl)")
    p.add_argument("--reference", help="a model independent of RUN's order, to remove each record's own difficulty")
    p.add_argument(
        "--by",
        choices=("last", "first"),
        default="last",
        help="a record's place: the last draw that trained it (default; the freshest after several epochs) or the first",
    )
    p.add_argument("--max-docs", type=int, default=0, help="test the first N trained records of the file (0: all)")
    p.add_argument("--permutations", type=int, default=9999, help="re-drawn orders of the permutation p-value")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-drawn orders")
    p.add_argument("--alpha", type=float, default=0.05, help="the level of the verdict")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the report to this .json file")
    args = p.parse_args(argv)
    require(args.max_docs >= 0, "--max-docs", args.max_docs, ">= 0 (0: all)")
    require(args.permutations >= 1, "--permutations", args.permutations, ">= 1")
    require(0 < args.alpha < 1, "--alpha", args.alpha, "in (0, 1)")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; give a .json file path")

    run_dir = run_directory(args.order, "--order run directory")
    path = run_dir / TRAINING_ORDER_FILE
    if not path.is_file():
        raise UserError(
            f"--order {args.order}: no {TRAINING_ORDER_FILE}; the run's training order was not logged (lmlab sft "
            "runs of this version log it unless sft.training_order=false): train RUN again with this version and "
            "the log on to test provenance against it"
        )
    key = "last_position" if args.by == "last" else "position"
    records = read_training_order(path)
    trained = [r for r in records if getattr(r, key) is not None]
    if not trained:
        raise UserError(f"--order {args.order}: {path} lists no record that training served")
    never_trained = len(records) - len(trained)
    if args.max_docs:
        trained = trained[: args.max_docs]
    tokenizer = run_tokenizer(run_dir)
    if tokenizer is None:
        raise UserError(f"--order {args.order}: the run has no tokenizer.json")
    run_cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded

    against = f"--order run {args.order}"
    suspect = load_frozen(args.suspect, device, role="suspect", tokenizer=tokenizer, against=against, key="SUSPECT")
    models = {"suspect": suspect}
    if args.reference:
        models["reference"] = load_frozen(
            args.reference, device, role="reference", tokenizer=tokenizer, against=against, key="--reference"
        )
    context = min([run_cfg.train.seq_len, *(m.cfg.model.max_seq_len for m in models.values())])
    template = None
    if any(r.record.text is None for r in trained):
        template = resolve_template(tokenizer)  # RUN's tokenizer carries the template RUN trained with
    encoded = [r.record.encode(tokenizer, template, run_cfg.sft.loss_on) for r in trained]
    examples, kept, _ = fit_examples(encoded, context)  # as training cut them; a shorter model context cuts more
    positions = [getattr(trained[i], key) for i in kept]
    nll = {name: example_nll(m.model, examples, args.batch_size) for name, m in models.items()}
    try:
        rho, p_value = query_statistic(positions, nll["suspect"], nll.get("reference"))
        scores = [s - r for s, r in zip(nll["suspect"], nll["reference"])] if args.reference else nll["suspect"]
        p_permutation = permutation_pvalue(positions, scores, args.permutations, args.seed)
    except ValueError as err:
        same = " (is --reference the suspect itself?)" if args.reference else ""
        raise UserError(f"the query test cannot run on {len(examples)} records of {path}: {err}{same}") from None

    report = {
        "suspect": str(args.suspect),
        "order": str(args.order),
        "reference": args.reference,
        "by": args.by,
        "n": len(examples),
        "rho": rho,
        "p_value": p_value,
        "p_permutation": p_permutation,
        "permutations": args.permutations,
        "alpha": args.alpha,
        "verdict": "derived" if p_permutation <= args.alpha else "not shown",
        **{f"mean_nll_{name}": sum(values) / len(values) for name, values in nll.items()},
        "skipped": {"never_trained": never_trained, "no_target_in_context": len(trained) - len(kept)},
    }
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0
