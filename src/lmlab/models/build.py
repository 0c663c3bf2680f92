"""``build_model``: the one place a model is made from its config, for every recipe and loader."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.decoder import Decoder
from lmlab.models.reward_head import RewardModel

Head = Literal["lm", "reward"]


def build_model(cfg: ModelConfig, head: Head = "lm") -> nn.Module:
    """A freshly initialised model: the decoder with its LM head, or with a scalar reward head on top."""
    if head == "reward":
        return RewardModel(cfg)
    return Decoder(cfg)
