"""Supervised fine-tuning: ``lmlab sft CONFIG [key=value ...] --out DIR``.

Reads JSONL records (conversations, prompt/completion pairs or plain ``text`` documents;
``lmlab.data.chat``), or Q&A conversations of the ``facts`` world when ``data.synthetic.world=facts``
and no file is given. Renders them with the chat template, learns the assistant tokens only
(``sft.loss_on``), packs them into rows of ``train.seq_len`` with per-example attention isolation
(``lmlab.data.packing``) and trains with the shared loop and the configured objective (goldfish,
NEFTune, label smoothing, z-loss, distillation from a teacher run, each logged per component).
``init_from`` starts from the weights of an lmlab run (e.g. one made by ``lmlab import-hf``), whose
tokenizer and architecture the run then uses. The run directory follows docs/CONTRACTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig, load_config, save_config, validate
from lmlab.data.chat import SFTRecord, end_of_turn_id, read_records, render_prompt, resolve_template
from lmlab.data.packing import PackStats, Row, RowBatches, build_rows, iterate_batches
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import CheckpointError, ConfigError, DataError, UserError
from lmlab.objectives.lm import causal_lm_loss
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.commands import resolve_run, run_parser
from lmlab.train.lm_objective import attach_objective_hooks, build_lm_loss, model_inputs
from lmlab.train.loop import Trainer, fit_logged
from lmlab.train.pretrain import _write_summary, prepare_run_dir, print_report, write_samples
from lmlab.train.runtime import environment, resolve_device, seed_everything


class VocabularyMismatchError(UserError):
    """The tokenizer has ids the model's embedding table cannot hold."""


# --------------------------------------------------------------------------- inputs


def load_records(cfg: RunConfig) -> tuple[list[SFTRecord], list[SFTRecord]]:
    """Training and validation records: the configured files, or the facts world's Q&A.

    Without ``sft.val_file`` a ``data.val_fraction`` share of the training records (chosen with
    ``data.seed``) is held out for validation when there are at least 10 records.
    """
    s = cfg.sft
    if s.train_file:
        train = read_records(s.train_file)
    elif cfg.data.source == "synthetic" and cfg.data.synthetic.world == "facts":
        train = facts_records(cfg, "train")
        if not s.val_file:
            return train, facts_records(cfg, "heldout")
    else:
        raise ConfigError("lmlab sft needs sft.train_file (a JSONL file), or data.synthetic.world=facts")
    if s.val_file:
        return train, read_records(s.val_file)
    n_val = int(round(len(train) * cfg.data.val_fraction))
    if len(train) < 10 or n_val == 0:
        return train, []
    order = list(range(len(train)))
    random.Random(cfg.data.seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def facts_records(cfg: RunConfig, split: str) -> list[SFTRecord]:
    """Q&A conversations about the first ``data.synthetic.n_docs`` people of the facts world."""
    from lmlab.data.synthetic.facts import FactsWorld

    syn = cfg.data.synthetic
    convs = FactsWorld().qa_conversations(syn.seed, syn.n_docs, split)
    return [SFTRecord(f"facts:{split}:{c['person']}:{c['attribute']}", tuple(c["messages"])) for c in convs]


def load_tokenizer(cfg: RunConfig, records: list[SFTRecord]) -> TextTokenizer:
    """``tokenizer.path``, else the ``init_from`` run's tokenizer, else a BPE trained on the records' text."""
    if cfg.tokenizer.path:
        return TextTokenizer.load(cfg.tokenizer.path)
    if cfg.init_from:
        path = Path(cfg.init_from) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"init_from={cfg.init_from}: the run has no tokenizer.json")
        return TextTokenizer.load(path)
    texts = [r.text if r.text is not None else "\n".join(m["content"] for m in r.messages) for r in records]
    return TextTokenizer.train_bpe(
        texts[: cfg.tokenizer.train_docs], cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency
    )


