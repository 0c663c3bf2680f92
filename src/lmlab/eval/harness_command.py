"""``lmlab eval harness RUN --tasks T1,T2``: lm-evaluation-harness tasks on a run, with lm-eval's own output files.

The flags mirror ``lm_eval``'s (``--tasks``, ``--include-path``, ``--limit``, ``--num-fewshot``, ``--output-path``,
``--log-samples``, ``--apply-chat-template``, ``--metadata``, ``--seed``); results and samples are written by
lm-eval's ``EvaluationTracker``, so they are the files ``lm_eval`` itself writes (under ``RUN/evals`` unless
``--output-path`` says otherwise). The synthetic worlds' tasks (``lmlab_*``, ``lmlab/eval/tasks``) are always on the
include path. Everything is local: a task that needs the Hub fails under ``HF_HUB_OFFLINE=1`` with lm-eval's error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.errors import UserError
from lmlab.eval.commands import require


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmlab eval harness",
        description="Run lm-evaluation-harness tasks on a run (its latest checkpoint, or a checkpoint directory).",
    )
    p.add_argument("run_dir", nargs="?", help="run directory or checkpoint directory")
    p.add_argument("--tasks", help="comma-separated task or group names (lmlab_* tasks are built in)")
    p.add_argument("--include-path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-path", help="lm-eval's results/samples directory (default RUN/evals)")
    p.add_argument("--log-samples", action="store_true", help="also write every document's requests and scores")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the run's chat template")
    p.add_argument(
        "--no-bos", action="store_true", help="no document-start token before each context (as lm-eval's hf)"
    )
    p.add_argument("--metadata", default="{}", help="JSON passed to the tasks, e.g. '{\"seed\": 3}' (a world's seed)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seed for few-shot sampling and generation")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in lmlab_* tasks and their directory")
    p.add_argument(
        "--tasks-dir", action="store_true", help="print the built-in tasks' directory (for lm_eval --include_path)"
    )
    return p


def harness_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table, sanitize_model_name
    except ImportError:
        raise UserError("lmlab eval harness needs lm-evaluation-harness: pip install 'lmlab[eval]'") from None
    from lmlab.eval.harness import TASKS_DIR, LmlabLM

    if args.tasks_dir:
        print(TASKS_DIR)
        return 0
    if args.list_tasks:
        names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        print(json.dumps({"tasks_dir": str(TASKS_DIR), "tasks": names}, indent=1))
        return 0
    if not args.run_dir or not args.tasks:
        raise UserError("give a run directory and --tasks T1,T2 (see --list-tasks for the built-in ones)")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    if args.limit is not None:
        require(args.limit > 0, "--limit", args.limit, "> 0")
    if args.num_fewshot is not None:
        require(args.num_fewshot >= 0, "--num-fewshot", args.num_fewshot, ">= 0")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: not a directory")
    try:
        metadata = json.loads(args.metadata)
    except json.JSONDecodeError as err:
        raise UserError(f"--metadata is not valid JSON: {err}") from None
    if not isinstance(metadata, dict):
        raise UserError("--metadata must be a JSON object")

    manager = TaskManager(include_path=[str(TASKS_DIR), *args.include_path], metadata=metadata)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)}; add their directory with --include-path")
    lm = LmlabLM(run=args.run_dir, device=args.device, batch_size=args.batch_size, add_bos_token=not args.no_bos)
    output = Path(args.output_path) if args.output_path else _default_output(args.run_dir)
    tracker = EvaluationTracker(output_path=str(output))
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        task_manager=manager,
        evaluation_tracker=tracker,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        metadata=metadata,
    )
    samples = results.pop("samples", None)
    # lm-eval names the output folder after model_args' pretrained=...; an LM object has none: name it after the run
    run_name = f"lmlab__{Path(args.run_dir).resolve().name}"
    tracker.general_config_tracker.model_name = run_name
    tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(run_name)
    results["config"]["model"] = "lmlab"
    results["config"]["model_args"] = f"run={args.run_dir}"
    tracker.save_results_aggregated(results=results, samples=samples)
    if args.log_samples and samples:
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=samples[name])
    print(make_table(results))
    print(f"wrote lm-eval results under {output}")
    return 0


def _default_output(run_dir: str) -> Path:
    path = Path(run_dir)
    root = path.parent.parent if path.parent.name == "checkpoints" else path
    return root / "evals"
