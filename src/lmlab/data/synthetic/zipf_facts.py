"""The ``zipf_facts`` world: facts about 2^22 fictitious entities whose popularity follows a Zipf law.

Why this world: a scaling-law study needs data whose loss falls as a smooth power law in model size and in
data, and whose irreducible loss is known exactly. The quantization model of scaling (Michaud et al. 2023,
arXiv 2303.13506) and learning-curve theory (Hutter 2021, arXiv 2102.04074) say how to get both: make the
learnable content many independent "quanta" used with Zipf frequencies p_k ∝ k^(−s). A model that holds the
n most frequent quanta has excess loss ∝ n^(−(s−1)); a learner that has seen D samples has excess loss
∝ D^(−(s−1)/s). Here a quantum is one fact: the value of relation r for entity e, fixed by a hash of (e, r)
and so learnable only by memorising it in the weights. ``lmlab.science.quanta`` computes both predictions
for this generator.

A document states one fact of one entity: the entity drawn with probability p_k ∝ (k + q)^(−s) over ranks
k = 1 … K (q = 10 keeps any single entity from holding a large share, so that no one quantum is a visible step
in the loss curve), a relation drawn uniformly from 32::

    Notably, Disilita's glyph is vemi.        The harbour of Kojimoma is sodu.

Each sentence uses one of four frames (Zipf-weighted) and, with probability ½, starts with a filler adverb
(Zipf-weighted). ``max_facts`` > 1 states up to that many distinct relations, one sentence each; only the first
names the entity ("it"/"its" after), but retrieving the name for later values is a circuit that forms abruptly,
so the default is one fact. Documents are ≈ 11 tokens, far shorter than a training window.

**Exact entropy floor.** Every random choice (entity, number of facts, relations, frames, fillers) is
visible in the text, and distinct choices give distinct texts (tests/unit/data/test_zipf_facts_world.py
enumerates a small world to check it), so −log p(document) is the sum of the choices' −log-probabilities
(``nll``, in nats, the end of the document included); ``documents_with_nll`` yields it with each text. The
prepared data of a run (``data.synthetic.world: zipf_facts``) stores Σ nll / Σ tokens (EOS included) of each
split in its manifest, the loss of the Bayes-optimal model that knows every fact, and evaluation reports
``val_loss_docs`` and ``val_floor`` on the documents each window holds whole (``lmlab.eval.perplexity``).

Everything is a pure function of ``(seed, index)`` (``random.Random(f"zipf_facts:{seed}:{index}")``), so
``documents(seed)`` streams without end (well over 10^9 tokens) and document i is the same however many are
generated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lmlab.data.synthetic import register_world

CONSONANTS = "bdfghjklmnprstvz"  # 16 consonants × 4 vowels = 64 syllables of two letters
VOWELS = "aeio"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)
NAME_SYLLABLES = 4  # 64^4 = 2^24 possible names
N_ENTITIES = 2**22
RELATIONS = (
    "glyph", "harbour", "charm", "colour", "river", "mentor", "rival", "motto",
    "song", "sport", "tool", "pet", "guild", "language", "festival", "dish",
    "ship", "star", "gem", "flower", "tree", "bird", "wind", "market",
    "craft", "symbol", "patron", "clan", "season", "mountain", "lantern", "banner",
)  # fmt: skip
FILLERS = (
    "Notably", "Indeed", "Reportedly", "Famously", "Apparently", "Clearly", "Certainly", "Curiously",
    "Admittedly", "Evidently", "Fittingly", "Naturally", "Oddly", "Plainly", "Rarely", "Surely",
    "Truly", "Usually", "Frankly", "Happily", "Honestly", "Luckily", "Notoriously", "Officially",
    "Allegedly", "Briefly", "Ironically", "Mostly", "Obviously", "Predictably", "Sadly", "Strangely",
)  # fmt: skip
# Frames: {S} subject, {O} object, {P} possessive; the entity's name in the first sentence, it/its after.
FRAMES = (
    "{P} {rel} is {val}.",
    "The {rel} of {O} is {val}.",
    "For {O}, the {rel} is {val}.",
    "{S} has {val} as {rel}.",
)
FILLER_PROBABILITY = 0.5


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Normalised Zipf probabilities p_k ∝ k^(−exponent) for ranks k = 1 … n (index k−1)."""
    raw = [k ** (-exponent) for k in range(1, n + 1)]
    total = math.fsum(raw)
    return [w / total for w in raw]