def resolve_model(cfg: RunConfig, tokenizer: TextTokenizer) -> RunConfig:
    """Take the architecture from ``init_from``; fill or check ``model.vocab_size`` against the tokenizer."""
    model_cfg = cfg.model
    where = "model.vocab_size"
    if cfg.init_from:
        init_cfg_path = Path(cfg.init_from) / "config.yaml"
        if not init_cfg_path.is_file():
            raise CheckpointError(f"init_from={cfg.init_from}: not a run directory (config.yaml is missing)")
        model_cfg = load_config(init_cfg_path).model
        where = f"the model of init_from={cfg.init_from} (vocab_size)"
    elif model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    check_vocabulary(tokenizer, model_cfg.vocab_size, where)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    return cfg


def check_vocabulary(tokenizer: TextTokenizer, model_vocab: int, where: str) -> None:
    """Refuse a model whose embedding table is smaller than the tokenizer's vocabulary."""
    if tokenizer.vocab_size > model_vocab:
        raise VocabularyMismatchError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but {where} is {model_vocab}; "
            "the model and the tokenizer must come from the same run"
        )


def encode_records(records: list[SFTRecord], tokenizer: TextTokenizer, cfg: RunConfig):
    """``(ids, target_mask)`` per record with the run's template and ``sft.loss_on``."""
    template = None
    if any(r.text is None for r in records):
        template = resolve_template(tokenizer, cfg.sft.chat_template)
    return [r.encode(tokenizer, template, cfg.sft.loss_on) for r in records]


def steps_for_epochs(cfg: RunConfig, n_rows: int) -> RunConfig:
    """With ``sft.epochs > 0``, ``train.steps`` = ceil(epochs · rows / rows per step)."""
    if cfg.sft.epochs <= 0:
        return cfg
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    steps = max(1, math.ceil(cfg.sft.epochs * n_rows / per_step))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    if cfg.schedule.warmup_steps > steps:
        raise ConfigError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds the {steps} steps of "
            f"sft.epochs={cfg.sft.epochs}; lower the warmup"
        )
    return validate(cfg)


def save_tokenizer(tokenizer: TextTokenizer, run_dir: Path, cfg: RunConfig) -> None:
    """Write ``tokenizer.json`` and, when the run's chat template is not the built-in one, a
    ``tokenizer_config.json`` holding it, so generation, evaluation and export use the same template."""
    run_dir = Path(run_dir)
    source_config = (
        Path(tokenizer.source).parent / "tokenizer_config.json" if not tokenizer.source.startswith("<") else None
    )
    config: dict[str, Any] = {}
    if source_config is not None and source_config.is_file():
        config = json.loads(source_config.read_text())
    if Path(tokenizer.source).resolve() != (run_dir / "tokenizer.json").resolve():
        tokenizer.save(run_dir / "tokenizer.json")
    if cfg.sft.chat_template is not None:
        template = resolve_template(tokenizer, cfg.sft.chat_template)
        if template.origin == "builtin":
            config.pop("chat_template", None)
        else:
            config["chat_template"] = template.source
    if config:
        (run_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


# --------------------------------------------------------------------------- evaluation and samples


def evaluate_rows(
    model: torch.nn.Module, rows: list[Row], *, batch_size: int, pad_id: int, pad_to: int | None, packed: bool, device
) -> dict[str, float]:
    """Mean target-token cross-entropy over all validation rows (exactly once)."""
    loss_sum, count = 0.0, 0
    for batch in iterate_batches(rows, batch_size, pad_id, pad_to, with_docs=packed):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = causal_lm_loss(model(batch["input_ids"], **model_inputs(batch)), batch["labels"])
        loss_sum += float(out.loss_sum)
        count += int(out.count)
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def write_chat_samples(model, tokenizer: TextTokenizer, cfg: RunConfig, run_dir: Path, device) -> Path:
    """One reply per ``sample.prompts`` entry (as a user turn) into ``samples.txt``."""
    from lmlab.models.generation import generate

    s = cfg.sample
    template = resolve_template(tokenizer, cfg.sft.chat_template)
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    stop = end_of_turn_id(tokenizer)
    blocks = []
    for prompt in s.prompts:
        ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}], template)
        room = cfg.model.max_seq_len - len(ids)
        if room <= 0:
            continue
        new = generate(
            model,
            ids,
            max_new_tokens=min(s.max_new_tokens, room),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=stop,
            generator=gen,
        )
        blocks.append(f"user: {prompt}\nassistant: {tokenizer.decode(new, skip_special_tokens=True)}")
    path = run_dir / "samples.txt"
    path.write_text("\n\n---\n\n".join(blocks) + "\n")
    return path


