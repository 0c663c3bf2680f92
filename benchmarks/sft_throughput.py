"""SFT training throughput: lmlab packed vs unpacked, and lmlab vs TRL's ``SFTTrainer``.

Same data, model, batch geometry and optimizer for every contender:

- data: prompt/completion conversations from the ``facts`` world (1 to ``--max-turns`` Q&A turns
  about one person; the last answer is the completion, earlier turns are the prompt), rendered
  with lmlab's built-in chat template, loss on the completion only;
- model: one lmlab ``Decoder`` (``--d-model``/``--layers``/``--heads``); TRL trains the same
  weights as a ``LlamaForCausalLM`` built from the exported config (``lmlab.models.hf``);
- batch: ``--batch`` rows per step; packed rows hold up to ``--seq-len`` tokens (lmlab: best-fit
  decreasing with per-example attention isolation; TRL: ``packing_strategy="bfd"``, padding-free),
  unpacked rows hold one example padded to the longest row of the batch;
- optimizer: AdamW, lr 1e-4, fp32 (or ``--precision bf16`` autocast on CUDA for lmlab and TRL's ``bf16``).

Reported per contender: tokens/s counting real (non-padding) tokens, padded slots/s, step time;
and the ratios lmlab packed / lmlab unpacked and lmlab / TRL. The first ``--warmup`` steps are not
timed. Usage (smoke): ``python benchmarks/sft_throughput.py --steps 3 --warmup 1 --examples 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import ModelConfig, ObjectiveConfig
from lmlab.data.chat import BUILTIN_TEMPLATE, parse_record
from lmlab.data.packing import RowBatches, build_rows
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.models.decoder import Decoder
from lmlab.objectives.lm_objective import build_lm_loss


def make_records(n: int, max_turns: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion records of 1..max_turns Q&A turns about one facts-world person."""
    world, rng = FactsWorld(), random.Random(seed)
    attributes = ("birth_date", "birthplace", "employer", "occupation", "university", "hobby")
    records = []
    for i in range(n):
        turns = []
        for attribute in rng.sample(attributes, rng.randint(1, max_turns)):
            q, a = world.qa(seed, i, attribute)
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"prompt": turns[:-1], "completion": turns[-1:]})
    return records


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_lmlab(model, rows, args, device, packed: bool, pad_id: int) -> dict:
    """Train ``warmup + steps`` steps on lmlab rows; time the last ``steps``."""
    batches = RowBatches(rows, pad_id=pad_id, seed=0, pad_to=args.seq_len if packed else None, with_docs=packed)
    loss_fn = build_lm_loss(ObjectiveConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    real = slots = 0
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batches.next_batch(args.batch).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = loss_fn(model, batch)
        (out.loss_sum / out.count.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            slots += batch["input_ids"].numel()
            real += int((batch["input_ids"] != pad_id).sum())  # pad_id is a special token text never contains
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": real / elapsed, "slots_per_s": slots / elapsed, "step_s": elapsed / args.steps}


def bench_trl(lmlab_model: Decoder, tokenizer: TextTokenizer, records, args, device, packed: bool) -> dict:
    """The same steps with TRL's ``SFTTrainer`` on a ``LlamaForCausalLM`` holding the same weights."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lmlab.models.hf import lmlab_state_dict_to_hf, model_config_to_hf_config
    from lmlab.train.checkpoint import model_state_dict

    hf_cfg = model_config_to_hf_config(
        lmlab_model.cfg,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
    )
    for key in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(key, None)
    hf_model = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    missing, unexpected = hf_model.load_state_dict(lmlab_state_dict_to_hf(model_state_dict(lmlab_model)), strict=False)
    wrong = [k for k in missing if k != "lm_head.weight"] + list(unexpected)  # lm_head is tied to the embeddings
    if wrong:
        raise RuntimeError(f"the Llama model does not take the lmlab weights: {wrong[:5]}")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend,
        bos_token=tokenizer.id_to_token(tokenizer.bos_id),
        eos_token=tokenizer.id_to_token(tokenizer.eos_id),
        pad_token=tokenizer.id_to_token(tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id),
    )
    hf_tok.chat_template = BUILTIN_TEMPLATE

    counts = {"real": 0, "slots": 0, "timing": False}

    def count_tokens(module, a, kwargs):
        if not counts["timing"]:
            return
        ids = kwargs.get("input_ids", a[0] if a else None)
        mask = kwargs.get("attention_mask")
        counts["slots"] += ids.numel()
        counts["real"] += int(mask.sum()) if mask is not None else ids.numel()

    hf_model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    times: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                synchronize(device)
                counts["timing"] = True
                times["start"] = time.perf_counter()

        def on_train_end(self, targs, state, control, **kw):
            synchronize(device)
            times["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            max_length=args.seq_len,
            packing=packed,
            packing_strategy="bfd",
            padding_free=packed,
            completion_only_loss=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=device.type == "cpu",
            bf16=args.precision == "bf16",
            dataloader_num_workers=0,
            max_grad_norm=0.0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=hf_model,
            args=config,
            train_dataset=Dataset.from_list(records),
            processing_class=hf_tok,
            callbacks=[Timer()],
        )
        trainer.train()
    elapsed = times["end"] - times["start"]
    return {
        "tokens_per_s": counts["real"] / elapsed,
        "slots_per_s": counts["slots"] / elapsed,
        "step_s": elapsed / args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SFT throughput: lmlab packed vs unpacked, lmlab vs TRL SFTTrainer")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    p.add_argument("--out", "--json", dest="out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)

    records = make_records(args.examples, args.max_turns)
    texts = [m["content"] for r in records for m in r["prompt"] + r["completion"]]
    tokenizer = TextTokenizer.train_bpe(texts, args.vocab)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    examples = [parse_record(r, f"record {i}").encode(tokenizer) for i, r in enumerate(records)]
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq_len,
    )
    results: dict[str, dict] = {}
    for name, packed in (("lmlab_packed", True), ("lmlab_unpacked", False)):
        rows, stats = build_rows(examples, args.seq_len, packing=packed)
        torch.manual_seed(0)
        model = Decoder(cfg).to(device)
        dropped = stats.dropped_no_target + stats.dropped_overlong
        results[name] = {
            **bench_lmlab(model, rows, args, device, packed, pad_id),
            "rows": stats.rows,
            "dropped": dropped,
        }
        print(name, json.dumps(results[name]), flush=True)
    if not args.no_trl:
        for name, packed in (("trl_packed", True), ("trl_unpacked", False)):
            torch.manual_seed(0)
            model = Decoder(cfg)
            results[name] = bench_trl(model, tokenizer, records, args, device, packed)
            print(name, json.dumps(results[name]), flush=True)
    ratios = {
        "lmlab_packed_over_unpacked": results["lmlab_packed"]["tokens_per_s"]
        / results["lmlab_unpacked"]["tokens_per_s"]
    }
    if not args.no_trl:
        for mode in ("packed", "unpacked"):
            ratios[f"lmlab_over_trl_{mode}"] = (
                results[f"lmlab_{mode}"]["tokens_per_s"] / results[f"trl_{mode}"]["tokens_per_s"]
            )
    report = {
        "device": str(device),
        "params": sum(p.numel() for p in Decoder(cfg).parameters()),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(report["ratios"], indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
