"""The perplexity filter (docs/science.md §29.2): the §17 test vectors, token NLLs against a hand loop, ROC."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.eval.perplexity_filter import (
    detection_rates,
    mean_score,
    passes,
    roc,
    token_nlls,
    window_means,
    windowed_score,
)
from lmlab.models.build import build_model

from helpers import tiny_config


def test_science_vector_whole_passes_windowed_fails():
    nlls = [1.0] * 18 + [9.0, 9.0]
    assert mean_score(nlls) == pytest.approx(1.8) and passes(mean_score(nlls), 2.0)
    assert window_means(nlls, 10) == pytest.approx([1.0, 2.6])
    assert not passes(windowed_score(nlls), 2.0)


def test_science_vector_both_fail():
    nlls = [float(i) for i in range(1, 13)]
    assert mean_score(nlls) == pytest.approx(6.5) and not passes(mean_score(nlls), 6.0)
    assert window_means(nlls) == pytest.approx([5.5, 11.5]) and not passes(windowed_score(nlls), 6.0)


def test_token_nlls_match_a_hand_loop():
    torch.manual_seed(0)
    model = build_model(tiny_config("model.vocab_size=50").model).eval()
    ids = [3, 17, 5, 42, 8]
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert token_nlls(model, ids) == pytest.approx(expected, abs=1e-5)
    assert token_nlls(model, [3]) == []


def test_detection_rates_and_roc():
    rates = detection_rates(2.0, attacked=[1.0, 3.0, 5.0, 7.0], benign=[0.5, 1.5, 2.5, 1.0])
    assert rates["detection_rate"] == 0.75 and rates["false_positive_rate"] == 0.25
    assert roc([5.0, 6.0], [1.0, 2.0])["auc"] == pytest.approx(1.0)
    assert roc([1.0, 2.0], [5.0, 6.0])["auc"] == pytest.approx(0.0)
    mixed = roc([1.0, 3.0], [2.0, 4.0])["auc"]  # 1 of the 4 (attacked, benign) pairs ranked right
    assert mixed == pytest.approx(0.25) and not math.isnan(mixed)
