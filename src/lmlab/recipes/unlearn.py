"""Unlearning (``lmlab unlearn CONFIG --out DIR``): make a model forget one split of an unlearning benchmark.

The policy starts from ``init_from`` (default: the benchmark's target model) and trains for ``unlearn.epochs``
passes over the forget split's questions with the method of ``unlearn.method`` (a row of
``lmlab.objectives.unlearning_methods``; docs/science.md §14). Each micro-batch holds forget questions with their
true answers, refusal answers to the same questions (a template redrawn per draw, as in TOFU) and as many
retain questions (people outside the split); the method says which it uses and which the frozen reference (the
starting model, or an adapter run's base) scores. Every evaluation scores the model on the benchmark
(``lmlab.eval.unlearning``, without generation): forget quality against the gold model of the split, model
utility, forget and retain probabilities; ``unlearn.stop_forget_quality`` / ``unlearn.stop_utility_ratio`` end
the run early. The final report, with greedy-decoding metrics, is ``unlearning.json`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from typing import Any

import torch
from torch import nn

from lmlab.config import RunConfig
from lmlab.data.chat import resolve_template
from lmlab.data.tokenizer import TextTokenizer
from lmlab.data.unlearning_bench import BenchData
from lmlab.errors import ConfigError
from lmlab.eval.answers import Encoded, collate, encode_qa, score_answers
from lmlab.eval.unlearning import BenchScorer, headline
from lmlab.models.lora import adapters_disabled
from lmlab.objectives.base import LossOutput
from lmlab.objectives.unlearning_methods import Scored
from lmlab.objectives.weight_attribution import top_fraction_masks, wagle_scores
from lmlab.recipes.launch import run_command
from lmlab.recipes.unlearn_bench import bench_main
from lmlab.safe_io import write_bytes_atomic, write_text_atomic
from lmlab.train.callbacks import Callback
from lmlab.train.engine import Job, Plan, execute
from lmlab.train.pretrained import check_same_tokenizer, inherit_from_init, load_frozen, run_tokenizer

REPORT = "unlearning.json"
WEIGHT_MASK = "weight_mask.pt"
GOLD_SCORES_VERSION = 1  # bump when the cached gold scores change meaning

# --------------------------------------------------------------------------- batches


class UnlearnBatches:
    """The loop's ``BatchSource``: shuffled epochs over the forget items, each paired with a retain item and a
    refusal template drawn from ``(seed, epoch, position)``, so the stream is deterministic and resumable."""

    def __init__(self, forget, retain, idk, pad_id: int, seed: int, parts, *, rank: int = 0, world_size: int = 1):
        self.forget, self.retain, self.idk = forget, retain, idk  # encoded rows; idk[i][j]: question i, template j
        self.pad_id, self.seed, self.parts = pad_id, seed, parts
        self.rank, self.world_size = rank, world_size
        self.epoch = self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.forget)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        drawn: list[tuple[int, int, int]] = []  # (forget index, epoch, position)
        wanted = batch_size * self.world_size
        while len(drawn) < wanted:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            drawn.append((self._order[self.position], self.epoch, self.position))
            self.position += 1
        drawn = drawn[self.rank * batch_size : (self.rank + 1) * batch_size]
        batch: dict[str, torch.Tensor] = {}
        rows: dict[str, list[Encoded]] = {"forget": [], "retain": [], "idk": []}
        for i, epoch, position in drawn:
            rng = random.Random(f"{self.seed}:{epoch}:{position}")
            rows["forget"].append(self.forget[i])
            rows["retain"].append(self.retain[rng.randrange(len(self.retain))])
            rows["idk"].append(self.idk[i][rng.randrange(len(self.idk[i]))])
        for part in self.parts:
            batch[f"{part}_ids"], batch[f"{part}_mask"] = collate(rows[part], self.pad_id)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# --------------------------------------------------------------------------- the loss


def build_unlearn_loss(method, reference: nn.Module | None, *, implicit: bool, n_layers: int):
    """``loss_fn(model, batch) -> LossOutput``: the method's parts scored under the policy and, without gradients,
    its ``ref_parts`` under the reference (the policy with adapters off when ``implicit``)."""
    block = method.hidden_block(n_layers)

    def score(model: nn.Module, batch, part: str) -> Scored:
        return score_answers(
            model, batch[f"{part}_ids"], batch[f"{part}_mask"], keep_logits=method.needs_logits, hidden_block=block
        )

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        policy = {part: score(model, batch, part) for part in method.parts}
        ref = None
        if method.ref_parts:
            with torch.no_grad():
                if implicit:
                    with adapters_disabled(model):
                        ref = {part: score(model, batch, part) for part in method.ref_parts}
                else:
                    ref = {part: score(reference, batch, part) for part in method.ref_parts}
        out = method.loss(policy, ref)
        n = policy[method.parts[0]].logps.numel()
        for part, scored in policy.items():  # logged as per-example means, like the loss
            out.metrics[f"nll/{part}"] = scored.nll.detach().sum() * (out.count / n)
        return out

    return loss_fn


# --------------------------------------------------------------------------- WAGLE's weight mask


def attribution_masks(model: nn.Module, forget, retain, pad_id: int, wm, batch_size: int, device) -> dict:
    """WAGLE's masks of the trainable weights from the gradients of the mean forget-answer NLL and of the mean
    retain-answer NLL at the starting weights (``lmlab.objectives.weight_attribution``). For gradient ascent,
    GradDiff and NPO (whose gradient at the start is gradient ascent's) the forget NLL's gradient is the forget
    loss's up to its sign, which the score's absolute value ignores."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = wm.max_items or len(forget)
    retain = [retain[i] for i in random.Random(0).sample(range(len(retain)), min(n, len(retain)))]

    def mean_nll_grad(rows) -> dict[str, torch.Tensor]:
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for start in range(0, len(rows), batch_size):
            ids, mask = collate(rows[start : start + batch_size], pad_id)
            nll = score_answers(model, ids.to(device), mask.to(device)).nll.sum() / len(rows)
            grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    total[name] += g
        return total

    was_training = model.training
    model.eval()
    forget_grad, retain_grad = mean_nll_grad(forget[:n]), mean_nll_grad(retain)
    model.train(was_training)
    scores = {name: wagle_scores(p.detach(), forget_grad[name], retain_grad[name], wm.mu) for name, p in params.items()}
    return {name: m.cpu() for name, m in top_fraction_masks(scores, wm.keep).items()}


# --------------------------------------------------------------------------- evaluation and early stopping


class EarlyStop(Callback):
    """Stops the run (after its evaluation, with a checkpoint) once forget quality reaches a level or model
    utility falls below a fraction of the starting model's."""

    def __init__(self, forget_quality: float, utility_floor: float | None):
        self.forget_quality, self.utility_floor = forget_quality, utility_floor
        self.reason: str | None = None

    def on_evaluate(self, trainer, metrics: dict[str, float]) -> None:
        fq, mu = metrics.get("forget_quality"), metrics.get("model_utility")
        if self.forget_quality > 0 and fq is not None and fq >= self.forget_quality:
            self.reason = f"forget quality {fq:.3g} >= {self.forget_quality}"
        elif self.utility_floor is not None and mu is not None and mu < self.utility_floor:
            self.reason = f"model utility {mu:.4f} < {self.utility_floor:.4f}"
        if self.reason:
            trainer.stop.request("early_stop")


def _flat(report: dict[str, Any]) -> dict[str, float]:
    out = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    for split in ("forget", "retain", "world"):
        out.update(
            {f"{split}/{k}": v for k, v in report[split].items() if isinstance(v, (int, float)) and k != "items"}
        )
    return out


# --------------------------------------------------------------------------- the recipe


def resolve_unlearn_config(cfg: RunConfig) -> tuple[RunConfig, BenchData]:
    """The benchmark and the config with ``init_from`` defaulting to its target model."""
    u = cfg.unlearn
    if not u.bench:
        raise ConfigError("lmlab unlearn needs unlearn.bench (a directory made by `lmlab unlearn bench prepare`)")
    bench = BenchData.open(u.bench)
    bench.check_split(u.split)
    if not cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=str(bench.model("target")))
    return inherit_from_init(cfg), bench


