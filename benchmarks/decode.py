"""Decode throughput, lmlab ``generate`` vs Hugging Face ``LlamaForCausalLM.generate`` on the same model.

For every size × batch size the same Llama-style weights generate greedily from the same prompts
(``--prompt-len`` random tokens per row, ``--new-tokens`` new ones, no end-of-sequence stop), with

- **lmlab_dynamic**: ``lmlab.models.generation.generate`` with the growing KV cache (the default);
- **lmlab_static**: ``generate(..., cache="static")``, the static-shape cache (``lmlab.models.static_cache``);
- **lmlab_graphs** (CUDA): ``generate(..., cache="static", cuda_graphs=True)``, each decode step replayed
  from a captured CUDA graph;
- **lmlab_graphs_compiled** (CUDA): the same on a copy of the model whose blocks are ``torch.compile``-d in place
  (Inductor's fused kernels inside the graph);
- **hf_dynamic**: ``transformers.LlamaForCausalLM.generate`` (``do_sample=False``) with its default cache;
- **hf_static**: the same with ``cache_implementation="static"`` (on CUDA transformers then compiles the decode
  forward itself, ``torch.compile(mode="reduce-overhead")``);

in interleaved repetitions after discarded warmup calls (``common.interleaved``). A repetition times, for
each implementation, one ``generate`` call of ``--new-tokens`` and one of a single new token (the prefill);
the decode rate is batch × (N − 1) / (difference of the median times), so a large prefill (big batches on a
CPU) does not hide the decode steps; the whole-call rate (batch × N / time, prefill included) is reported too.
Before timing, both libraries generate ``--check-tokens`` greedy tokens in fp32 from the same prompts and must
agree (a mismatch is printed as a warning and recorded), and every timed call's tokens are compared with lmlab's
dynamic-cache ones. It prints a markdown table (median decode tokens/s of each, the ratio of the best lmlab
variant to HF's static-cache generate) and writes every number to ``--json``.

    python benchmarks/decode.py --sizes 7m,25m --batches 1,8 --threads 1 --json decode-cpu.json
    python benchmarks/decode.py --device cuda --json decode-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lmlab.errors import UserError  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.models.generation import clear_cuda_graphs, generate  # noqa: E402

IMPLS: dict[str, str] = {
    "lmlab_dynamic": "lmlab dynamic",
    "lmlab_static": "lmlab static",
    "lmlab_graphs": "lmlab static + CUDA graphs",
    "lmlab_graphs_compiled": "lmlab static + CUDA graphs + compiled blocks",
    "hf_dynamic": "HF dynamic",
    "hf_static": "HF static",
}
CUDA_ONLY = ("lmlab_graphs", "lmlab_graphs_compiled")
LMLAB = [name for name in IMPLS if name.startswith("lmlab")]
DEFAULT_SIZES = {"cpu": "7m,25m", "cuda": "124m,350m"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/decode.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help="comma list of presets (default: 7m,25m; CUDA: 124m,350m)")
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy new tokens per row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 weights (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded generate calls per implementation")
    parser.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with HF in fp32 first")
    parser.add_argument("--init-std", type=float, default=0.1, help="weight init std (spread logits: no near-ties)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name, least in (("prompt_len", 1), ("new_tokens", 2), ("reps", 1)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.warmup < 0 or args.check_tokens < 0:
        raise UserError("--warmup and --check-tokens must be >= 0")
    return args


def build_models(size: str, args: argparse.Namespace, device: torch.device) -> tuple[Decoder, nn.Module]:
    """The lmlab model of a preset (seeded) and HF Llama loaded with its weights, fp32, on ``device``."""
    cfg, seq_len = common.model_config(size)
    cfg = replace(cfg, init_std=args.init_std, max_seq_len=max(seq_len, args.prompt_len + args.new_tokens))
    torch.manual_seed(0)
    model = Decoder(cfg).to(device).eval()
    hf_model = common.hf_llama(cfg, model).to(device).eval()
    hf_model.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    hf_model.generation_config.pad_token_id = 0
    return model, hf_model


def hf_generate(hf_model: nn.Module, prompts: torch.Tensor, new_tokens: int, cache: str | None) -> torch.Tensor:
    out = hf_model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation=cache,
    )
    return out[:, prompts.shape[1] :]  # [B, N]


def parity(model: Decoder, hf_model: nn.Module, prompts: torch.Tensor, tokens: int) -> dict:
    """Greedy tokens in fp32 from the same prompts: lmlab (dynamic cache) vs HF (its dynamic cache), and
    lmlab's static cache vs its dynamic one; a mismatch is warned about. (Every timed implementation's tokens are
    also compared with lmlab's dynamic-cache ones in the benchmark's dtype: ``same_tokens_as_lmlab_dynamic``.)"""
    if tokens == 0:
        return {"tokens": 0, "lmlab_vs_hf": None, "static_vs_dynamic": None}
    rows = prompts.tolist()
    with torch.no_grad():
        theirs = hf_generate(hf_model, prompts, tokens, None).tolist()
    ours = generate(model, rows, tokens, temperature=0)
    ours_static = generate(model, rows, tokens, temperature=0, cache="static")
    result = {
        "tokens": tokens,
        "lmlab_vs_hf": ours == theirs,
        "static_vs_dynamic": ours_static == ours,
        "distinct_tokens_row0": len(set(ours[0])),
    }
    if not (result["lmlab_vs_hf"] and result["static_vs_dynamic"]):
        print(f"decode.py: warning: greedy tokens differ in fp32: {result}", file=sys.stderr)
    return result


def lmlab_runner(
    name: str, model: Decoder, prompts: list[list[int]], new_tokens: int, outputs: dict | None
) -> common.Runner:
    static, graphs = name.split("@")[0] != "lmlab_dynamic", name.split("@")[0] in CUDA_ONLY
    device = next(model.parameters()).device

    def step() -> float:
        new = generate(
            model, prompts, new_tokens, temperature=0, cache="static" if static else "dynamic", cuda_graphs=graphs
        )
        if outputs is not None:
            outputs[name] = new
        return 0.0

    return common.Runner(name, step, len(prompts) * new_tokens, device)


def hf_runner(
    name: str, hf_model: nn.Module, prompts: torch.Tensor, new_tokens: int, outputs: dict | None
) -> common.Runner:
    cache = "static" if name.split("@")[0] == "hf_static" else None

    def step() -> float:
        with torch.no_grad():
            new = hf_generate(hf_model, prompts, new_tokens, cache)
        if new.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {new.shape[1]} tokens, not {new_tokens}")
        if outputs is not None:
            outputs[name] = new.tolist()
        return 0.0

    return common.Runner(name, step, prompts.shape[0] * new_tokens, prompts.device)


def decode_rate(batch: int, new_tokens: int, full: float | None, prefill: float | None) -> float | None:
    """Tokens/s of the decode steps alone: batch × (N − 1) new tokens over the time of a call of N new tokens
    minus that of a call of 1 (the prefill and the first token), both medians; None if not positive."""
    if not full or not prefill:
        return None
    seconds = batch * new_tokens / full - batch / prefill
    return batch * (new_tokens - 1) / seconds if seconds > 0 else None


def bench_row(size: str, batch: int, impls: list[str], device: torch.device, args: argparse.Namespace) -> dict:
    """All implementations on one size × batch in interleaved repetitions; one result row.

    Each implementation has two runners: ``NAME`` generates ``--new-tokens`` and ``NAME@1`` one token (the
    prefill), so the decode rate can be told apart from the prefill's cost (large for big batches on a CPU).
    """
    torch._dynamo.reset()
    clear_cuda_graphs()
    model, hf_model = build_models(size, args, device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
    check = parity(model, hf_model, prompts, args.check_tokens)
    dtype = DTYPES[args.dtype]
    model.to(dtype)
    hf_model.to(dtype)
    outputs: dict[str, list[list[int]]] = {}
    runners = []
    for name in impls:
        if name.startswith("lmlab"):
            lm = model
            if name == "lmlab_graphs_compiled":
                lm = copy.deepcopy(model)
                for block in lm.layers:
                    block.compile()
            runners.append(lmlab_runner(name, lm, prompts.tolist(), args.new_tokens, outputs))
            runners.append(lmlab_runner(f"{name}@1", lm, prompts.tolist(), 1, None))
        else:
            runners.append(hf_runner(name, hf_model, prompts, args.new_tokens, outputs))
            runners.append(hf_runner(f"{name}@1", hf_model, prompts, 1, None))
    rates = common.interleaved(runners, args.warmup, 1, args.reps)
    errors = {runner.name: runner.error for runner in runners}
    row = {
        "size": size,
        "params": common.params_of(model.cfg),
        "batch": batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "warmup": args.warmup,
        "init_std": args.init_std,
        "parity_fp32": check,
        **common.environment(device, args.dtype, torch.get_num_threads()),
    }
    reference = outputs.get("lmlab_dynamic")
    for name in impls:
        got = outputs.get(name)
        full, prefill = common.median(rates[name]), common.median(rates[f"{name}@1"])
        row[name] = {
            "decode_tokens_per_s": decode_rate(batch, args.new_tokens, full, prefill),
            "tokens_per_s": full,  # batch × new tokens / time of the whole call, prefill included
            "tokens_per_s_reps": rates[name],
            "prefill_seconds": batch / prefill if prefill else None,
            "prefill_call_tokens_per_s_reps": rates[f"{name}@1"],
            "same_tokens_as_lmlab_dynamic": None if got is None or reference is None else got == reference,
            "error": errors[name] or errors[f"{name}@1"],
        }
    for key in ("decode_tokens_per_s", "tokens_per_s"):
        hf = row.get("hf_static", {}).get(key)
        best = max((row[name][key] or 0.0 for name in impls if name in LMLAB), default=0.0)
        row[f"best_lmlab_over_hf_static_{key}"] = best / hf if best and hf else None
    clear_cuda_graphs()
    return row


def headers(impls: list[str]) -> list[str]:
    return [
        "size",
        "batch",
        *(f"{IMPLS[name]} decode tok/s" for name in impls),
        "best lmlab / HF static (decode)",
        "(whole call)",
        "same tokens as HF (fp32)",
        "dtype",
        "threads",
        "device",
    ]


def table_cells(row: dict, impls: list[str]) -> list[str]:
    def rate(name: str) -> str:
        error = row[name]["error"]
        return f"failed: {error}" if error else common.fmt(row[name]["decode_tokens_per_s"], "tok")

    same = row["parity_fp32"]["lmlab_vs_hf"]
    return [
        row["size"],
        str(row["batch"]),
        *(rate(name) for name in impls),
        common.fmt(row["best_lmlab_over_hf_static_decode_tokens_per_s"], "x"),
        common.fmt(row["best_lmlab_over_hf_static_tokens_per_s"], "x"),
        "—" if same is None else ("yes" if same else "NO"),
        row["dtype"],
        str(row["threads"]),
        row["device_name"],
    ]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = common.resolve_device(args.device)
        sizes = common.parse_list(args.sizes or DEFAULT_SIZES[device.type], tuple(common.PRESETS), "size")
        batches = [int(b) for b in common.parse_list(args.batches, None, "batch")]
        if any(b < 1 for b in batches):
            raise UserError(f"--batches must be positive, got {args.batches}")
        args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        common.parse_list(args.dtype, tuple(DTYPES), "dtype")
        default_impls = [name for name in IMPLS if device.type == "cuda" or name not in CUDA_ONLY]
        impls = common.parse_list(args.impls, tuple(IMPLS), "implementation") if args.impls else default_impls
        needs_cuda = [name for name in impls if name in CUDA_ONLY]
        if needs_cuda and device.type != "cuda":
            raise UserError(f"{', '.join(needs_cuda)} need --device cuda")
    except (UserError, ValueError) as err:
        print(f"decode.py: error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in sizes:
        for batch in batches:
            rows.append(bench_row(size, batch, impls, device, args))
            line = common.markdown_table(headers(impls), [table_cells(rows[-1], impls)]).splitlines()[-1]
            print(line, file=sys.stderr)
    print(common.markdown_table(headers(impls), [table_cells(row, impls) for row in rows]))
    print(
        f"\nCommand: `{common.command_line()}`; prompt {args.prompt_len} + {args.new_tokens} greedy new tokens per row; "
        f"{args.reps} interleaved repetitions after {args.warmup} warmup calls of a generate call of "
        f"{args.new_tokens} and one of 1 new token; decode tok/s = batch × {args.new_tokens - 1} / (median time "
        "of the first − of the second); whole call = batch × new tokens / its median time, prefill included."
    )
    common.write_json(args.json, {"benchmark": "decode", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
