"""lmlab.eval."""