def encode_parts(bench: BenchData, split: str, method, tokenizer, template, max_len: int):
    """``(forget, retain, refusals)`` rows of a split: the forget answers (and, for ULD, their paraphrases), the
    retain pool (the retain people's answers, and for ULD the forget questions' wrong answers), and for each
    forget row the refusal templates to its question (only when the method uses them)."""
    forget_items = bench.items(split)
    forgotten = set(bench.manifest["forget_people"][split])
    retain_items = bench.items("retain") + [it for it in bench.items("forget10") if it["person"] not in forgotten]

    def enc(item: dict, answer: str) -> Encoded:
        return encode_qa(tokenizer, item["question"], answer, template=template, max_len=max_len, where=item["id"])

    forget_rows = [(it, it[field]) for it in forget_items for field in method.forget_answers]
    forget = [enc(it, answer) for it, answer in forget_rows]
    retain = [enc(it, it["answer"]) for it in retain_items]
    if method.retain_with_perturbed:  # ULD's D_r⁺: the forget questions' wrong answers count as retain data
        retain += [enc(it, wrong) for it in forget_items for wrong in it["perturbed_answers"]]
    if "idk" not in method.parts:
        return forget, retain, [[f] for f in forget]
    idk = [r["text"] for r in bench.items("idk")]
    return forget, retain, [[enc(it, text) for text in idk] for it, _ in forget_rows]


