"""Parameter and FLOP accounting for the science tools: a re-export of :mod:`lmlab.models.counting`.

The counting conventions (what is an embedding parameter, Kaplan's FLOPs per token, training = 3 × forward) are
documented and owned there; sweeps and fitters import them from here so that there is one definition.
"""

from __future__ import annotations

from lmlab.models.counting import count_params, flops_per_token, size_config, size_table

__all__ = ["count_params", "flops_per_token", "size_config", "size_table"]
