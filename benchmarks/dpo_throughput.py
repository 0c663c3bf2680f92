"""DPO step throughput and peak memory: lmlab vs TRL's ``DPOTrainer`` (issue 4, item 7).

Both implementations train the *same* tiny random Llama model (built once with ``transformers``,
saved, and read by lmlab through ``lmlab.models.hf.load_hf_model``) on the *same* preference pairs
(the synthetic ``preferences`` world) with the same batch size, β = 0.1, AdamW and fp32/bf16, each
with a live reference model and with precomputed reference log-probs (lmlab
``align.precompute_reference``; TRL ``precompute_ref_log_probs=True``). TRL runs with
``gradient_checkpointing=False`` (its 1.x default is True) so both do the same work per step.

Every configuration runs in a fresh subprocess so peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set (``ru_maxrss``, which
also counts the imported libraries). Throughput is completion+prompt tokens of the pairs processed
per second of optimizer steps after ``--warmup`` steps. "data setup s" is the time to tokenize the pairs
and, with precomputation, score them with the reference (TRL does both in ``DPOTrainer.__init__``).
Token counts are lmlab's tokenization of the pairs for both (same tokenizer; TRL may add one or
two special tokens per sequence, which this ignores).

    python benchmarks/dpo_throughput.py                       # defaults: CUDA if present
    python benchmarks/dpo_throughput.py --smoke               # seconds on CPU: checks that it runs
    python benchmarks/dpo_throughput.py --json benchmarks/dpo_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = [("lmlab", False), ("lmlab", True), ("trl", False), ("trl", True)]


# --------------------------------------------------------------------------- shared setup


def build_setup(root: Path, args: argparse.Namespace) -> None:
    """Tokenizer, tiny random Llama (HF format) and preference JSONL under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmlab.data.synthetic.preference_world import PreferenceWorld
    from lmlab.data.tokenizer import BOS, EOS, PAD, TextTokenizer

    world = PreferenceWorld()
    tok = TextTokenizer.train_bpe(list(world.documents(0, 2000)), vocab_size=512)
    hf_dir = root / "hf"
    hf_dir.mkdir(parents=True)
    tok.save(hf_dir / "tokenizer.json")
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
    PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token=BOS, eos_token=EOS, pad_token=PAD
    ).save_pretrained(hf_dir)
    n_pairs = (args.steps + args.warmup) * args.batch
    world.write_pairs(root / "pairs.jsonl", 0, n_pairs, "train")


def tokens_per_pair(root: Path) -> float:
    from lmlab.data.preference import load_preference_file
    from lmlab.data.tokenizer import TextTokenizer

    data = load_preference_file(root / "pairs.jsonl", TextTokenizer.load(root / "hf" / "tokenizer.json"))
    return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in data.pairs) / len(data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "cuda_max_allocated_mib", torch.cuda.max_memory_allocated(device) / 2**20
    return "cpu_peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- workers


def run_lmlab(root: Path, args: argparse.Namespace, precompute: bool, device: torch.device) -> dict:
    import copy

    from lmlab.config import AlignConfig
    from lmlab.data.preference import PreferenceBatches, load_preference_file, pad_id_of
    from lmlab.data.tokenizer import TextTokenizer
    from lmlab.models.hf import load_hf_model
    from lmlab.recipes.align import build_align_loss, reference_table
    from lmlab.train.runtime import autocast_context

    tok = TextTokenizer.load(root / "hf" / "tokenizer.json")
    model, _ = load_hf_model(root / "hf")
    model.to(device).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    t0 = time.perf_counter()  # like TRL's __init__: tokenize, and with precompute score the reference
    data = load_preference_file(root / "pairs.jsonl", tok, max_prompt_len=128, max_len=256)
    pad = pad_id_of(tok)
    table = None
    if precompute:
        table = reference_table(reference, data, pad, args.batch, device)
        del reference
        reference = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _sync(device)
    precompute_s = time.perf_counter() - t0
    batches = PreferenceBatches(data, pad, seed=0, reference=table)
    loss_fn = build_align_loss(AlignConfig(loss="dpo", beta=0.1), reference)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        batch = {k: v.to(device) for k, v in batches.next_batch(args.batch).items()}
        with autocast_context(device, args.precision):
            out = loss_fn(model, batch)
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter())
    return {"step_times": times, "precompute_s": precompute_s}


def run_trl(root: Path, args: argparse.Namespace, precompute: bool, device: torch.device) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003 - the transformers callback signature
            _sync(device)
            times.append(time.perf_counter())

    records = [json.loads(x) for x in (root / "pairs.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    model = AutoModelForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    config = DPOConfig(
        output_dir=str(root / f"trl_{int(precompute)}"),
        per_device_train_batch_size=args.batch,
        precompute_ref_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        beta=0.1,
        max_length=256,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        bf16=args.precision == "bf16",
        use_cpu=device.type == "cpu",
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    t0 = time.perf_counter()  # TRL 1.x tokenizes and (with precompute) scores the reference in __init__
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    _sync(device)
    precompute_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    return {"step_times": times, "precompute_s": precompute_s}


def worker(args: argparse.Namespace) -> None:
    impl, flag = args.worker.split(":")
    root = Path(args.root)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fn = run_lmlab if impl == "lmlab" else run_trl
    res = fn(root, args, flag == "1", device)
    times = res["step_times"][args.warmup - 1 :] if args.warmup > 0 else res["step_times"]
    steps = len(times) - 1 if args.warmup > 0 else len(times)
    span = times[-1] - times[0] if args.warmup > 0 else None
    key, peak = _peak_memory(device)
    out = {"impl": impl, "precompute": flag == "1", "timed_steps": steps, "seconds": span, key: peak}
    out["precompute_s"] = res["precompute_s"]
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--only", choices=("lmlab", "trl"), help="run one implementation")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, CPU: check that everything runs")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch = 3, 1, 2
        args.d_model, args.ffn, args.layers, args.heads, args.device = 32, 64, 1, 2, "cpu"
    args.warmup = max(1, args.warmup)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        root = Path(tmp)
        build_setup(root, args)
        per_pair = tokens_per_pair(root)
        rows = []
        for impl, precompute in CONFIGS:
            if args.only and impl != args.only:
                continue
            cmd = [sys.executable, __file__, "--worker", f"{impl}:{int(precompute)}", "--root", str(root)]
            cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}"]
            cmd += [f"--precision={args.precision}", f"--device={args.device}", f"--threads={args.threads}"]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{impl} precompute={precompute} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            row = json.loads(lines[-1][len("RESULT ") :])
            row["tokens_per_s"] = row["timed_steps"] * args.batch * per_pair / row["seconds"]
            rows.append(row)
    mem_key = next(k for k in rows[0] if k.endswith("_mib"))
    print(
        f"\nDPO step, {args.device}, {args.precision}, batch {args.batch} pairs, {per_pair:.1f} tokens/pair, "
        f"model d={args.d_model} L={args.layers}, {args.steps} timed steps\n"
    )
    print(f"| implementation | reference | tokens/s | s/step | peak memory ({mem_key}) | data setup s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = "precomputed" if r["precompute"] else "live model"
        print(
            f"| {r['impl']} | {ref} | {r['tokens_per_s']:,.0f} | {r['seconds'] / r['timed_steps']:.4f} "
            f"| {r[mem_key]:,.1f} | {r['precompute_s']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "tokens_per_pair": per_pair, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
