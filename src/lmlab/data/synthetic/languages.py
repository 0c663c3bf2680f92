"""The ``languages`` world: several synthetic languages, grouped into families, for multilingual experiments.

Why this world: the multilingual scaling law of He et al. 2024 (docs/science.md §4) is about language *families* —
related languages transfer to each other, unrelated ones do not. Here that structure is built in and known:

* each **family** has its own phonotactics (consonant and vowel inventories, syllable shapes) and a proto-lexicon
  of pseudo-word roots for a fixed list of concepts (nouns, verbs, adjectives);
* each **language** descends from its family's proto-language by an ordered list of regular **sound changes**
  (e.g. ``p → f``, intervocalic voicing, final-vowel loss), so the languages of one family share cognate roots
  while languages of different families share nothing but chance;
* each language has its own **word order** (SVO, SOV or VSO), adjective placement, plural and past suffixes and a
  determiner, so grammar differs even inside a family.

Documents are a few sentences of one language. Which language document ``i`` is written in, and its text, are a
pure function of ``(seed, i)``; :meth:`LanguagesWorld.documents_for` streams the documents of one language (to
build mixtures with chosen sampling ratios), and :meth:`LanguagesWorld.tagged_documents` yields
``(language, text)`` pairs. The languages themselves are fixed (they do not depend on the stream seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from lmlab.data.synthetic import register_world
from lmlab.errors import ConfigError

NOUNS = (
    "water fire stone tree river mountain house child mother father dog bird fish sun moon star road field "
    "bread salt king woman man friend boat village wind rain snow night day door"
).split()
VERBS = "see take give eat find carry love build follow call hear keep".split()
ADJECTIVES = "big small old new red black good cold warm long".split()
CONCEPTS = NOUNS + VERBS + ADJECTIVES


@dataclass(frozen=True)
class FamilySpec:
    """A family's proto-phonology: inventories and syllable templates (C = consonant, V = vowel)."""

    name: str
    consonants: str
    vowels: str
    syllables: tuple[str, ...]  # drawn uniformly; repeat a template to make it more frequent
    root_syllables: tuple[int, int]  # min, max syllables per root


@dataclass(frozen=True)
class LanguageSpec:
    """A daughter language: its family, sound changes (regex, replacement, applied in order) and grammar."""

    name: str
    family: str
    sound_changes: tuple[tuple[str, str], ...]
    order: str  # "SVO", "SOV" or "VSO"
    adjective_first: bool
    plural: str
    past: str
    determiner: str


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("northern", "ptkbdgmnlrsv", "aeiou", ("CV", "CVC"), (2, 3)),
    FamilySpec("island", "pkmnlhw", "aiu", ("CV", "CV", "CV", "V"), (2, 3)),
    FamilySpec("steppe", "tkqzsxrmnj", "aeoy", ("CVC", "VC", "CV"), (1, 2)),
)

LANGUAGES: tuple[LanguageSpec, ...] = (
    LanguageSpec("norra", "northern", (), "SVO", True, "en", "ed", "ta"),
    LanguageSpec(
        "vesk",
        "northern",
        (("p", "f"), ("k", "h"), ("([aeiou])t([aeiou])", r"\1d\2"), ("[aeiou]$", "")),
        "SOV",
        True,
        "ar",
        "ik",
        "de",
    ),
    LanguageSpec(
        "ollin", "northern", (("a", "o"), ("g", "j"), ("^s", "sh"), ("b", "v")), "VSO", False, "i", "um", "lo"
    ),
    LanguageSpec("kalua", "island", (), "VSO", False, "mai", "na", "ke"),
    LanguageSpec("hanu", "island", (("k", "'"), ("w", "v"), ("l", "n")), "SVO", False, "ha", "lu", "he"),
    LanguageSpec("qazan", "steppe", (), "SOV", True, "lar", "di", "bu"),
    LanguageSpec("tayoz", "steppe", (("q", "k"), ("x", "h"), ("y", "i"), ("z$", "s")), "SOV", True, "ler", "ti", "pu"),
)


def _syllable(rng: random.Random, family: FamilySpec) -> str:
    template = rng.choice(family.syllables)
    return "".join(rng.choice(family.consonants if ch == "C" else family.vowels) for ch in template)


def proto_lexicon(family: FamilySpec) -> dict[str, str]:
    """The family's proto-roots: one distinct pseudo-word per concept, fixed by the family's name."""
    rng = random.Random(f"languages:proto:{family.name}")
    roots: dict[str, str] = {}
    used: set[str] = set()
    for concept in CONCEPTS:
        while True:
            n = rng.randint(*family.root_syllables)
            word = "".join(_syllable(rng, family) for _ in range(n))
            if len(word) >= 2 and word not in used:
                break
        used.add(word)
        roots[concept] = word
    return roots


