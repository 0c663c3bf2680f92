"""``lmlab merge``: one model from several runs of the same architecture (``lmlab.models.merging``).

    lmlab merge runs/a runs/b runs/c --out runs/soup                          # uniform soup
    lmlab merge runs/a runs/b runs/c --out runs/greedy --method greedy --val val.jsonl
    lmlab merge runs/a runs/b --out runs/mix --method linear --weights 0.7 0.3
    lmlab merge runs/a runs/b --out runs/s --method slerp --t 0.5
    lmlab merge runs/a runs/b --out runs/ta --method task-arithmetic --base runs/base --scale 0.8
    lmlab merge runs/a runs/b --out runs/ties --method ties --base runs/base --density 0.2
    lmlab merge runs/a --last 3 --out runs/a_avg                              # average the last 3 checkpoints

The runs (or checkpoint directories) must have the same model section and tokenizer. The output is a run
directory like an imported one: the first run's config and tokenizer files, the merged weights as a step-0
checkpoint whose ``meta.json`` records the method and inputs, and ``merge.json`` with the held-out scores of a
greedy soup. ``--val`` is an SFT-format dataset (any source ``lmlab.data.rows`` reads); its score is the mean
loss on the tokens SFT learns (assistant turns, or all tokens of ``{"text"}`` records).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from lmlab.config import RunConfig, save_config, to_dict
from lmlab.errors import UserError
from lmlab.models import merging
from lmlab.safe_io import write_text_atomic
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.pretrained import load_run_model

METHODS = ("uniform", "greedy", "linear", "slerp", "task-arithmetic", "ties")


def _load(path: str | Path):
    loaded = load_run_model(path, "cpu")
    return loaded, ckpt_io.model_state_dict(loaded.model)


def _same_model(loaded: list, names: list[str]) -> None:
    first = loaded[0]
    for other, name in zip(loaded[1:], names[1:]):
        if to_dict(other.cfg.model) != to_dict(first.cfg.model):
            raise UserError(f"{name} has another model section than {names[0]}: runs to merge share an architecture")
        if (other.tokenizer and other.tokenizer.hash) != (first.tokenizer and first.tokenizer.hash):
            raise UserError(f"{name} has another tokenizer than {names[0]}: runs to merge share a tokenizer")


def held_out_score(cfg: RunConfig, tokenizer, val: str, batch_size: int = 8):
    """``score(state) -> mean loss`` on the SFT-format dataset ``val`` (learned tokens only)."""
    from lmlab.data.chat import read_records
    from lmlab.models.build import build_model
    from lmlab.recipes.sft import encode_rows, evaluate_rows

    records = read_records(val, cfg.sft.columns)
    rows, _ = encode_rows(records, tokenizer, cfg)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    model = build_model(cfg.model, "lm")

    def score(state: dict) -> float:
        model.load_state_dict(state)
        model.eval()
        packed = cfg.sft.packing
        pad_to = cfg.train.seq_len if packed else None
        return evaluate_rows(
            model, rows, batch_size=batch_size, pad_id=pad, pad_to=pad_to, packed=packed, device="cpu"
        )["val_loss"]

    return score


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Merge per the parsed arguments; write the run directory; return what ``merge.json`` records."""
    out = Path(args.out)
    for source in [*args.runs, *([args.base] if args.base else [])]:
        if out.resolve() == Path(source).resolve() or out.resolve() in Path(source).resolve().parents:
            raise UserError(f"--out {out} is one of the runs being merged ({source}); choose a new directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to replace it, or choose a new --out")
    if args.last:
        if len(args.runs) != 1:
            raise UserError("--last N averages the checkpoints of one run; give exactly one run")
        checkpoints = ckpt_io.list_checkpoints(args.runs[0])[-args.last :]
        if len(checkpoints) < 2:
            raise UserError(f"{args.runs[0]} has {len(checkpoints)} checkpoint(s); --last needs at least 2")
        inputs = [str(c) for c in checkpoints]
    else:
        inputs = list(args.runs)
    if len(inputs) < 2:
        raise UserError("give at least two runs (or one run with --last N) to merge")
    pairs = [_load(p) for p in inputs]
    loaded, states = [p[0] for p in pairs], [p[1] for p in pairs]
    _same_model(loaded, inputs)
    try:
        merging.check_compatible(states, inputs)
    except ValueError as err:
        raise UserError(str(err)) from None
    method = "uniform" if args.last else args.method
    record: dict[str, Any] = {"method": method, "inputs": inputs}
    if method in ("uniform", "linear"):
        weights = args.weights if method == "linear" else None
        if method == "linear" and weights is None:
            raise UserError("--method linear needs --weights (one per run)")
        merged = merging.average(states, weights)
        record["weights"] = weights
    elif method == "slerp":
        if len(states) != 2:
            raise UserError("--method slerp interpolates two runs")
        merged, record["t"] = merging.slerp(states[0], states[1], args.t), args.t
    elif method in ("task-arithmetic", "ties"):
        if not args.base:
            raise UserError(f"--method {method} needs --base: the run the others were fine-tuned from")
        base_loaded, base = _load(args.base)
        _same_model([loaded[0], base_loaded], [inputs[0], args.base])
        record.update(base=args.base, scale=args.scale)
        if method == "ties":
            merged = merging.ties(base, states, density=args.density, scale=args.scale)
            record["density"] = args.density
        else:
            merged = merging.task_arithmetic(base, states, scale=args.scale)
    else:  # greedy
        if not args.val:
            raise UserError("--method greedy needs --val: held-out data to decide which runs join the soup")
        score = held_out_score(loaded[0].cfg, loaded[0].tokenizer, args.val)
        merged, chosen, own = merging.greedy_soup(states, score)
        record.update(val=args.val, chosen=[inputs[i] for i in chosen], val_loss=dict(zip(inputs, own)))
        record["soup_val_loss"] = score(merged)
    _write_run(out, loaded[0], merged, record)
    return record


