"""The forced-token rules of refusal steering on hand-made logits (docs/science.md §28), every branch."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import UserError
from lmlab.eval.refusal_steering import ControlTokens, RefusalSteering, choose_control_token

OTHER, RESPOND, REFUSE, FRAUD, PRIVACY = 0, 1, 2, 3, 4
SINGLE = ControlTokens(RESPOND, (REFUSE,), ("refuse",))
CATS = ControlTokens(RESPOND, (FRAUD, PRIVACY), ("fraud", "privacy"))


def logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax (T = 1) is exactly each row of probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def forced(rows, tokens=SINGLE, **steering) -> list[int]:
    return choose_control_token(logits(*rows), tokens, RefusalSteering(**steering)).token.tolist()


def test_single_argmax_rule_compares_refuse_with_respond():
    # [other, respond, refuse, -, -]: refuse iff p[refuse] >= p[respond] (a tie refuses); [other] is ignored
    rows = [[0.1, 0.3, 0.6, 0, 0], [0.1, 0.6, 0.3, 0, 0], [0.2, 0.4, 0.4, 0, 0], [0.8, 0.05, 0.15, 0, 0]]
    assert forced(rows, threshold=-1) == [REFUSE, RESPOND, REFUSE, REFUSE]


def test_single_threshold_rule_reads_p_refuse_alone():
    rows = [[0.1, 0.55, 0.35, 0, 0], [0.1, 0.65, 0.25, 0, 0], [0.0, 0.75, 0.25, 0, 0]]
    assert forced(rows, threshold=0.3) == [REFUSE, RESPOND, RESPOND]  # p >= t, even below p[respond]
    assert forced(rows, threshold=0.25) == [REFUSE, REFUSE, REFUSE]  # p = t refuses
    assert forced(rows, threshold=0.0) == [REFUSE] * 3  # t = 0 always refuses
    assert forced(rows, threshold=1.0) == [RESPOND] * 3


def test_bias_and_temperature_change_p_before_the_threshold():
    row = [[0.1, 0.6, 0.3, 0, 0]]
    assert forced(row, threshold=-1) == [RESPOND]
    assert forced(row, threshold=-1, bias=math.log(2) + 1e-6) == [REFUSE]  # 0.6 vs 0.3·2
    # T = 2: p ∝ sqrt(p): [0.316, 0.775, 0.548] / 1.639 -> p[refuse] = 0.334 >= 0.32; at T = 1 it is 0.3 < 0.32
    assert forced(row, threshold=0.32) == [RESPOND]
    assert forced(row, threshold=0.32, temperature=2.0) == [REFUSE]
    choice = choose_control_token(logits(*row), SINGLE, RefusalSteering(temperature=2.0))
    expected = math.sqrt(0.3) / (math.sqrt(0.1) + math.sqrt(0.6) + math.sqrt(0.3))
    assert choice.score.item() == pytest.approx(expected, rel=1e-6) and choice.refusal_token.item() == REFUSE


def test_category_rules():
    # [other, respond, fraud, privacy]
    top_fraud = [0.1, 0.2, 0.5, 0.2]
    top_fraud_low = [0.3, 0.25, 0.3, 0.15]
    top_respond = [0.1, 0.5, 0.3, 0.1]
    top_privacy = [0.1, 0.2, 0.1, 0.6]
    rows = [[r[0], r[1], 0.0, r[2], r[3]] for r in (top_fraud, top_fraud_low, top_respond, top_privacy)]
    # no thresholds (t = -1 everywhere): the most probable of (categories, respond)
    assert forced(rows, CATS) == [FRAUD, FRAUD, RESPOND, PRIVACY]
    # global t = 0.4: a category on top is forced iff its p >= t, else [respond]; [respond] on top stays
    assert forced(rows, CATS, threshold=0.4) == [FRAUD, RESPOND, RESPOND, PRIVACY]
    # selected set {fraud: 0.4}: fraud rows thresholded; privacy (not selected) keeps its argmax
    assert forced(rows, CATS, category_thresholds={"fraud": 0.4}) == [FRAUD, RESPOND, RESPOND, PRIVACY]
    # a category's own threshold overrides the global one, in both directions
    assert forced(rows, CATS, threshold=0.4, category_thresholds={"privacy": 0.7}) == [FRAUD, RESPOND, RESPOND, RESPOND]
    assert forced(rows, CATS, threshold=0.7, category_thresholds={"fraud": 0.0}) == [FRAUD, FRAUD, RESPOND, RESPOND]
    choice = choose_control_token(logits(*rows), CATS, RefusalSteering())
    assert choice.refusal_token.tolist() == [FRAUD, FRAUD, FRAUD, PRIVACY]
    assert choice.score[2].item() == -math.inf and choice.score[0].item() == pytest.approx(0.5)


def test_category_bias_raises_every_category():
    row = [[0.1, 0.5, 0.0, 0.3, 0.1]]
    assert forced(row, CATS) == [RESPOND]
    assert forced(row, CATS, bias=1.0) == [FRAUD]  # 0.3·e = 0.82 > 0.5


def test_refusal_rate_is_monotone_in_t_and_b():
    torch.manual_seed(0)
    z = torch.randn(200, 6)
    rates_t = [
        (choose_control_token(z, SINGLE, RefusalSteering(threshold=t)).token == REFUSE).float().mean().item()
        for t in (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
    ]
    assert rates_t == sorted(rates_t, reverse=True) and rates_t[0] == 1.0
    rates_b = [
        (choose_control_token(z, SINGLE, RefusalSteering(bias=b)).token == REFUSE).float().mean().item()
        for b in (-4, -1, 0, 1, 4)
    ]
    assert rates_b == sorted(rates_b) and rates_b[0] < rates_b[-1]


@pytest.mark.parametrize("t", [1.5, -0.5, -2, float("nan")])
def test_threshold_outside_range_is_one_message(t):
    with pytest.raises(UserError, match=r"--refusal-threshold must be in \[0, 1\], or -1"):
        RefusalSteering(threshold=t).validate()
    with pytest.raises(UserError, match=r"--category-threshold fraud must be in \[0, 1\]"):
        RefusalSteering(category_thresholds={"fraud": t}).validate()


def test_bad_temperature_and_categories():
    with pytest.raises(UserError, match="--refusal-temperature must be finite and > 0"):
        RefusalSteering(temperature=0).validate()
    with pytest.raises(UserError, match=r"unknown category 'weapon'; the tokenizer's categories: fraud, privacy"):
        CATS.check_categories(["weapon"])
    with pytest.raises(UserError, match="needs a run fine-tuned with sft.refusal_tokens=category"):
        SINGLE.check_categories(["fraud"])
    CATS.check_categories(["privacy"])
