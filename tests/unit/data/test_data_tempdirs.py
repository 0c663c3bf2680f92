"""Hidden work directories left by killed preparations are removed on the next start; live ones are kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmlab.data import tempdirs
from lmlab.data.cache import cache_root
from lmlab.data.mixture import shared_tokenizer
from lmlab.data.prepare import Document, prepare_shards

from helpers import tiny_config


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not tempdirs.owner_alive(proc.pid)
    return proc.pid


def _leftover(parent, name: str):
    d = parent / name
    d.mkdir(parents=True)
    (d / "train_0000.bin").write_bytes(b"partial")
    return d


def test_only_dead_owners_on_this_host_lose_their_directories(tmp_path, dead_pid):
    host = tempdirs.host_tag()
    dead = _leftover(tmp_path, f".data.tmp-{dead_pid}-{host}-0123abcd")
    dead_old = _leftover(tmp_path, f".data.old-{dead_pid}-{host}-0123abcd")
    legacy = _leftover(tmp_path, f".data.tmp-{dead_pid}-89abcdef")  # lmlab before host tags
    legacy_tokenizer = _leftover(tmp_path, f".tmp-mixture-0123456789abcdef-{dead_pid}")
    live = _leftover(tmp_path, f".data.tmp-{os.getpid()}-{host}-0123abcd")
    other_host = _leftover(tmp_path, f".data.tmp-{dead_pid}-{'0' * 8 if host != '0' * 8 else '1' * 8}-0123abcd")
    unrelated = _leftover(tmp_path, f".data.backup-{dead_pid}")
    user_dir = _leftover(tmp_path, f"data.tmp-{dead_pid}-{host}-0123abcd")  # not hidden: not ours
    removed = tempdirs.remove_stale(tmp_path)
    assert sorted(removed) == sorted([dead, dead_old, legacy, legacy_tokenizer])
    assert not any(d.exists() for d in removed)
    assert all(d.exists() for d in (live, other_host, unrelated, user_dir))


def test_work_dir_names_are_recognised(tmp_path):
    work = tempdirs.work_dir(tmp_path / "prepared")
    assert work.parent == tmp_path and work.name.startswith(f".prepared.tmp-{os.getpid()}-{tempdirs.host_tag()}-")
    work.mkdir()
    assert tempdirs.remove_stale(tmp_path) == [] and work.exists()  # its owner (this process) is alive
    assert tempdirs.owner_alive(os.getpid()) and tempdirs.owner_alive(0)


def test_prepare_removes_leftovers_of_a_killed_run(abc, tmp_path, dead_pid):
    dead = _leftover(tmp_path, f".prep.tmp-{dead_pid}-{tempdirs.host_tag()}-0123abcd")
    live = _leftover(tmp_path, f".prep.tmp-{os.getpid()}-{tempdirs.host_tag()}-0123abcd")
    prepare_shards([Document("a b", "mem", 0)], abc, tmp_path / "prep", val_fraction=0.0)
    assert not dead.exists() and live.exists()
    assert (tmp_path / "prep" / "manifest.json").is_file()


def test_mixture_tokenizer_cache_removes_leftovers(tmp_path, dead_pid):
    cfg = tiny_config(
        "data.source=mixture",
        "data.mixture=[{name: norra, weight: 1, synthetic: {world: languages, subset: norra, n_docs: 40}},"
        " {name: kalua, weight: 1, synthetic: {world: languages, subset: kalua, n_docs: 40}}]",
    )
    tokenizers = cache_root() / "tokenizers"
    dead = _leftover(tokenizers, f".tmp-mixture-0123456789abcdef-{dead_pid}")
    live = _leftover(tokenizers, f".mixture-0123456789abcdef.tmp-{os.getpid()}-{tempdirs.host_tag()}-0123abcd")
    _, path = shared_tokenizer(cfg)
    assert path.is_file() and path.parent.parent == tokenizers
    assert not dead.exists() and live.exists()
    assert [p.name for p in tokenizers.iterdir() if p.name.startswith(".")] == [live.name]
