"""lmlab.science: scaling-law fitters, predictions, sweeps and their results (docs/science.md §1–4).

Modules, one job each:

- ``huber``: the Huber loss every fitter sums (§1.2);
- ``chinchilla``: ``L(N, D) = E + A/N^α + B/D^β``, published presets, compute-optimal allocation and the
  Approach-3 grid fit with bootstrap intervals (§1); ``batched_lbfgs``: the vectorised L-BFGS it runs on;
- ``isoflop``: Approach 2, IsoFLOP parabolas (§1.4);
- ``schedules`` and ``annealing``: LR schedules as arrays and the learning-rate-annealing law (§2);
- ``lr_horizon``: the optimal LR across token horizons (§3);
- ``mixture``: per-family multilingual law and optimal sampling ratios (§4);
- ``results`` and ``curves``: reading run / sweep directories and CSVs; ``sweep``: the sweep runner;
- ``fits``, ``plots`` and ``commands``: ``lmlab fit``, ``lmlab predict`` and ``lmlab sweep``;
- ``accounting``: parameter and FLOP counts (re-exported from ``lmlab.models.counting``).
"""
