"""Writing files that a run directory owns without following links out of it.

A run directory may come from somewhere else (copied, downloaded, shared); a file in it that is a
symlink must never redirect one of lmlab's writes to another place. Whole-file writes go to a new
temporary file (created exclusively, so a planted link there is refused) that is renamed over the
target: a rename replaces a symlink instead of following it, and readers never see a half-written
file. Appends (``metrics.jsonl``) open with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.errors import UserError


def refuse_symlink(path: str | Path) -> None:
    """``UserError`` when ``path`` is a symbolic link (lmlab writes only regular files it owns)."""
    p = Path(path)
    if p.is_symlink():
        raise UserError(
            f"{p} is a symbolic link (to {os.readlink(p)}); lmlab does not write through links, remove it first"
        )


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fresh temporary file in the same directory and a rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def open_append(path: str | Path):
    """Open ``path`` for appending text, refusing a symbolic link (``O_NOFOLLOW``)."""
    refuse_symlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")
