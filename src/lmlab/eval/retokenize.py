"""Retokenization defense (Jain et al. 2023, arXiv 2309.00614, after BPE-dropout, Provilkov et al. 2020, arXiv
1910.13267; docs/science.md §29.3): re-segment a prompt into smaller in-vocabulary pieces, so an adversarial
suffix optimised for one segmentation reaches the model as other tokens.

``Resegmenter`` undoes merges: each token is, with probability p, split into two pieces that are both in the
vocabulary (the last BPE merge that built it is one such split), and each piece is split again with probability
p, down to single symbols. p = 0 keeps the ids; p = 1 spells every token in base symbols. Special tokens are never
split. The text is unchanged (the pieces concatenate to the token), only its segmentation changes. Seeded, so a
defense run is reproducible (the ``tokenizers`` library's own BPE dropout draws from an unseeded generator).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class Resegmenter:
    """Splits token ids of one vocabulary into smaller in-vocabulary pieces with probability ``p`` per merge."""

    def __init__(self, vocab: dict[str, int], special: Sequence[int] = ()):
        self.vocab = vocab
        self.pieces = {i: t for t, i in vocab.items()}
        self.special = frozenset(special)
        self._splits: dict[int, list[tuple[int, int]]] = {}

    @classmethod
    def of(cls, tokenizer) -> Resegmenter:
        """The re-segmenter of an lmlab ``TextTokenizer`` (its BPE vocabulary; added tokens are special)."""
        backend = tokenizer.backend
        vocab = backend.get_vocab(with_added_tokens=True)
        return cls(vocab, special=list(backend.get_added_tokens_decoder()))

    def splits(self, tid: int) -> list[tuple[int, int]]:
        """Every (left, right) pair of in-vocabulary pieces that concatenate to token ``tid``."""
        if tid not in self._splits:
            piece = self.pieces.get(tid, "")
            out = []
            if tid not in self.special:
                for cut in range(1, len(piece)):
                    left, right = self.vocab.get(piece[:cut]), self.vocab.get(piece[cut:])
                    if (
                        left is not None
                        and right is not None
                        and left not in self.special
                        and right not in self.special
                    ):
                        out.append((left, right))
            self._splits[tid] = out
        return self._splits[tid]

    def token(self, tid: int, p: float, rng: random.Random) -> list[int]:
        """Token ``tid`` re-segmented: split with probability p into a random in-vocabulary pair, recursively."""
        options = self.splits(tid)
        if not options or rng.random() >= p:
            return [tid]
        left, right = rng.choice(options)
        return self.token(left, p, rng) + self.token(right, p, rng)

    def ids(self, ids: Sequence[int], p: float, rng: random.Random) -> list[int]:
        """Every token of ``ids`` re-segmented."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        return [piece for tid in ids for piece in self.token(tid, p, rng)]
