"""The life of a run directory, the same for every kind of run.

``Run.open`` claims the directory for the whole run: it refuses a path that is a file, takes the
one-writer lock (``lmlab.train.lock``), removes what a killed earlier process left half-written, and
decides whether this is a new run, a continuation (``--resume RUN`` or ``--resume RUN/checkpoints/
step_N``, or with ``--auto-resume`` the same command run again on a run of the same config) or a refusal
(a directory holding anything else, unless ``--overwrite``). ``start`` writes the resolved ``config.yaml``, the tokenizer,
``env.json``, ``run.json`` (kind, run id, the config as requested, every start) and a ``"running"``
summary; ``fit`` trains with the metrics log and the stop signals installed; ``finish`` records the
outcome — ``finished``, ``diverged`` (with the step) or ``interrupted`` (with the signal) — writes the
summary and the loss plot. A run that fails after it started is marked ``"failed"`` with the error; a
directory this process created and never started is removed again.

Only rank 0 touches files; the other ranks learn the decisions by broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab import __version__
from lmlab.config import RunConfig, save_config, to_dict
from lmlab.errors import CheckpointError, UserError
from lmlab.safe_io import refuse_symlink, write_text_atomic
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.distributed import DistContext
from lmlab.train.lock import LOCK_FILE, RunLock
from lmlab.train.loop import Trainer, TrainResult
from lmlab.train.metrics import MetricsLogger, read_metrics
from lmlab.train.plots import plot_loss
from lmlab.train.runtime import environment
from lmlab.train.signals import StopRequest
from lmlab.train.trackers import Tracker, start_trackers

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
# Settings that change how a run is watched, not what it computes: ignored when deciding whether a
# directory holds "the same run".
RUNTIME_ONLY = {
    ("train", "progress"),
    ("train", "tensorboard"),
    ("train", "trackers"),
    ("train", "tracker_project"),
}


@dataclass
class RunSummary:
    """``summary.json``: the fields every run has, plus the recipe's own (``extra``, written at the top level)."""

    kind: str
    status: str = "running"  # running | finished | diverged | interrupted | failed
    steps: int = 0
    tokens: int = 0
    params: int | None = None
    non_embedding_params: int | None = None
    flops: float | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_val_ppl: float | None = None
    wall_time_s: float | None = None
    world_size: int = 1
    init_from: dict | None = None
    diverged_at: int | None = None
    stopped_by: str | None = None
    checkpoint: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


