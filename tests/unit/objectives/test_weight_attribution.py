"""WAGLE's weight attribution (lmlab.objectives.weight_attribution): the score and the global top-fraction mask."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.objectives.weight_attribution import top_fraction_masks, wagle_scores


def test_wagle_score_by_hand():
    weight = torch.tensor([1.0, -2.0, 0.5])
    forget = torch.tensor([0.1, 0.2, -0.4])
    retain = torch.tensor([1e-6, 0.0, -2e-6])
    # |(θ − g_r/μ)·g_f| with μ = 1e-6: |(1 − 1)·0.1|, |(−2 − 0)·0.2|, |(0.5 + 2)·(−0.4)|
    assert wagle_scores(weight, forget, retain, 1e-6).tolist() == pytest.approx([0.0, 0.4, 1.0])


def test_top_fraction_masks_rank_the_whole_model():
    scores = {"a": torch.tensor([[0.9, 0.1], [0.5, 0.2]]), "b": torch.tensor([0.8, 0.05, 0.3, 0.7])}
    masks = top_fraction_masks(scores, 0.5)  # 4 of 8 entries: 0.9, 0.8, 0.7, 0.5
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [True, False, False, True]
    assert all(m.dtype == torch.bool for m in masks.values())
    assert int(sum(m.sum() for m in top_fraction_masks(scores, 1e-9).values())) == 1  # at least one
    assert all(m.all() for m in top_fraction_masks(scores, 1.0).values())


def test_weight_mask_options_are_checked():
    assert load_config(None, ["unlearn.weight_mask.kind=wagle"]).unlearn.weight_mask.enabled
    with pytest.raises(ConfigError, match="unlearn.weight_mask.keep=0.0 must be in"):
        load_config(None, ["unlearn.weight_mask.kind=wagle", "unlearn.weight_mask.keep=0"])
    with pytest.raises(ConfigError, match="unlearn.weight_mask.mu"):
        load_config(None, ["unlearn.weight_mask.mu=-1"])
