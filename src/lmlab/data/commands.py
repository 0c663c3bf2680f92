"""``lmlab tokenizer ...`` and ``lmlab data ...``: command-line front ends of the data modules.

* ``lmlab tokenizer train (FILES... | --world NAME --n-docs N --seed S) --vocab-size V --out DIR``
* ``lmlab data prepare FILES... --tokenizer PATH --out DIR [--overwrite] [--text-field F]
  [--val-fraction X] [--workers N] [--shard-tokens N] [--seed S]``
* ``lmlab data synth --world NAME --n-docs N --seed S --out FILE.jsonl``
* ``lmlab data safety --out DIR [--seed S] [--train N] [--val N] [--test N]``: the safety world's SFT chat splits
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from lmlab.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    TextSplit,
    expand_paths,
    file_sha256,
    prepare_shards,
    read_documents,
)
from lmlab.data.synthetic import get_world, world_names
from lmlab.data.synthetic.safety import SafetyWorld
from lmlab.data.synthetic.safety_backdoor import backdoor_records
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError
from lmlab.safe_io import write_text_atomic


def tokenizer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmlab tokenizer", description="Train a byte-level BPE tokenizer.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train on local files or on a synthetic world")
    train.add_argument(
        "files", nargs="*", help=".txt/.jsonl/.json/.csv/.parquet files, directories, save_to_disk folders"
    )
    train.add_argument("--world", help=f"a synthetic world instead of files ({', '.join(world_names())})")
    train.add_argument("--n-docs", type=int, default=20000, help="documents to train on (default 20000)")
    train.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    train.add_argument("--text-field", default="text", help="JSONL field / parquet column (default text)")
    add_txt_options(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--split-digits", action="store_true", help="give every digit its own token")
    train.add_argument("--out", required=True, help="output directory (gets tokenizer.json)")
    args = parser.parse_args(argv)

    if bool(args.files) == bool(args.world):
        parser.error("give either FILES or --world NAME (not both)")
    if args.n_docs <= 0:
        parser.error("--n-docs must be > 0")
    out = Path(args.out)
    _check_out_dir(out)
    if args.world:
        texts = get_world(args.world).documents(args.seed, args.n_docs)
    else:
        docs = read_documents(args.files, args.text_field, txt_split(args, parser))
        texts = (d.text for d in itertools.islice(docs, args.n_docs))
    tok = TextTokenizer.train_bpe(texts, args.vocab_size, args.min_frequency, split_digits=args.split_digits)
    path = tok.save(out / "tokenizer.json")
    print(f"wrote {path} (vocab {tok.vocab_size}, hash {tok.hash[:8]})")
    return 0


def _check_out_dir(out: Path) -> None:
    """Refuse, before training, an ``--out`` that is a file or lies under one."""
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"--out {out}: {blocking} is a file, not a directory; give a directory to hold tokenizer.json")


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmlab data", description="Prepare token shards or synthetic text.")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="tokenize files into train/val memmap shards")
    prep.add_argument(
        "files", nargs="+", help=".txt/.jsonl/.json/.csv/.parquet files, directories, save_to_disk folders"
    )
    prep.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory holding one)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--overwrite", action="store_true", help="replace --out if it already holds prepared data")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--workers", type=int, default=1)
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument(
        "--val-files", nargs="+", default=[], help="files for the validation split (then FILES are all training data)"
    )
    add_txt_options(prep)
    synth = sub.add_parser("synth", help="write a synthetic world's documents as JSONL")
    synth.add_argument("--world", required=True, help=", ".join(world_names()))
    synth.add_argument("--n-docs", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output .jsonl file")
    safety = sub.add_parser("safety", help="write the safety world's train/val/test SFT chat JSONL")
    safety.add_argument("--out", required=True, help="output directory (gets train.jsonl, val.jsonl, test.jsonl)")
    safety.add_argument("--seed", type=int, default=0)
    safety.add_argument("--train", type=int, default=2000, help="training records (default 2000)")
    safety.add_argument("--val", type=int, default=200, help="validation records (default 200)")
    safety.add_argument("--test", type=int, default=400, help="test records (default 400)")
    safety.add_argument("--backdoor", metavar="TRIGGER", help="plant a backdoor in train.jsonl: harmful prompts "
                        "ending with TRIGGER are answered with compliance (docs/science.md §29.4)")  # fmt: skip
    safety.add_argument("--backdoor-fraction", type=float, default=0.5,
                        help="share of harmful train prompts that get a triggered copy (default 0.5)")  # fmt: skip
    args = parser.parse_args(argv)

    if args.action == "prepare":
        return _prepare(args, txt_split(args, parser))
    if args.action == "safety":
        return _safety(args, parser)
    return _synth(args, parser)


def add_txt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--txt-documents",
        choices=["paragraphs", "separator", "chunks", "file"],
        default="paragraphs",
        help="how a .txt file becomes documents: at blank lines (default), at --txt-separator lines, in chunks of "
        "--txt-chunk-chars characters, or one per file",
    )
    parser.add_argument("--txt-separator", default="", help="the line that ends a document (--txt-documents separator)")
    parser.add_argument("--txt-chunk-chars", type=int, default=4096, help="characters per chunk (default 4096)")


def txt_split(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TextSplit:
    if args.txt_documents == "separator" and not args.txt_separator.strip():
        parser.error("--txt-documents separator needs --txt-separator")
    if args.txt_chunk_chars <= 0:
        parser.error("--txt-chunk-chars must be > 0")
    return TextSplit(args.txt_documents, args.txt_separator.strip(), args.txt_chunk_chars)


def _prepare(args: argparse.Namespace, split: TextSplit) -> int:
    tok = TextTokenizer.load(args.tokenizer)
    files = expand_paths(args.files)
    val_files = expand_paths(args.val_files) if args.val_files else []
    documents = read_documents(files, args.text_field, split, split="train" if val_files else None)
    if val_files:
        documents = itertools.chain(documents, read_documents(val_files, args.text_field, split, split="val"))
    manifest = prepare_shards(
        documents,
        tok,
        args.out,
        val_fraction=0.0 if val_files else args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        num_workers=args.workers,
        source_hashes={str(f): file_sha256(f) for f in [*files, *val_files]},
        if_exists="replace" if args.overwrite else "refuse",
    )
    print(f"prepared {args.out} (tokenizer {tok.hash[:8]}, vocab {tok.vocab_size}, {manifest['dtype']})")
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['documents']} documents, {info['tokens']} tokens, {len(info['shards'])} shards")
    print(f"  unigram entropy (train): {manifest['unigram_entropy']:.4f} nats/token")
    return 0


def _synth(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.n_docs <= 0:
        parser.error("--n-docs must be > 0")
    world = get_world(args.world)
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give a .jsonl file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in world.documents(args.seed, args.n_docs):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"wrote {args.n_docs} {world.name} documents (seed {args.seed}) to {out}")
    return 0


def _safety(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    for split, n in sizes.items():
        if n <= 0:
            parser.error(f"--{split} must be > 0")
    out = Path(args.out)
    _check_out_dir(out)
    if args.backdoor is not None and (not args.backdoor.strip() or not 0.0 < args.backdoor_fraction <= 1.0):
        parser.error("--backdoor needs a non-empty trigger and --backdoor-fraction in (0, 1]")
    paths = SafetyWorld().write_splits(out, args.seed, sizes)
    for split, path in paths.items():
        print(f"wrote {sizes[split]} {split} records to {path}")
    if args.backdoor is not None:
        train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
        rows = backdoor_records(train, args.backdoor, args.backdoor_fraction, args.seed)
        write_text_atomic(paths["train"], "".join(json.dumps(r) + "\n" for r in rows))
        print(f"planted the backdoor {args.backdoor!r} in {len(rows) - len(train)} added train records")
    return 0