def _write_run(out: Path, first, state: dict, record: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    root = first.checkpoint.parent.parent
    tokenizer = first.tokenizer
    cfg = first.cfg
    if tokenizer is not None:
        write_text_atomic(out / "tokenizer.json", tokenizer.to_json())
        for name, text in tokenizer.companion_files().items():
            write_text_atomic(out / name, text)
        path = str((out / "tokenizer.json").resolve())
        cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=path))
    ckpt_io.save_checkpoint(out, 0, state, model_cfg=cfg.model, meta={"source": "merge", **record})
    save_config(cfg, out / "config.yaml")
    write_text_atomic(out / "merge.json", json.dumps({**record, "from_config": str(root / "config.yaml")}, indent=1))


def merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab merge", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run directories (or checkpoint directories) of one architecture")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--method", choices=METHODS, default="uniform")
    p.add_argument("--weights", type=float, nargs="+", help="--method linear: one weight per run")
    p.add_argument("--t", type=float, default=0.5, help="--method slerp: 0 = the first run, 1 = the second")
    p.add_argument("--base", help="--method task-arithmetic / ties: the run the others were fine-tuned from")
    p.add_argument("--scale", type=float, default=1.0, help="task-arithmetic / ties: λ on the merged task vector")
    p.add_argument("--density", type=float, default=0.2, help="ties: share of each task vector's entries kept")
    p.add_argument("--val", help="--method greedy: held-out SFT-format data")
    p.add_argument("--last", type=int, default=0, help="average the last N checkpoints of one run")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        record = merge(args)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"merged {len(record['inputs'])} models ({record['method']}) -> {args.out}")
    if "chosen" in record:
        print(f"  greedy soup of {len(record['chosen'])}: val loss {record['soup_val_loss']:.4f}")
    return 0
