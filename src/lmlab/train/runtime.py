"""Where and how a run executes: device, threads, precision context, seeds, environment record."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lmlab import __version__
from lmlab.errors import ConfigError, UserError


def resolve_device(name: str, key: str = "train.device", error: type[UserError] = ConfigError) -> torch.device:
    """``auto`` -> cuda if available else cpu; a name that is no device, or CUDA without CUDA, is ``error``
    naming ``key`` (the config key, or a command-line flag such as ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise error(f"{key}={name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}={name!r} but CUDA is not available on this machine; use cpu or auto")
    return device


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast (weights stay fp32); fp32 runs without autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device: torch.device) -> dict:
    """What produced this run: versions, code commit, host, device."""
    info = {
        "lmlab_version": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
