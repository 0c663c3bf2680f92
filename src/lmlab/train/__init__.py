"""lmlab.train."""
