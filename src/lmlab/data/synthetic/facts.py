"""The ``facts`` world: fictitious people, places and organizations, their biographies and Q&A.

Why this world: knowledge storage and extraction can be measured exactly only when every fact is
known. The setup follows Allen-Zhu & Li, *Physics of Language Models: Part 3.1* (arXiv 2309.14316):
each person has attributes (birth date, birthplace, employer, occupation, university, hobby),
rendered as a short biography whose sentences vary in wording and order (pretraining text).
Question-answer conversations ask for one attribute (SFT data). Some people are *held out*: their
biographies are in the pretraining text but their Q&A is not in the SFT set, so exact-answer
accuracy on them measures whether a model can extract knowledge it only read about.

Places and organizations are entities too (a place has a region and a founding year, an
organization a home city, an industry and a founding year); an organization's home city is a
place of the same world, so facts chain. Names are built from syllables and are fictitious.

Everything is a pure function of ``(seed, index)``: person ``i`` of seed ``s`` is the same however
many people are generated (``random.Random(f"facts:{s}:person:{i}")``), and biography ``i`` is
person ``i``'s, so ``documents(seed, n)`` streams.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from lmlab.data.synthetic import register_world

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "tr", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
OCCUPATIONS = (
    "baker",
    "carpenter",
    "chemist",
    "engineer",
    "gardener",
    "geologist",
    "historian",
    "journalist",
    "librarian",
    "mapmaker",
    "musician",
    "nurse",
    "painter",
    "pilot",
    "potter",
    "surveyor",
    "teacher",
    "translator",
    "weaver",
    "writer",
)
HOBBIES = (
    "archery",
    "beekeeping",
    "chess",
    "climbing",
    "cycling",
    "fishing",
    "gardening",
    "juggling",
    "kayaking",
    "knitting",
    "origami",
    "painting",
    "rowing",
    "sailing",
    "singing",
    "skating",
    "stargazing",
    "swimming",
    "woodcarving",
    "yoga",
)
INDUSTRIES = ("glassworks", "shipping", "textiles", "printing", "mining", "brewing", "clockmaking", "farming")
ORG_KINDS = ("Company", "Works", "Guild", "Institute", "Society", "Trust")
REGIONS = ("the North Vale", "the East Coast", "the Highlands", "the South Plains", "the West Isles", "the Lakelands")
N_PLACES = 64
N_ORGS = 48
N_UNIVERSITIES = 12

ATTRIBUTES = ("birth_date", "birthplace", "employer", "occupation", "university", "hobby")


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _name(rng: random.Random, syllables: tuple[int, int]) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(*syllables))).capitalize()


@dataclass(frozen=True)
class Place:
    name: str
    region: str
    founded: int


@dataclass(frozen=True)
class Organization:
    name: str
    city: str
    industry: str
    founded: int


@dataclass(frozen=True)
class Person:
    index: int
    first: str
    last: str
    pronoun: str  # "he" | "she" | "they"
    birth_date: str
    birthplace: str
    employer: str
    occupation: str
    university: str
    hobby: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


# Each attribute: biography sentence templates, a question and the exact answer string.
_SENTENCES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {birth_date}.", "{Pronoun} came into the world on {birth_date}."),
    "birthplace": ("{name} was born in {birthplace}.", "{Pronoun} spent {poss} early years in {birthplace}."),
    "employer": ("{name} works for {employer}.", "{Pronoun} {is} employed by {employer}."),
    "occupation": ("{name} is a {occupation}.", "By trade {pronoun} {is} a {occupation}."),
    "university": ("{name} studied at {university}.", "{Pronoun} graduated from {university}."),
    "hobby": ("In {poss} free time {name} enjoys {hobby}.", "{Pronoun} {likes} {hobby}."),
}
_QUESTIONS: dict[str, str] = {
    "birth_date": "When was {name} born?",
    "birthplace": "Where was {name} born?",
    "employer": "Which organization does {name} work for?",
    "occupation": "What is the occupation of {name}?",
    "university": "Which university did {name} attend?",
    "hobby": "What is the hobby of {name}?",
}
_ANSWERS: dict[str, str] = {
    "birth_date": "{name} was born on {birth_date}.",
    "birthplace": "{name} was born in {birthplace}.",
    "employer": "{name} works for {employer}.",
    "occupation": "{name} is a {occupation}.",
    "university": "{name} attended {university}.",
    "hobby": "{name} enjoys {hobby}.",
}


@register_world("facts")
class FactsWorld:
    """Generator of biographies and question-answer conversations about fictitious entities.

    ``heldout_fraction`` of the people (chosen by a hash of ``(seed, index)``) are held out of the
    Q&A training set; ``documents`` still includes their biographies.
    """

    name = "facts"

    def __init__(self, heldout_fraction: float = 0.2):
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        self.heldout_fraction = heldout_fraction

    # ------------------------------------------------------------------ entities

    @staticmethod
    @lru_cache(maxsize=8)
    def places(seed: int) -> tuple[Place, ...]:
        rng = random.Random(f"facts:{seed}:places")
        names = _unique(lambda: _name(rng, (2, 3)) + rng.choice(("", "", " Falls", " Bay", "ford", "holm")), N_PLACES)
        return tuple(Place(n, rng.choice(REGIONS), rng.randint(900, 1800)) for n in names)

    @staticmethod
    @lru_cache(maxsize=8)
    def organizations(seed: int) -> tuple[Organization, ...]:
        rng = random.Random(f"facts:{seed}:orgs")
        places = FactsWorld.places(seed)
        names = _unique(lambda: f"{_name(rng, (2, 2))} {rng.choice(ORG_KINDS)}", N_ORGS)
        return tuple(
            Organization(n, rng.choice(places).name, rng.choice(INDUSTRIES), rng.randint(1800, 2015)) for n in names
        )

    @staticmethod
    @lru_cache(maxsize=8)
    def universities(seed: int) -> tuple[str, ...]:
        places = FactsWorld.places(seed)
        rng = random.Random(f"facts:{seed}:universities")
        return tuple(f"the University of {p.name}" for p in rng.sample(places, N_UNIVERSITIES))

    def person(self, seed: int, index: int) -> Person:
        """Person ``index`` of world ``seed`` (a pure function of both)."""
        rng = random.Random(f"facts:{seed}:person:{index}")
        return Person(
            index=index,
            first=_name(rng, (1, 2)),
            last=_name(rng, (2, 3)),
            pronoun=rng.choice(("he", "she", "they")),
            birth_date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2005)}",
            birthplace=rng.choice(self.places(seed)).name,
            employer=rng.choice(self.organizations(seed)).name,
            occupation=rng.choice(OCCUPATIONS),
            university=rng.choice(self.universities(seed)),
            hobby=rng.choice(HOBBIES),
        )

    def is_heldout(self, seed: int, index: int) -> bool:
        """Whether person ``index``'s Q&A is held out of SFT training (a hash of seed and index)."""
        return random.Random(f"facts:{seed}:heldout:{index}").random() < self.heldout_fraction

    # ------------------------------------------------------------------ text

    def biography(self, seed: int, index: int) -> str:
        """Person ``index``'s biography: one sentence per attribute, wording and order varied."""
        p = self.person(seed, index)
        rng = random.Random(f"facts:{seed}:bio:{index}")
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        first, *rest = order
        sentences = [_fill(_SENTENCES[first][0], p)]  # the first sentence always names the person
        sentences += [_fill(rng.choice(_SENTENCES[a]), p) for a in rest]
        return " ".join(sentences)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """Biographies of persons 0, 1, 2, ... (endless when ``n_docs`` is None)."""
        i = 0
        while n_docs is None or i < n_docs:
            yield self.biography(seed, i)
            i += 1

    def qa(self, seed: int, index: int, attribute: str) -> tuple[str, str]:
        """``(question, answer)`` about one attribute of person ``index``."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; choose from {', '.join(ATTRIBUTES)}")
        p = self.person(seed, index)
        return _fill(_QUESTIONS[attribute], p), _fill(_ANSWERS[attribute], p)

    def qa_conversations(
        self, seed: int, n_people: int, split: str = "train", attributes: tuple[str, ...] = ATTRIBUTES
    ) -> list[dict]:
        """Single-turn Q&A conversations (``{"messages": [...], "answer": str, "person": int, "attribute": str}``)
        about persons 0..n_people−1: ``split="train"`` the non-held-out people, ``"heldout"`` the others."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        out = []
        for i in range(n_people):
            if self.is_heldout(seed, i) != (split == "heldout"):
                continue
            for attribute in attributes:
                question, answer = self.qa(seed, i, attribute)
                value = getattr(self.person(seed, i), attribute)
                out.append(
                    {
                        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        "answer": value,
                        "person": i,
                        "attribute": attribute,
                    }
                )
        return out


