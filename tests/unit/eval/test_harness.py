"""lm-evaluation-harness on lmlab runs: parity with ``lm_eval --model hf`` on the exported model, the CLI, the
built-in world tasks, and lm-eval's own CLI with ``--model lmlab``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab.cli import main as lmlab_main  # noqa: E402
from lmlab.eval.harness import TASKS_DIR, LmlabLM  # noqa: E402
from lmlab.eval.world_tasks import facts_items, preference_items, stories_items  # noqa: E402
from lmlab.recipes.pretrain import run_pretraining  # noqa: E402

from helpers import tiny_config  # noqa: E402

META = {"n_people": 300}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness") / "run"
    cfg = tiny_config(
        "data.synthetic.world=facts", "data.synthetic.n_docs=300", "tokenizer.vocab_size=400", "train.steps=30"
    )
    run_pretraining(cfg, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert lmlab_main(["export-hf", str(run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return TaskManager(include_path=[str(TASKS_DIR)], metadata=META)  # indexing lm-eval's tasks takes seconds: once


def _evaluate(manager, model, tasks, limit, **kwargs):
    return simple_evaluate(model=model, tasks=tasks, limit=limit, log_samples=True, task_manager=manager, **kwargs)


def _responses(results, task):
    return [r["resps"] for r in results["samples"][task]]


def test_parity_with_lm_eval_hf_on_the_exported_model(run, exported, manager):
    """Same per-choice log-likelihoods (1e-4), same accuracy, same rolling log-likelihoods and greedy answers,
    with both models' defaults: the exported tokenizer puts lmlab's document prefix (EOS) in front of every
    context, as lmlab does. lm-eval's hf model is told the prefix token of empty contexts (it would take the
    tokenizer's BOS otherwise); for rolling windows, which start with that token, it adds no special tokens."""
    tasks = ["lmlab_facts_mc", "lmlab_facts_qa"]
    ours_lm = LmlabLM(run=str(run), batch_size=4)
    hf_args = f"pretrained={exported},dtype=float32,prefix_token_id={ours_lm.eot_token_id}"
    hf = _evaluate(manager, "hf", tasks, 12, model_args=hf_args, device="cpu", batch_size=4)
    ours = _evaluate(manager, ours_lm, [*tasks, "lmlab_stories_ppl"], 12)
    hf_rolling = _evaluate(
        manager, "hf", ["lmlab_stories_ppl"], 12, model_args=f"{hf_args},add_bos_token=False", device="cpu"
    )

    ref, got = _responses(hf, "lmlab_facts_mc"), _responses(ours, "lmlab_facts_mc")
    assert len(ref) == 12 and all(len(choices) == 4 for choices in ref)
    for ref_doc, got_doc in zip(ref, got):
        for (ref_ll, ref_greedy), (got_ll, got_greedy) in [(r[0], g[0]) for r, g in zip(ref_doc, got_doc)]:
            assert got_ll == pytest.approx(ref_ll, abs=1e-4)
            assert got_greedy == ref_greedy
    assert ours["results"]["lmlab_facts_mc"]["acc,none"] == hf["results"]["lmlab_facts_mc"]["acc,none"]
    assert ours["results"]["lmlab_facts_mc"]["acc_norm,none"] == hf["results"]["lmlab_facts_mc"]["acc_norm,none"]

    # whole stories are longer than the 64-token context: several rolling windows each
    for ref_doc, got_doc in zip(_responses(hf_rolling, "lmlab_stories_ppl"), _responses(ours, "lmlab_stories_ppl")):
        assert got_doc[0][0] == pytest.approx(ref_doc[0][0], abs=1e-3)
    assert _responses(ours, "lmlab_facts_qa") == _responses(hf, "lmlab_facts_qa")


def test_document_start_prefix_changes_the_scores(run, manager):
    """By default every context follows EOS, as lmlab's training documents do; the scores then differ."""
    with_prefix = _evaluate(manager, LmlabLM(run=str(run)), ["lmlab_facts_mc"], 4)
    without = _evaluate(manager, LmlabLM(run=str(run), add_bos_token=False), ["lmlab_facts_mc"], 4)
    a = [c[0][0] for doc in _responses(with_prefix, "lmlab_facts_mc") for c in doc]
    b = [c[0][0] for doc in _responses(without, "lmlab_facts_mc") for c in doc]
    assert all(x != pytest.approx(y, abs=1e-4) for x, y in zip(a, b))


