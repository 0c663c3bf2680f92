"""Idealised learners of the ``zipf_facts`` world follow the power laws the world was designed for
(docs/science.md §5; Michaud et al. 2023, Hutter 2021)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from lmlab.data.synthetic.zipf_facts import ZipfFactsWorld
from lmlab.science import quanta


def test_expected_exponents_of_the_default_world():
    world = ZipfFactsWorld()
    assert quanta.expected_exponents(world) == pytest.approx({"alpha_N": 3 / 7, "alpha_D": 0.3})


def test_data_limited_learner_matches_hutters_test_vectors():
    # One fact per document, one relation: the excess / log V is Σ_k p_k (1 − p_k)^D (docs/science.md §26), whose
    # test vectors are for an infinite Zipf law (normalised by ζ(s)). The world stops at K entities and
    # normalises by H_K = Σ_{k≤K} k^−s; for k > K, p_k·D < 1e-4, so the missing terms are their mass alone.
    s, k = 10 / 7, 2**24
    world = ZipfFactsWorld(n_entities=k, n_relations=1, max_facts=1, n_values=2, zipf_offset=0.0)
    h_k = float(np.sum(np.arange(1, k + 1, dtype=np.float64) ** -s))
    zeta = float(special.zeta(s))
    e = quanta.data_limited_excess(world, [1e4, 1e5, 1e6]) / math.log(2)
    infinite = (e * h_k + (zeta - h_k)) / zeta
    assert infinite == pytest.approx([0.0620953, 0.0311219, 0.0155979], rel=2e-4)


def test_default_world_gives_the_designed_slopes():
    world = ZipfFactsWorld()
    docs = [1e4, 1e5, 1e6]
    slopes_d = quanta.local_slopes(docs, quanta.data_limited_excess(world, docs))
    assert slopes_d == pytest.approx([-0.3, -0.3], abs=0.01)  # α_D = 0.3 (finite K steepens it by < 0.01)
    facts = [1e4, 3e4, 1e5]  # past the offset's flat head, before the finite tail steepens it
    slopes_n = quanta.local_slopes(facts, quanta.capacity_limited_excess(world, facts))
    assert slopes_n == pytest.approx([-3 / 7, -3 / 7], abs=0.015)  # α_N = s − 1
    # holding every fact leaves no excess
    assert quanta.capacity_limited_excess(world, [world.n_entities * world.n_relations])[0] == 0.0


def test_monte_carlo_on_the_generator_agrees_with_the_formula():
    # The learner sees the generator's own draws; one training set's unseen mass varies by a few % (the
    # Zipf tail), so three independent streams are averaged.
    world = ZipfFactsWorld()
    budgets = [1000, 4000, 16000]
    runs = [quanta.simulate_data_limited(world, budgets, seed=s, eval_seed=10 + s, eval_docs=6000) for s in range(3)]
    simulated = np.mean(runs, axis=0)
    assert simulated == pytest.approx(quanta.data_limited_excess(world, budgets), rel=0.05)
    assert quanta.local_slopes(budgets, simulated) == pytest.approx([-0.3, -0.3], abs=0.04)
