"""lmlab.data."""
