"""Hidden work directories of atomic publication, and the removal of those whose owner died.

A directory is written under a hidden name next to its final place and renamed into place when
finished. The hidden name carries the owner's PID and a tag of its host
(``.NAME.tmp-PID-HOST-RANDOM``), so a later start can tell the leftovers of a killed process
(``remove_stale``) from the work of one still running: a directory is removed only when it was
made on this host and no process with its PID is alive. Names from older lmlab versions
(``.NAME.tmp-PID-RANDOM`` of ``prepare_shards``, ``.tmp-NAME-PID`` of the mixture tokenizer) are
recognised and taken to be from this host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

_NAMED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{8}))?-[0-9a-f]{8}$")
_LEGACY_TOKENIZER = re.compile(r"^\.tmp-(?P<name>.+)-(?P<pid>\d+)$")


def host_tag() -> str:
    """Eight hex digits naming this host (a hash of its hostname)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def work_dir(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to ``final`` owned by this process (``kind``: ``tmp`` or ``old``)."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{host_tag()}-{uuid.uuid4().hex[:8]}"


def owner_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists on this host (a process of another user is alive)."""
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_owner(name: str) -> int | None:
    """The PID that owned the hidden directory ``name`` when it is ours to judge, else None."""
    match = _NAMED.match(name) or _LEGACY_TOKENIZER.match(name)
    if match is None:
        return None
    host = match.groupdict().get("host")
    if host is not None and host != host_tag():
        return None  # made on another host sharing this filesystem: its PIDs mean nothing here
    return int(match.group("pid"))


def remove_stale(parent: Path) -> list[Path]:
    """Remove the hidden work directories in ``parent`` whose owner is dead; return them."""
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        pid = _stale_owner(entry.name)
        if pid is None or owner_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
