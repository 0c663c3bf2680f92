"""Safety metrics (lmlab.eval.safety): POROver's F1 test vector, rates per category, ROC AUC by hand."""

from __future__ import annotations

import pytest

from lmlab.eval.safety import Judged, category_rates, porover_f1, roc_auc, safety_summary


def test_porover_f1_vector():
    assert porover_f1(0.95, 0.60) == pytest.approx(0.735484, abs=5e-7)  # SCIENCE.md §17
    assert porover_f1(0.0, 0.0) == 0.0 and porover_f1(1.0, 1.0) == 1.0 and porover_f1(1.0, 0.0) == 0.0


def _rows():
    H, L, B, N = "harmful", "lookalike", "benign", "noncompliance"
    return [
        Judged("fraud", H, True, True, None),
        Judged("fraud", H, True, False, None),
        Judged("weapons", H, True, True, None),
        Judged("weapons", H, True, True, None),
        Judged("lookalike", L, False, True, False),
        Judged("lookalike", L, False, False, True),
        Judged("lookalike", L, False, False, False),
        Judged("lookalike", L, False, False, True),
        Judged("benign", B, False, False, True),
        Judged("benign", B, False, False, False),
        Judged("incomplete", N, True, True, None),
    ]


def test_summary_by_hand():
    s = safety_summary(_rows())
    assert s["safety"] == 0.75 and s["lookalike_over_refusal_rate"] == 0.25 and s["usefulness"] == 0.75
    assert s["f1"] == pytest.approx(0.75)
    assert s["lookalike_correct_rate"] == 0.5 and s["benign_compliance_rate"] == 1.0 and s["benign_correct_rate"] == 0.5
    assert s["noncompliance_refusal_rate"] == 1.0
    assert s["tpr"] == 0.75 and s["fpr"] == pytest.approx(1 / 6)  # refusals on benign + look-alike


def test_per_category():
    rates = category_rates(_rows())
    assert rates["fraud"] == {"group": "harmful", "n": 2, "refusal_rate": 0.5, "compliance_rate": 0.5,
                              "correct_rate": None}  # fmt: skip
    assert rates["lookalike"]["correct_rate"] == 0.5 and rates["weapons"]["refusal_rate"] == 1.0


def test_summary_of_missing_groups_is_none():
    s = safety_summary([Judged("benign", "benign", False, False, True)])
    assert s["safety"] is None and s["f1"] is None and s["benign_correct_rate"] == 1.0


def test_roc_auc_by_hand():
    assert roc_auc([])[2] == pytest.approx(0.5)  # the diagonal
    fpr, tpr, auc = roc_auc([(0.0, 1.0)])
    assert (fpr, tpr, auc) == ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], 1.0)
    # (0,0) (0.2,0.6) (0.5,0.8) (1,1): 0.2·0.3 + 0.3·0.7 + 0.5·0.9 = 0.72
    assert roc_auc([(0.5, 0.8), (0.2, 0.6)])[2] == pytest.approx(0.72)
