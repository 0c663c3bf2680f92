"""TOFU and MUSE metrics (docs/science.md §13; Maini et al. 2024, arXiv 2401.06121; Shi et al. 2024,
arXiv 2407.06460): the §13 test vectors, hand-computed fluency statistics and the edge cases."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lmlab.errors import UserError
from lmlab.eval import unlearning_metrics as um

GOLD_R = [0.55, 0.60, 0.65, 0.70, 0.75]


def test_length_normalised_probability():
    assert um.length_normalised_probability(0.0) == 1.0
    assert um.length_normalised_probability(2.0) == pytest.approx(math.exp(-2.0))


def test_probability_with_options_vector():
    # e^-0.5 / (e^-0.5 + e^-1 + e^-1.5 + e^-2 + e^-2.5)
    assert um.probability_with_options(0.5, [1.0, 1.5, 2.0, 2.5]) == pytest.approx(0.428656, abs=1e-6)


def test_probability_with_options_is_stable_for_large_losses():
    assert um.probability_with_options(1000.0, torch.tensor([1000.0, 1000.0, 1000.0])) == pytest.approx(0.25)


def test_truth_ratio_is_the_geometric_mean_convention():
    r = um.truth_ratio(1.0, [1.5, 2.0, 2.5])
    assert r == pytest.approx(math.exp(-1.0), abs=1e-12)
    arithmetic = sum(math.exp(-x) for x in (1.5, 2.0, 2.5)) / 3 / math.exp(-1.0)
    assert arithmetic == pytest.approx(0.399180, abs=1e-6) and r != pytest.approx(arithmetic)


def test_truth_ratio_aggregators():
    r = math.exp(-1.0)
    assert um.truth_ratio_forget_score([r]) == pytest.approx(0.367879, abs=1e-6)
    assert um.truth_ratio_retain_score([r]) == pytest.approx(0.632121, abs=1e-6)
    assert um.truth_ratio_forget_score([0.5, 2.0, 1.0]) == pytest.approx(2.0 / 3.0)
    assert um.truth_ratio_retain_score([0.5, 2.0, 1.0]) == pytest.approx(0.5 / 3.0)


def test_rouge_vector():
    gt, gen = "the cat sat on the mat", "the cat lay on the mat today"
    assert um.rouge_l_recall(gt, gen) == pytest.approx(5 / 6, abs=1e-6)
    assert um.rouge_l_f1(gt, gen) == pytest.approx(10 / 13, abs=1e-6)
    assert um.rouge_l_recall(gt, gen, stemmer=False) == pytest.approx(0.833333, abs=1e-6)
    assert um.rouge_l_f1(gt, gen, stemmer=False) == pytest.approx(0.769231, abs=1e-6)


def test_rouge_stemmer_flag():
    # stemmed: [run, dog] vs [the, dog, run], LCS 1 -> P 1/3, R 1/2, F 0.4; unstemmed nothing is shared
    assert um.rouge_l_recall("Running dogs", "the dog runs") == pytest.approx(0.5)
    assert um.rouge_l_f1("Running dogs", "the dog runs") == pytest.approx(0.4)
    assert um.rouge_l_f1("Running dogs", "the dog runs", stemmer=False) == 0.0


def test_rouge_empty_text_scores_zero():
    assert um.rouge_l_recall("", "the cat") == 0.0
    assert um.rouge_l_f1("the cat", "") == 0.0


def test_rouge_missing_package_is_a_user_error(monkeypatch):
    um._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    try:
        with pytest.raises(UserError, match=r"pip install 'lmlab\[unlearn\]'"):
            um.rouge_l_recall("a", "a")
    finally:
        um._rouge_scorer.cache_clear()


def test_verbmem_and_knowmem_are_f1_times_100_without_stemming():
    gt, gen = "the cat sat on the mat", "the cat lay on the mat today"
    assert um.verbmem_score(gt, gen) == pytest.approx(76.9231, abs=1e-4)
    assert um.knowmem_score(gt, gen) == pytest.approx(76.9231, abs=1e-4)
    assert um.knowmem_score("Running dogs", "the dog runs") == 0.0
    assert um.knowmem_score("Running dogs", "the dog runs", stemmer=True) == pytest.approx(40.0)


def test_knowmem_prompt():
    prompt = um.knowmem_prompt([("Who?", "Ann"), ("Where?", "Oslo")], "When?")
    assert prompt == "Question: Who?\nAnswer: Ann\n\nQuestion: Where?\nAnswer: Oslo\n\nQuestion: When?\nAnswer: "
    assert um.knowmem_prompt([], "When?") == "Question: When?\nAnswer: "


@pytest.mark.parametrize(
    "text,expected",
    [
        ("In 1999.\n\nQuestion: next", "In 1999."),
        ("In 1999.\nQuestion: next", "In 1999."),
        ("In 1999. Question: next", "In 1999. "),
        ("In 1999.\nMore text", "In 1999.\nMore text"),
        ("Paris\nQuestion\n\n", "Paris"),
        ("", ""),
    ],
)
def test_cut_knowmem_answer(text, expected):
    assert um.cut_knowmem_answer(text) == expected


def test_forget_quality_vectors():
    assert um.forget_quality([0.30, 0.35, 0.40, 0.45, 0.50], GOLD_R) == pytest.approx(2 / 252, abs=1e-9)
    assert um.forget_quality([0.30, 0.58, 0.40, 0.62, 0.50], GOLD_R) == pytest.approx(0.357143, abs=1e-6)
    assert um.forget_quality(GOLD_R, GOLD_R) == pytest.approx(1.0)


def test_forget_quality_is_invariant_under_inverting_both_samples():
    unl = [0.30, 0.58, 0.40, 0.62, 0.50]
    inverted = um.forget_quality([1 / r for r in unl], [1 / r for r in GOLD_R])
    assert inverted == pytest.approx(um.forget_quality(unl, GOLD_R))


def test_forget_quality_empty_sample_raises():
    with pytest.raises(ValueError, match="unlearned_ratios is empty"):
        um.forget_quality([], GOLD_R)
    with pytest.raises(ValueError, match="gold_ratios is empty"):
        um.forget_quality(GOLD_R, torch.tensor([]))


def test_model_utility_vector():
    values = [0.9, 0.8, 0.5, 0.45, 0.9, 0.6, 0.5, 0.85, 0.55]
    assert um.model_utility(values) == pytest.approx(0.626926, abs=1e-6)
    assert um.model_utility(values) == pytest.approx(9 / sum(1 / v for v in values))


def test_model_utility_zero_gives_zero_and_negative_raises():
    assert um.model_utility([0.9, 0.0, 0.5]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        um.model_utility([0.9, -0.1])


def test_privleak_vector_and_orientation():
    assert um.MUSE_RETRAIN_AUC["news"] == 0.4772
    assert um.privleak(0.2, um.MUSE_RETRAIN_AUC["news"]) == pytest.approx(-58.0889, abs=1e-4)
    assert um.privleak(0.0, 0.5) == -100.0  # a memorising model in MUSE's orientation
    assert um.privleak(0.5393, um.MUSE_RETRAIN_AUC["books"]) == 0.0


def test_privleak_rejects_bad_aucs():
    with pytest.raises(ValueError, match="auc_gold is 0"):
        um.privleak(0.2, 0.0)
    with pytest.raises(ValueError, match=r"auc_unlearned must be in \[0, 1\]"):
        um.privleak(1.2, 0.5)


@pytest.mark.parametrize(
    "predicted,expected",
    [
        ([9, 6, 7, 8], 0.75),
        ([9, 9, 7, 8], 0.5),
        ([5, 6, 7, 9], 0.0),  # the definition; OU reports 1/T = 0.25
        ([1, 2, 3, 4], 0.0),
        ([9, 9, 9, 8], 0.25),
        ([5, 6, 7, 8], 1.0),
    ],
)
def test_extraction_strength_vectors(predicted, expected):
    assert um.extraction_strength(predicted, [5, 6, 7, 8]) == expected
    assert um.extraction_strength(torch.tensor(predicted), torch.tensor([5, 6, 7, 8])) == expected


def test_extraction_strength_bad_inputs():
    with pytest.raises(ValueError, match="target_ids is empty"):
        um.extraction_strength([], [])
    with pytest.raises(ValueError, match="predicted_ids has 3 tokens but target_ids has 4"):
        um.extraction_strength([6, 7, 8], [5, 6, 7, 8])


def test_ngram_entropy_hand_computed():
    # "a b c d": 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1)
    assert um.ngram_entropy("a b c d") == pytest.approx((math.log2(3) + 2.0) / 3.0)
    assert um.ngram_entropy("a b c d") == pytest.approx(1.194987, abs=1e-6)
    # "a b a b a b": bigrams ab x3, ba x2 (H2 = H(0.6, 0.4) = 0.970951); trigrams aba x2, bab x2 (H3 = 1)
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert um.ngram_entropy("a b a b a b") == pytest.approx((h2 + 2.0) / 3.0)
    assert um.ngram_entropy("a b a b a b") == pytest.approx(0.990317, abs=1e-6)
    assert um.ngram_entropy("hello") == 0.0
    assert um.ngram_entropy("") == 0.0


def test_ngram_entropy_counts_punctuation_as_tokens():
    # "A cat." -> [A, cat, .]: 2 distinct bigrams (H2 = 1), 1 trigram (H3 = 0)
    assert um.ngram_entropy("A cat.") == pytest.approx(1.0 / 3.0)


def test_repetition_rate_hand_computed():
    # 4-grams of "a b a b a b": abab, baba, abab -> 2 distinct of 3
    assert um.repetition_rate("a b a b a b") == pytest.approx(1.0 / 3.0)
    assert um.repetition_rate("a b c d") == 0.0
    assert um.repetition_rate("a b c") == 0.0
    assert um.repetition_rate("x x x x x x", n=2) == pytest.approx(1.0 - 1.0 / 5.0)


def test_fluency_means_over_generations():
    out = um.fluency(["a b c d", "a b a b a b"])
    assert out["ngram_entropy"] == pytest.approx((1.194987 + 0.990317) / 2, abs=1e-6)
    assert out["repetition_rate"] == pytest.approx(1.0 / 6.0)
    assert um.fluency(["hello"]) == {"ngram_entropy": 0.0, "repetition_rate": 0.0}


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: um.probability_with_options(0.5, []), "perturbed_nll_means"),
        (lambda: um.truth_ratio(1.0, []), "perturbed_nll_means"),
        (lambda: um.truth_ratio_forget_score([]), "ratios"),
        (lambda: um.truth_ratio_retain_score(torch.tensor([])), "ratios"),
        (lambda: um.model_utility([]), "values"),
        (lambda: um.fluency([]), "generations"),
    ],
)
def test_empty_inputs_raise(call, name):
    with pytest.raises(ValueError, match=f"{name} is empty"):
        call()


def test_truth_ratio_forget_score_rejects_non_positive():
    with pytest.raises(ValueError, match="must be positive"):
        um.truth_ratio_forget_score([0.5, 0.0])
