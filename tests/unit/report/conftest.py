"""Run directories written by hand, shaped like real ones (docs/CONTRACTS.md), for the report tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lmlab.config import RunConfig, to_dict


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_records(loss: float = 3.0, steps: int = 12, extra_train: dict | None = None) -> list[dict]:
    """Train records every step, eval records every 4 steps (per-source losses), task evaluations every 6, a DPO-style
    diagnostic every 6, and a ``data`` record logged once."""
    records: list[dict] = [{"kind": "data", "step": 0, "examples": 40, "truncated": 2}]
    for step in range(1, steps + 1):
        records.append(
            {
                "kind": "train",
                "step": step,
                "tokens": step * 128,
                "loss": loss + 2.0 / step,
                "lr": 1e-3 * min(1.0, step / 3),
                "grad_norm": 1.0 + 0.1 * math.sin(step),
                "goldfish_dropped": 0.25,
                "tokens_per_s": 5000.0 + step,
                "time": 0.01 * step,
                **(extra_train or {}),
            }
        )
        if step % 4 == 0:
            records.append(
                {
                    "kind": "eval",
                    "step": step,
                    "tokens": step * 128,
                    "val_loss": loss + 1.0 / step,
                    "val_ppl": math.exp(loss + 1.0 / step),
                    "val_loss/<wiki>": loss + 0.1,
                    "val_loss/code": loss + 0.2,
                }
            )
        if step % 6 == 0:
            records.append(
                {
                    "kind": "task_eval",
                    "step": step,
                    "tokens": step * 128,
                    "arith/acc": 0.1 * step / 6,
                    "arith/exact_match": 0.05 * step / 6,
                    "copy/acc": 0.5,
                    "eval_seconds": 0.4,
                    "eval_cost_pct": 3.5,
                }
            )
            records.append({"kind": "diagnostic", "step": step, "grad_cos": 0.3, "probe_logps/chosen": -20.0})
    return records


def make_run(
    path: Path,
    *,
    loss: float = 3.0,
    status: str = "finished",
    config_changes: dict | None = None,
    records: list[dict] | None = None,
) -> Path:
    """A complete run directory: config.yaml (defaults + ``config_changes``, dotted keys), run.json, env.json,
    metrics.jsonl, a DPO-like summary.json with nested dicts, samples.txt, samples.jsonl and a harness result file."""
    path.mkdir(parents=True)
    config = to_dict(RunConfig())
    for dotted, value in (config_changes or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_jsonl(path / "metrics.jsonl", fake_records(loss) if records is None else records)
    summary = {
        "kind": "align",
        "status": status,
        "steps": 12,
        "tokens": 1536,
        "params": 12345,
        "non_embedding_params": 1000,
        "flops": 1.5e11,
        "final_val_loss": loss if math.isfinite(loss) else None,
        "init_from": {"path": "/runs/base", "checkpoint": "/runs/base/checkpoints/step_0000100", "step": 100},
        "final_eval": {"val_margin": 0.4972, "val_rewards/chosen": -0.0416},
        "train_data": {"pairs": 40, "truncated": 0},
        "kl_to_reference": 0.0831,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    run = {
        "kind": "align",
        "run_id": "326222624b76",
        "created": "2026-12-02 07:43:54",
        "lmlab_version": "0.1.0",
        "requested_config": config,
        "starts": [{"time": "2026-12-02 07:43:54", "argv": ["lmlab", "align", "a.yaml"], "world_size": 1}],
    }
    (path / "run.json").write_text(json.dumps(run))
    env = {"python": "3.11.7", "torch": "2.13.0+cpu", "host": "vm", "device": "cpu", "world_size": 1}
    (path / "env.json").write_text(json.dumps(env))
    (path / "samples.txt").write_text("Once upon a time <b>bold</b>")
    write_jsonl(
        path / "samples.jsonl",
        [{"prompt": "Question: 3 plus 2?", "completion": " 5 <i>", "tokens": 2, "policy_logp": -3.5}],
    )
    (path / "evals").mkdir()
    harness = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.2512, "acc_stderr,none": 0.0043, "acc_norm,none": 0.26},
            "arc_easy": {"acc,none": 0.4321, "acc_stderr,none": "N/A"},
        }
    }
    (path / "evals" / "harness-0-shot.json").write_text(json.dumps(harness))
    return path


@pytest.fixture(scope="session")
def run_writer():
    """:func:`make_run` itself, for fixtures of a wider scope than ``run_factory``."""
    return make_run


@pytest.fixture
def run_factory(tmp_path):
    def factory(name: str = "run", **kwargs) -> Path:
        return make_run(tmp_path / name, **kwargs)

    return factory


@pytest.fixture
def records_factory():
    return fake_records
