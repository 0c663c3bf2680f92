"""The benchmark suite: one command, one JSON file and one markdown report.

CPU part (always, unless ``--gpu-only``):

- tokens/s of lmlab's ``Trainer`` vs Hugging Face Llama in a plain PyTorch loop vs
  ``transformers.Trainer``, the same model, batch, dtype and threads, interleaved repetitions
  (``common.py``), with the lmlab/peer ratios and achieved training FLOP/s as a fraction of a matmul
  peak measured in the same run;
- peak memory of each implementation, measured in a fresh child process per implementation (peak
  RSS, sampled by a thread in the child; its growth over the RSS after imports is shown too);
- data-parallel scaling on gloo: global tokens/s of 1 and ``--nproc`` ranks of lmlab's own DDP path
  (``lmlab.train.distributed.setup_distributed`` + ``Trainer``; weak scaling, same batch per rank),
  and the efficiency ``tok/s(n) / (n · tok/s(1))``.

GPU part (when CUDA is present, unless ``--cpu-only``): ~124M and ~350M models at sequence 1024 in
bf16: lmlab with ``torch.compile``, lmlab with ``torch.compile`` and FSDP2 (``fully_shard`` through
``distributed.strategy=fsdp`` on a one-process group) and ``transformers.Trainer`` (``--hf-compile``
to compile it too), each run alone so its ``torch.cuda.max_memory_allocated`` is its own; tokens/s,
MFU against the GPU's data-sheet dense bf16 peak and against a measured bf16 matmul peak. Failures
(out of memory, compilation) are reported in their row and the suite goes on.

    python benchmarks/suite.py --json suite.json --markdown suite.md
    python benchmarks/suite.py --quick            # seconds: the smoke test's settings
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402

from lmlab.errors import UserError  # noqa: E402

IMPLS = ("lmlab", "hf", "hf_trainer")
IMPL_TITLES = {"lmlab": "lmlab Trainer", "hf": "HF plain loop", "hf_trainer": "HF Trainer"}
WRAPPING_NOTE = (
    "Each rank runs lmlab's own data-parallel path (lmlab.train.distributed.setup_distributed with "
    "distributed.strategy=ddp, backend gloo, then the Trainer, which wraps the model in DDP); one rank "
    "trains without a process group, as `lmlab train` does. Weak scaling: the batch is per rank."
)
GPU_IMPLS = ("lmlab", "lmlab_fsdp", "hf_trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/suite.py", description=__doc__.split("\n")[0])
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--cpu-only", action="store_true", help="skip the GPU part")
    part.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    parser.add_argument("--quick", action="store_true", help="tiny model, one step: checks the suite runs")
    parser.add_argument("--cpu-sizes", default="7m,25m")
    parser.add_argument("--cpu-dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the CPU rows (default: torch's)")
    parser.add_argument("--batch", type=int, default=8, help="CPU sequences per step")
    parser.add_argument("--steps", type=int, default=4, help="CPU timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="CPU discarded steps per implementation")
    parser.add_argument("--reps", type=int, default=3, help="CPU interleaved repetitions")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the gloo scaling row (compared with 1)")
    parser.add_argument("--dist-threads", type=int, default=1, help="torch threads per rank in the scaling row")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory child processes")
    parser.add_argument("--gpu-sizes", default="124m,350m")
    parser.add_argument("--gpu-batch", type=int, default=8, help="GPU sequences per step (sequence 1024)")
    parser.add_argument("--gpu-steps", type=int, default=10, help="GPU timed steps per repetition")
    parser.add_argument("--gpu-warmup", type=int, default=3, help="GPU discarded steps (compilation included)")
    parser.add_argument("--gpu-reps", type=int, default=2)
    parser.add_argument("--hf-compile", action="store_true", help="TrainingArguments(torch_compile=True) on GPU")
    parser.add_argument("--no-compile", action="store_true", help="run lmlab eagerly on GPU (no torch.compile)")
    parser.add_argument(
        "--gpu-compile",
        choices=("blocks", "full"),
        default="blocks",
        help="lmlab on GPU: compile each block, or the whole forward with head and loss (one process)",
    )
    parser.add_argument(
        "--gpu-loss-impl",
        choices=("standard", "chunked", "fused"),
        default="standard",
        help="lmlab on GPU: objective.loss_impl (fused: no [B,T,V] logits)",
    )
    parser.add_argument("--gpu-float8", action="store_true", help="lmlab on GPU: train.float8 (torchao, sm89+)")
    parser.add_argument(
        "--gpu-impls", default=",".join(GPU_IMPLS), help=f"comma list of {', '.join(GPU_IMPLS)} (lmlab_fsdp: FSDP2)"
    )
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="duration of each matmul-peak loop")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--markdown", default=None, help="write the markdown report here (it is printed too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cpu_sizes = args.gpu_sizes = "tiny"
        args.cpu_dtypes = "fp32"
        args.batch = args.gpu_batch = 2
        args.steps = args.gpu_steps = args.reps = args.gpu_reps = args.warmup = args.gpu_warmup = 1
        args.peak_seconds = 0.05
    common.parse_list(args.cpu_sizes, tuple(common.PRESETS), "size")  # refuse bad lists before any run
    common.parse_list(args.gpu_sizes, tuple(common.PRESETS), "size")
    common.parse_list(args.cpu_dtypes, ("fp32", "bf16"), "dtype")
    common.parse_list(args.gpu_impls, GPU_IMPLS, "GPU implementation")
    for name in ("batch", "steps", "reps", "nproc", "dist_threads", "gpu_batch", "gpu_steps", "gpu_reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------- CPU


def cpu_row(size: str, dtype: str, threads: int, args: argparse.Namespace, peak: float, out_dir: str) -> dict:
    """lmlab vs HF plain loop vs HF Trainer, interleaved, on one size and dtype; memory in child processes."""
    device = torch.device("cpu")
    cfg, seq_len = common.model_config(size)
    trainer, batches = common.build_lmlab(cfg, seq_len, args.batch, dtype, device)
    runners = [
        common.lmlab_runner(trainer, args.batch, seq_len),
        common.hf_plain_runner(common.hf_llama(cfg, trainer.model), batches, dtype, device),
        common.HFTrainerRunner(common.hf_llama(cfg, trainer.model), batches, dtype, device, out_dir),
    ]
    rates = common.interleaved(runners, args.warmup, args.steps, args.reps)
    flops_token = common.training_flops_per_token(cfg, seq_len)
    row = {
        "size": size,
        "params": common.params_of(cfg),
        "seq_len": seq_len,
        "batch": args.batch,
        "training_flops_per_token": flops_token,
        "matmul_peak_flops": peak,
        **common.environment(device, dtype, threads),
    }
    for runner in runners:
        tok_s = common.median(rates[runner.name])
        row[runner.name] = {
            "tokens_per_s": tok_s,
            "steps_per_s": None if tok_s is None else tok_s / runner.tokens_per_step,
            "tokens_per_s_reps": rates[runner.name],
            "fraction_of_matmul_peak": None if tok_s is None else tok_s * flops_token / peak,
            "error": runner.error,
        }
    for peer in ("hf", "hf_trainer"):
        lm, other = row["lmlab"]["tokens_per_s"], row[peer]["tokens_per_s"]
        row[f"ratio_lmlab_over_{peer}"] = lm / other if lm and other else None
    if not args.no_memory:
        for impl in IMPLS:
            probe = common.run_in_child(common.memory_probe, impl, size, dtype, args.batch, args.warmup + 1, threads)
            row[impl]["peak_rss"] = probe.get("peak_rss")
            row[impl]["baseline_rss"] = probe.get("baseline_rss")
            row[impl]["memory_error"] = probe.get("error")
    del trainer, runners
    return row


def scaling_rows(args: argparse.Namespace, size: str, dtype: str) -> dict:
    """Global tokens/s of 1 and ``--nproc`` gloo ranks and the weak-scaling efficiency."""
    runs = {}
    for world in (1, args.nproc):
        runs[world] = common.ddp_scaling(world, size, dtype, args.batch, args.warmup, args.steps, args.dist_threads)
    one, many = runs[1].get("tokens_per_s"), runs[args.nproc].get("tokens_per_s")
    return {
        "size": size,
        "ranks": args.nproc,
        "threads_per_rank": args.dist_threads,
        "batch_per_rank": args.batch,
        "tokens_per_s_1": one,
        "tokens_per_s_n": many,
        "efficiency": many / (args.nproc * one) if one and many else None,
        "errors": [r["error"] for r in runs.values() if r.get("error")],
        "wrapper_n": runs[args.nproc].get("wrapper"),
        "note": WRAPPING_NOTE,
        **common.environment(torch.device("cpu"), dtype, args.dist_threads),
    }


def cpu_part(args: argparse.Namespace) -> tuple[list[dict], dict]:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sizes = common.parse_list(args.cpu_sizes, tuple(common.PRESETS), "size")
    dtypes = common.parse_list(args.cpu_dtypes, ("fp32", "bf16"), "dtype")
    peak_size = 64 if args.quick else None
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for dtype in dtypes:
            peak, n = common.measure_matmul_peak(torch.device("cpu"), dtype, args.peak_seconds, peak_size)
            for size in sizes:
                rows.append(cpu_row(size, dtype, threads, args, peak, out_dir))
                rows[-1]["matmul_peak_size"] = n
                print(f"cpu {size} {dtype} done", file=sys.stderr)
    scaling = scaling_rows(args, sizes[0], dtypes[0])
    print("cpu scaling done", file=sys.stderr)
    return rows, scaling


# --------------------------------------------------------------------------- GPU


def gpu_impl(impl: str, size: str, args: argparse.Namespace, out_dir: str, device: torch.device) -> dict:
    """One implementation alone on the device (bf16): warmup, ``--gpu-reps`` × ``--gpu-steps`` timed
    steps and, on CUDA, its own ``max_memory_allocated``; any failure is returned as ``error``."""
    cfg, seq_len = common.model_config(size)
    runner = None
    result: dict = {"tokens_per_s": None, "tokens_per_s_reps": [], "peak_memory": None, "error": None}
    cuda = device.type == "cuda"
    # Compile each row afresh: a graph left from another size would be recompiled with dynamic shapes.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        result["memory_before"] = torch.cuda.memory_allocated(device)  # leftovers of earlier rows, if any
    ctx = None
    try:
        if impl in ("lmlab", "lmlab_fsdp"):
            if impl == "lmlab_fsdp":  # FSDP2 (fully_shard per block, then the root) on a one-process group
                ctx = common.lmlab_dist_context("fsdp", "nccl" if cuda else "gloo", device, 0, 1)
            compile_model = False if args.no_compile else (True if args.gpu_compile == "blocks" else "full")
            trainer, _ = common.build_lmlab(
                cfg, seq_len, args.gpu_batch, "bf16", device, compile_model=compile_model, dist=ctx,
                loss_impl=args.gpu_loss_impl, float8=args.gpu_float8,
            )  # fmt: skip
            runner = common.lmlab_runner(trainer, args.gpu_batch, seq_len)
            runner.name = impl
        else:
            torch.manual_seed(0)
            batches = common.SyntheticBatches(cfg.vocab_size, seq_len, args.gpu_batch)
            model = common.hf_llama(cfg)
            runner = common.HFTrainerRunner(model, batches, "bf16", device, out_dir, compile_model=args.hf_compile)
        rates = common.interleaved([runner], args.gpu_warmup, args.gpu_steps, args.gpu_reps)[runner.name]
        result.update(tokens_per_s=common.median(rates), tokens_per_s_reps=rates, error=runner.error)
        if cuda:
            result["peak_memory"] = torch.cuda.max_memory_allocated(device)
    except Exception as err:  # noqa: BLE001  OOM or compile failure while building: report it in the row
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    finally:
        del runner
        if ctx is not None:
            ctx.close()
        if cuda:
            torch.cuda.empty_cache()
    return result


def gpu_part(args: argparse.Namespace, device: torch.device | None = None) -> list[dict]:
    """The GPU rows (``device`` defaults to the current CUDA device; the smoke test passes the CPU)."""
    device = device or torch.device("cuda")
    measured, peak_size = common.measure_matmul_peak(device, "bf16", args.peak_seconds, 64 if args.quick else None)
    nominal = common.nominal_bf16_peak(device)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for size in common.parse_list(args.gpu_sizes, tuple(common.PRESETS), "size"):
            cfg, seq_len = common.model_config(size)
            flops_token = common.training_flops_per_token(cfg, seq_len)
            row = {
                "size": size,
                "params": common.params_of(cfg),
                "seq_len": seq_len,
                "batch": args.gpu_batch,
                "training_flops_per_token": flops_token,
                "nominal_bf16_peak_flops": nominal,
                "matmul_peak_flops": measured,
                "matmul_peak_size": peak_size,
                "lmlab_compile": False if args.no_compile else args.gpu_compile,
                "lmlab_loss_impl": args.gpu_loss_impl,
                "lmlab_float8": args.gpu_float8,
                "hf_compile": args.hf_compile,
                **common.environment(device, "bf16", torch.get_num_threads()),
            }
            for impl in common.parse_list(args.gpu_impls, GPU_IMPLS, "GPU implementation"):
                result = gpu_impl(impl, size, args, out_dir, device)
                tok_s = result["tokens_per_s"]
                result["steps_per_s"] = None if tok_s is None else tok_s / (args.gpu_batch * seq_len)
                achieved = None if tok_s is None else tok_s * flops_token
                result["mfu"] = None if achieved is None or nominal is None else achieved / nominal
                result["fraction_of_matmul_peak"] = None if achieved is None else achieved / measured
                row[impl] = result
                print(f"gpu {size} {impl} done", file=sys.stderr)
            hf = row.get("hf_trainer", {}).get("tokens_per_s")
            for impl in ("lmlab", "lmlab_fsdp"):
                lm = row.get(impl, {}).get("tokens_per_s")
                row[f"ratio_{impl}_over_hf_trainer"] = lm / hf if lm and hf else None
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def _rate(result: dict) -> str:
    if result.get("error"):
        return f"failed: {result['error']}"
    return common.fmt(result.get("tokens_per_s"), "tok")


def _memory(result: dict) -> str:
    """``peak (+ growth over the RSS after imports)``."""
    if result.get("memory_error"):
        return f"failed: {result['memory_error']}"
    peak, base = result.get("peak_rss"), result.get("baseline_rss")
    if peak is None or base is None:
        return "—"
    return f"{common.fmt(peak, 'mib')} (+{(peak - base) / 2**20:,.0f})"


def _gpu_title(impl: str, row: dict) -> str:
    if impl == "hf_trainer":
        return "HF Trainer (compile)" if row["hf_compile"] else "HF Trainer"
    mode = "compile" if row["lmlab_compile"] else "eager"
    return f"lmlab ({mode}, FSDP2 on 1 GPU)" if impl == "lmlab_fsdp" else f"lmlab ({mode})"


def markdown(cpu_rows: list[dict], scaling: dict | None, gpu_rows: list[dict], note: str | None) -> str:
    parts = [f"Command: `{common.command_line()}`"]
    if cpu_rows:
        env = cpu_rows[0]
        parts.append(
            f"## CPU: {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"threads: {env['threads']}"
        )
        headers = ["size", "dtype", "threads"]
        headers += [f"{IMPL_TITLES[i]} tok/s" for i in IMPLS]
        headers += ["lmlab / HF loop", "lmlab / HF Trainer"]
        headers += [f"{IMPL_TITLES[i]} % of matmul peak" for i in IMPLS]
        headers += ["matmul peak"] + [f"{IMPL_TITLES[i]} peak RSS (+ over imports)" for i in IMPLS]
        table = []
        for r in cpu_rows:
            cells = [r["size"], r["dtype"], str(r["threads"])]
            cells += [_rate(r[i]) for i in IMPLS]
            cells += [common.fmt(r["ratio_lmlab_over_hf"], "x"), common.fmt(r["ratio_lmlab_over_hf_trainer"], "x")]
            cells += [common.fmt(r[i]["fraction_of_matmul_peak"], "pct") for i in IMPLS]
            cells += [common.fmt(r["matmul_peak_flops"], "flops")] + [_memory(r[i]) for i in IMPLS]
            table.append(cells)
        parts.append(common.markdown_table(headers, table))
    if scaling is not None:
        parts.append(f"## CPU data-parallel scaling (gloo, {scaling['dtype']}, {scaling['size']})")
        headers = ["ranks", "threads/rank", "batch/rank", "tok/s, 1 rank", "tok/s, n ranks", "efficiency"]
        cells = [
            str(scaling["ranks"]),
            str(scaling["threads_per_rank"]),
            str(scaling["batch_per_rank"]),
            common.fmt(scaling["tokens_per_s_1"], "tok"),
            common.fmt(scaling["tokens_per_s_n"], "tok"),
            common.fmt(scaling["efficiency"], "pct"),
        ]
        parts.append(common.markdown_table(headers, [cells]))
        parts.append(scaling["note"] + (f" Errors: {'; '.join(scaling['errors'])}" if scaling["errors"] else ""))
    if gpu_rows:
        env = gpu_rows[0]
        parts.append(f"## GPU: {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, bf16")
        headers = ["size", "implementation", "batch × seq", "tok/s", "vs HF Trainer", "MFU", "% of matmul peak"]
        headers += ["peak memory"]
        table = []
        for r in gpu_rows:
            for impl in GPU_IMPLS:
                if impl not in r:
                    continue
                result = r[impl]
                table.append(
                    [
                        r["size"],
                        _gpu_title(impl, r),
                        f"{r['batch']} × {r['seq_len']}",
                        _rate(result),
                        common.fmt(r.get(f"ratio_{impl}_over_hf_trainer"), "x"),
                        common.fmt(result["mfu"], "pct"),
                        common.fmt(result["fraction_of_matmul_peak"], "pct"),
                        common.fmt(result["peak_memory"], "mib"),
                    ]
                )
        parts.append(common.markdown_table(headers, table))
        nominal = env["nominal_bf16_peak_flops"]
        parts.append(
            f"MFU against the data-sheet dense bf16 peak ({common.fmt(nominal, 'flops')}); measured bf16 matmul "
            f"peak {common.fmt(env['matmul_peak_flops'], 'flops')}. HF Trainer compiled: {env['hf_compile']}."
        )
    if note:
        parts.append(note)
    parts.append(
        "Tokens/s: median over interleaved repetitions after discarded warmup steps; FLOP/s = tokens/s × "
        "training FLOPs/token (3 × forward, lmlab.models.counting)."
    )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as err:
        print(f"suite.py: error: {err}", file=sys.stderr)
        return 2
    cpu_rows: list[dict] = []
    scaling = None
    gpu_rows: list[dict] = []
    note = None
    if not args.gpu_only:
        cpu_rows, scaling = cpu_part(args)
    if not args.cpu_only:
        if torch.cuda.is_available():
            gpu_rows = gpu_part(args)
        else:
            note = "GPU part skipped: CUDA is not available on this machine."
    report = markdown(cpu_rows, scaling, gpu_rows, note)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(report)
    common.write_json(
        args.json,
        {
            "benchmark": "suite",
            "command": common.command_line(),
            "cpu": cpu_rows,
            "cpu_scaling": scaling,
            "gpu": gpu_rows,
            "note": note,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
