"""Pairwise judging: position-swap combination, win rates with Wilson intervals, Bradley-Terry, judges, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from lmlab.cli import main
from lmlab.config import load_config, save_config
from lmlab.data.synthetic.preference_world import PreferenceWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError
from lmlab.eval.judges import COMPARISON_TEMPLATE, LMJudge, ScoreJudge, load_judge, preference_score
from lmlab.eval.pairwise import (
    bradley_terry,
    combine_orders,
    comparison_design,
    position_bias,
    wilson_interval,
    win_matrix,
    win_rate,
)
from lmlab.models.decoder import Decoder
from lmlab.models.generation import generate
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.pretrained import load_model

Z95 = 1.959963984540054  # Φ⁻¹(0.975)

# --------------------------------------------------------------------------- position swap


@pytest.mark.parametrize(
    "p_ab, p_ba, p_a, outcome, consistent",
    [
        (1.0, 0.0, 1.0, 1.0, True),  # a wins shown first and shown second
        (0.0, 1.0, 0.0, 0.0, True),  # b wins in both orders
        (1.0, 1.0, 0.5, 0.5, False),  # the first position always wins: a tie, not a win for a
        (0.0, 0.0, 0.5, 0.5, False),  # the second position always wins
        (0.5, 0.5, 0.5, 0.5, True),  # a tie in both orders
        (1.0, 0.5, 0.75, 0.5, False),  # a win and a tie: not a win in both orders
        (0.8, 0.4, 0.7, 1.0, True),  # probabilities: a preferred in both orders
        (0.7, 0.6, 0.55, 0.5, False),  # each order prefers its first answer
    ],
)
def test_combine_orders(p_ab, p_ba, p_a, outcome, consistent):
    v = combine_orders(p_ab, p_ba)
    assert v.p_a == pytest.approx(p_a)
    assert v.outcome == outcome
    assert v.consistent is consistent


def test_combine_orders_refuses_non_probabilities():
    with pytest.raises(ValueError, match="p_ba"):
        combine_orders(0.5, 1.5)


def test_position_bias_hand_computed():
    # verdicts (first position's P): 1,1 | 1,0 | .5,.5 | 1,1  ->  first won 5 of 8, second 1, ties 2
    bias = position_bias([(1.0, 1.0), (1.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
    assert (bias.first_wins, bias.second_wins, bias.ties) == (5 / 8, 1 / 8, 2 / 8)
    assert bias.mean_p_first == pytest.approx(6 / 8)
    assert bias.consistency == 0.5  # (1,0) and (.5,.5) agree across orders; (1,1) twice does not
    assert bias.n_pairs == 4


# --------------------------------------------------------------------------- win rate


def test_wilson_interval_hand_computed():
    # p̂ = 0.8, n = 10, z² = 3.841459: centre = (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half = 1.959964 · sqrt(0.016 + 0.009604) / 1.384146 = 0.226578  ->  (0.490162, 0.943318)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-6)
    assert high == pytest.approx(0.943318, abs=1e-6)
    # no successes: the lower end is 0 and the upper z² / (n + z²) = 3.841459 / 13.841459
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(Z95**2 / (10 + Z95**2))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_half():
    wr = win_rate([1.0] * 7 + [0.5] * 2 + [0.0])
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (7, 2, 1, 10)
    assert wr.rate == pytest.approx(0.8)  # (7 + 2/2) / 10
    assert (wr.low, wr.high) == pytest.approx(wilson_interval(8, 10))


def test_win_matrix_hand_computed():
    rates, counts = win_matrix(3, [(0, 1, 1.0), (0, 1, 0.5), (1, 2, 0.0)])
    assert rates[0, 1] == 0.75 and rates[1, 0] == 0.25
    assert rates[2, 1] == 1.0 and counts[1, 2] == 1
    assert math.isnan(rates[0, 2]) and counts[0, 2] == 0


# --------------------------------------------------------------------------- design


def test_comparison_design_all_pairs_by_default():
    design = comparison_design(4, 3)
    assert len(design) == 3 * 6
    assert {(i, j) for p, i, j in design if p == 2} == {(i, j) for i in range(4) for j in range(i + 1, 4)}


def test_comparison_design_balanced_incomplete():
    design = comparison_design(5, 40, pairs_per_prompt=2, seed=3)
    assert len(design) == 80
    per_prompt = {}
    for p, i, j in design:
        assert i < j
        per_prompt.setdefault(p, set()).add((i, j))
    assert all(len(pairs) == 2 for pairs in per_prompt.values())  # two different pairs per prompt
    met = [sum((i, j) == pair for _, i, j in design) for pair in {(i, j) for _, i, j in design}]
    assert len(met) == 10 and max(met) - min(met) <= 1  # every pair, about equally often
    subset = comparison_design(5, 40, pairs_per_prompt=2, comparisons=25, seed=3)
    assert len(subset) == 25 and set(subset) <= set(design)


# --------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_two_players_closed_form():
    # player 1 beats player 0 7 times and loses 3: θ1 - θ0 = log(7/3), variance 1/7 + 1/3
    bt = bradley_terry(2, [(1, 0, 1.0)] * 7 + [(0, 1, 1.0)] * 3, prior=0.0)
    se = math.sqrt(1 / 7 + 1 / 3)
    assert bt.scores[0] == 0.0
    assert bt.scores[1] == pytest.approx(math.log(7 / 3), abs=1e-8)
    assert bt.stderr[1] == pytest.approx(se, rel=1e-6)
    assert bt.low[1] == pytest.approx(math.log(7 / 3) - Z95 * se, rel=1e-6)
    assert bt.high[1] == pytest.approx(math.log(7 / 3) + Z95 * se, rel=1e-6)
    assert list(bt.ranks) == [2, 1]
    # ties are half wins: 6 wins, 2 ties, 2 losses score like 7 wins and 3 losses
    tied = bradley_terry(2, [(1, 0, 1.0)] * 6 + [(1, 0, 0.5)] * 2 + [(0, 1, 1.0)] * 2, prior=0.0)
    assert tied.scores[1] == pytest.approx(bt.scores[1], abs=1e-8)


def test_bradley_terry_prior_keeps_an_unbeaten_player_finite():
    comparisons = [(1, 0, 1.0)] * 5  # player 1 never lost
    with pytest.raises(ValueError, match="prior > 0"):
        bradley_terry(2, comparisons, prior=0.0)
    bt = bradley_terry(2, comparisons, prior=1.0)
    assert np.all(np.isfinite(bt.scores)) and np.all(np.isfinite(bt.stderr))
    assert bt.scores[1] > 0 and bt.ranks[1] == 1


def test_bradley_terry_solves_its_score_equations():
    # at the MAP estimate each player's expected score equals its observed score, virtual games included
    rng = np.random.default_rng(0)
    comps = [(int(i), int(j), float(rng.choice([0.0, 0.5, 1.0]))) for i, j in rng.integers(0, 4, (60, 2)) if i != j]
    prior = 2.0
    bt = bradley_terry(4, comps, prior=prior)
    wins, counts = np.zeros(4), np.zeros((4, 4))
    for i, j, s in comps:
        wins[i] += s
        wins[j] += 1 - s
        counts[i, j] += 1
        counts[j, i] += 1

    def residual(log_scale: float) -> np.ndarray:
        g = np.exp(bt.scores + log_scale)
        expected = (counts * g[:, None] / (g[:, None] + g[None, :])).sum(axis=1) + prior * g / (g + 1)
        return wins + prior / 2 - expected

    # scores are relative to player 0; the virtual player (strength 1) fixes the absolute scale
    scale = brentq(lambda s: residual(s).sum(), -20, 20)
    assert np.abs(residual(scale)).max() < 1e-6


def test_bradley_terry_recovers_the_ranking_of_five_players():
    # log-strengths 0.75 apart (ranks 3, 1, 5, 2, 4); 300 comparisons, two of the ten pairs per prompt
    true = np.array([1.5, 3.0, 0.0, 2.25, 0.75])
    target = true - true[0]
    covered = []
    for seed in range(10):
        design = comparison_design(5, 150, pairs_per_prompt=2, seed=seed)
        rng = np.random.default_rng(seed)
        comps = [(i, j, float(rng.random() < 1 / (1 + math.exp(true[j] - true[i])))) for _, i, j in design]
        bt = bradley_terry(5, comps, prior=1.0)
        assert list(bt.ranks) == [3, 1, 5, 2, 4], seed
        assert np.abs(bt.scores - target).max() < 0.8
        covered += list((bt.low <= target) & (target <= bt.high))[1:]
    assert np.mean(covered) >= 0.85  # 95% intervals (0.96 over 50 seeds)


# --------------------------------------------------------------------------- judges

QUESTION = "Question: What is 3 plus 4?\nAnswer:"
PADDED = " Well, that is a good question. The answer is 7. I hope this helps!"


def test_preferences_judge_ranks_correct_then_concise():
    judge = load_judge("preferences")
    assert judge(QUESTION, " 7.", " 8.") == 1.0  # correct beats wrong
    assert judge(QUESTION, " 8.", " 7.") == 0.0
    assert judge(QUESTION, " 7.", PADDED) == 1.0  # concise beats padded
    assert judge(QUESTION, PADDED, " 8.") == 1.0  # padded but correct beats wrong
    assert judge(QUESTION, " 7.", " 7.") == 0.5
    # on the world's own pairs the chosen answer always wins, in both orders
    for pair in PreferenceWorld().pairs(0, 20, "test"):
        v = combine_orders(
            judge(pair["prompt"], pair["chosen"], pair["rejected"]),
            judge(pair["prompt"], pair["rejected"], pair["chosen"]),
        )
        assert v.outcome == 1.0


def test_module_function_judge_and_errors():
    judge = load_judge("lmlab.eval.judges:preference_score")
    assert isinstance(judge, ScoreJudge) and judge.score is preference_score
    assert judge(QUESTION, " 7.", " 8.") == 1.0
    with pytest.raises(UserError, match="cannot import"):
        load_judge("no_such_module_xyz:score")
    with pytest.raises(UserError, match="no function"):
        load_judge("math:no_such_function")
    with pytest.raises(UserError, match="not a run directory"):
        load_judge("no-such-judge")


MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=96", "train.seq_len=64"]


@pytest.fixture(scope="module")
def world_tokenizer() -> TextTokenizer:
    return TextTokenizer.train_bpe(list(PreferenceWorld().documents(0, 300)), vocab_size=320)


def make_run(run_dir: Path, tokenizer: TextTokenizer, seed: int) -> Path:
    """An untrained tiny run directory (config, tokenizer, one checkpoint)."""
    cfg = load_config(None, [*MODEL, f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(seed)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 0, Decoder(cfg.model), model_cfg=cfg.model)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("pairwise_runs")
    return [make_run(root / f"run{k}", world_tokenizer, seed=k) for k in range(2)]


def test_lm_judge_is_the_softmax_of_the_choice_logprobs(runs):
    judge = load_judge(str(runs[0]))
    assert isinstance(judge, LMJudge)
    text = judge.render(QUESTION, " 7.", PADDED)
    assert text == COMPARISON_TEMPLATE.replace("{prompt}", QUESTION).replace("{answer_a}", "7.").replace(
        "{answer_b}", PADDED.strip()
    )
    # the batched, padded forward equals one unpadded forward per choice
    model, _, tok = load_model(runs[0])
    context = [tok.eos_id, *tok.encode(text)]
    logps = []
    for choice in (" A", " B"):
        ids = context + tok.encode(choice)
        with torch.no_grad():
            lp = model(torch.tensor([ids])).log_softmax(-1)[0]
        logps.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(context), len(ids))))
    expected = 1 / (1 + math.exp(logps[1] - logps[0]))
    p = judge(QUESTION, " 7.", PADDED)
    assert 0.0 < p < 1.0
    assert p == pytest.approx(expected, abs=1e-5)
    assert judge.truncated == 0
    judge(QUESTION * 20, " 7.", " 8.")  # longer than the 96-token context: cut from the left
    assert judge.truncated == 1


# --------------------------------------------------------------------------- the command


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [
    "Question: What is 3 plus 4?\nAnswer:",
    "Question: Which is larger, 12 or 7?\nAnswer:",
    "Question: What colour is grass?\nAnswer:",
    "Question: What is 1 plus 1?\nAnswer:",
]
CONCISE = [" 7.", " 12.", " green.", " 2."]
PADDED_ALL = [PADDED, " Sure, I can help with that. The answer is 12.", " green.", " 3."]
WRONG = [" 8.", " 7.", " blue.", " 3."]


def compare(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["eval", "compare", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_cli_win_rate_from_generations_files(tmp_path, capsys):
    concise = write_jsonl(tmp_path / "c.jsonl", [{"prompt": p, "response": a} for p, a in zip(PROMPTS, CONCISE)])
    padded = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, PADDED_ALL)])
    out = tmp_path / "rows.jsonl"
    code, summary, _ = compare(
        capsys, "--generations", f"concise={concise}", "--generations", f"padded={padded}", "--judge", "preferences",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    # concise wins prompts 1, 2 (shorter) and 4 (correct); prompt 3 is the same answer: 3 wins, 1 tie
    wr = summary["win_rate"]
    assert (wr["of"], wr["over"], wr["wins"], wr["ties"], wr["losses"]) == ("concise", "padded", 3, 1, 0)
    assert wr["rate"] == pytest.approx(3.5 / 4)
    assert wr["interval"] == pytest.approx(list(wilson_interval(3.5, 4)), abs=1e-6)
    assert summary["position_bias"]["consistency"] == 1.0  # a program has no position bias
    assert summary["prompts"] == 4 and summary["judgements"] == 8
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["outcome"] for r in rows] == [1.0, 1.0, 0.5, 1.0]
    assert rows[0]["answer_a"] == " 7." and rows[0]["p_first_ab"] == 1.0 and rows[0]["p_first_ba"] == 0.0


def test_cli_bradley_terry_for_three_contestants(tmp_path, capsys):
    files = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": p, "response": a} for p, a in zip(PROMPTS, answers)])
        for name, answers in (("wrong", WRONG), ("concise", CONCISE), ("padded", PADDED_ALL))
    }
    args = [x for name, f in files.items() for x in ("--generations", f"{name}={f}")]
    code, summary, _ = compare(capsys, *args, "--judge", "preferences")
    assert code == 0
    table = summary["bradley_terry"]["table"]
    assert [row["name"] for row in table] == ["concise", "padded", "wrong"]
    assert summary["bradley_terry"]["reference"] == "wrong"
    assert next(r for r in table if r["name"] == "wrong")["score"] == 0.0
    assert summary["win_rates"]["concise"]["wrong"] == {"rate": 1.0, "n": 4}
    # an incomplete design: one pair per prompt
    code, summary, _ = compare(capsys, *args, "--judge", "preferences", "--pairs-per-prompt", "1")
    assert code == 0 and summary["comparisons"] == 4


def test_cli_matches_repeated_prompts_by_occurrence(tmp_path, capsys):
    prompts = [PROMPTS[0], PROMPTS[0]]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, [" 7.", " 8."])])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, [" 8.", " 7."])])
    code, summary, _ = compare(capsys, "--generations", f"a={a}", "--generations", f"b={b}", "--judge", "preferences")
    assert code == 0
    assert (summary["win_rate"]["wins"], summary["win_rate"]["losses"]) == (1, 1)


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", [{"prompt": PROMPTS[0], "response": " 7."}])
    other = write_jsonl(tmp_path / "o.jsonl", [{"prompt": PROMPTS[1], "response": " 12."}])
    gens = ["--generations", f"a={good}", "--generations", f"b={good}"]
    cases = [
        (["--generations", f"a={good}", "--judge", "preferences"], "at least two contestants"),
        (["--generations", "nofile", "--generations", f"b={good}", "--judge", "preferences"], "NAME=FILE"),
        (["--generations", f"a={tmp_path}/missing.jsonl", *gens[2:], "--judge", "preferences"], "not found"),
        ([*gens[:2], "--generations", f"a={good}", "--judge", "preferences"], "used twice"),
        ([*gens, "--judge", "preferences", "--prompts", str(tmp_path / "none.jsonl")], "not found"),
        ([*gens, "--judge", "preferences", "--pairs-per-prompt", "0"], "--pairs-per-prompt"),
        ([str(tmp_path), *gens, "--judge", "preferences"], "--prompts"),
        ([*gens[:2], "--generations", f"b={other}", "--judge", "preferences"], "no prompt in common"),
        ([*gens[:2], "--generations", f"b={other}", "--judge", "preferences", "--prompts", str(good)], "no answer"),
        ([*gens, "--judge", "nonsense"], "not a run directory"),
        ([*gens, "--judge", "preferences", "--judge-template", str(good)], "lacks {prompt}"),
    ]
    for argv, message in cases:
        code, _, err = compare(capsys, *argv)
        assert code != 0, argv
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_cli_generates_with_two_runs_and_judges_with_a_run(tmp_path, runs, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "rows.jsonl"
    code, summary, _ = compare(
        capsys, str(runs[0]), "--prompts", str(prompts), str(runs[1]), "--judge", "preferences",
        "--max-new-tokens", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert summary["contestants"] == ["run0", "run1"] and summary["comparisons"] == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, _, tok = load_model(runs[0])  # run0's answer is its greedy continuation after EOS, EOS dropped
    new = generate(model, [tok.eos_id, *tok.encode(PROMPTS[0])], 4, temperature=0.0, eos_id=tok.eos_id)
    assert rows[0]["answer_a"] == tok.decode([t for t in new if t != tok.eos_id], skip_special_tokens=True)
    assert all(isinstance(r["answer_b"], str) for r in rows)
    # the same answers, as generations files, judged by a run (an LM judge) give probabilities
    gens = []
    for name, key in (("g0", "answer_a"), ("g1", "answer_b")):
        file = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": r["prompt"], "response": r[key]} for r in rows])
        gens += ["--generations", f"{name}={file}"]
    template = tmp_path / "judge.txt"
    template.write_text("Task: {prompt}\nFirst: {answer_a}\nSecond: {answer_b}\nThe better one is")
    code, summary, _ = compare(capsys, *gens, "--judge", str(runs[1]), "--judge-template", str(template))
    assert code == 0
    assert summary["judge"] == str(runs[1])
    assert 0.0 <= summary["win_rate"]["mean_p"] <= 1.0


def test_equal_bradley_terry_scores_share_a_rank():
    from lmlab.eval.pairwise import bradley_terry

    # a beats b and c equally often; b and c tie each other: b and c share rank 2 whatever their order
    comparisons = [(0, 1, 1.0)] * 6 + [(0, 2, 1.0)] * 6 + [(1, 2, 0.5)] * 4 + [(0, 1, 0.0), (0, 2, 0.0)]
    fit = bradley_terry(3, comparisons, prior=1.0)
    assert list(fit.ranks) == [1, 2, 2]


def test_identical_answers_do_not_count_against_consistency():
    from lmlab.eval.pairwise_command import summarize

    rows = [
        {"a": "x", "b": "y", "answer_a": "7.", "answer_b": "7.", "p_first_ab": 0.7, "p_first_ba": 0.7}
        | {"p_a": 0.5, "outcome": 0.5},
        {"a": "x", "b": "y", "answer_a": "7.", "answer_b": "8.", "p_first_ab": 0.9, "p_first_ba": 0.2}
        | {"p_a": 0.85, "outcome": 1.0},
    ]
    out = summarize(["x", "y"], rows, confidence=0.95, prior=1.0)
    assert out["identical_answers"] == 1
    assert out["position_bias"]["consistency"] == 1.0  # the one pair with different answers is consistent
