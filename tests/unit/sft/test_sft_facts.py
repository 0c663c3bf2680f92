"""The facts world: determinism, held-out people, Q&A and exact-answer scoring."""

from __future__ import annotations

from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.facts import ATTRIBUTES, FactsWorld, answer_is_correct, exact_answer_accuracy


def test_registered_and_deterministic_per_index():
    world = get_world("facts")
    assert world.name == "facts"
    first = list(world.documents(3, 5))
    assert list(FactsWorld().documents(3, 5)) == first
    assert next(iter(FactsWorld().documents(3, None))) == first[0]  # document i does not depend on n_docs
    assert list(FactsWorld().documents(4, 5)) != first


def test_biography_states_every_attribute():
    world = FactsWorld()
    for i in range(20):
        person, bio = world.person(0, i), world.biography(0, i)
        assert person.name in bio
        for attribute in ATTRIBUTES:
            assert getattr(person, attribute) in bio
        assert bio.count(".") >= len(ATTRIBUTES)


def test_employers_and_birthplaces_are_world_entities():
    world = FactsWorld()
    places = {p.name for p in world.places(0)}
    orgs = world.organizations(0)
    assert len(places) == len(world.places(0))  # unique names
    assert all(o.city in places for o in orgs)
    for i in range(30):
        p = world.person(0, i)
        assert p.birthplace in places and p.employer in {o.name for o in orgs}


def test_heldout_split_is_disjoint_and_about_the_configured_fraction():
    world = FactsWorld(heldout_fraction=0.25)
    train = world.qa_conversations(1, 400, "train")
    held = world.qa_conversations(1, 400, "heldout")
    train_people = {c["person"] for c in train}
    held_people = {c["person"] for c in held}
    assert not train_people & held_people and len(train_people | held_people) == 400
    assert 70 <= len(held_people) <= 130
    conv = held[0]
    assert conv["messages"][0]["role"] == "user" and conv["answer"] in conv["messages"][1]["content"]
    assert len(held) == len(held_people) * len(ATTRIBUTES)


def test_exact_answer_scoring():
    assert answer_is_correct("Mira Dol was born in Tessaford.", "Tessaford")
    assert answer_is_correct("born in tessaford", "Tessaford")
    assert not answer_is_correct("Mira Dol was born in Tessafordholm.", "Tessaford")  # whole words only
    convs = FactsWorld().qa_conversations(0, 10, "train", attributes=("birthplace",))
    truth = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in convs}
    perfect = exact_answer_accuracy(lambda msgs: truth[msgs[0]["content"]], convs)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == len(convs)
    assert exact_answer_accuracy(lambda msgs: "I do not know.", convs)["accuracy"] == 0.0