def chat_responder(model, tokenizer: TextTokenizer, template=None, max_new_tokens: int = 48):
    """``respond(messages) -> reply text``: greedy decoding of an assistant turn up to its end-of-turn token."""
    from lmlab.models.generation import generate

    chat = resolve_template(tokenizer, template)
    stop = end_of_turn_id(tokenizer)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)

    def respond(messages: list[dict]) -> str:
        ids = render_prompt(tokenizer, messages, chat)
        room = max_new_tokens if limit is None else min(max_new_tokens, limit - len(ids))
        if room <= 0:
            return ""
        new = generate(model, ids, max_new_tokens=room, temperature=0.0, eos_id=stop)
        return tokenizer.decode(new, skip_special_tokens=True)

    return respond


@torch.no_grad()
def facts_accuracy(model, tokenizer: TextTokenizer, cfg: RunConfig, limit: int = 120) -> dict[str, dict]:
    """Exact-answer accuracy on the facts world's Q&A: people seen in SFT (``train``) and held out (``heldout``);
    replies are decoded greedily for at most ``sample.max_new_tokens`` tokens."""
    from lmlab.data.synthetic.facts import FactsWorld, exact_answer_accuracy

    syn = cfg.data.synthetic
    respond = chat_responder(model, tokenizer, cfg.sft.chat_template, max_new_tokens=cfg.sample.max_new_tokens)
    world = FactsWorld()
    return {
        split: exact_answer_accuracy(respond, world.qa_conversations(syn.seed, syn.n_docs, split)[:limit])
        for split in ("train", "heldout")
    }


# --------------------------------------------------------------------------- the run


