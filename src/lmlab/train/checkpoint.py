"""Checkpoints: atomic, checksummed, safe to load, pruned to the last K.

Layout: ``RUN_DIR/checkpoints/step_0000100/`` holds ``model.safetensors`` (weights),
``train_state.pt`` (optimizer, sampler position, RNG states, step; tensors and plain
Python only, loaded with ``weights_only=True`` so nothing can run code) and
``meta.json`` (step, model config, parameter shapes, SHA-256 of each file).

A checkpoint is written into a hidden temporary directory, every file is fsynced, and
the directory is renamed into place; a process killed mid-write leaves the previous
checkpoints untouched and the partial one invisible. Loading verifies the checksums
(corruption) and the model config and parameter shapes (a checkpoint from another model).

Several ranks or FSDP write the same directory layout with the weights and optimizer in a
``dcp/`` folder instead (``torch.distributed.checkpoint``, sharded, resharded on load), plus
``train_state.pt`` and ``meta.json``; such a checkpoint resumes on any world size and loads into
a plain model for generation, evaluation or ``lmlab export``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmlab import __version__
from lmlab.config import ModelConfig, model_config_diff, to_dict
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.lora import adapter_state_keys, has_adapters
from lmlab.train.dcp_safe import read_metadata_safely, safe_reader

CKPT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once and tensors made contiguous on CPU; of a model with adapters,
    only what trains (``adapter_state_keys``: the base stays in the run it came from)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in saved_part(model, model.state_dict()).items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue  # tied weight (e.g. lm_head == tok_embeddings)
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def saved_part(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``model``'s ``state`` a checkpoint holds: all of them, or of a model with adapters only what
    trains (``adapter_state_keys``: the base stays in the run it came from)."""
    if not has_adapters(model):
        return state
    keys = adapter_state_keys(model)
    return {k: v for k, v in state.items() if k in keys}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    *,
    model_cfg: ModelConfig,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step``; prune to ``keep_last``; return its directory.

    An OS error while writing (disk full, read-only filesystem) removes the partial checkpoint and
    raises one ``CheckpointError`` saying which earlier checkpoint is intact.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        weights = model if isinstance(model, dict) else model_state_dict(model)
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "lmlab", "step": str(step)})
        files = [MODEL_FILE]
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        for name in files:
            _fsync_file(tmp / name)
        info = {
            "format_version": FORMAT_VERSION,
            "lmlab_version": __version__,
            "step": step,
            "model_config": to_dict(model_cfg),
            "shapes": {k: list(v.shape) for k, v in weights.items()},
            "sha256": {name: _sha256(tmp / name) for name in files},
            **(meta or {}),
        }
        _publish(tmp, final, info)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, final, err) from None
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last, owner=(meta or {}).get("run_id"))
    return final


