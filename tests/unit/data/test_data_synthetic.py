"""The synthetic-world registry and the ``stories`` world."""

from __future__ import annotations

import itertools
import re
import time
import types

import pytest

from lmlab.data import synthetic
from lmlab.data.synthetic import get_world, register_world, world_names
from lmlab.data.synthetic.stories import (
    COLORS,
    LEXICON,
    NAME_GENDER,
    OBJECTS,
    PRONOUNS,
    StoriesWorld,
    story_rng,
    story_sentences,
)
from lmlab.errors import ConfigError

# ----------------------------------------------------------------------------- registry


def test_builtin_world_registered_on_import():
    assert "stories" in world_names()
    world = get_world("stories")
    assert isinstance(world, StoriesWorld) and world.name == "stories"
    assert isinstance(world, synthetic.World)


def test_unknown_world_lists_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown synthetic world 'nope'.*stories"):
        get_world("nope")


def test_register_custom_world(monkeypatch):
    monkeypatch.setattr(synthetic, "_REGISTRY", dict(synthetic._REGISTRY))

    @register_world("counting")
    class Counting:
        name = "counting"

        def documents(self, seed, n_docs=None):
            for i in itertools.count() if n_docs is None else range(n_docs):
                yield f"{seed} {i}"

    assert "counting" in world_names()
    assert list(get_world("counting").documents(7, 2)) == ["7 0", "7 1"]
    register_world("counting")(Counting)  # the same factory again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_world("counting")(lambda: Counting())


# ----------------------------------------------------------------------------- stories


def test_deterministic_and_prefix_stable():
    w = get_world("stories")
    a = list(w.documents(seed=3, n_docs=20))
    b = list(w.documents(seed=3, n_docs=50))
    assert a == b[:20]  # document i does not depend on how many are generated
    assert a != list(w.documents(seed=4, n_docs=20))
    assert len(set(b)) == len(b)


def test_endless_stream_is_lazy():
    gen = get_world("stories").documents(seed=0, n_docs=None)
    assert isinstance(gen, types.GeneratorType)
    docs = list(itertools.islice(gen, 1500))
    assert len(docs) == 1500 and all(docs)


def test_lexicon_size_and_coverage(story_docs):
    assert len(LEXICON) >= 1000
    words = {w.lower().removesuffix("'s") for d in story_docs for w in re.findall(r"[A-Za-z'-]+", d)}
    unknown = words - LEXICON
    assert not unknown, f"generated words missing from LEXICON: {sorted(unknown)[:20]}"


def test_sentence_count_and_dialogue():
    lengths = [len(story_sentences(story_rng(0, i))) for i in range(300)]
    assert min(lengths) >= 5 and max(lengths) <= 15
    docs = list(get_world("stories").documents(0, 300))
    assert sum('"' in d for d in docs) > 250  # dialogue in quotes in (nearly) every story


_SPEECH = re.compile(r'"\s+(?:said|asked|shouted|whispered|replied|cried|called|answered)\s+([A-Z][a-z]+)\.$')
_SUBJECT_PRONOUNS = {"He": "m", "She": "f", "They": "n"}


def test_subject_pronouns_agree_with_the_last_named_subject():
    """A sentence starting with He/She/They refers to the previous sentence's subject (the first
    character named in it, or the speaker of a quote): its gender must match the name's."""
    checked = 0
    for i in range(400):
        subject = None
        for sent in story_sentences(story_rng(1, i)):
            first = sent.split()[0].strip(",")
            speech = _SPEECH.search(sent)
            names = [w for w in re.findall(r"[A-Z][a-z]+", sent) if w in NAME_GENDER]
            if first in _SUBJECT_PRONOUNS:
                assert subject is not None, f"story {i}: pronoun without antecedent: {sent!r}"
                assert _SUBJECT_PRONOUNS[first] == NAME_GENDER[subject], f"story {i}: {subject!r} then {sent!r}"
                be = re.match(r"\w+ (was|were)\b", sent)
                if be:  # "they were", "he/she was"
                    assert be.group(1) == PRONOUNS[NAME_GENDER[subject]].be, sent
                checked += 1
            elif sent.startswith('"') and speech:
                subject = speech.group(1)
            elif names and not sent.startswith('"'):
                subject = names[0]
            else:
                subject = None
    assert checked > 300


def test_possessives_agree_in_fixed_frames():
    """'NAME had a PET named X. ... with his/her/their PET' and 'sat beside him/her/them'."""
    frame = re.compile(r"Every day, (\w+) liked to \w+ with (\w+) ")
    seen = 0
    for i in range(300):
        sents = story_sentences(story_rng(2, i))
        hero = next(w for w in re.findall(r"[A-Z][a-z]+", sents[0]) if w in NAME_GENDER)
        for sent in sents:
            m = frame.search(sent)
            if m:
                assert m.group(2) == PRONOUNS[NAME_GENDER[hero]].poss, (hero, sent)
                seen += 1
    assert seen > 50


def test_facts_stay_consistent_within_a_story():
    """The found object keeps its colour, and 'the X that NAME found' names the hero who found it."""
    objects = "|".join(sorted(map(re.escape, OBJECTS), key=len, reverse=True))
    found = re.compile(rf"(\w+) found an? (\w+) ({objects}) near the")
    for i in range(300):
        text = " ".join(story_sentences(story_rng(5, i)))
        m = found.search(text)
        assert m, text
        finder, color, obj = m.groups()
        for ref in re.finditer(rf"the (\w+) ({objects}) that (\w+) found", text):
            assert ref.groups() == (color, obj, finder), text
        for mention in re.finditer(rf"\b(\w+) {re.escape(obj)}\b", text):
            if mention.group(1) in COLORS:
                assert mention.group(1) == color, text


def test_generation_speed():
    w = StoriesWorld()
    best = 0.0
    for attempt in range(3):  # the CPU is shared; take the best of three
        t0 = time.perf_counter()
        n = sum(1 for _ in w.documents(seed=attempt, n_docs=1000))
        best = max(best, n / (time.perf_counter() - t0))
    assert best >= 2000, f"{best:.0f} stories/s"
