"""The ``recall`` world: associative recall, a needle-in-a-haystack task a tiny model learns on a CPU.

Why this world: sparse and approximate attention (sliding windows, S2-Attention's strided shards, top-k
attention at inference) must still find one key anywhere in the context. A document lists ``pairs`` random
key=value pairs (``"kob=47 ruz=05 …"``), then ``" ;"`` and ``queries`` of the keys again, each followed by
its value (``" ruz=05"``). The queried values can only be read from the list, so the loss on them and the
exact-answer accuracy of ``recall_items`` measure retrieval at every depth of the context (the multi-query
associative recall of Arora et al. 2023, "Zoology", arXiv 2312.04927).

Keys are three letters, values two digits; all are drawn afresh per document from
``random.Random(f"recall:{seed}:{index}")``, so document ``i`` is the same however many are generated.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

from lmlab.data.synthetic import register_world
from lmlab.errors import ConfigError

HELDOUT_RECALL_SEED = 900_003  # no config or example trains on this stream
# Named sizes for ``data.synthetic.subset`` (the default is 40 pairs, 8 queries).
SUBSETS: dict[str, dict[str, int]] = {
    "pairs8": {"pairs": 8, "queries": 4},
    "pairs16": {"pairs": 16, "queries": 8},
    "pairs24": {"pairs": 24, "queries": 8},
    "pairs64": {"pairs": 64, "queries": 16},
}


@dataclass(frozen=True)
class RecallItem:
    """One retrieval question: ``prompt`` (the list, ``" ;"``, the queried key and ``"="``) and its ``answer``."""

    prompt: str
    answer: str
    depth: float  # where the needle sits in the list: 0 = first pair, 1 = last


@register_world("recall")
class RecallWorld:
    """``pairs`` key=value pairs, then ``queries`` of their keys with the values (see the module docstring)."""

    name = "recall"
    version = 1

    def __init__(self, pairs: int = 40, queries: int = 8) -> None:
        if pairs < 1 or not 1 <= queries <= pairs:
            raise ConfigError(f"the recall world needs pairs >= 1 and 1 <= queries <= pairs, got {pairs}, {queries}")
        self.pairs = pairs
        self.queries = queries

    def example(self, seed: int, index: int) -> tuple[list[tuple[str, str]], list[int]]:
        """The document's pairs (distinct keys) and the indices of the queried pairs."""
        rng = random.Random(f"recall:{seed}:{index}")
        keys: list[str] = []
        while len(keys) < self.pairs:
            key = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
            if key not in keys:
                keys.append(key)
        pairs = [(k, f"{rng.randrange(100):02d}") for k in keys]
        return pairs, rng.sample(range(self.pairs), self.queries)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        index = 0
        while n_docs is None or index < n_docs:
            pairs, queried = self.example(seed, index)
            listing = " ".join(f"{k}={v}" for k, v in pairs)
            yield listing + " ;" + "".join(f" {pairs[q][0]}={pairs[q][1]}" for q in queried)
            index += 1

    def documents_for(self, subset: str, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """The documents of a named size (``SUBSETS``), e.g. ``pairs16``."""
        if subset not in SUBSETS:
            raise ConfigError(f"unknown recall subset {subset!r}; choose one of {', '.join(SUBSETS)}")
        return RecallWorld(**SUBSETS[subset]).documents(seed, n_docs)


def recall_items(n: int, pairs: int = 40, seed: int = HELDOUT_RECALL_SEED) -> list[RecallItem]:
    """``n`` held-out questions, one per document, the needle's depth spread evenly over the list."""
    world = RecallWorld(pairs=pairs, queries=1)
    items = []
    for i in range(n):
        listing, _ = world.example(seed, i)
        needle = (i * 7919) % pairs  # every depth, in a fixed scrambled order
        key, value = listing[needle]
        prompt = " ".join(f"{k}={v}" for k, v in listing) + f" ; {key}="
        items.append(RecallItem(prompt, value, needle / max(pairs - 1, 1)))
    return items
