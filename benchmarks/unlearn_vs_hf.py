"""Unlearning throughput: ``lmlab unlearn`` (NPO+RT) against a plain Hugging Face loop of the same method.

Same model, batches and update on both sides:

- model: the unlearning benchmark's target (``lmlab unlearn bench prepare``), and its ``lmlab export-hf`` copy
  loaded with ``AutoModelForCausalLM`` (fp32, sdpa) as the HF policy and, frozen, as its reference;
- batches: the exact stream of the lmlab run (``recipes.unlearn.UnlearnBatches``, same seed): per step 16 forget
  questions with their answers and 16 paired retain questions, right-padded, answer tokens as targets;
- update: NPO+RT (β 0.1, weights 1 and 1) and AdamW (lr 1e-4, wd 0.01, constant), no clipping on either side.
  The HF loop is what open-unlearning's trainer computes: the policy's logits on the forget batch, per-sequence
  summed answer log-probs by cross-entropy, the reference's under ``no_grad``, the NPO loss, plus the retain
  batch's ``outputs.loss`` (the token mean with labels −100 outside the answers), one backward, one step.

Each side runs in its own fresh process (``--side``); speed is steps per second over the steps after
``--warmup`` from each side's own clock (lmlab's ``metrics.jsonl`` times with ``train.log_every=1``; the loop's
``perf_counter``), and tokens per second count every id of both batches (padding included, the same on both
sides). Sides alternate ``--reps`` times; medians are reported.

Usage: ``python benchmarks/unlearn_vs_hf.py --bench bench/unlearning --out /tmp/unlearn_speed.json``
(about 5 minutes on 2 CPU cores); smoke: ``--steps 4 --warmup 1 --reps 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LR, WD, BETA = 1e-4, 0.01, 0.1


def run_lmlab(bench: Path, split: str, steps: int, threads: int, work: Path) -> list[float]:
    """``lmlab unlearn`` for ``steps`` steps; the step times from its metrics."""
    run = work / "lmlab-run"
    config = work / "unlearn.yaml"
    config.write_text("name: speed\n")
    cmd = [
        sys.executable, "-m", "lmlab.cli", "unlearn", str(config), "--bench", str(bench), "--split", split,
        "--out", str(run), "--overwrite", "--quiet", "unlearn.method.kind=npo", f"unlearn.method.beta={BETA}",
        "unlearn.epochs=0", f"train.steps={steps}", "train.micro_batch_size=16", "train.log_every=1",
        "train.eval_every=1000000", "train.ckpt_every=1000000", "train.progress=false", f"train.threads={threads}",
        f"optim.lr={LR}", f"optim.weight_decay={WD}", "optim.grad_clip=0", "schedule.name=constant",
        "schedule.warmup_steps=0", "unlearn.eval_items=8",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r.get("kind") == "train"]
    tokens = [r["tokens"] for r in records if r.get("kind") == "train"]
    return [times[0]] + [b - a for a, b in zip(times, times[1:])], [tokens[0]] + [
        b - a for a, b in zip(tokens, tokens[1:])
    ]


def run_hf(bench: Path, split: str, steps: int, threads: int, work: Path) -> tuple[list[float], list[int]]:
    """The plain HF loop on the same batches; its step times and token counts."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lmlab.data.chat import resolve_template
    from lmlab.data.tokenizer import TextTokenizer
    from lmlab.data.unlearning_bench import BenchData
    from lmlab.eval.answers import encode_qa
    from lmlab.recipes.hf_commands import export_hf
    from lmlab.recipes.unlearn import UnlearnBatches

    torch.set_num_threads(threads)
    data = BenchData.open(bench)
    target = data.model("target")
    hf_dir = work / "hf-target"
    if not (hf_dir / "config.json").is_file():
        export_hf(target, hf_dir, overwrite=True)
    tokenizer = TextTokenizer.load(target / "tokenizer.json")
    template = resolve_template(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    forgotten = set(data.manifest["forget_people"][split])
    forget_items = data.items(split)
    retain_items = data.items("retain") + [it for it in data.items("forget10") if it["person"] not in forgotten]

    def enc(item):
        return encode_qa(tokenizer, item["question"], item["answer"], template=template, max_len=128, where=item["id"])

    forget = [enc(it) for it in forget_items]
    batches = UnlearnBatches(
        forget, [enc(it) for it in retain_items], [[f] for f in forget], pad, 0, ("forget", "retain")
    )
    policy = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    reference.eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WD)

    def labelled(ids, mask):
        labels = ids.masked_fill(~mask, -100)
        return ids, (ids != pad) | mask, labels

    def sequence_logps(model, ids, attention, labels):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        return -nll.sum(-1)

    times, tokens = [], []
    for _ in range(steps):
        start = time.perf_counter()  # batch assembly included, as in lmlab's step clock
        batch = batches.next_batch(16)
        f_ids, f_att, f_lab = labelled(batch["forget_ids"], batch["forget_mask"])
        r_ids, r_att, r_lab = labelled(batch["retain_ids"], batch["retain_mask"])
        policy_logps = sequence_logps(policy, f_ids, f_att, f_lab)
        with torch.no_grad():
            ref_logps = sequence_logps(reference, f_ids, f_att, f_lab)
        forget_loss = (-(2.0 / BETA) * F.logsigmoid(-BETA * (policy_logps - ref_logps))).mean()
        retain_loss = policy(input_ids=r_ids, attention_mask=r_att, labels=r_lab).loss
        (forget_loss + retain_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        tokens.append(int(f_ids.numel() + r_ids.numel()))
    return times, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True)
    p.add_argument("--split", default="forget05")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--side", choices=["lmlab", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    bench = Path(args.bench).resolve()
    if args.side:
        runner = run_lmlab if args.side == "lmlab" else run_hf
        times, tokens = runner(bench, args.split, args.steps, args.threads, Path(args.work))
        print(json.dumps({"times": times, "tokens": tokens}))
        return
    work = Path(tempfile.mkdtemp(prefix="unlearn-speed-"))
    results: dict[str, list[dict]] = {"lmlab": [], "hf": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for _ in range(args.reps):
        for side in ("lmlab", "hf"):
            cmd = [sys.executable, __file__, "--bench", str(bench), "--split", args.split, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--side", side, "--work", str(work)]  # fmt: skip
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            )
            measured = json.loads(line)
            kept_t, kept_n = measured["times"][args.warmup :], measured["tokens"][args.warmup :]
            results[side].append({"steps_per_s": len(kept_t) / sum(kept_t), "tokens_per_s": sum(kept_n) / sum(kept_t)})
    summary = {
        side: {k: statistics.median(r[k] for r in runs) for k in ("steps_per_s", "tokens_per_s")}
        for side, runs in results.items()
    }
    summary["ratio_lmlab_over_hf"] = summary["lmlab"]["steps_per_s"] / summary["hf"]["steps_per_s"]
    report = {"config": vars(args), "reps": results, "median": summary}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
