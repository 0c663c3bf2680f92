"""Training throughput, lmlab vs Hugging Face Llama on the same model, batch, dtype and threads.

For every size × dtype × thread count the same Llama-style model is trained by

- **lmlab**: the product's own step, ``Trainer.train_step`` (accumulation normalised by the token
  count, clipping, AdamW with parameter groups, autocast), fed by an in-memory ``BatchSource``;
- **hf**: ``transformers.LlamaForCausalLM`` (SDPA attention, the lmlab weights loaded) in a plain
  PyTorch loop: ``model(input_ids, labels=…)``, backward, clip at 1, AdamW, ``zero_grad``;

in interleaved repetitions after discarded warmup steps (see ``common.py``). It prints a markdown
table (median tokens/s of each, the ratio lmlab/hf, achieved training FLOP/s as a fraction of the
matmul peak measured in the same run for that dtype) and writes every number to ``--json``.

    python benchmarks/throughput.py --sizes 7m,25m --dtypes fp32,bf16 --threads 1,2 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402

from lmlab.errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/throughput.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="7m,25m", help=f"comma list of {', '.join(common.PRESETS)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--threads", default=None, help="comma list of torch intra-op thread counts (CPU)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps per implementation")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default: adaptive)")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="duration of each matmul-peak loop")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    return args


def bench_row(size: str, dtype: str, threads: int, device: torch.device, args: argparse.Namespace, peak: float) -> dict:
    """Train ``size`` with both implementations in interleaved repetitions; one result row."""
    if args.compile:
        torch._dynamo.reset()  # a graph left from another size would be recompiled with dynamic shapes
    cfg, seq_len = common.model_config(size)
    if args.seq_len:
        seq_len = args.seq_len
        cfg.max_seq_len = seq_len
    trainer, batches = common.build_lmlab(cfg, seq_len, args.batch, dtype, device, compile_model=args.compile)
    hf_model = common.hf_llama(cfg, trainer.model)
    runners = [
        common.lmlab_runner(trainer, args.batch, seq_len),
        common.hf_plain_runner(hf_model, batches, dtype, device, compile_model=args.compile),
    ]
    rates = common.interleaved(runners, args.warmup, args.steps, args.reps)
    flops_token = common.training_flops_per_token(cfg, seq_len)
    row = {
        "size": size,
        "params": common.params_of(cfg),
        "seq_len": seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "compile": args.compile,
        "training_flops_per_token": flops_token,
        "matmul_peak_flops": peak,
        **common.environment(device, dtype, threads),
    }
    for runner in runners:
        tok_s = common.median(rates[runner.name])
        achieved = None if tok_s is None else tok_s * flops_token
        row[runner.name] = {
            "tokens_per_s": tok_s,
            "tokens_per_s_reps": rates[runner.name],
            "achieved_flops": achieved,
            "fraction_of_matmul_peak": None if achieved is None else achieved / peak,
            "first_timed_loss": float(runner.losses[0]) if runner.losses else None,
            "last_loss": float(runner.losses[-1]) if runner.losses else None,
            "error": runner.error,
        }
    lm, hf = row["lmlab"]["tokens_per_s"], row["hf"]["tokens_per_s"]
    row["ratio_lmlab_over_hf"] = lm / hf if lm and hf else None
    return row


HEADERS = [
    "size",
    "dtype",
    "threads",
    "lmlab tok/s",
    "HF tok/s",
    "lmlab / HF",
    "lmlab % of matmul peak",
    "HF % of matmul peak",
    "matmul peak",
    "device",
    "torch",
]


def table_cells(row: dict) -> list[str]:
    def rate(name: str) -> str:
        error = row[name]["error"]
        return f"failed: {error}" if error else common.fmt(row[name]["tokens_per_s"], "tok")

    return [
        row["size"],
        row["dtype"],
        str(row["threads"]),
        rate("lmlab"),
        rate("hf"),
        common.fmt(row["ratio_lmlab_over_hf"], "x"),
        common.fmt(row["lmlab"]["fraction_of_matmul_peak"], "pct"),
        common.fmt(row["hf"]["fraction_of_matmul_peak"], "pct"),
        common.fmt(row["matmul_peak_flops"], "flops"),
        row["device_name"],
        row["torch"],
    ]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = common.resolve_device(args.device)
        sizes = common.parse_list(args.sizes, tuple(common.PRESETS), "size")
        dtypes = common.parse_list(args.dtypes, ("fp32", "bf16"), "dtype")
        thread_counts = (
            [int(t) for t in common.parse_list(args.threads, None, "thread")]
            if args.threads
            else [torch.get_num_threads()]
        )
    except (UserError, ValueError) as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for dtype in dtypes:
            peak, peak_size = common.measure_matmul_peak(device, dtype, args.peak_seconds, args.peak_size)
            for size in sizes:
                rows.append(bench_row(size, dtype, threads, device, args, peak))
                rows[-1]["matmul_peak_size"] = peak_size
                print(common.markdown_table(HEADERS, [table_cells(rows[-1])]).splitlines()[-1], file=sys.stderr)
    print(common.markdown_table(HEADERS, [table_cells(row) for row in rows]))
    print(
        f"\nCommand: `{common.command_line()}`; batch {args.batch}, {args.steps} timed steps × {args.reps} "
        f"interleaved repetitions after {args.warmup} warmup steps; median tokens/s. FLOP/s = tokens/s × "
        "training FLOPs/token (3 × forward, lmlab.models.counting); peak = measured square matmul."
    )
    common.write_json(args.json, {"benchmark": "throughput", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