def _unique(make: Callable[[], str], n: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < n:
        name = make()
        if name not in seen:
            seen.append(name)
    return seen


def _fill(template: str, p: Person) -> str:
    plural = p.pronoun == "they"
    values = {
        "name": p.name,
        "pronoun": p.pronoun,
        "Pronoun": p.pronoun.capitalize(),
        "poss": {"he": "his", "she": "her", "they": "their"}[p.pronoun],
        "is": "are" if plural else "is",
        "likes": "like" if plural else "likes",
        **{a: getattr(p, a) for a in ATTRIBUTES},
    }
    return template.format(**values)


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed: the comparison form of answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_is_correct(response: str, answer: str) -> bool:
    """Exact-answer scoring: the normalized attribute value occurs in the normalized response as whole words."""
    return f" {normalize_answer(answer)} " in f" {normalize_answer(response)} "


def exact_answer_accuracy(respond: Callable[[list[dict]], str], conversations: list[dict]) -> dict[str, float | int]:
    """Fraction of conversations whose answer ``respond(prompt_messages)`` gets exactly right.

    ``respond`` maps the conversation without its assistant turn to the model's reply text
    (e.g. greedy decoding of ``render_prompt``); ``conversations`` come from ``qa_conversations``.
    """
    correct = 0
    for conv in conversations:
        prompt = [m for m in conv["messages"] if m["role"] != "assistant"]
        correct += answer_is_correct(respond(prompt), conv["answer"])
    n = len(conversations)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n}