class Run:
    """A claimed run directory (see the module docstring); create it with ``Run.open``."""

    def __init__(self, path: Path, kind: str, ctx: DistContext, *, quiet: bool):
        self.path = path
        self.kind = kind
        self.ctx = ctx
        self.quiet = quiet or not ctx.is_main
        self.checkpoint: Path | None = None  # the checkpoint this run continues from
        self.run_id = ""
        self.summary = RunSummary(kind, world_size=ctx.world_size)
        self.stop = StopRequest()
        self.started = False
        self.trackers: list[Tracker] = []  # started by ``fit``, finished with the summary by ``finish``
        self._lock: RunLock | None = None
        self._created = False
        self._record: dict[str, Any] = {}

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    # ------------------------------------------------------------------ claiming the directory

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str | Path,
        *,
        kind: str,
        requested: RunConfig,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        ctx: DistContext | None = None,
        quiet: bool = False,
    ) -> Iterator[Run]:
        """Claim ``path`` for a run of ``kind``; yields the ``Run`` and releases the lock at the end, whatever
        happens. ``resume``: True for the latest checkpoint, a checkpoint directory, or ``"auto"`` (continue
        the directory's run if it is this run, else start a new one)."""
        run = cls(Path(path), kind, ctx or DistContext(), quiet=quiet)
        try:
            claim = run.ctx.main_first(lambda: run._claim(requested, resume, overwrite), others=False)
            claim = run.ctx.broadcast_object(claim)
        except BaseException:
            if run._lock is not None:
                run._lock.release()
            if run._created:  # refused before anything was written: leave no empty directory behind
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        run.checkpoint = Path(claim["checkpoint"]) if claim["checkpoint"] else None
        run.run_id = claim["run_id"]
        try:
            yield run
        except BaseException as err:
            run._on_error(err)
            raise
        finally:
            if run._lock is not None:
                run._lock.release()

    def _claim(self, requested: RunConfig, resume: bool | str | Path, overwrite: bool) -> dict[str, Any]:
        """Rank 0: lock the directory and decide new / continue / refuse (see the module docstring)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} exists and is not a directory; choose another --out for the run")
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run directory {path}: {err.strerror or err}") from None
        self._lock = RunLock(path).acquire(quiet=self.quiet)
        self._remove_leftovers()
        self._record = self._read_record()
        if resume and resume != "auto":
            checkpoint = self._checkpoint_to_resume(resume)
        else:
            checkpoint = self._claim_new(requested, overwrite, auto=resume == "auto")
        run_id = self._record.get("run_id") if checkpoint else None
        return {"checkpoint": str(checkpoint) if checkpoint else None, "run_id": run_id or uuid.uuid4().hex[:12]}

    def _remove_leftovers(self) -> None:
        """Half-written files of a process that was killed: partial checkpoints, temporary summary/config files."""
        ckpt_io.remove_partial_checkpoints(self.path)
        for tmp in self.path.glob(".*.tmp-*"):
            if tmp.is_file() or tmp.is_symlink():
                tmp.unlink()

    def _read_record(self) -> dict[str, Any]:
        p = self.path / RUN_FILE
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{p}: unreadable ({err})") from None

    def _checkpoint_to_resume(self, resume: bool | str | Path) -> Path:
        path = self.path
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"{path}: not a run directory (config.yaml is missing)")
        kind = self._record.get("kind")
        if kind and kind != self.kind:
            command = {"pretrain": "train", "reward": "reward train"}.get(kind, kind)
            raise UserError(f"{path} is a {kind} run; continue it with: lmlab {command} --resume {path}")
        if resume is True:
            latest = ckpt_io.latest_checkpoint(path)
            if latest is None:
                raise CheckpointError(f"{path}: nothing to resume (no checkpoint in {path / ckpt_io.CKPT_DIR})")
            return latest
        chosen = Path(resume)
        if chosen.resolve().parent != (path / ckpt_io.CKPT_DIR).resolve() or not (chosen / ckpt_io.META_FILE).is_file():
            raise CheckpointError(f"{chosen}: not a checkpoint of {path} (expected {path / ckpt_io.CKPT_DIR}/step_*/)")
        moved = ckpt_io.set_aside_after(path, int(ckpt_io.read_meta(chosen).get("step", 0)))
        if moved and not self.quiet:
            print(f"continuing from {chosen.name}: the {len(moved)} later checkpoint(s) moved to {moved[0].parent}")
        return path / ckpt_io.CKPT_DIR / chosen.name

    def _claim_new(self, requested: RunConfig, overwrite: bool, auto: bool) -> Path | None:
        """A new run in ``self.path``. With ``auto`` (``--auto-resume``) a directory holding this same run (same
        kind, same requested config) with a checkpoint is continued instead, so a requeued job can rerun its
        command unchanged."""
        path = self.path
        contents = [p for p in path.iterdir() if p.name != LOCK_FILE]
        if not contents:
            return None
        if overwrite:
            for p in contents:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self._record = {}
            return None
        latest = ckpt_io.latest_checkpoint(path)
        same = self._record.get("kind") == self.kind and _comparable(self._record.get("requested_config")) == (
            _comparable(to_dict(requested))
        )
        if same and latest is not None and auto:
            if not self.quiet:
                print(f"{path} holds this run (same kind and config): continuing from {latest.name}")
            return latest
        if latest is not None:
            which = "of this run" if same else "of another run (its kind or config differs)"
            raise UserError(
                f"{path} already holds checkpoints {which}; resume it with --resume {path}, "
                "choose another --out, or pass --overwrite to replace it"
            )
        names = ", ".join(sorted(p.name for p in contents)[:4])
        raise UserError(
            f"{path} is not empty ({names}{', ...' if len(contents) > 4 else ''}) and holds no run to continue; "
            "choose another --out or pass --overwrite to replace its contents"
        )

    # ------------------------------------------------------------------ the run

    def start(
        self,
        cfg: RunConfig,
        requested: RunConfig,
        *,
        tokenizer=None,
        files: dict[str, str] | None = None,
    ) -> None:
        """Write the run's description (config, tokenizer, extra ``files``, env.json, run.json, summary)."""
        self.started = True
        if self.ctx.is_main:
            save_config(cfg, self._file("config.yaml"))
            if tokenizer is not None:  # with its declared special tokens, stop tokens and chat template
                write_text_atomic(self._file("tokenizer.json"), tokenizer.to_json())
                for name, text in tokenizer.companion_files().items():
                    write_text_atomic(self._file(name), text)
            for name, text in (files or {}).items():
                write_text_atomic(self._file(name), text)
            env = environment(self.ctx.device)
            env.update(world_size=self.ctx.world_size, strategy=self.ctx.strategy, backend=self.ctx.backend)
            write_text_atomic(self._file("env.json"), json.dumps(env, indent=1))
            self._write_record(requested)
            if self.resuming and (self.path / SUMMARY_FILE).is_file():
                self._keep_summary_fields()
            self.summary.status = "running"
            self.write_summary()
        self.ctx.barrier()

    def _write_record(self, requested: RunConfig) -> None:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        record = self._record or {
            "kind": self.kind,
            "run_id": self.run_id,
            "created": now,
            "lmlab_version": __version__,
            "requested_config": to_dict(requested),
            "starts": [],
        }
        record["starts"] = [
            *record.get("starts", []),
            {
                "time": now,
                "argv": sys.argv,
                "world_size": self.ctx.world_size,
                "from_checkpoint": self.checkpoint.name if self.checkpoint else None,
            },
        ]
        self._record = record
        write_text_atomic(self._file(RUN_FILE), json.dumps(record, indent=1))

    def _keep_summary_fields(self) -> None:
        """On a continuation, keep the recipe's fields that the new process will not recompute."""
        try:
            old = json.loads((self.path / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return
        known = {f.name for f in dataclasses.fields(RunSummary)}
        self.summary.extra = {**{k: v for k, v in old.items() if k not in known}, **self.summary.extra}
        if self.summary.init_from is None:  # loaded by the first start, not again
            self.summary.init_from = old.get("init_from")

    def _file(self, name: str) -> Path:
        """``RUN_DIR/name`` after refusing a symlink there (writes never leave the run directory)."""
        target = self.path / name
        refuse_symlink(target)
        return target

    def write_summary(self) -> None:
        if self.ctx.is_main:
            write_text_atomic(self._file(SUMMARY_FILE), json.dumps(self.summary.as_json(), indent=1))

    def fit(self, trainer: Trainer, first_records: Iterable[dict[str, Any]] = ()) -> TrainResult:
        """``trainer.fit`` with ``metrics.jsonl`` (cut back to the resumed step), trackers and stop signals."""
        logger = None
        if self.ctx.is_main:
            cfg = trainer.cfg
            self.trackers = start_trackers(
                cfg.train.tracker_names,
                self.path,
                project=cfg.train.tracker_project,
                run_name=cfg.name or self.path.resolve().name,
                run_id=self.run_id,
                config=to_dict(cfg),
            )
            logger = MetricsLogger(
                self.path, trackers=self.trackers, resume_step=trainer.step if self.resuming else None
            )
            if not self.resuming:
                for record in first_records:
                    logger.log(record)
        if self.resuming and not self.quiet:
            print(f"resumed from {self.checkpoint} (step {trainer.step})")
        start = time.perf_counter()
        try:
            with self.stop.installed():
                result = trainer.fit(logger)
        finally:
            if logger is not None:
                logger.close()
        self.summary.wall_time_s = time.perf_counter() - start
        self.summary.steps, self.summary.tokens = result.steps, result.tokens
        self.summary.final_train_loss = result.final_train_loss
        if result.final_train_loss is None and self.ctx.is_main:  # continued at the last step: nothing trained here
            self.summary.final_train_loss = _logged(self.path, "train", result.steps).get("loss")
        self.summary.status = result.status
        self.summary.diverged_at = result.diverged_at
        self.summary.stopped_by = result.stopped_by
        latest = ckpt_io.latest_checkpoint(self.path) if self.ctx.is_main else None
        self.summary.checkpoint = str(latest) if latest else None
        return result

    def final_eval(self, result: TrainResult) -> dict[str, float]:
        """The evaluation of the last step: this process's, or the logged one of a run continued at its end."""
        if result.final_eval:
            return result.final_eval
        record = _logged(self.path, "eval", result.steps) if self.ctx.is_main else {}
        return {k: v for k, v in record.items() if k not in ("kind", "step", "tokens")}

    def finish(self, *, unigram_entropy: float | None = None) -> RunSummary:
        """Write the final summary and the loss plot (and hand the summary to the trackers)."""
        self.write_summary()
        self._end_trackers()
        if self.ctx.is_main:
            plot_loss(self.path, unigram_entropy)
        self.ctx.barrier()
        return self.summary

    def _end_trackers(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish(self.summary.as_json())

    def _on_error(self, err: BaseException) -> None:
        """Mark a started run ``failed`` (with the error); remove a directory created for a run that never started."""
        if not self.ctx.is_main:
            return
        if self.started and self.summary.status == "running":
            self.summary.status = "failed"
            self.summary.error = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
            with contextlib.suppress(OSError, UserError):
                self.write_summary()
        elif self._created and not self.started and self._lock is not None:
            self._lock.release()
            self._lock = None
            shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(Exception):  # a tracker's own failure must not hide the run's error
            self._end_trackers()


def _comparable(config: dict | None) -> dict | None:
    """A requested config without the settings that do not change what a run computes."""
    if config is None:
        return None
    out = json.loads(json.dumps(config))
    for section, key in RUNTIME_ONLY:
        out.get(section, {}).pop(key, None)
    return out


def _logged(run_dir: Path, kind: str, step: int) -> dict[str, Any]:
    """The ``kind`` record of ``metrics.jsonl`` at ``step`` (empty if absent)."""
    found = [r for r in read_metrics(run_dir) if r.get("kind") == kind and r.get("step") == step]
    return found[-1] if found else {}
