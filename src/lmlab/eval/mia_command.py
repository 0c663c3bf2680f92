"""``lmlab eval mia RUN --members A --nonmembers B``: how well membership-inference attacks tell a run's training
texts from unseen ones.

Scores every text of A (members: texts the run trained on) and B (non-members: texts from the same distribution it
never saw) with each attack of ``lmlab.eval.mia`` (LOSS, zlib, Min-K%, Min-K%++, gradient norm, and the reference
model's calibration with ``--reference``), then prints per attack the AUC and the TPR at FPR ≤ 0.1%, 1% and 5%
as JSON. ``--out DIR`` (default RUN/mia) receives that report as ``mia.json``, one row per text in
``scores.jsonl`` and the ROC curves in ``roc.png``. The reference model must share the run's tokenizer: the score
compares the same tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.errors import DataError, UserError
from lmlab.eval.commands import require
from lmlab.eval.mia import ATTACKS, mia_report, mia_scores, plot_roc, roc_curve
from lmlab.eval.ood_command import read_set
from lmlab.safe_io import refuse_symlink, write_text_atomic
from lmlab.train.pretrained import load_frozen, load_model, run_directory
from lmlab.train.runtime import resolve_device

OUT_FILES = ("mia.json", "scores.jsonl", "roc.png")


def parse_attacks(text: str | None, has_reference: bool) -> list[str] | None:
    """The attacks ``--attacks`` names (None: every available one), checked against ``ATTACKS``."""
    if text is None:
        return None
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if not names or unknown:
        raise UserError(f"--attacks must be a comma list of {', '.join(ATTACKS)}, got {text!r}")
    if "reference" in names and not has_reference:
        raise UserError("--attacks reference needs --reference RUN (the model to calibrate against)")
    return names


def mia_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab eval mia",
        description="Membership inference: AUC and TPR at low FPR of each attack, members vs non-members.",
    )
    p.add_argument("run_dir", help="the run directory (or one of its checkpoints) to attack")
    docs_help = "documents: .jsonl ('text' field or 'messages') or .txt (one per line)"
    p.add_argument("--members", required=True, help=f"texts the run trained on; {docs_help}")
    p.add_argument("--nonmembers", required=True, help=f"texts it never saw, from the same distribution; {docs_help}")
    p.add_argument("--reference", help="a run with the same tokenizer, for the reference attack (loss difference)")
    p.add_argument(
        "--attacks", help=f"comma list of {', '.join(ATTACKS)} (default: all; reference only with --reference)"
    )
    p.add_argument(
        "--k", type=float, default=0.4, help="the fraction of lowest-scoring tokens of Min-K%% and Min-K%%++"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="directory for mia.json, scores.jsonl and roc.png (default: RUN/mia)")
    args = p.parse_args(argv)
    require(0 < args.k <= 1, "--k", args.k, "in (0, 1]")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    attacks = parse_attacks(args.attacks, args.reference is not None)
    out_dir = Path(args.out) if args.out else run_directory(args.run_dir) / "mia"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    for name in OUT_FILES:
        refuse_symlink(out_dir / name)
    sides = {"member": ("--members", args.members), "nonmember": ("--nonmembers", args.nonmembers)}
    texts = {side: read_set(flag, path, 0) for side, (flag, path) in sides.items()}
    device = resolve_device(args.device, "--device", UserError)  # before any model is loaded

    model, _, tokenizer = load_model(args.run_dir, device=device)
    if tokenizer is None:
        raise UserError(f"{args.run_dir}: the run has no tokenizer.json")
    reference = None
    if args.reference:
        reference = load_frozen(
            args.reference, device, role="reference", tokenizer=tokenizer, against=f"run {args.run_dir}",
            key="--reference",
        ).model  # fmt: skip
    scores = {}
    for side, (flag, path) in sides.items():
        try:
            scores[side] = mia_scores(
                model, tokenizer, texts[side], reference=reference, attacks=attacks, batch_size=args.batch_size,
                device=device, k=args.k,
            )  # fmt: skip
        except DataError as err:
            raise DataError(f"{flag} {path}: {err}") from None

    curves = {a: roc_curve(scores["member"][a], scores["nonmember"][a]) for a in scores["member"]}
    report = {
        "run": str(args.run_dir),
        "reference": args.reference,
        "members": str(args.members),
        "nonmembers": str(args.nonmembers),
        "k": args.k,
        "orientation": "scores are loss-like (higher = non-member); AUC = P(nonmember score > member score)",
        "attacks": mia_report(scores["member"], scores["nonmember"]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"set": side, "doc": i, **{a: values[i] for a, values in by_attack.items()}}
        for side, by_attack in scores.items()
        for i in range(len(texts[side]))
    ]
    write_text_atomic(out_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    plot_roc(curves, out_dir / "roc.png", title=f"membership inference: {Path(args.run_dir).name}")
    write_text_atomic(out_dir / "mia.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0
