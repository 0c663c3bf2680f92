"""A reward model: the decoder's final hidden state of the last non-pad token -> one scalar.

``RewardModel`` wraps a ``Decoder`` and adds ``head``, a bias-free linear map d -> 1 (the usual
sequence-classification head of HF reward models). Sequences are right-padded, so with causal
attention the hidden state at the last real token has seen the whole prompt and answer and none of
the padding. The decoder's own LM head stays in place (``lm_logits``) so the regularised variant
(Yang et al. 2024, "Regularizing hidden states enables learning generalizable reward models for LLMs",
arXiv 2406.10216) can keep training it with a text-generation loss on the shared hidden states.

Checkpoints use the parameter names ``decoder.<Decoder names>`` and ``head.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.decoder import Decoder


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row, ``lengths − 1`` [B]; a length < 1 is a bug."""
    if bool((lengths < 1).any()):
        raise ValueError("every sequence needs at least one token")
    return lengths.long() - 1


class RewardModel(nn.Module):
    """``Decoder`` + scalar head. ``forward(input_ids, lengths) -> rewards [B]``."""

    def __init__(self, cfg: ModelConfig, decoder: Decoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.decoder = decoder if decoder is not None else Decoder(cfg)
        self.head = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1.0 / (cfg.d_model + 1) ** 0.5)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, d] (``Decoder.forward_hidden``)."""
        return self.decoder.forward_hidden(input_ids)

    def score(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards [B] from hidden states [B, T, d] at each row's last real token."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(lengths).to(hidden.device)]  # [B, d]
        return self.head(last).squeeze(-1).float()

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] from the same hidden states (the kept LM head)."""
        return self.decoder.output(hidden)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder's blocks (what FSDP, activation checkpointing and compile wrap one by one)."""
        return self.decoder.layers

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, lm_rows: int = 0
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B]; with ``lm_rows`` > 0 also the LM logits [lm_rows, T, V] of the first rows (one forward
        through this module, so wrappers that act on the whole model's call, like FSDP, see both)."""
        hidden = self.hidden(input_ids)
        rewards = self.score(hidden, lengths)
        if lm_rows <= 0:
            return rewards
        return rewards, self.lm_logits(hidden[:lm_rows])