def _mix(x: int) -> int:
    """A 64-bit integer hash (splitmix64's finaliser): fixes each fact's value without storing it."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@dataclass(frozen=True)
class FactDocument:
    """The choices behind one document: entity rank (0-based), relations in order, frame and filler per sentence
    (filler −1: none), and −log p of all of them in nats."""

    entity: int
    relations: tuple[int, ...]
    frames: tuple[int, ...]
    fillers: tuple[int, ...]
    nll: float


@register_world("zipf_facts")
class ZipfFactsWorld:
    """Facts about Zipf-popular entities with an exact entropy floor; see the module docstring.

    ``zipf_exponent`` s sets the exponents: α_N = s − 1 in parameters, α_D = (s − 1)/s in data. The default
    10/7 gives α_D = 0.3 and α_N ≈ 0.43 (docs/science.md §26); ``zipf_offset`` q flattens the head only.
    """

    name = "zipf_facts"
    version = 3  # bump when the generated text changes (invalidates cached shards)

    def __init__(
        self,
        *,
        n_entities: int = N_ENTITIES,
        n_relations: int = len(RELATIONS),
        n_values: int = 64,
        max_facts: int = 1,
        zipf_exponent: float = 10 / 7,
        zipf_offset: float = 10.0,
        n_frames: int = len(FRAMES),
        n_fillers: int = len(FILLERS),
    ):
        if not 1 <= n_entities <= len(SYLLABLES) ** NAME_SYLLABLES:
            raise ValueError(f"n_entities must be in [1, {len(SYLLABLES) ** NAME_SYLLABLES}], got {n_entities}")
        if not 1 <= max_facts <= n_relations <= len(RELATIONS):
            raise ValueError(f"need 1 <= max_facts <= n_relations <= {len(RELATIONS)}")
        if not 1 <= n_values <= len(SYLLABLES) ** 2 or not 1 <= n_frames <= len(FRAMES):
            raise ValueError("n_values or n_frames out of range")
        if not 1 <= n_fillers <= len(FILLERS) or zipf_exponent <= 1.0:
            raise ValueError("n_fillers out of range or zipf_exponent <= 1")
        self.n_entities, self.n_relations, self.n_values = n_entities, n_relations, n_values
        if zipf_offset < 0:
            raise ValueError(f"zipf_offset must be >= 0, got {zipf_offset}")
        self.max_facts, self.zipf_exponent, self.zipf_offset = max_facts, zipf_exponent, zipf_offset
        self.frame_p = zipf_weights(n_frames, 1.0)
        self.filler_p = zipf_weights(n_fillers, 1.0)

    # ------------------------------------------------------------------ the distribution

    @cached_property
    def entity_p(self) -> np.ndarray:
        """p_k ∝ (k + q)^(−s) of entity rank k = 1 … K (at 0-based index k − 1), float64."""
        ranks = np.arange(1, self.n_entities + 1, dtype=np.float64)
        weights = (ranks + self.zipf_offset) ** (-self.zipf_exponent)
        return weights / weights.sum()

    @cached_property
    def _entity_cdf(self) -> np.ndarray:
        cdf = np.cumsum(self.entity_p)
        cdf[-1] = 1.0  # guard against rounding: every draw u < 1 lands on a rank
        return cdf

    @cached_property
    def values(self) -> tuple[tuple[str, ...], ...]:
        """Each relation's value words: ``n_values`` distinct two-syllable words, fixed per relation."""
        words = [a + b for a in SYLLABLES for b in SYLLABLES]
        return tuple(tuple(random.Random(f"zipf_facts:values:{r}").sample(words, self.n_values)) for r in range(32))

    def entity_name(self, rank: int) -> str:
        """The name of entity ``rank``: four syllables, a bijection of the rank scrambled so that popular
        entities do not share spellings."""
        space = len(SYLLABLES) ** NAME_SYLLABLES
        code = (rank * 0x5BD1E995 + 0x2F1) % space  # odd multiplier: a bijection of [0, 2^24)
        parts = []
        for _ in range(NAME_SYLLABLES):
            code, digit = divmod(code, len(SYLLABLES))
            parts.append(SYLLABLES[digit])
        return "".join(parts).capitalize()

    def fact_value(self, entity: int, relation: int) -> int:
        """The value index of ``relation`` for ``entity``: a hash, the same in every document."""
        return _mix(entity * 64 + relation) % self.n_values

    def draw(self, seed: int, index: int) -> FactDocument:
        """The choices of document ``index`` of stream ``seed``, with their −log-probability."""
        rng = random.Random(f"zipf_facts:{seed}:{index}")
        entity = min(int(np.searchsorted(self._entity_cdf, rng.random(), side="right")), self.n_entities - 1)
        relations = tuple(rng.sample(range(self.n_relations), rng.randint(1, self.max_facts)))
        frames, fillers = [], []
        for _ in relations:
            frames.append(_pick(rng, self.frame_p))
            fillers.append(_pick(rng, self.filler_p) if rng.random() < FILLER_PROBABILITY else -1)
        return FactDocument(
            entity, relations, tuple(frames), tuple(fillers), self.nll(entity, relations, frames, fillers)
        )

    def nll(self, entity: int, relations: Sequence[int], frames: Sequence[int], fillers: Sequence[int]) -> float:
        """−log p (nats) of one set of choices: the entity, how many facts, which relations in which order (drawn
        without replacement), and each sentence's frame and filler (−1: none)."""
        m = len(relations)
        out = -math.log(float(self.entity_p[entity])) + math.log(self.max_facts)
        out += math.fsum(math.log(self.n_relations - i) for i in range(m))
        for frame, filler in zip(frames, fillers):
            out -= math.log(self.frame_p[frame])
            if filler >= 0:
                out -= math.log(FILLER_PROBABILITY * self.filler_p[filler])
            else:
                out -= math.log(1.0 - FILLER_PROBABILITY)
        return out

    def render(self, doc: FactDocument) -> str:
        """The text of a document's choices."""
        name = self.entity_name(doc.entity)
        sentences = []
        for i, (rel, frame, filler) in enumerate(zip(doc.relations, doc.frames, doc.fillers)):
            subject, obj, poss = (name, name, name + "'s") if i == 0 else ("It", "it", "Its")
            value = self.values[rel][self.fact_value(doc.entity, rel)]
            text = FRAMES[frame].format(S=subject, O=obj, P=poss, rel=RELATIONS[rel], val=value)
            if filler >= 0:
                first = text.split(" ", 1)[0]
                lowered = first if i == 0 and first.startswith(name) else first[0].lower() + first[1:]
                text = f"{FILLERS[filler]}, {lowered} {text.split(' ', 1)[1]}"
            sentences.append(text)
        return " ".join(sentences)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        for text, _ in self.documents_with_nll(seed, n_docs):
            yield text

    def documents_with_nll(self, seed: int, n_docs: int | None = None) -> Iterator[tuple[str, float]]:
        """``(text, −log p)`` of documents 0, 1, … (endless when ``n_docs`` is None)."""
        i = 0
        while n_docs is None or i < n_docs:
            doc = self.draw(seed, i)
            yield self.render(doc), doc.nll
            i += 1

    def entropy_per_document(self) -> float:
        """The exact entropy of a document in nats: E[−log p(document)], from the distribution (no sampling)."""
        h_entity = -float(np.sum(self.entity_p * np.log(self.entity_p)))
        h_frame = -math.fsum(p * math.log(p) for p in self.frame_p)
        h_filler = -math.fsum(p * math.log(p) for p in self.filler_p)
        q = FILLER_PROBABILITY
        h_sentence = h_frame - q * math.log(q) - (1 - q) * math.log(1 - q) + q * h_filler
        total = h_entity + math.log(self.max_facts)
        for m in range(1, self.max_facts + 1):
            h_relations = math.fsum(math.log(self.n_relations - i) for i in range(m))
            total += (h_relations + m * h_sentence) / self.max_facts
        return total


def _pick(rng: random.Random, weights: list[float]) -> int:
    u, acc = rng.random(), 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return len(weights) - 1