def checkpoint_root(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``, created if needed; refused when it is a symbolic link (writes stay in the run)."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_symlink():
        raise CheckpointError(f"{root} is a symbolic link; lmlab writes checkpoints only inside the run directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_error(run_dir: str | Path, final: Path, err: OSError) -> CheckpointError:
    """One message for a checkpoint that could not be written, naming the intact one to resume from."""
    intact = latest_checkpoint(run_dir)
    where = f"the latest intact checkpoint is {intact}" if intact else "no earlier checkpoint exists"
    reason = err.strerror or str(err)
    return CheckpointError(
        f"could not write checkpoint {final}: {reason}; the partial checkpoint was removed and {where}"
    )


def _publish(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """Write ``meta.json`` last, fsync, and rename the finished temporary directory into place."""
    (tmp / META_FILE).write_text(json.dumps(info, indent=1))
    _fsync_file(tmp / META_FILE)
    _fsync_dir(tmp)
    root = final.parent
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace atomically
        old = root / f".old_{final.name}_{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / META_FILE).is_file():
            try:
                found.append((int(p.name[len("step_") :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep_last: int, owner: str | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints of the run ``owner`` (its ``run_id``).

    Only complete checkpoints (``meta.json`` written last, so present only when complete) whose meta
    names this run are candidates, plus those of older lmlab versions that name no run; a temporary
    directory is never touched here (the run lifecycle removes leftovers while it holds the lock).
    """
    ours = [p for p in list_checkpoints(run_dir) if _run_id(p) in (owner, None)]
    for p in ours[: max(0, len(ours) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)


def _run_id(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / META_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return "<unreadable>"  # never pruned: it is not known to be ours


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Remove the temporary directories of checkpoint writes that never finished (a killed process);
    call it only while holding the run's lock. Returns what was removed."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir() or root.is_symlink():
        return []
    partial = [p for p in root.iterdir() if p.name.startswith((".tmp_step_", ".old_step_"))]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def set_aside_after(run_dir: str | Path, step: int) -> list[Path]:
    """Move the checkpoints newer than ``step`` into ``checkpoints/discarded-<time>/`` (kept, not deleted),
    so resuming from an earlier checkpoint starts a clean continuation."""
    newer = [p for p in list_checkpoints(run_dir) if _step_of(p) > step]
    if not newer:
        return []
    target = Path(run_dir) / CKPT_DIR / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(exist_ok=True)
    for p in newer:
        os.rename(p, target / p.name)
    return [target / p.name for p in newer]


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name[len("step_") :])


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a checkpoint ({META_FILE} is missing)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{ckpt / META_FILE}: corrupted ({err})") from None


def verify_checkpoint(ckpt: Path, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Check that the checkpoint holds exactly the files its meta.json lists, with their checksums, and
    (if given) that it belongs to ``model_cfg``.

    A file that meta.json does not list, a symbolic link or a listed name outside the directory is
    refused: nothing in a checkpoint is read unless lmlab wrote it and its checksum matches.
    """
    meta = read_meta(ckpt)
    listed = meta.get("sha256", {})
    if not isinstance(listed, dict):
        raise CheckpointError(f"{ckpt / META_FILE}: corrupted (sha256 is not a mapping)")
    for name, digest in listed.items():
        path = ckpt / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{ckpt / META_FILE}: lists {name!r}, a path outside the checkpoint; refused")
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: corrupted (checksum mismatch); earlier checkpoints may still be intact")
    for path in sorted(ckpt.rglob("*")):
        name = str(path.relative_to(ckpt))
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link inside a checkpoint; refused (lmlab writes none)")
        if path.is_file() and name != META_FILE and name not in listed:
            raise CheckpointError(
                f"{path}: not listed in {META_FILE}; refusing a checkpoint holding files lmlab did not write"
            )
    if is_sharded(ckpt):
        read_metadata_safely(ckpt / DCP_DIR)  # DCP's metadata is a pickle: read it through the allow-list now
    if model_cfg is not None:
        try:
            diffs = model_config_diff(meta.get("model_config", {}), model_cfg)
        except ConfigError as err:
            raise CheckpointError(f"{ckpt / META_FILE}: unreadable model config ({err})") from None
        if diffs:
            raise CheckpointError(f"{ckpt}: checkpoint from another model ({'; '.join(diffs)})")
    return meta


def load_weights(
    ckpt: Path, model: torch.nn.Module, model_cfg: ModelConfig | None = None, *, verified: bool = False
) -> dict[str, Any]:
    """Verify (unless the caller just did: ``verified``) and load the checkpoint's weights into ``model``
    (strict); return the meta.

    Works for both formats: ``model.safetensors`` and a sharded ``dcp/`` checkpoint, which is
    read into this (unsharded) model whatever world size wrote it.
    """
    meta = read_meta(ckpt) if verified else verify_checkpoint(ckpt, model_cfg)
    if is_sharded(ckpt):
        expected = model_state_dict(model)
        _check_same_model(ckpt, expected, {k: torch.Size(v) for k, v in meta.get("shapes", {}).items()})
        _load_sharded_weights(ckpt, model)
        return meta
    try:
        weights = load_file(str(ckpt / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{ckpt / MODEL_FILE}: unreadable ({err})") from None
    _check_same_model(ckpt, model_state_dict(model), {k: v.shape for k, v in weights.items()})
    model.load_state_dict(weights, strict=False)  # tied weights are stored once
    return meta


def _check_same_model(ckpt: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Size]) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from the model's."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad_shapes = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if bad_shapes:
            parts.append(f"shape mismatch {bad_shapes[:3]}")
        raise CheckpointError(f"{ckpt}: checkpoint from another model ({'; '.join(parts)})")


def load_train_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no training state ({STATE_FILE}); cannot resume from a weights-only checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupted file
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"run directory does not exist: {p}")
    if (p / META_FILE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: no checkpoint found (expected {CKPT_DIR}/step_*/)")
    return latest


# --------------------------------------------------------------------------- sharded checkpoints

DCP_DIR = "dcp"


def is_sharded(ckpt: Path) -> bool:
    """True for a checkpoint written by ``save_sharded_checkpoint`` (``torch.distributed.checkpoint``)."""
    return (Path(ckpt) / DCP_DIR).is_dir()


@contextlib.contextmanager
def _single_process_dcp():
    """Silence DCP's notice that it loads in one process: reading a sharded checkpoint alone is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _load_sharded_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Read the model part of a sharded checkpoint into a plain (unsharded) model, in this process only."""
    target = {"model": saved_part(model, model.state_dict())}  # shares storage with the model: loaded in place
    try:
        with _single_process_dcp():
            dcp.load(target, storage_reader=safe_reader(ckpt / DCP_DIR), no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{ckpt / DCP_DIR}: unreadable ({_dcp_reason(err)})") from None
    model.load_state_dict(target["model"], strict=not has_adapters(model))


def _dcp_reason(err: BaseException) -> str:
    """The first line of what went wrong inside DCP (it wraps each rank's error in a ``CheckpointException``)."""
    failures = getattr(err, "failures", None) or {}
    inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
    source = inner if isinstance(inner, BaseException) else err
    text = str(source).strip().splitlines()
    return f"{type(source).__name__}: {text[0] if text else ''}"[:300]


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ctx: Any,
    model_cfg: ModelConfig,
    train_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Collective save of model and optimizer with ``torch.distributed.checkpoint``; all ranks call it.

    Each rank writes its own shards (FSDP) or its share of the replicated tensors (DDP) into
    ``dcp/``; rank 0 writes ``train_state.pt`` (step, data position, RNG) and, after every rank has
    finished, checksums and ``meta.json``, then renames the directory into place. The result loads
    on any world size (``load_sharded_state``) and into a plain model (``load_weights``).
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_sharded"
    if ctx.is_main:
        checkpoint_root(run_dir)
        if tmp.exists():  # left by a job that died while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    model_sd, optim_sd = _trained_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    if ctx.is_main:
        torch.save(train_state, tmp / STATE_FILE)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for name in files:
            _fsync_file(tmp / name)
        _fsync_dir(tmp / DCP_DIR)
        info = {
            "format_version": FORMAT_VERSION,
            "format": "sharded",
            "lmlab_version": __version__,
            "step": step,
            "model_config": to_dict(model_cfg),
            "shapes": {k: list(v.shape) for k, v in model_sd.items()},
            "sha256": {name: _sha256(tmp / name) for name in files},
            **(meta or {}),
        }
        _publish(tmp, final, info)
        if keep_last is not None:
            prune_checkpoints(run_dir, keep_last, owner=(meta or {}).get("run_id"))
    ctx.barrier()
    return final


def load_sharded_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into ``model`` (plain, DDP or FSDP) on any world size.

    Collective when a process group exists; DCP reshards the saved tensors to this job's layout.
    """
    model_sd, optim_sd = _trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        with _single_process_dcp():
            dcp.load(state, storage_reader=safe_reader(ckpt / DCP_DIR), no_dist=alone)
    except CheckpointException as err:
        raise CheckpointError(f"{ckpt / DCP_DIR}: unreadable ({_dcp_reason(err)})") from None
    options = StateDictOptions(strict=not has_adapters(model))  # an adapter run's checkpoint holds no base
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def _trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``get_state_dict`` of model and optimizer; of a model with adapters, only the model's trained part."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return saved_part(model, model_sd), optim_sd


def load_full_state_sharded(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any]
) -> None:
    """Load a single-process checkpoint (``model.safetensors`` + a ``torch.optim`` state dict) into a
    DDP or FSDP model on several ranks: every rank reads the full tensors and keeps its shard."""
    try:
        weights = load_file(str(ckpt / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{ckpt / MODEL_FILE}: unreadable ({err})") from None
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for g in optimizer_state["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(order):
        raise CheckpointError(
            f"{ckpt}: the optimizer state has {len(saved_ids)} parameters, the model {len(order)}; "
            "checkpoint from another model"
        )
    by_id = dict(zip(saved_ids, order))
    fqn_state = {
        "state": {by_id[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=fqn_state,
        options=StateDictOptions(full_state_dict=True, strict=not has_adapters(model)),
    )
