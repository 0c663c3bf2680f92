"""Downstream tasks during training (``train.evals``): a loop callback that runs lm-eval tasks on the live model.

Every ``every`` steps (and after the last step) each configured task runs through ``LmlabLM.from_model`` on the
model being trained, on every rank: lm-eval deals each rank a shard of the documents and the metrics are gathered
to rank 0 (``lmlab.eval.harness``), so under FSDP the forward passes stay collective. Rank 0 logs one record per
evaluation, ``{"kind": "task_eval", "step", "tokens", "<task>/<metric>": value, ..., "eval_seconds",
"eval_cost_pct"}``, to ``metrics.jsonl`` and the trackers; ``eval_cost_pct`` is the evaluation time so far as a
percentage of the training time so far, the price of watching these metrics.

Tasks are built once, at the start of training (loading a dataset and indexing lm-eval's tasks takes seconds);
each evaluation reuses them.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from lmlab.config import EvalTaskConfig
from lmlab.errors import ConfigError
from lmlab.train.callbacks import Callback
from lmlab.train.runtime import autocast_context

if TYPE_CHECKING:
    from lmlab.train.loop import Trainer, TrainResult

# lm-eval's bookkeeping entries of a task's results, not metrics
_NOT_METRICS = ("alias", "name", "sample_len", "sample_count")
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples at every evaluation


class TaskEvals(Callback):
    """Runs ``evals`` (``EvalTaskConfig``) on the trained model at their cadence; see the module docstring."""

    def __init__(self, evals: list[EvalTaskConfig], tokenizer: Any, max_length: int, default_every: int) -> None:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError("train.evals needs lm-evaluation-harness: pip install 'lmlab[eval]'") from None
        from lmlab.eval.harness import TASKS_DIR

        self.evals = evals
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.default_every = default_every
        paths = list(dict.fromkeys([str(TASKS_DIR)] + [p for e in evals for p in e.include_path]))
        # the metadata reaches a task only through its manager: one manager per distinct metadata
        self._managers: dict[str, Any] = {}
        for e in evals:
            key = json.dumps(e.metadata, sort_keys=True)
            if key not in self._managers:
                self._managers[key] = TaskManager(include_path=paths, metadata=dict(e.metadata))
        known = next(iter(self._managers.values())).all_tasks
        unknown = [e.task for e in evals if e.task not in known]
        if unknown:
            raise ConfigError(
                f"train.evals: unknown lm-eval task(s) {', '.join(unknown)}; add their directory with include_path"
            )
        self._tasks: dict[int, dict] = {}
        self.eval_seconds = 0.0
        self._fit_start = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        for i, e in enumerate(self.evals):
            loaded = self._managers[json.dumps(e.metadata, sort_keys=True)].load([e.task])
            for task in loaded["tasks"].values():
                if e.num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=e.num_fewshot)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            self._tasks[i] = loaded
        self._fit_start = time.perf_counter()
        self.eval_seconds = 0.0

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        last = trainer.step == trainer.cfg.train.steps
        due = [i for i, e in enumerate(self.evals) if last or trainer.step % (e.every or self.default_every) == 0]
        if due:
            self.run(trainer, due)

    def run(self, trainer: Trainer, which: list[int]) -> dict[str, float]:
        """Evaluate tasks ``which`` now; rank 0 emits (and returns) the record."""
        from lm_eval.evaluator import evaluate

        from lmlab.eval.harness import LmlabLM

        started = time.perf_counter()
        record: dict[str, Any] = {"kind": "task_eval", "step": trainer.step, "tokens": trainer.tokens}
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast_context(trainer.device, trainer.cfg.train.precision):
                for i in which:
                    e = self.evals[i]
                    lm = LmlabLM.from_model(model, self.tokenizer, self.max_length, batch_size=e.batch_size)
                    out = evaluate(
                        lm=lm, task_dict=self._tasks[i], limit=e.limit, bootstrap_iters=0, verbosity="WARNING"
                    )
                    if out is not None:  # rank 0
                        record.update(_flatten(out["results"]))
        finally:
            model.train(was_training)
        spent = time.perf_counter() - started
        self.eval_seconds += spent
        training = max(time.perf_counter() - self._fit_start - self.eval_seconds, 1e-9)
        record.update(eval_seconds=spent, eval_cost_pct=100.0 * self.eval_seconds / training)
        if trainer.is_main():
            trainer.emit(record)
        return record

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        self._tasks.clear()


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": v, "acc_stderr,none": e}}`` -> ``{"task/acc": v, "task/acc_stderr": e}``
    (the filter name is kept when it is not ``none``); only finite numbers."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}[{filt}]"
            if math.isfinite(value):
                flat[name] = float(value)
    return flat


def task_evals(cfg, tokenizer) -> TaskEvals | None:
    """The callback for ``cfg.train.evals`` (None when there are none)."""
    if not cfg.train.evals:
        return None
    if tokenizer is None:
        raise ConfigError("train.evals needs a run with a text tokenizer")
    return TaskEvals(cfg.train.evals, tokenizer, cfg.model.max_seq_len, cfg.train.eval_every)
