"""The sweep runner: expand a sweep file into runs and train each in its own subprocess, N at a time or on Slurm.

A sweep file (YAML)::

    base: configs/demo.yaml            # relative paths are relative to the sweep file
    overrides: [train.device=cpu]      # applied to every run
    grid:                              # cartesian product of the values ...
      optim.lr: [1.0e-3, 3.0e-3]
      model.size: [nano, micro]
    runs:                              # ... or (and) an explicit list of override sets
      - {optim.lr: 1.0e-3, train.steps: 200}
    ladder:                            # ... or a compute ladder (needs lmlab.models.counting)
      compute: [1.0e12, 1.0e13]        # training FLOPs per budget
      sizes: [nano, micro, tiny]       # named sizes to choose from
      tokens_per_param: 20             # one run per budget: the size whose D/N is closest to this
      isoflop: false                   # true: every size at every budget (IsoFLOP profiles, Approach 2)

    slurm:                             # only read by ``--launcher slurm`` (lmlab.science.slurm); the
      partition: gpu                   # --slurm-* options override it key by key
      time: 240                        # minutes per run; a run past it is checkpointed and requeued
      gpus: 1                          # per run; also cpus, mem (16G), array_parallelism
      sbatch: {account: lab}           # any other sbatch option

``grid`` and ``runs`` combine as ``runs × grid``; a ladder is combined with them the same way. Each run is the
subprocess ``[*train_command, base, "--out", run_dir, "--quiet", *overrides]`` where ``train_command`` defaults
to ``[sys.executable, "-m", "lmlab", "train"]`` and can be replaced by the environment variable
``LMLAB_SWEEP_TRAIN_CMD`` (split with shlex; the tests use a fake trainer). A run whose ``summary.json`` says
``finished`` is skipped; a run directory with a checkpoint but no finished summary is resumed with
``[*train_command, "--resume", run_dir, "--quiet"]``; anything else starts fresh (``--overwrite`` when a
directory without a checkpoint is left). Each run's output goes to
``OUT/logs/<run>.log``; the plan is written to ``OUT/sweep.json`` and, at the end, ``OUT/results.csv``.

Where the runs execute is the launcher's business: here, ``jobs`` subprocesses at a time on this machine; with
``lmlab sweep --launcher slurm``, one Slurm job array (:mod:`lmlab.science.slurm`). Either way a launcher calls
one :class:`RunTask` per unfinished run, which decides train or resume only when it starts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import yaml

from lmlab.errors import ConfigError, UserError
from lmlab.science.results import collect_results, read_summary, write_results_csv

TRAIN_CMD_ENV = "LMLAB_SWEEP_TRAIN_CMD"
SWEEP_KEYS = {"base", "overrides", "grid", "runs", "ladder", "name", "slurm"}
LADDER_KEYS = {"compute", "sizes", "tokens_per_param", "isoflop"}
#: sbatch options lmlab sets itself (array, logs, the requeue signal) or through a dedicated ``slurm:`` key.
SBATCH_RESERVED = {
    "array": None,
    "output": None,
    "error": None,
    "open-mode": None,
    "signal": None,
    "partition": "partition",
    "time": "time",
    "gpus-per-node": "gpus",
    "cpus-per-task": "cpus",
    "mem": "mem",
}


@dataclass
class PlannedRun:
    """One run of a sweep: its directory name and the overrides on top of the base config."""

    name: str
    overrides: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # params, tokens, flops, compute budget (when known)


@dataclass
class SlurmOptions:
    """What each run of a sweep asks Slurm for: the sweep file's ``slurm:`` section under the ``--slurm-*`` options."""

    partition: str | None = None  # None: the cluster's default partition
    time: int = 60  # minutes per run; past it the run is checkpointed and requeued (lmlab.science.slurm)
    gpus: int = 0  # per run
    cpus: int = 1  # per run
    mem: str | None = None  # per run, in sbatch's syntax (16G, 4000M); None: the partition's default
    array_parallelism: int = 256  # runs of the sweep running at the same time
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option: {account: lab}; true: a flag

    def validate(self, where: str) -> None:
        """A ``ConfigError`` naming ``where`` and the key for a value sbatch would refuse (or misread)."""
        if self.partition is not None and (not isinstance(self.partition, str) or not self.partition):
            raise ConfigError(f"{where}: slurm.partition must be a partition name, got {self.partition!r}")
        for key, least in (("time", 1), ("gpus", 0), ("cpus", 1), ("array_parallelism", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{where}: slurm.{key} must be an integer >= {least}, got {value!r}")
        if self.mem is not None and not re.fullmatch(r"[0-9]+[KMGT]?", str(self.mem)):
            raise ConfigError(f"{where}: slurm.mem must be a size like 16G or 4000M, got {self.mem!r}")
        for key in self.sbatch:
            name = key.replace("_", "-")
            if name in SBATCH_RESERVED:
                dedicated = SBATCH_RESERVED[name]
                fix = f"use slurm.{dedicated}" if dedicated else "lmlab sets it for each run"
                raise ConfigError(f"{where}: slurm.sbatch.{key}: {fix}")

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> SlurmOptions:
        """The ``slurm:`` section of a sweep file; an unknown key is a ``ConfigError`` naming it."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: 'slurm' must be a mapping of option: value")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"{where}: unknown slurm key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        sbatch = data.get("sbatch") or {}
        if not isinstance(sbatch, dict) or not all(isinstance(v, (str, int, float)) for v in sbatch.values()):
            raise ConfigError(f"{where}: slurm.sbatch must map sbatch options to single values")
        options = cls(**{**data, "sbatch": {str(k): v for k, v in sbatch.items()}})
        if options.mem is not None:
            options.mem = str(options.mem)
        options.validate(where)
        return options


@dataclass
class SweepSpec:
    base: Path
    overrides: list[str]
    runs: list[PlannedRun]
    path: Path
    slurm: SlurmOptions = field(default_factory=SlurmOptions)  # used by --launcher slurm only


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def _override(key: str, value: Any) -> str:
    return f"{key}={_format_value(value)}"


def run_name(index: int, assignment: dict[str, Any]) -> str:
    """``007_lr-0.003_size-nano``: the index, then ``<last key part>-<value>`` for each swept key."""
    parts = [f"{index:03d}"] + [f"{k.split('.')[-1]}-{_format_value(v)}" for k, v in assignment.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts))[:120]


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and expand a sweep file (module docstring); unknown keys and empty sweeps are ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    if "base" not in data:
        raise ConfigError(f"{path}: 'base' (the base config file) is required")
    base = Path(data["base"])
    if not base.is_absolute():
        base = (path.parent / base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base config not found: {base}")
    overrides = [str(o) for o in data.get("overrides") or []]
    slurm = SlurmOptions.from_mapping(data.get("slurm"), str(path))
    assignments = _expand(data, path)
    ladder = data.get("ladder")
    planned: list[PlannedRun] = []
    if ladder:
        rungs = ladder_runs(ladder, base, overrides, path)
        combos = [(rung, a) for a in assignments for rung in rungs]
    else:
        combos = [(None, a) for a in assignments]
    for i, (rung, assignment) in enumerate(combos):
        shown = dict(assignment)
        extra: list[str] = []
        info: dict[str, Any] = {}
        if rung is not None:
            shown = {"C": f"{rung['compute']:.2g}", "size": rung["size"], **assignment}
            extra = rung["overrides"]
            info = {"compute": rung["compute"]}
        planned.append(PlannedRun(run_name(i, shown), extra + [_override(k, v) for k, v in assignment.items()], info))
    if not planned:
        raise ConfigError(f"{path}: the sweep has no runs")
    return SweepSpec(base, overrides, planned, path, slurm)


def _expand(data: dict, path: Path) -> list[dict[str, Any]]:
    runs = data.get("runs") or [{}]
    grid = data.get("grid") or {}
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{path}: 'runs' must be a list of mappings of key: value")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map each key to a non-empty list of values")
    keys = list(grid)
    product = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [{**r, **g} for r in runs for g in product]


def ladder_runs(ladder: dict, base: Path, overrides: list[str], where: Path) -> list[dict[str, Any]]:
    """(size, steps) per compute budget; steps make ``training FLOPs/token × tokens ≈ C`` (Kaplan counting)."""
    from lmlab.config import load_config
    from lmlab.models.sizes import SIZES
    from lmlab.science.accounting import count_params, flops_per_token

    unknown = sorted(set(ladder) - LADDER_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown ladder key(s) {', '.join(unknown)}; valid: {', '.join(sorted(LADDER_KEYS))}"
        )
    budgets = [float(c) for c in ladder.get("compute") or []]
    sizes = list(ladder.get("sizes") or [])
    if not budgets or not sizes:
        raise ConfigError(f"{where}: a ladder needs 'compute' (a list of FLOPs) and 'sizes' (named sizes)")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise ConfigError(f"{where}: ladder sizes {bad} are not named sizes; valid: {', '.join(SIZES)}")
    rungs = []
    for c in budgets:
        options = []
        for size in sizes:
            dims = [_override(f"model.{k}", v) for k, v in SIZES[size].items()]
            cfg = load_config(base, [*overrides, f"model.size={size}", *dims])
            model = cfg.model
            if model.vocab_size == 0:
                from dataclasses import replace

                model = replace(model, vocab_size=cfg.tokenizer.vocab_size)
            n = count_params(model)["total"]
            per_token = flops_per_token(model, cfg.train.seq_len)["training"]
            batch_tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len
            steps = max(1, round(c / per_token / batch_tokens))
            tokens = steps * batch_tokens
            options.append(
                {
                    "compute": c,
                    "size": size,
                    "params": n,
                    "tokens": tokens,
                    "overrides": [f"model.size={size}", *dims, f"train.steps={steps}"],
                }
            )
        if ladder.get("isoflop"):
            rungs += options
        else:
            target = float(ladder.get("tokens_per_param", 20))
            rungs.append(min(options, key=lambda o: abs(math.log(o["tokens"] / o["params"] / target))))
    return rungs


# --------------------------------------------------------------------------- planning and running


def train_command() -> list[str]:
    """The trainer invocation: ``$LMLAB_SWEEP_TRAIN_CMD`` if set, else ``python -m lmlab train``."""
    env = os.environ.get(TRAIN_CMD_ENV)
    if env:
        return shlex.split(env)
    return [sys.executable, "-m", "lmlab", "train"]


def has_checkpoint(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.is_dir() for p in ckpts.iterdir())


def run_action(run_dir: Path) -> str:
    """``skip`` (finished), ``resume`` (checkpoint but not finished) or ``start``."""
    summary = read_summary(run_dir) if run_dir.is_dir() else None
    if summary is not None and summary.get("status") == "finished":
        return "skip"
    if run_dir.is_dir() and has_checkpoint(run_dir):
        return "resume"
    return "start"


def command_for(spec: SweepSpec, run: PlannedRun, out: Path, cmd: Sequence[str]) -> tuple[str, list[str]]:
    run_dir = out / run.name
    action = run_action(run_dir)
    if action == "resume":
        return action, [*cmd, "--resume", str(run_dir), "--quiet"]
    # A run directory left without a checkpoint (the run died early) holds nothing worth keeping: start over.
    fresh = ["--overwrite"] if run_dir.exists() else []
    return action, [*cmd, str(spec.base), "--out", str(run_dir), "--quiet", *fresh, *spec.overrides, *run.overrides]


def estimate(spec: SweepSpec, run: PlannedRun) -> dict[str, Any]:
    """Params, tokens and training FLOPs of a planned run, from its resolved config (lmlab.models.counting)."""
    from dataclasses import replace

    from lmlab.config import load_config
    from lmlab.science.accounting import count_params, flops_per_token

    cfg = load_config(spec.base, [*spec.overrides, *run.overrides])
    model = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size)
    tokens = cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len
    return {
        "params": count_params(model)["total"],
        "tokens": tokens,
        "flops": flops_per_token(model, cfg.train.seq_len)["training"] * tokens,
    }


def plan_table(spec: SweepSpec, out: Path, tokens_per_s: float) -> str:
    """The dry-run plan: one line per run with its action, params, tokens, FLOPs and an estimated time."""
    lines = [f"{'run':<40} {'action':<7} {'params':>10} {'tokens':>12} {'flops':>10} {'est. time':>10}"]
    total_s = 0.0
    for run in spec.runs:
        action = run_action(out / run.name)
        est = estimate(spec, run)
        secs = est["tokens"] / tokens_per_s if action != "skip" else 0.0
        total_s += secs
        lines.append(
            f"{run.name:<40} {action:<7} {est['params']:>10,} {est['tokens']:>12,} {est['flops']:>10.3g} "
            f"{_duration(secs):>10}"
        )
    lines.append(f"{len(spec.runs)} runs; estimated total {_duration(total_s)} at {tokens_per_s:,.0f} tokens/s")
    return "\n".join(lines)


def _duration(secs: float) -> str:
    if secs < 60:
        return f"{secs:.0f}s"
    if secs < 3600:
        return f"{secs / 60:.1f}m"
    return f"{secs / 3600:.1f}h"


@dataclass
class SweepOutcome:
    started: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)  # run -> exit code


@dataclass
class RunTask:
    """One run of a sweep as a callable a launcher can run anywhere; returns the trainer's exit code.

    The command (train, resume, or nothing when finished) is chosen when the task starts, not when it is
    planned, so a task that a scheduler runs again after an interruption resumes from its checkpoint.
    """

    spec: SweepSpec
    run: PlannedRun
    out: Path
    cmd: list[str]

    def __call__(self) -> int:
        action, argv = command_for(self.spec, self.run, self.out, self.cmd)
        if action == "skip":
            return 0
        with (self.out / "logs" / f"{self.run.name}.log").open("a") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {action}: {shlex.join(argv)}\n")
            log.flush()
            return self.spawn(argv, log).wait()

    def spawn(self, argv: list[str], log: IO[str]) -> subprocess.Popen:
        """Start the trainer with its output going to ``log``."""
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


#: A launcher runs the tasks and returns each one's exit code, in order.
Launcher = Callable[[list[RunTask]], list[int]]


def local_launcher(jobs: int = 1) -> Launcher:
    """Run the tasks on this machine, ``jobs`` subprocesses at a time."""

    def launch(tasks: list[RunTask]) -> list[int]:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(lambda task: task(), tasks))

    return launch


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    jobs: int = 1,
    cmd: Sequence[str] | None = None,
    launcher: Launcher | None = None,
) -> SweepOutcome:
    """Train every unfinished run (``launcher``, by default ``jobs`` at a time here), then write ``OUT/results.csv``."""
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cmd = list(cmd) if cmd is not None else train_command()
    plan = [{"name": r.name, "overrides": [*spec.overrides, *r.overrides], **r.info} for r in spec.runs]
    (out / "sweep.json").write_text(
        json.dumps({"base": str(spec.base), "sweep": str(spec.path), "runs": plan}, indent=1)
    )
    outcome = SweepOutcome()
    tasks = []
    for run in spec.runs:
        action = run_action(out / run.name)
        if action == "skip":
            outcome.skipped.append(run.name)
            continue
        (outcome.resumed if action == "resume" else outcome.started).append(run.name)
        tasks.append(RunTask(spec, run, out, cmd))
    launch = launcher or local_launcher(jobs)
    for task, rc in zip(tasks, launch(tasks)):
        if rc != 0:
            outcome.failed[task.run.name] = rc
    try:
        write_results_csv(collect_results(out), out / "results.csv")
    except UserError as err:  # no run directory at all (every run failed before creating one)
        print(f"lmlab sweep: no results to collect: {err}", file=sys.stderr)
    return outcome