def run_sft(cfg: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``run_dir``; returns the summary also written to ``summary.json``."""
    from lmlab.models.counting import count_params, flops_per_token
    from lmlab.models.decoder import Decoder

    run_dir = prepare_run_dir(Path(run_dir), resume)
    device = resolve_device(cfg.train.device)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    train_records, val_records = load_records(cfg)
    own = run_dir / "tokenizer.json"
    tokenizer = TextTokenizer.load(own) if resume and own.is_file() else load_tokenizer(cfg, train_records)
    cfg = resolve_model(cfg, tokenizer)
    s, t = cfg.sft, cfg.train
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    pad_to = t.seq_len if s.packing else None
    train_rows, train_stats = build_rows(
        encode_records(train_records, tokenizer, cfg), t.seq_len, packing=s.packing, overlong=s.overlong
    )
    if not train_rows:
        raise DataError(f"no training example is left after the over-long policy ({train_stats.as_dict()})")
    val_rows, val_stats = build_rows(
        encode_records(val_records, tokenizer, cfg), t.seq_len, packing=s.packing, overlong=s.overlong
    )
    cfg = steps_for_epochs(cfg, len(train_rows))
    if resume:
        ckpt_io.verify_checkpoint(ckpt_io.resolve_checkpoint(run_dir), cfg.model)
    save_config(cfg, run_dir / "config.yaml")
    save_tokenizer(tokenizer, run_dir, cfg)
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1))

    seed_everything(t.seed)
    model = Decoder(cfg.model).to(device)
    if cfg.init_from and not resume:
        ckpt_io.load_weights(ckpt_io.resolve_checkpoint(cfg.init_from), model, cfg.model)
    attach_objective_hooks(model, cfg.objective, pad_id=pad_id)

    extras, teacher, cache_hit = None, None, None
    kd = cfg.objective.distill
    if kd.teacher:
        from lmlab.train.teacher import cached_topk, load_teacher

        teacher = load_teacher(kd.teacher, tokenizer, cfg.model.vocab_size, device)
        if kd.topk_cache > 0:
            extras, cache_hit = cached_topk(
                teacher,
                train_rows,
                kd.topk_cache,
                run_dir / "teacher_topk.pt",
                pad_id=pad_id,
                pad_to=t.seq_len,
                batch_size=t.micro_batch_size,
                device=device,
            )
            teacher = None  # the teacher ran once; training reads the cache
    loss_fn = build_lm_loss(cfg.objective, teacher, topk_cached=extras is not None)
    batches = RowBatches(
        train_rows, pad_id=pad_id, seed=cfg.data.seed + t.seed, pad_to=pad_to, with_docs=s.packing, extras=extras
    )

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_rows(
            m, val_rows, batch_size=t.micro_batch_size, pad_id=pad_id, pad_to=pad_to, packed=s.packing, device=device
        )

    trainer = Trainer(cfg, run_dir, model, batches, loss_fn, device=device, eval_fn=eval_fn if val_rows else None)
    if resume:
        ckpt = trainer.resume()
        if not quiet:
            print(f"resumed from {ckpt} (step {trainer.step})")
    params = count_params(cfg.model)
    data_info = {**train_stats.as_dict("train_"), **val_stats.as_dict("val_")}
    summary: dict[str, Any] = {
        "status": "running",
        "steps": trainer.step,
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "data": data_info,
        "teacher_topk_cache": None if cache_hit is None else ("loaded" if cache_hit else "computed"),
    }
    _write_summary(run_dir, summary)
    if not quiet:
        _print_data_report(run_dir, cfg, train_stats, val_stats)
    result, fields = fit_logged(
        trainer, run_dir, resume=resume, first_records=[{"kind": "data", "step": 0, **data_info}]
    )
    flops_tok = flops_per_token(cfg.model, t.seq_len)["training"]
    summary.update(
        fields,
        flops=flops_tok * result.tokens,
        final_val_loss=result.final_eval.get("val_loss"),
        final_val_ppl=result.final_eval.get("val_ppl"),
        unigram_entropy=None,
    )
    _write_summary(run_dir, summary)
    from lmlab.train.plots import plot_loss

    plot_loss(run_dir)
    if not result.diverged and not cfg.sft.train_file and cfg.data.synthetic.world == "facts":
        summary["facts_accuracy"] = facts_accuracy(model, tokenizer, cfg)
        _write_summary(run_dir, summary)
    if not result.diverged:
        if any(r.text is None for r in train_records):
            write_chat_samples(model, tokenizer, cfg, run_dir, device)
        else:
            write_samples(model, tokenizer, cfg, run_dir, device)
    if not quiet:
        print_report(run_dir, summary)
    return summary


def _print_data_report(run_dir: Path, cfg: RunConfig, train: PackStats, val: PackStats) -> None:
    layout = "packed" if cfg.sft.packing else "one example per row"
    print(
        f"sft {run_dir}: {train.examples} training examples -> {train.rows} rows of <= {cfg.train.seq_len} tokens "
        f"({layout}); {train.target_tokens:,} target tokens; {val.examples} validation examples; "
        f"{cfg.train.steps} steps"
    )
    if train.truncated or train.dropped_overlong or val.truncated or val.dropped_overlong:
        print(
            f"over-long examples ({cfg.sft.overlong}): train truncated {train.truncated}, dropped "
            f"{train.dropped_overlong}; validation truncated {val.truncated}, dropped {val.dropped_overlong}"
        )
    if train.dropped_no_target:
        print(f"dropped {train.dropped_no_target} training examples with no target token left")


def sft_main(argv: list[str]) -> int:
    p = run_parser(
        "lmlab sft",
        "Supervised fine-tuning on JSONL conversations / prompt-completion pairs (or the facts world). "
        "Overrides: dotted key=value after the config (e.g. sft.train_file=chat.jsonl init_from=runs/base).",
    )
    args = p.parse_intermixed_args(argv)
    cfg, run_dir, _ = resolve_run(p, args)
    summary = run_sft(cfg, run_dir, resume=bool(args.resume), quiet=args.quiet)
    return 3 if summary["status"] == "diverged" else 0
