"""lmlab.report."""