def apply_sound_changes(word: str, changes: tuple[tuple[str, str], ...]) -> str:
    """Apply regular sound changes in order (each a regex substitution over the whole word)."""
    for pattern, repl in changes:
        word = re.sub(pattern, repl, word)
    return word or "a"


@dataclass
class Language:
    """A ready-to-use language: its lexicon (concept -> word) and its grammar."""

    spec: LanguageSpec
    lexicon: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def noun_phrase(self, noun: str, adjective: str | None, plural: bool) -> list[str]:
        word = self.lexicon[noun] + (self.spec.plural if plural else "")
        parts = [word]
        if adjective is not None:
            adj = self.lexicon[adjective]
            parts = [adj, word] if self.spec.adjective_first else [word, adj]
        return [self.spec.determiner, *parts]

    def sentence(
        self,
        subject: str,
        verb: str,
        obj: str,
        *,
        subject_adj: str | None = None,
        object_adj: str | None = None,
        subject_plural: bool = False,
        object_plural: bool = False,
        past: bool = False,
    ) -> str:
        """One clause in this language's word order, capitalised and ending with a full stop."""
        s = self.noun_phrase(subject, subject_adj, subject_plural)
        o = self.noun_phrase(obj, object_adj, object_plural)
        v = [self.lexicon[verb] + (self.spec.past if past else "")]
        parts = {"SVO": s + v + o, "SOV": s + o + v, "VSO": v + s + o}[self.spec.order]
        text = " ".join(parts)
        return text[0].upper() + text[1:] + "."


def build_languages() -> dict[str, Language]:
    """Every language of the world, by name (deterministic)."""
    families = {f.name: f for f in FAMILIES}
    protos = {name: proto_lexicon(f) for name, f in families.items()}
    out = {}
    for spec in LANGUAGES:
        lexicon = {c: apply_sound_changes(w, spec.sound_changes) for c, w in protos[spec.family].items()}
        out[spec.name] = Language(spec, lexicon)
    return out


def doc_rng(seed: int, index: int, language: str | None = None) -> random.Random:
    tag = f":{language}" if language else ""
    return random.Random(f"languages:{seed}{tag}:{index}")


@register_world("languages")
class LanguagesWorld:
    """Documents in seven synthetic languages of three families; see the module docstring."""

    name = "languages"
    version = 1  # bump when the generated text changes (invalidates cached shards)

    def __init__(self) -> None:
        self.languages = build_languages()
        self.language_names = [spec.name for spec in LANGUAGES]

    def families(self) -> dict[str, list[str]]:
        """Family name -> its languages."""
        out: dict[str, list[str]] = {}
        for spec in LANGUAGES:
            out.setdefault(spec.family, []).append(spec.name)
        return out

    def language_of(self, seed: int, index: int) -> str:
        """The language of document ``index`` of the mixed stream ``seed`` (uniform over languages)."""
        return random.Random(f"languages:which:{seed}:{index}").choice(self.language_names)

    def document(self, language: str, rng: random.Random) -> str:
        lang = self.languages[language]
        sentences = []
        for _ in range(rng.randint(3, 8)):
            subject, obj = rng.sample(NOUNS, 2)
            sentences.append(
                lang.sentence(
                    subject,
                    rng.choice(VERBS),
                    obj,
                    subject_adj=rng.choice(ADJECTIVES) if rng.random() < 0.4 else None,
                    object_adj=rng.choice(ADJECTIVES) if rng.random() < 0.4 else None,
                    subject_plural=rng.random() < 0.3,
                    object_plural=rng.random() < 0.3,
                    past=rng.random() < 0.5,
                )
            )
        return " ".join(sentences)

    def tagged_documents(self, seed: int, n_docs: int | None = None) -> Iterator[tuple[str, str]]:
        """``(language, text)`` for documents ``0, 1, …`` of the mixed stream."""
        i = 0
        while n_docs is None or i < n_docs:
            language = self.language_of(seed, i)
            yield language, self.document(language, doc_rng(seed, i))
            i += 1

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """The mixed stream (each document in one language chosen uniformly)."""
        for _, text in self.tagged_documents(seed, n_docs):
            yield text

    def documents_for(self, language: str, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """A stream of documents in ``language`` only (document ``i`` is a pure function of seed, language, i)."""
        if language not in self.languages:
            raise ConfigError(f"unknown language {language!r}; choose one of {', '.join(self.language_names)}")
        i = 0
        while n_docs is None or i < n_docs:
            yield self.document(language, doc_rng(seed, i, language))
            i += 1
