"""The ``languages`` synthetic world (lmlab.data.synthetic.languages): families, cognates, word orders, streams.

(Lives here because its author owns tests/unit/science; it belongs with the data tests.)
"""

from __future__ import annotations

import itertools
from difflib import SequenceMatcher

import pytest

from lmlab.data.synthetic import get_world, world_names
from lmlab.data.synthetic.languages import CONCEPTS, LanguagesWorld, apply_sound_changes
from lmlab.errors import ConfigError


@pytest.fixture(scope="module")
def world() -> LanguagesWorld:
    return get_world("languages")


def test_registered_and_families(world):
    assert "languages" in world_names()
    fams = world.families()
    assert set(fams) == {"northern", "island", "steppe"}
    assert sorted(itertools.chain(*fams.values())) == sorted(world.language_names)


def test_documents_are_pure_functions_of_seed_and_index(world):
    five = list(world.documents(3, 5))
    assert list(world.documents(3, 2)) == five[:2]
    assert five != list(world.documents(4, 5))
    assert list(world.documents_for("vesk", 1, 3)) == list(itertools.islice(world.documents_for("vesk", 1), 3))


def test_word_orders(world):
    kw = dict(subject_adj=None, object_adj=None)
    for name, want in (("norra", "SVO"), ("vesk", "SOV"), ("kalua", "VSO")):
        lang = world.languages[name]
        d, s, v, o = lang.spec.determiner, lang.lexicon["dog"], lang.lexicon["see"], lang.lexicon["fish"]
        words = lang.sentence("dog", "see", "fish", **kw).rstrip(".").lower().split()
        expected = {"SVO": [d, s, v, d, o], "SOV": [d, s, d, o, v], "VSO": [v, d, s, d, o]}[want]
        assert words == [w.lower() for w in expected], name


def test_morphology_and_adjective_position(world):
    lang = world.languages["ollin"]  # adjective after the noun, plural -i, past -um
    text = lang.sentence("dog", "see", "fish", subject_adj="big", subject_plural=True, past=True)
    words = text.rstrip(".").lower().split()
    assert words[0] == lang.lexicon["see"] + "um"
    assert words[2:4] == [lang.lexicon["dog"] + "i", lang.lexicon["big"]]


def test_documents_for_uses_only_that_language(world):
    lang = world.languages["tayoz"]
    spec = lang.spec
    allowed = set(lang.lexicon.values()) | {spec.determiner}
    allowed |= {w + spec.plural for w in lang.lexicon.values()} | {w + spec.past for w in lang.lexicon.values()}
    for doc in world.documents_for("tayoz", 0, 20):
        words = {w.strip(".").lower() for w in doc.split()}
        assert words <= allowed
    with pytest.raises(ConfigError, match="unknown language"):
        next(world.documents_for("klingon", 0, 1))


def test_tagged_stream_matches_language_of(world):
    pairs = list(world.tagged_documents(0, 40))
    assert [lang for lang, _ in pairs] == [world.language_of(0, i) for i in range(40)]
    assert len({lang for lang, _ in pairs}) >= 5


def _similarity(a, b) -> float:
    return sum(SequenceMatcher(None, a.lexicon[c], b.lexicon[c]).ratio() for c in CONCEPTS) / len(CONCEPTS)


def test_cognates_within_families_not_across(world):
    langs = world.languages
    within, across = [], []
    for x, y in itertools.combinations(langs.values(), 2):
        (within if x.spec.family == y.spec.family else across).append(_similarity(x, y))
    assert min(within) > 0.6
    assert max(across) < 0.4
    # Lexicons are distinct: no two languages share every word.
    assert all(x.lexicon != y.lexicon for x, y in itertools.combinations(langs.values(), 2))


def test_sound_changes_apply_in_order():
    assert apply_sound_changes("pata", (("p", "f"), ("([aeiou])t([aeiou])", r"\1d\2"), ("[aeiou]$", ""))) == "fad"