def test_batch_size_does_not_change_scores_or_generations(run, manager):
    one = _evaluate(manager, LmlabLM(run=str(run), batch_size=1), ["lmlab_preferences_judge", "lmlab_facts_qa"], 6)
    many = _evaluate(manager, LmlabLM(run=str(run), batch_size=5), ["lmlab_preferences_judge", "lmlab_facts_qa"], 6)
    for x, y in zip(_responses(one, "lmlab_preferences_judge"), _responses(many, "lmlab_preferences_judge")):
        assert [c[0][0] for c in x] == pytest.approx([c[0][0] for c in y], abs=1e-4)
    assert _responses(one, "lmlab_facts_qa") == _responses(many, "lmlab_facts_qa")


def test_cli_writes_lm_evals_results_and_samples(run, tmp_path, capsys):
    out = tmp_path / "evals"
    code = lmlab_main(
        ["eval", "harness", str(run), "--tasks", "lmlab_facts_mc,lmlab_stories_cloze", "--limit", "5"]
        + ["--metadata", json.dumps(META), "--output-path", str(out), "--log-samples"]
    )
    assert code == 0
    assert "lmlab_facts_mc" in capsys.readouterr().out
    (results,) = out.glob("lmlab__run/results_*.json")
    data = json.loads(results.read_text())
    assert set(data["results"]) == {"lmlab_facts_mc", "lmlab_stories_cloze"}
    assert 0.0 <= data["results"]["lmlab_facts_mc"]["acc,none"] <= 1.0
    samples = sorted(p.name.split("_2")[0] for p in out.glob("lmlab__run/samples_*.jsonl"))
    assert samples == ["samples_lmlab_facts_mc", "samples_lmlab_stories_cloze"]
    rows = [json.loads(line) for line in next(out.glob("lmlab__run/samples_lmlab_facts_mc_*.jsonl")).open()]
    assert len(rows) == 5 and len(rows[0]["resps"]) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
        (["--tasks", "lmlab_facts_mc", "--limit", "0"], "--limit must be > 0"),
        (["--tasks", "lmlab_facts_mc", "--include-path", "/no/such/dir"], "not a directory"),
        (["--tasks", "lmlab_facts_mc", "--metadata", "{oops"], "--metadata is not valid JSON"),
    ],
    ids=["unknown-task", "zero-limit", "missing-include", "bad-metadata"],
)
def test_cli_bad_input_is_one_line(run, capsys, argv, message):
    assert lmlab_main(["eval", "harness", str(run), *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_lm_eval_cli_with_model_lmlab(run, tmp_path):
    """lm-eval's own command line, with lmlab's model registered (python -m lmlab.eval.lm_eval_cli)."""
    cmd = [sys.executable, "-m", "lmlab.eval.lm_eval_cli", "run", "--model", "lmlab", "--model_args", f"run={run}"]
    cmd += ["--tasks", "lmlab_preferences_judge", "--include_path", str(TASKS_DIR), "--limit", "4"]
    cmd += ["--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lmlab_preferences_judge" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_world_task_items_are_well_formed():
    facts = facts_items(seed=0, n_people=200)
    assert facts and all(
        len(r["choices"]) == 4 and r["choices"][r["gold"]].startswith(" " + r["answer"]) for r in facts
    )
    assert all(r["context"] and not r["context"].endswith(" ") for r in facts)
    assert facts == facts_items(seed=0, n_people=200)  # a pure function of its arguments
    golds = {r["gold"] for r in facts}
    assert golds == {0, 1, 2, 3}  # the truth is not always in one place
    stories = stories_items(n=20)
    assert all(r["target"].startswith(" ") and " " not in r["target"][1:] for r in stories)
    pairs = preference_items(n=40)
    assert {r["gold"] for r in pairs} == {0, 1} and all(r["choices"][0] != r["choices"][1] for r in pairs)


def test_apply_chat_template_renders_prompts_with_the_runs_template(run, tmp_path):
    out = tmp_path / "chat"
    argv = ["eval", "harness", str(run), "--tasks", "lmlab_facts_qa", "--limit", "2", "--apply-chat-template"]
    assert lmlab_main(argv + ["--metadata", json.dumps(META), "--output-path", str(out), "--log-samples"]) == 0
    rows = [json.loads(line) for line in next(out.glob("*/samples_lmlab_facts_qa_*.jsonl")).open()]
    prompt = rows[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|user|>Question: ") and prompt.endswith("<|end|><|assistant|>")


def test_cli_parity_lmlab_eval_harness_vs_lm_eval_hf(run, exported, tmp_path):
    """The issue's check, through both command lines: ``lmlab eval harness`` on the run and ``lm_eval --model hf`` on
    its export write the same per-choice log-likelihoods (1e-4) and the same accuracy in their samples files, each
    with its defaults (the export's tokenizer adds lmlab's document prefix, as ``lmlab eval harness`` does)."""
    eos = LmlabLM(run=str(run)).eot_token_id
    hf_out, ours_out = tmp_path / "hf", tmp_path / "ours"
    lm_eval = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--device", "cpu", "--limit", "12"]
    lm_eval += ["--model_args", f"pretrained={exported},dtype=float32,prefix_token_id={eos}"]
    lm_eval += ["--tasks", "lmlab_facts_mc", "--include_path", str(TASKS_DIR), "--log_samples"]
    lm_eval += ["--output_path", str(hf_out), "--metadata", json.dumps(META)]
    proc = subprocess.run(lm_eval, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    argv = ["eval", "harness", str(run), "--tasks", "lmlab_facts_mc", "--limit", "12", "--log-samples"]
    assert lmlab_main(argv + ["--output-path", str(ours_out), "--metadata", json.dumps(META)]) == 0

    def samples(root):
        (path,) = root.glob("*/samples_lmlab_facts_mc_*.jsonl")
        return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}

    def accuracy(root):
        (path,) = root.glob("*/results_*.json")
        return json.loads(path.read_text())["results"]["lmlab_facts_mc"]["acc,none"]

    ref, got = samples(hf_out), samples(ours_out)
    assert sorted(ref) == sorted(got) == list(range(12))
    for doc_id, row in ref.items():
        ref_ll = [float(choice[0][0]) for choice in row["resps"]]
        got_ll = [float(choice[0][0]) for choice in got[doc_id]["resps"]]
        assert got_ll == pytest.approx(ref_ll, abs=1e-4)
        assert got[doc_id]["acc"] == row["acc"]
    assert accuracy(ours_out) == accuracy(hf_out)


def test_facts_pass_at_k_scores_the_repeats_with_the_unbiased_estimator():
    from lmlab.eval.world_tasks import facts_pass_at_k

    doc = {"answer": "Kraimbemholm"}
    replies = [" X was born in Kraimbemholm.", " Nowhere.", " Brimsex.", " Bay."]
    # n = 4, c = 1: pass@1 = 1/4, pass@4 = 1; pass@16 needs 16 samples and is left out
    assert facts_pass_at_k(doc, [replies]) == {"pass@1": pytest.approx(0.25), "pass@4": 1.0}


def test_pass_at_k_task_samples_every_question_sixteen_times(run, tmp_path):
    out = tmp_path / "passk"
    argv = ["eval", "harness", str(run), "--tasks", "lmlab_facts_qa_passk", "--limit", "2", "--log-samples"]
    assert lmlab_main(argv + ["--metadata", json.dumps(META), "--output-path", str(out)]) == 0
    rows = [json.loads(line) for line in next(out.glob("*/samples_lmlab_facts_qa_passk_*.jsonl")).open()]
    assert [len(r["filtered_resps"][0]) for r in rows] == [16, 16]  # one request, its 16 sampled answers
    (results,) = out.glob("*/results_*.json")
    metrics = json.loads(results.read_text())["results"]["lmlab_facts_qa_passk"]
    assert {"pass@1,none", "pass@4,none", "pass@16,none"} <= set(metrics)


def test_sampled_generation_is_seeded_and_leaves_the_global_rng_alone(run, manager):
    """As in-loop evaluation runs it (lm-eval's evaluate, which seeds nothing): the samples come from the model's
    own generator, so they repeat, and the training's global random state is not touched."""
    import torch
    from lm_eval.evaluator import evaluate

    def sampled(lm, tasks):
        out = evaluate(lm, tasks, limit=2)
        return [r["filtered_resps"] for r in out["samples"]["lmlab_facts_qa_passk"]]

    # built first: loading a run builds (initialises) a model, which draws from the global generator
    lms = [LmlabLM(run=str(run), seed=3) for _ in range(2)]
    tasks = [manager.load(["lmlab_facts_qa_passk"]) for _ in range(2)]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = sampled(lms[0], tasks[0])
    assert torch.equal(torch.rand(3), expected)
    assert sampled(lms[1], tasks[1]) == first
    assert len(set(first[0][0])) > 1  # 16 samples, not 16 copies
