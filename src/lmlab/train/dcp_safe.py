"""Reading ``torch.distributed.checkpoint`` (DCP) checkpoints without running code planted in them.

DCP's ``FileSystemReader`` unpickles a checkpoint's ``.metadata`` with plain ``pickle.load``, and its
default load planner unpickles every non-tensor entry (the optimizer's ``param_groups``: lr, betas,
...) with ``torch.load(weights_only=False)``; either way a planted pickle runs code when the
checkpoint is loaded. ``SafeFileSystemReader`` closes both doors:

* the metadata goes through an allow-list unpickler (``METADATA_GLOBALS``: the classes DCP's
  ``Metadata`` is made of, ``torch.Size``, torch dtypes and layouts, ``pathlib`` paths), found by
  recording what real checkpoints of lmlab's kind (model and AdamW state, one process, and two ranks
  with DDP or FSDP) contain; anything else is a ``CheckpointError``, raised before the object is
  made, and the data files it names must lie inside the checkpoint directory;
* non-tensor entries are loaded with ``torch.load(weights_only=True)`` (plain Python values and
  tensors only) and handed to the planner re-serialized, so it never sees the file's own pickle.

Tensors themselves are already read by DCP with ``weights_only=True``. Use
``dcp.load(state, storage_reader=safe_reader(path))``.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from lmlab.errors import CheckpointError

METADATA_FILE = ".metadata"
METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_md, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> torch.layout lookup
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{
        (module, name): getattr(pathlib, name)  # the checkpoint's own directory; pathlib._local on Python 3.13+
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    },
}
"""Every global a DCP ``.metadata`` pickle may name, mapped to the object it stands for."""


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``METADATA_GLOBALS`` (no import, no other callable)."""

    def __init__(self, file: io.BufferedIOBase, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = METADATA_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"{self.source}: refused to unpickle {module}.{name} (not part of DCP metadata); "
                "the checkpoint may be malicious"
            )
        return allowed


def _check_storage(metadata: Metadata, checkpoint_dir: Path, source: Path) -> None:
    """``CheckpointError`` unless every data file the metadata names is a file name inside ``checkpoint_dir``."""
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{source}: storage_data is {type(storage).__name__}, not a dict; not a DCP checkpoint")
    root = checkpoint_dir.resolve()
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{source}: data file {name!r} is not a relative path inside {checkpoint_dir}")
        if not (root / name).resolve().is_relative_to(root):
            raise CheckpointError(f"{source}: data file {name!r} resolves outside {checkpoint_dir}")


def load_metadata_file(path: str | Path, checkpoint_dir: str | Path | None = None) -> Metadata:
    """The ``Metadata`` pickled in ``path`` (a DCP ``.metadata`` file), read with the allow-list."""
    source = Path(path)
    try:
        with open(source, "rb") as f:
            metadata = _MetadataUnpickler(f, source).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{source} not found: not a torch.distributed.checkpoint directory") from None
    except Exception as err:  # a truncated or garbled pickle raises many types
        raise CheckpointError(f"{source}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__name__}, not DCP Metadata")
    _check_storage(metadata, Path(checkpoint_dir) if checkpoint_dir is not None else source.parent, source)
    return metadata


def read_metadata_safely(checkpoint_dir: str | Path) -> Metadata:
    """The ``Metadata`` of the DCP checkpoint directory ``checkpoint_dir`` (its ``.metadata``), read safely."""
    return load_metadata_file(Path(checkpoint_dir) / METADATA_FILE, checkpoint_dir)


def _refused(err: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its long message (e.g. ``builtins.exec``)."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(
        r"WeightsUnpickler error: (.{1,200})", text
    )
    return found.group(1) if found else "a non-data object"


class _WeightsOnlyBytes:
    """A load planner seen through a filter: non-tensor entries are unpickled with ``weights_only=True``
    and passed on re-serialized; everything else goes to the wrapped planner unchanged."""

    def __init__(self, planner: LoadPlanner, source: Path):
        self._planner = planner
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{self._source}: refused to unpickle {_refused(err)} in entry {read_item.dest_index.fqn!r} "
                "(only plain Python values and tensors are allowed); the checkpoint may be malicious"
            ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata and non-tensor entries cannot run code (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_metadata_file(path, Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        return super().read_data(plan, _WeightsOnlyBytes(planner, Path(self.path)))


def safe_reader(checkpoint_dir: str | Path) -> SafeFileSystemReader:
    """A reader for ``dcp.load(..., storage_reader=...)``. The metadata is checked now, so a refused or
    unreadable checkpoint is a plain ``CheckpointError`` here rather than one wrapped by DCP later."""
    read_metadata_safely(checkpoint_dir)
    return SafeFileSystemReader(checkpoint_dir)
