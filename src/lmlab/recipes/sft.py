"""Supervised fine-tuning (``lmlab sft CONFIG [key=value ...] --out DIR``).

Reads JSONL records (conversations, prompt/completion pairs or plain ``text`` documents;
``lmlab.data.chat``), or the facts world's Q&A (``data.synthetic.world=facts``) or the safety world's chat
records (``safety``) when no file is given; ``sft.refusal_tokens`` starts each reply with its control token
(``lmlab.data.refusal_tokens``). Renders them with the chat template, learns the assistant tokens only
(``sft.loss_on``), packs them into rows of ``train.seq_len`` with per-example attention isolation (``lmlab.data.packing``) and
trains with the configured LM objective (goldfish, NEFTune, label smoothing, z-loss, distillation from a
teacher, each logged per component). ``init_from`` gives the architecture, the weights and (unless
``tokenizer.path`` is set) the tokenizer; without it a BPE is trained on the records.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig
from lmlab.data.chat import SFTRecord, read_records, resolve_template
from lmlab.data.packing import PackStats, Row, RowBatches, build_rows, iterate_batches
from lmlab.data.refusal_tokens import add_control_tokens, needed_tokens, require_tokens, with_control_tokens
from lmlab.data.synthetic.safety import SafetyWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.data.training_order import TRAINING_ORDER_FILE, training_order_jsonl
from lmlab.errors import ConfigError, DataError
from lmlab.eval.samples import chat_responder, write_chat_samples, write_samples
from lmlab.objectives.lm import causal_lm_loss
from lmlab.objectives.lm_objective import attach_objective_hooks, build_lm_loss, model_inputs
from lmlab.recipes.distill import cached_topk, load_teacher
from lmlab.recipes.launch import run_command
from lmlab.train.engine import Job, Plan, execute, print_report
from lmlab.train.pretrained import fit_vocabulary, inherit_from_init

# --------------------------------------------------------------------------- inputs


def load_records(cfg: RunConfig) -> tuple[list[SFTRecord], list[SFTRecord]]:
    """Training and validation records: the configured files, or the facts world's Q&A.

    Without ``sft.val_file`` a ``data.val_fraction`` share of the training records (chosen with
    ``data.seed``) is held out for validation when there are at least 10 records.
    """
    s = cfg.sft
    if s.train_file:
        train = read_records(s.train_file, s.columns)
    elif cfg.data.source == "synthetic" and cfg.data.synthetic.world == "facts":
        train = facts_records(cfg, "train")
        if not s.val_file:
            return train, facts_records(cfg, "heldout")
    elif cfg.data.source == "synthetic" and cfg.data.synthetic.world == "safety":
        train = safety_records(cfg, "train")
        if not s.val_file:
            return train, safety_records(cfg, "val")
    else:
        raise ConfigError(
            "lmlab sft needs sft.train_file (a dataset file, folder or id), or data.synthetic.world=facts or safety"
        )
    if s.val_file:
        return train, read_records(s.val_file, s.columns)
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


def safety_records(cfg: RunConfig, split: str) -> list[SFTRecord]:
    """The safety world's chat records with their refuse/category labels: ``data.synthetic.n_docs`` for ``train``,
    a tenth as many for ``val`` (splits never share a prompt)."""
    syn = cfg.data.synthetic
    n = syn.n_docs if split == "train" else max(1, syn.n_docs // 10)
    return [
        SFTRecord(r["id"], tuple(r["messages"]), refuse=r["refuse"], category=r["category"])
        for r in SafetyWorld().records(syn.seed, n, split)
    ]


def load_tokenizer(cfg: RunConfig, records: list[SFTRecord]) -> TextTokenizer:
    """``tokenizer.path`` (the init_from run's by default), else a BPE trained on the records' text."""
    if cfg.tokenizer.path:
        return TextTokenizer.load(cfg.tokenizer.path)
    texts = [r.text if r.text is not None else "\n".join(m["content"] for m in r.messages) for r in records]
    t = cfg.tokenizer
    return TextTokenizer.train_bpe(texts[: t.train_docs], t.vocab_size, t.min_frequency, split_digits=t.split_digits)


def encode_records(records: list[SFTRecord], tokenizer: TextTokenizer, cfg: RunConfig):
    """``(ids, target_mask)`` per record with the run's template and ``sft.loss_on``."""
    template = None
    if any(r.text is None for r in records):
        template = resolve_template(tokenizer, cfg.sft.chat_template)
    return [r.encode(tokenizer, template, cfg.sft.loss_on) for r in records]


def encode_rows(records: list[SFTRecord], tokenizer: TextTokenizer, cfg: RunConfig) -> tuple[list[Row], PackStats]:
    """The records as rows of ``train.seq_len`` tokens (packed or one per row, per ``sft.overlong``)."""
    s = cfg.sft
    return build_rows(
        encode_records(records, tokenizer, cfg), cfg.train.seq_len, packing=s.packing, overlong=s.overlong
    )


def steps_for_epochs(cfg: RunConfig, n_rows: int, world_size: int = 1) -> RunConfig:
    """With ``sft.epochs > 0``, ``train.steps`` = ceil(epochs · rows / rows per step)."""
    if cfg.sft.epochs <= 0:
        return cfg
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    steps = max(1, math.ceil(cfg.sft.epochs * n_rows / per_step))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    if cfg.schedule.warmup_steps > steps:
        raise ConfigError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds the {steps} steps of "
            f"sft.epochs={cfg.sft.epochs}; lower the warmup"
        )
    return cfg


