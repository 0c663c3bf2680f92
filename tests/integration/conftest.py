"""Fixtures of the integration tests: a real one-node Slurm cluster on localhost (``slurm_cluster.py``)."""

from __future__ import annotations

import pytest
from integration.slurm_cluster import SlurmCluster, missing_slurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster for the whole session; skipped, with the reason, where Slurm is not installed."""
    reason = missing_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
