"""The ``preferences`` world: short questions with a known answer, preference pairs and a judge.

Why this world: preference-optimisation effects (length drift, falling chosen log-probs, reward-model
over-fitting) need answers whose quality is *known*, so a program can judge any generated answer
without a human or a large model. Questions are simple enough for a ~1M-parameter model to learn:

* ``add``: "What is 3 plus 4?" -> "7."
* ``larger``: "Which is larger, 12 or 7?" -> "12."
* ``colour``: "What colour is grass?" -> "green." (a fixed table of everyday objects)

An answer comes in three styles: *concise* (correct, just the answer), *padded* (correct, wrapped in
filler sentences) and *wrong* (a plausible wrong answer, concise). A preference pair always has the
concise correct answer as ``chosen``; ``rejected`` is wrong with probability ``p_wrong`` and padded
otherwise. ``documents`` gives the SFT corpus (question + answer, styles mixed by ``sft_mix``), so a
model fine-tuned on it produces all three styles and preference training has something to move.

Splits: ``train`` and ``test`` share the question templates and number range (``test`` draws other
pairs with another seed stream: in-distribution); ``ood`` rewords every question, uses larger numbers
and other filler sentences (a distribution shift for reward-model generalisation, Yang et al. 2024, arXiv 2406.10216).

``judge(prompt, answer)`` parses the question back from the prompt and scores an answer: correct when
the first number (or colour word) in the answer is the right one; its length in words and whether it
is padded. Every pair and document is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmlab.data.synthetic import register_world

COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "a flamingo": "pink",
    "a lemon": "yellow",
    "a cherry": "red",
    "milk": "white",
    "a crow": "black",
    "the sea": "blue",
    "a leaf": "green",
}
COLOUR_WORDS = sorted(set(COLOURS.values()))

TEMPLATES = {
    "add": "What is {a} plus {b}?",
    "larger": "Which is larger, {a} or {b}?",
    "colour": "What colour is {obj}?",
}
OOD_TEMPLATES = {
    "add": "Could you tell me the sum of {a} and {b}?",
    "larger": "Between {a} and {b}, which number is bigger?",
    "colour": "Tell me the usual colour of {obj}.",
}
PAD_BEFORE = (
    "Well, that is a good question.",
    "Let me think about this carefully.",
    "Thank you for asking.",
    "Sure, I can help with that.",
)
PAD_AFTER = (
    "I hope this helps!",
    "Let me know if you have other questions.",
    "Feel free to ask me anything else.",
    "It was a pleasure to answer.",
)
OOD_PAD_BEFORE = ("Great question, I am happy to explain.", "Okay, here is what I know.")
OOD_PAD_AFTER = ("Have a wonderful day!", "Just ask if anything is unclear.")

SPLITS = ("train", "test", "ood")
STYLES = ("concise", "padded", "wrong")
PROMPT_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


@dataclass(frozen=True)
class Judgement:
    """A judged answer: ``correct`` (first answer token right), its length in ``words``, ``padded``."""

    correct: bool
    words: int
    padded: bool


def _question(rng: random.Random, split: str) -> Question:
    kind = rng.choice(tuple(TEMPLATES))
    templates = OOD_TEMPLATES if split == "ood" else TEMPLATES
    lo, hi = (10, 30) if split == "ood" else (0, 9)
    if kind == "colour":
        obj = rng.choice(tuple(COLOURS))
        return Question(kind, templates[kind].format(obj=obj), COLOURS[obj])
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if kind == "larger":
        while b == a:
            b = rng.randint(lo, hi)
        return Question(kind, templates[kind].format(a=a, b=b), str(max(a, b)))
    return Question(kind, templates[kind].format(a=a, b=b), str(a + b))


def _wrong(rng: random.Random, q: Question) -> str:
    if q.kind == "colour":
        return rng.choice([c for c in COLOUR_WORDS if c != q.answer])
    value = int(q.answer)
    delta = rng.choice((-2, -1, 1, 2, 3))
    return str(value + delta if value + delta >= 0 else value + abs(delta))


def render_answer(rng: random.Random, q: Question, style: str, split: str = "train") -> str:
    """The answer text of ``q`` in ``style`` (concise / padded / wrong), with a leading space."""
    if style == "concise":
        return f" {q.answer}."
    if style == "wrong":
        return f" {_wrong(rng, q)}."
    before, after = (OOD_PAD_BEFORE, OOD_PAD_AFTER) if split == "ood" else (PAD_BEFORE, PAD_AFTER)
    return f" {rng.choice(before)} The answer is {q.answer}. {rng.choice(after)}"


def format_prompt(question: str) -> str:
    return PROMPT_FORMAT.format(question=question)


class PreferenceWorld:
    """Question-answer documents, preference pairs and a programmatic judge (see the module docstring)."""

    name = "preferences"

    def __init__(self, p_wrong: float = 0.5, sft_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)):
        if not 0.0 <= p_wrong <= 1.0:
            raise ValueError(f"p_wrong must be in [0, 1], got {p_wrong}")
        if len(sft_mix) != 3 or min(sft_mix) < 0 or sum(sft_mix) <= 0:
            raise ValueError(f"sft_mix must be three non-negative weights (concise, padded, wrong), got {sft_mix}")
        self.p_wrong = p_wrong
        self.sft_mix = tuple(sft_mix)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """SFT corpus: ``Question: ...\\nAnswer: ...`` with the answer style drawn from ``sft_mix``."""
        i = 0
        while n_docs is None or i < n_docs:
            rng = random.Random(f"{seed}:doc:{i}")
            q = _question(rng, "train")
            style = rng.choices(STYLES, weights=self.sft_mix)[0]
            yield format_prompt(q.text) + render_answer(rng, q, style)
            i += 1

    def pairs(self, seed: int, n: int, split: str = "train") -> list[dict[str, str]]:
        """``n`` preference records ``{prompt, chosen, rejected, rejected_style}`` of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out = []
        for i in range(n):
            rng = random.Random(f"{seed}:{split}:{i}")
            q = _question(rng, split)
            style = "wrong" if rng.random() < self.p_wrong else "padded"
            out.append(
                {
                    "prompt": format_prompt(q.text),
                    "chosen": render_answer(rng, q, "concise", split),
                    "rejected": render_answer(rng, q, style, split),
                    "rejected_style": style,
                }
            )
        return out

    def write_pairs(self, path: str | Path, seed: int, n: int, split: str = "train") -> Path:
        """Write ``pairs(seed, n, split)`` as preference JSONL."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in self.pairs(seed, n, split)))
        return p


# --------------------------------------------------------------------------- judge

_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[a-z]+")
_PARSERS = (
    ("add", re.compile(r"What is (\d+) plus (\d+)\?"), lambda a, b: str(int(a) + int(b))),
    ("add", re.compile(r"sum of (\d+) and (\d+)\?"), lambda a, b: str(int(a) + int(b))),
    ("larger", re.compile(r"Which is larger, (\d+) or (\d+)\?"), lambda a, b: str(max(int(a), int(b)))),
    ("larger", re.compile(r"Between (\d+) and (\d+), which"), lambda a, b: str(max(int(a), int(b)))),
)
_COLOUR_Q = re.compile(r"(?:What colour is|usual colour of) (.+?)[?.]")
_PAD_MARKERS = tuple(s.split()[0].lower() for s in PAD_BEFORE + OOD_PAD_BEFORE) + ("the answer is",)


def expected_answer(prompt: str) -> tuple[str, str] | None:
    """``(kind, answer)`` of the question in ``prompt``, or None when it is not one of this world's."""
    for kind, pattern, solve in _PARSERS:
        m = pattern.search(prompt)
        if m:
            return kind, solve(*m.groups())
    m = _COLOUR_Q.search(prompt)
    if m and m.group(1) in COLOURS:
        return "colour", COLOURS[m.group(1)]
    return None


def judge(prompt: str, answer: str) -> Judgement:
    """Score ``answer`` to ``prompt``: the first number (or colour word) must be the right one.

    Padded answers name the answer after "The answer is", so for them the first number or colour
    *after* that phrase counts; a prompt this world did not write is judged incorrect.
    """
    text = answer.strip()
    words = len(text.split())
    lower = text.lower()
    padded = words > 2 and ("the answer is" in lower or lower.split()[0].strip(",.") in _PAD_MARKERS)
    found = expected_answer(prompt)
    if found is None:
        return Judgement(False, words, padded)
    kind, truth = found
    idx = lower.find("the answer is")
    scope = lower[idx + len("the answer is") :] if idx >= 0 else lower
    if kind == "colour":
        first = next((w for w in _WORD.findall(scope) if w in COLOUR_WORDS), None)
    else:
        m = _NUMBER.search(scope)
        first = m.group(0) if m else None
    return Judgement(first == truth, words, padded)


register_world("preferences")(PreferenceWorld)