def with_run_template(tokenizer: TextTokenizer, cfg: RunConfig) -> TextTokenizer:
    """The tokenizer carrying the chat template the run uses (``sft.chat_template`` when set; the built-in one
    is carried as none), so the run directory's tokenizer files, and generation, evaluation and export after
    it, use the same template."""
    if cfg.sft.chat_template is None:
        return tokenizer
    template = resolve_template(tokenizer, cfg.sft.chat_template)
    if template.origin == "builtin":
        return tokenizer.with_chat_template(None)
    return tokenizer.with_chat_template(template.source, template.origin)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
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


# --------------------------------------------------------------------------- the recipe


class SFTRecipe:
    name = "sft"

    def setup(self, job: Job) -> Plan:
        cfg = inherit_from_init(job.requested)
        train_records, val_records = load_records(cfg)
        own = job.run.path / "tokenizer.json"  # a continued run keeps the tokenizer it trained
        kept = job.run.resuming and own.is_file()
        tokenizer = TextTokenizer.load(own) if kept else load_tokenizer(cfg, train_records)
        mode = cfg.sft.refusal_tokens
        train_records, val_records = with_control_tokens(train_records, mode), with_control_tokens(val_records, mode)
        tokens = needed_tokens(train_records + val_records, mode)
        if kept or cfg.tokenizer.path:
            require_tokens(tokenizer, tokens, f"sft.refusal_tokens={mode}")
        else:
            tokenizer = add_control_tokens(tokenizer, tokens)
        cfg = fit_vocabulary(cfg, tokenizer)
        tokenizer = with_run_template(tokenizer, cfg)
        s, t, ctx = cfg.sft, cfg.train, job.ctx
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        pad_to = t.seq_len if s.packing else None
        rows, stats = encode_rows(train_records, tokenizer, cfg)
        if not rows:
            raise DataError(f"no training example is left after the over-long policy ({stats.as_dict()})")
        val_rows, val_stats = encode_rows(val_records, tokenizer, cfg)
        cfg = steps_for_epochs(cfg, len(rows), ctx.world_size)
        model = job.start_model(cfg)
        attach_objective_hooks(model, cfg.objective, pad_id=pad_id)
        teacher, extras, cache = self._teacher(job, cfg, tokenizer, rows, pad_id)
        batches = RowBatches(
            rows, pad_id=pad_id, seed=cfg.data.seed + t.seed, pad_to=pad_to, with_docs=s.packing, extras=extras,
            rank=ctx.rank, world_size=ctx.world_size,
        )  # fmt: skip
        files: dict[str, str] = {}
        if ctx.is_main and s.training_order:  # the provenance transcript (lmlab.data.training_order)
            per_step = t.micro_batch_size * t.grad_accum * ctx.world_size
            files[TRAINING_ORDER_FILE] = training_order_jsonl(
                train_records, rows, batches.epoch_order, rows_per_step=per_step, steps=cfg.train.steps
            )

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            return evaluate_rows(
                m, val_rows, batch_size=t.micro_batch_size, pad_id=pad_id, pad_to=pad_to, packed=s.packing,
                device=job.device,
            )  # fmt: skip

        self.cfg, self.tokenizer, self.chat = cfg, tokenizer, any(r.text is None for r in train_records)
        data = {**stats.as_dict("train_"), **val_stats.as_dict("val_")}
        return Plan(
            cfg,
            model,
            batches,
            build_lm_loss(cfg.objective, teacher, topk_cached=extras is not None),
            tokenizer,
            eval_fn=eval_fn if val_rows else None,
            summary={"data": data, "teacher_topk_cache": cache, "unigram_entropy": None},
            first_records=[{"kind": "data", "step": 0, **data}],
            files=files,
            headline=_data_report(job.run.path, cfg, stats, val_stats),
        )

    def _teacher(self, job: Job, cfg: RunConfig, tokenizer, rows: list[Row], pad_id: int):
        """``(teacher, cached top-k tables, cache state)`` for distillation: with ``topk_cache`` the teacher
        runs once (rank 0 writes the cache, the others read it) and training reads the tables instead."""
        kd, t = cfg.objective.distill, cfg.train
        if not kd.teacher:
            return None, None, None
        teacher = load_teacher(kd.teacher, tokenizer, cfg.model.vocab_size, job.device)
        if kd.topk_cache <= 0:
            return teacher, None, None
        path = job.run.path / "teacher_topk.pt"
        tables, hit = job.ctx.main_first(
            lambda: cached_topk(
                teacher, rows, kd.topk_cache, path, pad_id=pad_id, pad_to=t.seq_len, batch_size=t.micro_batch_size,
                device=job.device,
            )
        )  # fmt: skip
        return None, tables, "loaded" if hit else "computed"

    def finish(self, job: Job, trainer, result) -> None:
        model = job.plain_model(trainer)
        if model is None:
            return
        cfg, tokenizer = self.cfg, self.tokenizer
        if not cfg.sft.train_file and cfg.data.synthetic.world == "facts":
            job.summary.extra["facts_accuracy"] = facts_accuracy(model, tokenizer, cfg)
        if self.chat:
            write_chat_samples(model, tokenizer, cfg, job.run.path)
        else:
            write_samples(model, tokenizer, cfg, job.run.path)

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        print_report(job.run.path, summary)