def logged_start(run_dir) -> dict[str, float]:
    """The step-0 evaluation a run logged (what a continued run reports as its start)."""
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("kind") == "eval" and record.get("step") == 0:
            return {k: v for k, v in record.items() if k not in ("kind", "step", "tokens")}
    return {}


class UnlearnRecipe:
    name = "unlearn"

    def setup(self, job: Job) -> Plan:
        cfg, bench = resolve_unlearn_config(job.requested)
        u, t, ctx = cfg.unlearn, cfg.train, job.ctx
        method = u.method
        tokenizer = TextTokenizer.load(cfg.tokenizer.path)
        gold_path = bench.model(f"gold_{u.split}")
        check_same_tokenizer(
            run_tokenizer(gold_path), tokenizer, f"gold model {gold_path}", f"the model {cfg.init_from}"
        )
        template = resolve_template(tokenizer)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        forget, retain, refusals = encode_parts(bench, u.split, method, tokenizer, template, u.max_len)
        per_step = t.micro_batch_size * t.grad_accum * ctx.world_size
        if u.epochs > 0:
            steps = max(1, math.ceil(u.epochs * len(forget) / per_step))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=u.max_len))
        model = job.start_model(cfg)
        frozen = [n for n, p in model.named_parameters() if not method.trainable(n, cfg.model.n_layers)]
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        kept = self._weight_mask(job, cfg, model, forget, retain, pad_id) if u.weight_mask.enabled else None
        implicit = cfg.adapter.enabled
        reference = None
        if method.ref_parts and not implicit:
            reference = load_frozen(
                cfg.init_from, job.device, role="reference", tokenizer=tokenizer, key="init_from"
            ).model
        batches = UnlearnBatches(
            forget,
            retain,
            refusals,
            pad_id,
            cfg.data.seed + t.seed,
            method.parts,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        scorer = BenchScorer(
            bench, u.split, tokenizer, template=template, max_len=u.max_len, limit=u.eval_items,
            batch_size=t.micro_batch_size, max_new_tokens=cfg.sample.max_new_tokens, device=job.device,
        )  # fmt: skip
        gold = gold_reference(job, bench, u.split, scorer)
        if job.run.resuming:  # the model is not the starting one any more: its step-0 evaluation was logged
            start = logged_start(job.run.path)
        else:
            start = _flat(scorer.evaluate(model, gold, generation=False)) if ctx.is_main else {}
        floor = start.get("model_utility", 0.0) * u.stop_utility_ratio if u.stop_utility_ratio > 0 else None
        self.early = EarlyStop(u.stop_forget_quality, floor)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return _flat(scorer.evaluate(method.eval_model(m), gold, generation=False))

        self.cfg, self.scorer, self.gold, self.start = cfg, scorer, gold, start
        return Plan(
            cfg,
            model,
            batches,
            build_unlearn_loss(method, reference, implicit=implicit, n_layers=cfg.model.n_layers),
            tokenizer,
            eval_fn=eval_fn,
            callbacks=[self.early],
            summary={
                "bench": str(bench.root),
                "split": u.split,
                "method": dataclasses.asdict(method),
                "forget_items": len(forget),
                "retain_items": len(retain),
                "frozen_parameters": len(frozen),
                "weight_mask_kept": kept,
                "start": start or None,
            },
            first_records=[{"kind": "eval", "step": 0, **start}] if start else [],
            headline=(
                f"unlearn {u.split} of {bench.root} with {method.kind}: {len(forget)} forget items, {len(retain)} "
                f"retain items, {cfg.train.steps} steps of {per_step}; at the start: forget quality "
                f"{start.get('forget_quality', float('nan')):.3g}, model utility {start.get('model_utility', float('nan')):.4f}"
            ),
        )

    def _weight_mask(self, job: Job, cfg: RunConfig, model, forget, retain, pad_id: int) -> float:
        """Restrict the updates to WAGLE's attributed weights: the masks are computed at the start of a new run
        and kept in ``RUN_DIR/weight_mask.pt`` (a continued run reads them); returns the fraction kept."""
        path = job.run.path / WEIGHT_MASK
        if job.run.resuming and path.is_file():
            masks = torch.load(path, map_location="cpu", weights_only=True)
        else:
            masks = attribution_masks(
                model, forget, retain, pad_id, cfg.unlearn.weight_mask, cfg.train.micro_batch_size, job.device
            )
            if job.ctx.is_main:
                buffer = io.BytesIO()
                torch.save(masks, buffer)
                write_bytes_atomic(path, buffer.getvalue())
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            keep = mask.to(params[name].device, params[name].dtype)
            params[name].register_hook(lambda grad, keep=keep: grad * keep)
        return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    def finish(self, job: Job, trainer, result) -> None:
        model = job.plain_model(trainer)
        if model is None:
            return
        report = self.scorer.evaluate(self.cfg.unlearn.method.eval_model(model), self.gold)
        report["early_stop"] = self.early.reason
        write_text_atomic(job.run.path / REPORT, json.dumps(report, indent=2) + "\n")
        job.summary.extra.update(unlearning={k: v for k, v in _flat(report).items()}, early_stop=self.early.reason)

    def report(self, job: Job, summary: dict[str, Any]) -> None:
        report = json.loads((job.run.path / REPORT).read_text()) if (job.run.path / REPORT).is_file() else None
        print(f"finished {summary['steps']} steps; " + (headline(report) if report else "no report"))
        print(f"run directory: {job.run.path} (report: {REPORT})")


def gold_reference(job: Job, bench: BenchData, split: str, scorer: BenchScorer) -> dict[str, Any]:
    """The gold model's scores on the split (forget-set truth ratios, privacy AUC), computed once per benchmark
    and split and cached in the benchmark directory as ``models/gold_SPLIT/gold_scores.json``."""
    path = bench.model(f"gold_{split}") / "gold_scores.json"
    key = {
        "version": GOLD_SCORES_VERSION,
        "items": len(scorer.sets["forget"]),
        "texts": len(scorer.forget_texts),
        "holdout": len(scorer.holdout_texts),
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    gold = load_frozen(
        bench.model(f"gold_{split}"), job.device, role="gold", tokenizer=scorer.tokenizer, key="unlearn.bench"
    ).model
    scores = {
        "key": key,
        "forget": {"truth_ratios": scorer.truth_ratios(gold, "forget")},
        "privacy_auc": scorer.privacy_auc(gold),
    }
    if job.ctx.is_main:
        write_text_atomic(path, json.dumps(scores) + "\n")
    return scores


def run_unlearn(cfg: RunConfig, run_dir, **options) -> dict[str, Any]:
    """Unlearn per ``cfg`` into ``run_dir`` (options as ``lmlab.train.engine.execute``); returns the summary."""
    return execute(UnlearnRecipe(), cfg, run_dir, **options)


def unlearn_main(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    return run_command(
        UnlearnRecipe(),
        ["unlearn"],
        argv,
        "Unlearn a forget split of an unlearning benchmark (lmlab unlearn bench prepare) with one method "
        "(unlearn.method.kind: npo, ga, grad_diff, simnpo, idk_dpo, idk_nll, flat, rmu). "
        "Overrides: dotted key=value after the config (e.g. unlearn.split=forget10 unlearn.method.beta=0.2).",
        aliases={
            "--bench": ("unlearn.bench", "the benchmark directory"),
            "--split": ("unlearn.split", "forget01 | forget05 | forget10"),
        },
    )
