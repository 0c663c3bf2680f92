"""Reward head on the last non-pad token, Bradley–Terry loss by hand, the regularised variant, config."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.config import ModelConfig, load_config
from lmlab.errors import ConfigError
from lmlab.models.reward_head import RewardModel
from lmlab.recipes.reward import bradley_terry_loss, build_reward_loss, chosen_nll


def tiny_model() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))


def test_reward_reads_the_last_real_token_and_ignores_padding():
    model = tiny_model().eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    lengths = torch.tensor([4, 6])
    r = model(ids, lengths)
    alone = model(ids[:1, :4], torch.tensor([4]))
    assert r[0].item() == pytest.approx(alone.item(), abs=1e-5)  # right padding changes nothing
    hidden = model.hidden(ids)
    assert r[1].item() == pytest.approx((hidden[1, 5] @ model.head.weight[0]).item(), abs=1e-5)
    with pytest.raises(ValueError):
        model(ids, torch.tensor([0, 6]))


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [math.log(2.0), math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)  # 0.693147, 0.126928, 2.126928


def test_chosen_nll_by_hand():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[False, True, True]])
    assert chosen_nll(logits, ids, mask).item() == pytest.approx(math.log(4.0), abs=1e-6)


def test_regularised_loss_adds_weighted_lm_term():
    model = tiny_model()
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]),
        "completion_mask": torch.tensor([[False, False, True, True], [False, False, True, False]]),
        "lengths": torch.tensor([4, 3]),
        "pair_index": torch.tensor([0]),
    }
    plain = build_reward_loss(0.0)(model, batch)
    reg = build_reward_loss(0.5)(model, batch)
    nll = reg.metrics["lm_nll"]
    assert "lm_nll" not in plain.metrics and int(plain.count) == 1
    assert reg.loss_sum.item() == pytest.approx(plain.loss_sum.item() + 0.5 * nll.item(), abs=1e-6)
    # the LM term trains the decoder through the LM head, the BT term through the reward head
    reg.loss_sum.backward()
    assert model.head.weight.grad is not None and model.decoder.tok_embeddings.weight.grad.abs().sum() > 0


def test_reward_config_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("init_from: base\nreward:\n  lm_weight: 0.1\n  ood_file: ood.jsonl\n")
    cfg = load_config(path, ["reward.lm_weight=0.2"])
    rcfg = cfg.reward
    assert cfg.init_from == "base" and rcfg.lm_weight == 0.2 and rcfg.ood_file == "ood.jsonl"
    with pytest.raises(ConfigError, match="reward.lm_weight=-1.0 must be >= 0"):
        load_config(path, ["reward.lm_weight=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'reward.weight'"):
        load_config(path, ["reward.weight=1"])