def _data_report(run_dir: Path, cfg: RunConfig, train: PackStats, val: PackStats) -> str:
    layout = "packed" if cfg.sft.packing else "one example per row"
    lines = [
        f"sft {run_dir}: {train.examples} training examples -> {train.rows} rows of <= {cfg.train.seq_len} tokens "
        f"({layout}); {train.target_tokens:,} target tokens; {val.examples} validation examples; "
        f"{cfg.train.steps} steps"
    ]
    if train.truncated or train.dropped_overlong or val.truncated or val.dropped_overlong:
        lines.append(
            f"over-long examples ({cfg.sft.overlong}): train truncated {train.truncated}, dropped "
            f"{train.dropped_overlong}; validation truncated {val.truncated}, dropped {val.dropped_overlong}"
        )
    if train.dropped_no_target:
        lines.append(f"dropped {train.dropped_no_target} training examples with no target token left")
    return "\n".join(lines)


def run_sft(cfg: RunConfig, run_dir, **options) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``run_dir`` (options as ``lmlab.train.engine.execute``); returns the summary."""
    return execute(SFTRecipe(), cfg, run_dir, **options)


def sft_main(argv: list[str]) -> int:
    return run_command(
        SFTRecipe(),
        ["sft"],
        argv,
        "Supervised fine-tuning on JSONL conversations / prompt-completion pairs (or the facts world). "
        "Overrides: dotted key=value after the config (e.g. sft.train_file=chat.jsonl init_from=runs/base).",
    )
