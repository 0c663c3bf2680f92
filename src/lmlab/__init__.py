"""lmlab: a laboratory for training decoder-only language models."""

__version__ = "0.1.0"
