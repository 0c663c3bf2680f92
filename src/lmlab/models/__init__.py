"""lmlab.models."""
