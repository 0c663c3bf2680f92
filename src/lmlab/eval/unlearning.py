"""The unlearning benchmark's metrics for one model: TOFU's forget quality and model utility, MUSE's memorisation
and privacy leakage, extraction strength and fluency (docs/science.md §13), per split.

``BenchScorer`` holds the benchmark's encoded items and scores any model on them:

- forget split (the questions being unlearned): answer probability, ROUGE-L recall of the greedy answer, truth
  ratio R against the paraphrased answer, extraction strength, fluency of the greedy answers, and, against the
  gold model's R on the same questions, **forget quality** (KS-test p-value);
- ``retain`` (retain people's questions) and ``world`` (places and organizations): probability (with options on
  world questions), ROUGE-L recall, truth ratio; **model utility** is the harmonic mean of these six (TOFU's nine
  without its real-authors set, which a synthetic world has no counterpart for);
- MUSE: VerbMem (ROUGE-L F1 × 100 of a greedy continuation of the first half of a forget biography),
  KnowMem on forget and retain questions (ROUGE-L F1 × 100 of the greedy chat answer: the bench models are chat
  models, so the questions go through the chat template rather than MUSE's few-shot text prompt), and PrivLeak
  (the Min-40% AUC of forget biographies vs never-trained holdout biographies, relative to the gold model's).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.data.chat import end_of_turn_id, render_prompt, resolve_template
from lmlab.data.unlearning_bench import BenchData
from lmlab.eval.answers import Encoded, answer_nlls, collate, encode_qa
from lmlab.eval.mia import mia_scores, roc_auc
from lmlab.eval.unlearning_metrics import (
    extraction_strength,
    fluency,
    forget_quality,
    length_normalised_probability,
    model_utility,
    privleak,
    probability_with_options,
    rouge_l_f1,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget_score,
    truth_ratio_retain_score,
)
from lmlab.models.generation import greedy_many

MIN_K = 0.4  # MUSE's PrivLeak uses Min-40%


@dataclass
class EncodedItem:
    item: dict[str, Any]
    answer: Encoded
    reference: Encoded  # the truth ratio's reference answer: paraphrased (forget, retain) or original (world)
    perturbed: list[Encoded]
    prompt: list[int]  # the question rendered for generation


class BenchScorer:
    """Scores models on one forget split of a benchmark (items encoded once with the model's tokenizer)."""

    def __init__(
        self, bench: BenchData, split: str, tokenizer, *, template=None, max_len: int = 128, limit: int = 0,
        batch_size: int = 32, max_new_tokens: int = 32, device="cpu",
    ):  # fmt: skip
        bench.check_split(split)
        self.split, self.tokenizer, self.device = split, tokenizer, torch.device(device)
        self.batch_size, self.max_new_tokens, self.max_len = batch_size, max_new_tokens, max_len
        self.chat = resolve_template(tokenizer, template)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.stop_id = end_of_turn_id(tokenizer)
        pick = _limited(limit)
        # the forget split is always scored whole: forget quality is a test between its two samples
        self.sets = {
            "forget": [self._encode(it, "paraphrased_answer") for it in bench.items(split)],
            "retain": [self._encode(it, "paraphrased_answer") for it in pick(bench.items("retain_eval"))],
            "world": [self._encode(it, "answer") for it in pick(bench.items("world"))],
        }
        self.forget_texts = [r["text"] for r in bench.items(f"{split}_texts")]
        self.holdout_texts = [r["text"] for r in pick(bench.items("holdout_texts"))]

    def _encode(self, item: dict[str, Any], reference_key: str) -> EncodedItem:
        where = f"{item.get('id', item['question'])}"

        def enc(answer: str) -> Encoded:
            return encode_qa(
                self.tokenizer, item["question"], answer, template=self.chat, max_len=self.max_len, where=where
            )

        prompt = render_prompt(self.tokenizer, [{"role": "user", "content": item["question"]}], self.chat)
        return EncodedItem(
            item, enc(item["answer"]), enc(item[reference_key]), [enc(a) for a in item["perturbed_answers"]], prompt
        )

    # ------------------------------------------------------------------ per-item quantities

    def _nlls(self, model: nn.Module, rows: list[Encoded]) -> list[float]:
        return answer_nlls(model, rows, self.pad_id, self.batch_size, self.device)

    def truth_ratios(self, model: nn.Module, name: str = "forget") -> list[float]:
        """R per item: the perturbed answers' geometric-mean probability over the reference answer's."""
        items = self.sets[name]
        ref = self._nlls(model, [e.reference for e in items])
        k = len(items[0].perturbed)
        pert = self._nlls(model, [p for e in items for p in e.perturbed])
        return [truth_ratio(ref[i], pert[i * k : (i + 1) * k]) for i in range(len(items))]

    @torch.no_grad()
    def greedy_answers(self, model: nn.Module, name: str) -> list[str]:
        items = self.sets[name]
        budgets = [max(min(self.max_new_tokens, model.cfg.max_seq_len - len(e.prompt)), 1) for e in items]
        new = greedy_many(model, [e.prompt for e in items], budgets, batch_size=self.batch_size, eos_id=self.stop_id)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]

    @torch.no_grad()
    def extraction_strengths(self, model: nn.Module) -> list[float]:
        """Teacher-forced extraction strength of each forget answer (its final end-of-turn target dropped)."""
        values = []
        for e in self.sets["forget"]:
            ids, mask = collate([e.answer], self.pad_id)
            logits = model(ids.to(self.device))[0, :-1]
            positions = [t for t in range(1, ids.shape[1]) if mask[0, t]][:-1] or [ids.shape[1] - 1]
            predicted = [int(logits[t - 1].argmax()) for t in positions]
            values.append(extraction_strength(predicted, [int(ids[0, t]) for t in positions]))
        return values

    def min_k_scores(self, model: nn.Module, texts: list[str]) -> list[float]:
        """Min-40% of each text as lmlab reads documents (``lmlab.eval.mia``, batched)."""
        return mia_scores(
            model, self.tokenizer, texts, attacks=["min_k"], k=MIN_K, batch_size=self.batch_size, device=self.device
        )["min_k"]

    @torch.no_grad()
    def verbmem(self, model: nn.Module) -> float:
        """MUSE VerbMem on the forget biographies: the first half of each as the prompt, the rest as the truth."""
        prompts, truths = [], []
        for text in self.forget_texts:
            ids = self.tokenizer.encode(text)
            half = len(ids) // 2
            prompts.append([self.tokenizer.eos_id, *ids[:half]])
            truths.append(ids[half:])
        new = greedy_many(
            model, prompts, [len(t) for t in truths], batch_size=self.batch_size, eos_id=self.tokenizer.eos_id
        )
        scores = [
            100
            * rouge_l_f1(self.tokenizer.decode(t), self.tokenizer.decode(n, skip_special_tokens=True), stemmer=False)
            for t, n in zip(truths, new)
        ]
        return statistics.fmean(scores)

    # ------------------------------------------------------------------ the report

    def privacy_auc(self, model: nn.Module) -> float:
        """MUSE's orientation: forget texts labelled 0, holdout 1, scored −Min-40%, so memorised forget texts give
        AUC → 0. ``roc_auc(a, b)`` is P(score_b > score_a) for loss-like scores, hence holdout first."""
        return roc_auc(self.min_k_scores(model, self.holdout_texts), self.min_k_scores(model, self.forget_texts))

    def evaluate(
        self, model: nn.Module, gold: dict[str, Any] | None = None, *, generation: bool = True
    ) -> dict[str, Any]:
        """Every metric of ``model``; ``gold`` (this method's output for the gold model, or ``gold_reference``'s)
        adds forget quality and PrivLeak. Without ``generation`` the ROUGE, KnowMem, VerbMem and fluency
        numbers (greedy decoding, the slow part) are skipped and model utility uses probabilities and truth
        ratios only."""
        model.eval()
        out: dict[str, Any] = {}
        ratios: dict[str, list[float]] = {}
        for name, items in self.sets.items():
            nll = self._nlls(model, [e.answer for e in items])
            ratios[name] = self.truth_ratios(model, name)
            split: dict[str, Any] = {"items": len(items), "nll": statistics.fmean(nll)}
            if name == "world":
                k = len(items[0].perturbed)
                pert = self._nlls(model, [p for e in items for p in e.perturbed])
                split["probability"] = statistics.fmean(
                    probability_with_options(nll[i], pert[i * k : (i + 1) * k]) for i in range(len(items))
                )
            else:
                split["probability"] = statistics.fmean(length_normalised_probability(v) for v in nll)
            score = truth_ratio_forget_score if name == "forget" else truth_ratio_retain_score
            split["truth_ratio"] = score(ratios[name])
            if generation:
                answers = self.greedy_answers(model, name)
                split["rouge_l_recall"] = statistics.fmean(
                    rouge_l_recall(e.item["answer"], a) for e, a in zip(items, answers)
                )
                split["knowmem"] = statistics.fmean(
                    100 * rouge_l_f1(e.item["answer"], a, stemmer=False) for e, a in zip(items, answers)
                )
                if name == "forget":
                    split["fluency"] = fluency(answers)
                    split["samples"] = [
                        {"question": e.item["question"], "answer": a} for e, a in zip(items[:8], answers)
                    ]
            out[name] = split
        out["forget"]["extraction_strength"] = statistics.fmean(self.extraction_strengths(model))
        out["forget"]["truth_ratios"] = ratios["forget"]
        utility_keys = (
            ("probability", "rouge_l_recall", "truth_ratio") if generation else ("probability", "truth_ratio")
        )
        out["model_utility"] = model_utility([out[s][k] for s in ("retain", "world") for k in utility_keys])
        out["privacy_auc"] = self.privacy_auc(model)
        if generation:
            out["verbmem"] = self.verbmem(model)
        if gold is not None:
            out["forget_quality"] = forget_quality(ratios["forget"], gold["forget"]["truth_ratios"])
            out["privleak"] = privleak(out["privacy_auc"], gold["privacy_auc"])
        return out


def _limited(limit: int) -> Callable[[list], list]:
    """The first ``limit`` rows of a list in a fixed shuffled order (all when 0), so a subset is representative."""

    def pick(rows: list) -> list:
        if not limit or limit >= len(rows):
            return rows
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        return [rows[i] for i in sorted(order[:limit])]

    return pick


def headline(report: dict[str, Any]) -> str:
    """One line: forget quality, model utility, forget and retain probabilities, PrivLeak."""
    fq = report.get("forget_quality")
    parts = [
        f"forget quality {fq:.3g}" if fq is not None else "forget quality n/a",
        f"model utility {report['model_utility']:.4f}",
        f"forget prob {report['forget']['probability']:.4f}",
        f"retain prob {report['retain']['probability']:.4f}",
    ]
    if report.get("privleak") is not None and math.isfinite(report["privleak"]):
        parts.append(f"PrivLeak {report['privleak']:.1f}")
    return ", ".join(parts)
