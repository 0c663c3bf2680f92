"""Shared test setup: offline, one thread, a private data cache per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Prepared datasets go to a per-session cache, never to the user's ~/.cache."""
    os.environ["LMLAB_CACHE"] = str(tmp_path_factory.mktemp("lmlab_cache"))
    yield
