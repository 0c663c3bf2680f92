"""Abacus embeddings: a learned embedding of each digit's position within its number (McLeish et al. 2024,
"Transformers Can Do Arithmetic with the Right Embeddings", arXiv 2405.17399).

A model that must add digits of equal significance has to know which digit of its number a token is. Abacus
gives digit tokens an extra embedding indexed by that place (1 for a number's first digit, 2 for the next,
…; 0 and no embedding for every other token), added to the token embedding. In the paper's reversed format
(least significant digit first, ``data.synthetic.subset=addition_reversed``) place i is the same significance
in both operands and in the answer. During training every row's places are shifted by one random offset in
[0, ``max_offset``], so the embeddings of high places are trained too and numbers longer than any seen in
training still get trained embeddings (the paper: offset up to 100 gives 99% on 100-digit addition after
20-digit training).

The digit tokens are those of the run's tokenizer (``digit_ids``, filled from it when a run starts; the
tokenizer must have one token per digit: ``tokenizer.split_digits``). Places beyond the table are clamped
to its last entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.component import NOT_IN_WEIGHTS

if TYPE_CHECKING:
    from lmlab.config import ModelConfig


@dataclass
class AbacusConfig:
    """Digit-place embeddings (``enabled``) for numbers up to ``max_digits`` + ``max_offset`` places."""

    enabled: bool = False
    max_digits: int = 128  # the longest number (in digits) the table covers beyond the training offset
    max_offset: int = field(default=100, metadata=NOT_IN_WEIGHTS)  # random shift of all places per row
    digit_ids: list[int] | None = None  # token ids of "0".."9" (None: from the run's tokenizer)

    @property
    def table_size(self) -> int:
        return self.max_digits + self.max_offset + 1  # + place 0: not a digit

    def validate(self, model: ModelConfig, key: str) -> None:
        if not self.enabled:
            return
        if self.max_digits < 1 or self.max_offset < 0:
            raise ConfigError(f"{key}.max_digits must be >= 1 and {key}.max_offset >= 0")
        if self.digit_ids is not None:
            if len(set(self.digit_ids)) != 10:
                raise ConfigError(f"{key}.digit_ids={self.digit_ids} must be the 10 distinct ids of the digits 0-9")
            if model.vocab_size and not all(0 <= i < model.vocab_size for i in self.digit_ids):
                raise ConfigError(f"{key}.digit_ids={self.digit_ids} must be token ids below model.vocab_size")


def digit_places(input_ids: torch.Tensor, digit_ids: torch.Tensor, carry: torch.Tensor | None = None):
    """Each token's place within its run of digits (1, 2, …; 0 for other tokens) for ``input_ids`` [B, T], and
    each row's run length at the end (the ``carry`` of the next call, so a number may span cached calls).

    E.g. "12+345=" gives [1, 2, 0, 1, 2, 3, 0]."""
    is_digit = torch.isin(input_ids, digit_ids)  # [B, T]
    seq = input_ids.shape[1]
    index = torch.arange(1, seq + 1, device=input_ids.device).expand_as(input_ids)  # 1-based
    # the index of the last non-digit at or before each token (0: none in this call)
    last_break = torch.where(is_digit, torch.zeros_like(index), index).cummax(dim=1).values
    places = torch.where(is_digit, index - last_break, torch.zeros_like(index))
    if carry is not None:  # digits before this call's first non-digit continue the previous call's run
        continues = is_digit & (last_break == 0)
        places = places + torch.where(continues, carry[:, None], torch.zeros_like(places))
    return places, places[:, -1]


class AbacusEmbedding(nn.Module):
    """place -> embedding [table_size, d]; place 0 (not a digit) is the zero vector and gets no gradient."""

    def __init__(self, cfg: AbacusConfig, d_model: int, init_std: float) -> None:
        super().__init__()
        if cfg.digit_ids is None:
            raise ConfigError(
                "model.abacus.enabled needs the digit token ids (model.abacus.digit_ids), filled from a tokenizer "
                "with one token per digit (tokenizer.split_digits: true)"
            )
        self.cfg = cfg
        self.init_std = init_std
        self.embedding = nn.Embedding(cfg.table_size, d_model, padding_idx=0)
        self._digit_ids: dict[torch.device, torch.Tensor] = {}  # not a buffer: a meta-device model keeps it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, mean=0.0, std=self.init_std)
        self.embedding.weight[0].zero_()

    def forward(self, input_ids: torch.Tensor, carry: torch.Tensor | None = None):
        """Embeddings [B, T, d] of the tokens' places, and the carry for a following cached call."""
        device = input_ids.device
        if device not in self._digit_ids:
            self._digit_ids[device] = torch.tensor(self.cfg.digit_ids, dtype=torch.long, device=device)
        places, carry_out = digit_places(input_ids, self._digit_ids[device], carry)
        if self.training and self.cfg.max_offset > 0:
            offset = torch.randint(0, self.cfg.max_offset + 1, (input_ids.shape[0], 1), device=input_ids.device)
            places = torch.where(places > 0, places + offset, places)
        return self.embedding(places.clamp(max=self.cfg.table_size - 1)), carry_out
