"""TOFU and MUSE unlearning metrics as pure functions of per-item numbers and texts (docs/science.md §13).

TOFU is Maini et al. 2024 (arXiv 2401.06121), MUSE is Shi et al. 2024 (arXiv 2407.06460); where the
papers and their code differ, these functions follow the code (locuslab/open-unlearning, "OU", and
swj0419/muse_bench) and say so. Nothing here runs a model: the caller computes each answer's
``NLL_mean`` (the mean per-token loss over answer tokens, OU's "avg loss"), the greedy generations
and the Min-K% AUCs, and these functions turn them into the reported numbers.

Notation (docs/science.md §13): ``P̃(y|x) = exp(−NLL_mean)`` is the length-normalised probability,
``a`` the correct (or paraphrased) answer, ``â_j`` the perturbed answers, ``R`` the truth ratio.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import torch
from scipy.stats import hmean, ks_2samp

from lmlab.errors import UserError

# MUSE's retrained-model AUC for forget vs holdout with Min-40% (muse_bench constants.py,
# AUC_RETRAIN[corpus]["forget_holdout_Min-40%"]), the reference of ``privleak``.
MUSE_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}

Values = Sequence[float] | torch.Tensor


def _values(values: Values, name: str) -> list[float]:
    """A non-empty flat list of floats from a sequence, array or tensor (any device)."""
    out = torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()
    if not out:
        raise ValueError(f"{name} is empty: need at least one value")
    return out


def _ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return torch.as_tensor(ids).reshape(-1).tolist()


def length_normalised_probability(nll_mean: float) -> float:
    """``P̃ = exp(−NLL_mean)``, the per-token geometric-mean probability of an answer.

    TOFU's "Probability" is the mean of this over items. Both OU and the TOFU code use it; the TOFU
    paper writes the raw sequence probability (locuslab/tofu issue #26).
    """
    return math.exp(-float(nll_mean))


def probability_with_options(correct_nll_mean: float, perturbed_nll_means: Values) -> float:
    """TOFU's probability on real authors and world facts (OU ``probability_w_options``):

        P̃(a) / (P̃(a) + Σ_j P̃(â_j))

    a softmax over the negated ``NLL_mean`` of the correct and the perturbed answers.
    """
    nlls = [float(correct_nll_mean), *_values(perturbed_nll_means, "perturbed_nll_means")]
    low = min(nlls)  # shift before exponentiating so large losses do not underflow to 0/0
    weights = [math.exp(low - nll) for nll in nlls]
    return weights[0] / sum(weights)


def truth_ratio(reference_nll_mean: float, perturbed_nll_means: Values) -> float:
    """TOFU's truth ratio of one item, ``R = P̃_pert / P̃_ref`` with the geometric mean

        P̃_pert = exp(−mean_j NLL_mean(â_j)),   so   R = exp(NLL_mean(ref) − mean_j NLL_mean(â_j)).

    This is the convention of OU and the TOFU code; the TOFU paper writes an arithmetic mean of
    ``P̃(â_j)``. The reference answer is the paraphrased answer on the forget and retain sets and the
    original answer on real authors and world facts; the caller chooses it.
    """
    perturbed = _values(perturbed_nll_means, "perturbed_nll_means")
    return math.exp(float(reference_nll_mean) - sum(perturbed) / len(perturbed))


def truth_ratio_forget_score(ratios: Values) -> float:
    """``mean(min(R, 1/R))`` over forget-set items (OU ``closer_to_1_better``): 1 when the model
    cannot tell the true answer from the perturbed ones."""
    rs = _values(ratios, "ratios")
    if min(rs) <= 0.0:
        raise ValueError(f"truth ratios must be positive, got {min(rs)}")
    return sum(min(r, 1.0 / r) for r in rs) / len(rs)


def truth_ratio_retain_score(ratios: Values) -> float:
    """``mean(max(0, 1 − R))`` over retain, real-author or world-fact items (OU ``true_better``)."""
    rs = _values(ratios, "ratios")
    return sum(max(0.0, 1.0 - r) for r in rs) / len(rs)


@lru_cache(maxsize=2)
def _rouge_scorer(stemmer: bool):
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError as err:
        raise UserError("ROUGE metrics need the rouge_score package: pip install 'lmlab[unlearn]'") from err
    return RougeScorer(["rougeL"], use_stemmer=stemmer)


def _rouge_l(reference: str, generated: str, stemmer: bool):
    return _rouge_scorer(stemmer).score(reference, generated)["rougeL"]


def rouge_l_recall(reference: str, generated: str, *, stemmer: bool = True) -> float:
    """ROUGE-L recall ``LCS(ref, gen) / |ref tokens|`` (Lin 2004), TOFU's "ROUGE" (OU ``rouge``).

    Scored by the ``rouge_score`` package as OU does, ``RougeScorer(["rougeL"], use_stemmer=True)``:
    lower-cased words, non-alphanumerics as separators, Porter-stemmed when ``stemmer``. An empty
    text scores 0.
    """
    return float(_rouge_l(reference, generated, stemmer).recall)


def rouge_l_f1(reference: str, generated: str, *, stemmer: bool = True) -> float:
    """ROUGE-L F1 ``2PR/(P + R)`` with ``P = LCS/|gen|``, ``R = LCS/|ref|``, scored as ``rouge_l_recall``."""
    return float(_rouge_l(reference, generated, stemmer).fmeasure)


def verbmem_score(gt_text: str, generated_text: str, *, stemmer: bool = False) -> float:
    """MUSE VerbMem of one item: ROUGE-L F1 × 100 between ``gt`` and the greedy continuation.

    The caller cuts ``gt`` to its first 128 tokens and decodes 128 new tokens; VerbMem is the mean
    over items. muse_bench scores without a stemmer (OU stems: pass ``stemmer=True``).
    """
    return 100.0 * rouge_l_f1(gt_text, generated_text, stemmer=stemmer)


def knowmem_score(gt_answer: str, generated_answer: str, *, stemmer: bool = False) -> float:
    """MUSE KnowMem of one QA item: ROUGE-L F1 × 100 between the answer and the generated answer,
    the latter already cut by ``cut_knowmem_answer``. Stemming as in ``verbmem_score``."""
    return 100.0 * rouge_l_f1(gt_answer, generated_answer, stemmer=stemmer)


def knowmem_prompt(fewshot_pairs: Sequence[tuple[str, str]], question: str) -> str:
    """MUSE's few-shot KnowMem prompt: ``"Question: q\\nAnswer: a\\n\\n"`` per example, then
    ``"Question: q\\nAnswer: "`` for the asked question."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in fewshot_pairs)
    return f"{shots}Question: {question}\nAnswer: "


_KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


def cut_knowmem_answer(text: str) -> str:
    """A KnowMem generation cut before the first ``"\\n\\n"``, ``"\\nQuestion"`` or ``"Question:"``
    (the model starting the next few-shot block)."""
    cut = min((i for i in (text.find(s) for s in _KNOWMEM_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def forget_quality(unlearned_ratios: Values, gold_ratios: Values) -> float:
    """TOFU forget quality: the p-value of a two-sided two-sample Kolmogorov-Smirnov test between
    the unlearned model's per-item forget-set truth ratios and those of the gold (retain) model,
    never trained on the forget split (OU ``ks_test``; ``scipy.stats.ks_2samp``, ``method="auto"``,
    exact at TOFU sizes). High means indistinguishable from the gold model.

    The TOFU code tests ``1/R``; the p-value is the same because KS is invariant under a monotone
    map of both samples.
    """
    unlearned = _values(unlearned_ratios, "unlearned_ratios")
    gold = _values(gold_ratios, "gold_ratios")
    return float(ks_2samp(unlearned, gold, alternative="two-sided", method="auto").pvalue)


def model_utility(values: Values) -> float:
    """TOFU model utility: the harmonic mean (``scipy.stats.hmean``, OU ``hm_aggregate``) of the
    nine {retain, real authors, world facts} × {probability, ROUGE-L recall, truth-ratio
    ``true_better``} scores; any zero gives 0."""
    vs = _values(values, "values")
    if min(vs) < 0.0:
        raise ValueError(f"model utility needs non-negative scores, got {min(vs)}")
    if min(vs) == 0.0:
        return 0.0
    return float(hmean(vs))


def privleak(auc_unlearned: float, auc_gold: float) -> float:
    """MUSE PrivLeak ``(AUC_unl − AUC_gold) / AUC_gold × 100``; near 0 is good.

    The AUCs are in MUSE's orientation: Min-K% (K = 40%) separating ``forget`` texts (label 0)
    from ``holdout`` texts (label 1) with score −MinK, so a model that memorised the forget set
    has AUC ≈ 0 and PrivLeak ≈ −100, and an over-unlearned one a positive PrivLeak.
    ``auc_gold`` is the retrained model's AUC (``MUSE_RETRAIN_AUC`` for the published corpora).
    OU's AUC has the opposite orientation: pass ``1 − AUC_OU`` for both.
    """
    for name, auc in (("auc_unlearned", auc_unlearned), ("auc_gold", auc_gold)):
        if not 0.0 <= auc <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {auc}")
    if auc_gold == 0.0:
        raise ValueError("auc_gold is 0: PrivLeak is undefined")
    return (auc_unlearned - auc_gold) / auc_gold * 100.0


def extraction_strength(predicted_ids: Sequence[int] | torch.Tensor, target_ids: Sequence[int] | torch.Tensor) -> float:
    """Extraction strength (Wang et al., ICLR 2025, as in OU): with ``ŷ`` the teacher-forced argmax
    predictions of the ``T`` answer tokens ``y``, ``k*`` the smallest k with ``ŷ_{k:} = y_{k:}``,

        ES = 1 − k*/T = (length of the longest suffix predicted exactly) / T.

    When not even the last token is right, ``k* = T`` and ES = 0, as the definition gives. OU's
    loop stops at k = T − 1 and so reports 1/T there (the same as one matching last token); its
    numbers exceed these by 1/T on such items. OU also drops the final EOS target; the caller does.
    """
    pred, target = _ids(predicted_ids), _ids(target_ids)
    if not target:
        raise ValueError("target_ids is empty: extraction strength needs at least one answer token")
    if len(pred) != len(target):
        raise ValueError(f"predicted_ids has {len(pred)} tokens but target_ids has {len(target)}")
    suffix = 0
    for p, y in zip(reversed(pred), reversed(target)):
        if p != y:
            break
        suffix += 1
    return suffix / len(target)


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    # Words and single punctuation marks, case kept: close to the nltk.word_tokenize ROME uses
    # without its tokenizer data (which splits contractions differently, "don't" -> "do", "n't").
    return _TOKEN.findall(text)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(text: str) -> float:
    """ROME's generation entropy of one text (Meng et al. 2022, arXiv 2202.05262):

        (2/3·H_2 + 4/3·H_3) / 2 = (H_2 + 2·H_3) / 3

    where ``H_n`` is the entropy in bits of the text's word n-gram frequency distribution (ROME
    weights the two entropies by 2/3 and 4/3 and takes their mean). A text with no n-grams has
    ``H_n = 0``. Low values flag repetitive, degenerate text.
    """
    tokens = _tokens(text)
    h2, h3 = (_entropy_bits(Counter(_ngrams(tokens, n))) for n in (2, 3))
    return (h2 + 2.0 * h3) / 3.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of the text's word n-grams that repeat an earlier one: ``1 − distinct/total``
    (0 with no n-grams)."""
    grams = _ngrams(_tokens(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def fluency(generations: Sequence[str]) -> dict[str, float]:
    """Model-free fluency of generations (e.g. on the forget set, where unlearning can degenerate):
    ``{"ngram_entropy": mean ngram_entropy, "repetition_rate": mean repetition_rate}`` (4-grams).

    Not a TOFU or MUSE metric; the mean of per-text entropies is ROME's ``n_gram_entropy``.
    """
    if not generations:
        raise ValueError("generations is empty: fluency needs at least one text")
    n = len(generations)
    return {
        "ngram_entropy": sum(ngram_entropy(t) for t in generations) / n,
        "repetition_rate": sum(repetition_rate(t) for t in generations) / n,
    }
