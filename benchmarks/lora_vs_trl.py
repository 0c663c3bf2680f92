"""LoRA fine-tuning memory and speed: ``lmlab sft`` with ``adapter.kind=lora`` vs TRL's ``SFTTrainer`` + PEFT.

Same base model, data, adapters and batch geometry on both sides:

- base: an lmlab ``Decoder`` (``--d-model``/``--layers``/``--heads``, a BPE tokenizer trained on the data, an
  embedding table and output head of ``--model-vocab`` rows: 32000 by default, Llama 2's and Mistral's) written
  as a run, and its ``lmlab export-hf`` directory, which TRL loads with ``AutoModelForCausalLM`` (fp32, sdpa);
- data: prompt/completion conversations of the ``facts`` world (``sft_throughput.make_records``), rendered with
  lmlab's built-in chat template on both sides (the export carries it), loss on the completion only, one example
  per row padded to the longest of its batch (lmlab ``sft.packing=false``; TRL's default, no packing);
- adapters: LoRA rank ``--rank``, alpha 2·rank, no dropout, on every attention and MLP projection (q, k, v, o,
  gate, up, down); the base frozen; AdamW at lr 1e-4, constant, no clipping;
- activation checkpointing: off on both sides, or with ``--activation-checkpointing`` on both (lmlab
  ``distributed.activation_checkpointing=full``, one checkpoint per block; TRL ``gradient_checkpointing=True``,
  its ``SFTConfig`` default).

Each side runs in its own fresh Python process (``--side``), so its peak resident memory (``ru_maxrss``) is its
own: the whole process as a user sees it, imports included, and, to separate the libraries from training,
the resident memory just before the first step. Speed: examples per second over the steps after ``--warmup``,
from each side's own step clock (lmlab's ``metrics.jsonl`` times, a TRL ``TrainerCallback``); the two sides see
the same examples in different orders, so tokens/s are the examples/s times the mean tokenized length (lmlab's).
Sides alternate (lmlab, TRL, lmlab, TRL …) ``--reps`` times; medians are reported.

Usage: ``python benchmarks/lora_vs_trl.py --out /tmp/lora.json`` (about 10 minutes on 2 CPU cores);
smoke: ``--d-model 64 --layers 2 --heads 2 --steps 2 --warmup 1 --examples 64 --reps 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, args) -> dict:
    """The base run, its HF export and the records file (once, in this process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sft_throughput import make_records

    from lmlab.cli import main as lmlab_main
    from lmlab.config import load_config, save_config
    from lmlab.data.chat import BUILTIN_TEMPLATE, parse_record
    from lmlab.data.tokenizer import TextTokenizer
    from lmlab.models.decoder import Decoder
    from lmlab.train.checkpoint import save_checkpoint

    records = make_records(args.examples, 4)
    with open(work / "records.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    texts = [m["content"] for r in records for m in r["prompt"] + r["completion"]]
    tokenizer = TextTokenizer.train_bpe(texts, args.vocab)
    base = work / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text(tokenizer.to_json())
    cfg = load_config(
        None,
        [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
         f"model.vocab_size={max(args.model_vocab, tokenizer.vocab_size)}", f"model.max_seq_len={args.seq_len}",
         f"train.seq_len={args.seq_len}", f"tokenizer.path={base / 'tokenizer.json'}"],
    )  # fmt: skip
    save_checkpoint(base, 0, Decoder(cfg.model), model_cfg=cfg.model, meta={"source": "benchmark"})
    save_config(cfg, base / "config.yaml")
    assert lmlab_main(["export-hf", str(base), str(work / "base_hf")]) == 0
    lengths = [len(parse_record(r, "records.jsonl").encode(tokenizer, BUILTIN_TEMPLATE)[0]) for r in records]
    params = sum(p.numel() for p in Decoder(cfg.model).parameters())
    return {"mean_tokens": statistics.mean(lengths), "params": params}


def side_lmlab(work: Path, args) -> dict:
    before_import = rss_mb()
    from lmlab.config import load_config
    from lmlab.recipes.sft import SFTRecipe
    from lmlab.train.engine import execute
    from lmlab.train.metrics import read_metrics

    imported = rss_mb()
    run = work / f"lmlab_{time.time_ns()}"
    cfg = load_config(
        None,
        [f"init_from={work / 'base'}", f"sft.train_file={work / 'records.jsonl'}", "sft.packing=false",
         f"model.max_seq_len={args.seq_len}", f"train.seq_len={args.seq_len}", f"train.steps={args.warmup + args.steps}",
         f"train.micro_batch_size={args.batch}", "train.log_every=1", "train.eval_every=100000",
         f"train.ckpt_every={args.warmup + args.steps}", "train.progress=false", "train.device=cpu",
         "optim.lr=1e-4", "optim.grad_clip=0", "schedule.name=constant", "schedule.warmup_steps=0",
         "sample.max_new_tokens=1", "sample.prompts=[a]", "adapter.kind=lora", f"adapter.rank={args.rank}",
         f"adapter.alpha={2 * args.rank}", f"adapter.targets=[{','.join(TARGETS)}]",
         f"distributed.activation_checkpointing={'full' if args.activation_checkpointing else 'none'}"],
    )  # fmt: skip
    at_start = {}

    import lmlab.train.loop as loop

    original = loop.Trainer.fit

    def fit(self, logger=None):
        at_start["rss"] = rss_mb()
        return original(self, logger)

    loop.Trainer.fit = fit
    execute(SFTRecipe(), cfg, run, quiet=True)
    times = {r["step"]: r["time"] for r in read_metrics(run) if r["kind"] == "train"}
    elapsed = times[args.warmup + args.steps] - times[args.warmup]
    return {"rss_start": before_import, "rss_imported": imported, "rss_at_first_step": at_start["rss"],
            "peak_rss": peak_rss_mb(), "examples_per_s": args.steps * args.batch / elapsed}  # fmt: skip


def side_trl(work: Path, args) -> dict:
    before_import = rss_mb()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    imported = rss_mb()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work / "base_hf", dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(work / "base_hf")
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    clock: dict[int, float] = {}
    at_start = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            at_start["rss"] = rss_mb()

        def on_step_end(self, targs, state, control, **kw):
            clock[state.global_step] = time.perf_counter()

    out = work / f"trl_{time.time_ns()}"
    config = SFTConfig(
        output_dir=str(out), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_length=args.seq_len, packing=False,
        completion_only_loss=True, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, max_grad_norm=0.0, seed=0, disable_tqdm=True, gradient_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
        peft_config=peft_config, callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    elapsed = clock[args.warmup + args.steps] - clock[args.warmup]
    return {"rss_start": before_import, "rss_imported": imported, "rss_at_first_step": at_start["rss"],
            "peak_rss": peak_rss_mb(), "examples_per_s": args.steps * args.batch / elapsed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="LoRA SFT: lmlab vs TRL + PEFT, peak memory and speed")
    p.add_argument("--side", choices=["lmlab", "trl"], default=None, help="(internal) run one side in this process")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--vocab", type=int, default=4096, help="the BPE tokenizer's vocabulary")
    p.add_argument("--model-vocab", type=int, default=32000, help="rows of the model's embedding and output head")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true", help="on both sides (TRL's default)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        result = (side_lmlab if args.side == "lmlab" else side_trl)(args.work, args)
        print("RESULT " + json.dumps(result))
        return 0

    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        keys = [
            "examples",
            "vocab",
            "model_vocab",
            "d_model",
            "layers",
            "heads",
            "seq_len",
            "batch",
            "rank",
            "steps",
            "warmup",
        ]
        passthrough = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        passthrough += ["--activation-checkpointing"] if args.activation_checkpointing else []
        runs: dict[str, list[dict]] = {"lmlab": [], "trl": []}
        for _ in range(args.reps):
            for side in ("lmlab", "trl"):
                cmd = [sys.executable, __file__, "--side", side, "--work", str(work), *passthrough]
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    raise SystemExit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(line[-1][len("RESULT ") :]))
    median = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    a, b = median["lmlab"], median["trl"]
    result = {
        "command": "python benchmarks/lora_vs_trl.py " + " ".join(sys.argv[1:]),
        "base_params": info["params"],
        "mean_tokens_per_example": info["mean_tokens"],
        "threads": torch.get_num_threads(),
        "activation_checkpointing": args.activation_checkpointing,
        "torch": torch.__version__,
        "median": median,
        "runs": runs,
        "peak_memory_ratio": a["peak_rss"] / b["peak_rss"],
        "training_memory_ratio": (a["peak_rss"] - a["rss_imported"]) / (b["peak_rss"] - b["rss_imported"]),
        "speed_ratio": a["examples_per_s"] / b["examples_per_s"],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
