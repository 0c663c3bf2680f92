"""What idealised learners of the ``zipf_facts`` world should achieve: the power laws it was built for.

The world (``lmlab.data.synthetic.zipf_facts``) states facts (entity e, relation r) with e drawn from a Zipf
law p_e ∝ rank^(−s) and r uniform over R relations. A fact is one quantum (Michaud et al. 2023, arXiv
2303.13506): known, its value costs 0 nats; unknown, log V (a learner still knows the V values are equally
likely). Two idealised learners, both exact for this generator:

* the **data-limited** learner knows a fact once it has seen it (Hutter 2021, arXiv 2102.04074). After D
  documents, a fact of entity e is still unseen with probability (1 − c·p_e)^D, c = E[m]/R the chance that
  a document about e states a given relation. Its excess loss per document is
  E[m]·log V·Σ_e p_e (1 − c·p_e)^D ∝ D^(−(s−1)/s);
* the **capacity-limited** learner holds the n most frequent facts: excess E[m]·log V·(tail mass beyond
  them) ∝ n^(−(s−1)). If parameters are proportional to facts held, α_N = s − 1.

``simulate_data_limited`` runs the first learner on the generator's own documents (Monte Carlo, with the
same draws as the text), so the theory is checked against the code that writes the corpus. docs/science.md
§26 lists the slopes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmlab.data.synthetic.zipf_facts import ZipfFactsWorld


def _facts_per_document(world: ZipfFactsWorld) -> float:
    return (world.max_facts + 1) / 2  # m is uniform on 1 … max_facts


def data_limited_excess(world: ZipfFactsWorld, n_docs: Sequence[float]) -> np.ndarray:
    """Expected excess loss per document (nats) of the learner that knows every fact it has seen once, after
    each number of training documents in ``n_docs``."""
    p = np.asarray(world.entity_p, dtype=np.float64)
    m = _facts_per_document(world)
    c = m / world.n_relations
    scale = m * math.log(world.n_values)
    return np.array([scale * float(np.sum(p * np.exp(d * np.log1p(-c * p)))) for d in n_docs])


def capacity_limited_excess(world: ZipfFactsWorld, n_facts: Sequence[float]) -> np.ndarray:
    """Excess loss per document (nats) of a learner holding the ``n`` most frequent facts, for each n."""
    p = np.asarray(world.entity_p, dtype=np.float64)
    tail = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])  # tail[e] = mass of entities e, e+1, …
    r = world.n_relations
    out = []
    for n in n_facts:
        full, part = divmod(min(int(n), len(p) * r), r)  # entities held whole, and facts of the next one
        held_part = part * p[full] / r if full < len(p) else 0.0
        out.append(float(tail[full]) - held_part)  # the mass of the facts not held (each fact of e: p_e/R)
    return _facts_per_document(world) * math.log(world.n_values) * np.array(out)


def simulate_data_limited(
    world: ZipfFactsWorld, budgets: Sequence[int], *, seed: int = 0, eval_seed: int = 1, eval_docs: int = 20000
) -> np.ndarray:
    """Monte Carlo of the data-limited learner on the generator's documents: train on documents 0 … D−1 of
    stream ``seed``; at each budget D, the excess (nats per document) on ``eval_docs`` documents of stream
    ``eval_seed`` is log V per fact not yet seen."""
    budgets = sorted(int(b) for b in budgets)
    eval_facts = [world.draw(eval_seed, i) for i in range(eval_docs)]
    seen: set[int] = set()
    out, trained = [], 0
    cost = math.log(world.n_values)
    for budget in budgets:
        while trained < budget:
            doc = world.draw(seed, trained)
            seen.update(doc.entity * world.n_relations + r for r in doc.relations)
            trained += 1
        unseen = sum(doc.entity * world.n_relations + r not in seen for doc in eval_facts for r in doc.relations)
        out.append(cost * unseen / eval_docs)
    return np.array(out)


def local_slopes(xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
    """Slopes of log y against log x between consecutive points."""
    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float))
    return np.diff(ly) / np.diff(lx)


def expected_exponents(world: ZipfFactsWorld) -> dict[str, float]:
    """α_N = s − 1 and α_D = (s − 1)/s for the world's Zipf exponent s (docs/science.md §26)."""
    s = world.zipf_exponent
    return {"alpha_N": s - 1.0, "alpha_D": (s - 1.0) / s}
