"""Pairwise-judging study for ``lmlab eval compare`` on the synthetic ``preferences`` world.

1. **Ranking from few comparisons.** One tiny decoder is trained on the world's question/answer documents;
   four of its checkpoints (more steps = better, by construction) are the contestants. ``lmlab eval compare``
   generates their greedy answers to held-out prompts and judges them with the world's programmatic judge
   (``--judge preferences``). We report each contestant's absolute judged accuracy, the Bradley-Terry (BT)
   ranking of the full design (every pair on every prompt) and of incomplete designs
   (``--pairs-per-prompt 1``, ``--comparisons N``) over many design seeds: how often the incomplete ranking
   equals the full / absolute ranking (exact match, Kendall tau) and how wide the BT intervals are.
2. **Position bias of LM judges and what the swap does.** The same comparisons are judged by LM judges
   (``--judge RUN_DIR``): the best contestant itself (never trained to judge) and a small dedicated judge
   trained on comparison prompts labelled by the programmatic judge. From the command's output we report
   position bias (first-position win share, consistency across the two orders), the bias on pairs whose
   two answers are the same string (any preference there is pure position), and how often the debiased
   verdicts agree with the programmatic judge, next to single-order verdicts without the swap. A constant
   "always the first answer" judge (through the same ``judge_design``/``summarize`` code) shows the swap
   turning position bias into ties.

Everything runs in-process: training through ``lmlab.recipes.pretrain.run_pretraining``, judging through
``lmlab.cli.main(["eval", "compare", ...])``. Finished runs in ``--out`` are reused.

    python examples/pairwise_judging/run_study.py                      # full: ~1 min on 2 shared CPU cores
    python examples/pairwise_judging/run_study.py --out /tmp/pj --quick  # smoke test (~20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config
from lmlab.data.synthetic.preference_world import (
    PreferenceWorld,
    _question,
    format_prompt,
    judge,
    render_answer,
)
from lmlab.eval.answer_files import PromptItem
from lmlab.eval.judges import COMPARISON_TEMPLATE, preference_score
from lmlab.eval.pairwise import bradley_terry, comparison_design
from lmlab.eval.pairwise_command import judge_design, summarize
from lmlab.recipes.pretrain import run_pretraining

SFT_MIX = (0.8, 0.1, 0.1)  # concise, padded, wrong: answers are mostly concise, so quality = correctness
JUDGE_TEMPLATE = "{prompt} A: {answer_a} B: {answer_b} Better:"
"""The trained judge's prompt (``--judge-template``): shorter than the default, so more of each training row
is spent on the verdict token."""


def sizes(quick: bool) -> dict:
    if quick:
        return dict(
            docs=3000, steps=200, checkpoints=[20, 60, 120, 200], prompts=16, judge_docs=4000, judge_steps=100,
            design_seeds=5, comparisons=[16, 8],
        )  # fmt: skip
    return dict(
        docs=6000, steps=400, checkpoints=[30, 100, 200, 400], prompts=48, judge_docs=20000, judge_steps=800,
        design_seeds=20, comparisons=[48, 24],
    )  # fmt: skip


def common() -> list[str]:
    return ["train.device=cpu", "train.progress=false", "data.num_workers=0", "train.threads=1"]


def finished(run_dir: Path) -> bool:
    s = run_dir / "summary.json"
    return s.is_file() and json.loads(s.read_text()).get("status") == "finished"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def fmt(values: list[float], digits: int = 2) -> str:
    m, h = mean_ci(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def compare(*argv: str) -> dict:
    """``lmlab eval compare ARGV`` in-process; its JSON summary."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = lmlab_main(["eval", "compare", *argv])
    if code != 0:
        raise RuntimeError(f"lmlab eval compare {' '.join(argv)} exited with {code}")
    return json.loads(buf.getvalue())


# --------------------------------------------------------------------------- training


def train(run_dir: Path, docs_file: Path, steps: int, ckpt_every: int, seq_len: int, batch: int, name: str) -> None:
    if finished(run_dir):
        return
    cfg = load_config(
        None,
        [
            *common(),
            f"name={name}",
            "data.source=files",
            f"data.files=['{docs_file}']",
            "tokenizer.vocab_size=384",
            "tokenizer.train_docs=2000",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.max_seq_len=192",
            f"train.seq_len={seq_len}",
            f"train.micro_batch_size={batch}",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.ckpt_every={ckpt_every}",
            f"train.keep_last={steps // ckpt_every}",
            "train.eval_tokens=4096",
            "train.log_every=20",
            "optim.lr=3e-3",
            f"schedule.warmup_steps={min(10, steps)}",
            "sample.prompts=['Question: What is 2 plus 3?']",
            "sample.max_new_tokens=16",
        ],
    )
    run_pretraining(cfg, run_dir, quiet=True)


def babble(rng: random.Random, question: str) -> str:
    """A degenerate answer like an undertrained model's: words of the question repeated."""
    words = question.rstrip("?").replace(",", "").split()
    return " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))


def judge_documents(n: int, seed: int = 0, template: str = COMPARISON_TEMPLATE) -> list[str]:
    """Comparison prompts (``template``, the LM judge's prompt) on training-split questions, each followed by
    " A" or " B" as the programmatic judge decides; the order is random and ties are left out, so " A" and
    " B" are equally likely and neither position is favoured by the labels."""
    docs = []
    i = 0
    while len(docs) < n:
        rng = random.Random(f"{seed}:judge:{i}")
        i += 1
        q = _question(rng, "train")
        prompt = format_prompt(q.text)
        answers = [
            babble(rng, q.text) if style == "babble" else render_answer(rng, q, style)
            for style in rng.choices(("concise", "padded", "wrong", "babble"), weights=(3, 1, 3, 1), k=2)
        ]
        sa, sb = (preference_score(prompt, a) for a in answers)
        if sa == sb:
            continue
        text = template
        for key, value in (
            ("{prompt}", prompt),
            ("{answer_a}", answers[0].strip()),
            ("{answer_b}", answers[1].strip()),
        ):
            text = text.replace(key, value)
        docs.append(text + (" A" if sa > sb else " B"))
    return docs


# --------------------------------------------------------------------------- part 1: ranking


def tied_ranks(values) -> list[int]:
    """Ranks, 1 = largest, equal values (to 1e-6) sharing the best rank: unlike the command's ``rank``
    column, which breaks ties by contestant order."""
    return [int(r) for r in stats.rankdata([-round(float(v), 6) for v in values], method="min")]


def scores_of(table: list[dict], names: list[str]) -> list[float]:
    by_name = {row["name"]: row["score"] for row in table}
    return [by_name[n] for n in names]


def kendall(x: list[float], y: list[float]) -> float:
    tau = stats.kendalltau(x, y).statistic
    return 0.0 if tau is None or math.isnan(tau) else float(tau)


def study_ranking(out: Path, contestants: list[Path], names: list[str], prompts_file: Path, n: dict) -> dict:
    full_rows_file = out / "compare" / "full_preferences.jsonl"
    summary_file = out / "compare" / "full_preferences.json"
    if not summary_file.is_file():
        summary = compare(
            *map(str, contestants), "--prompts", str(prompts_file), "--judge", "preferences",
            "--max-new-tokens", "24", "--out", str(full_rows_file),
        )  # fmt: skip
        summary_file.write_text(json.dumps(summary, indent=1))
    full = json.loads(summary_file.read_text())
    rows = read_jsonl(full_rows_file)
    # every contestant's answer to every prompt (the full design has them all), as generations files
    answers: dict[str, dict[int, str]] = {name: {} for name in names}
    prompt_text: dict[int, str] = {}
    for r in rows:
        answers[r["a"]][r["prompt_index"]] = r["answer_a"]
        answers[r["b"]][r["prompt_index"]] = r["answer_b"]
        prompt_text[r["prompt_index"]] = r["prompt"]
    gen_args = []
    for name in names:
        f = write_jsonl(
            out / "generations" / f"{name}.jsonl",
            ({"prompt": prompt_text[p], "response": answers[name][p]} for p in sorted(answers[name])),
        )
        gen_args += ["--generations", f"{name}={f}"]
    absolute = {}
    for name in names:
        verdicts = [judge(prompt_text[p], a) for p, a in answers[name].items()]
        absolute[name] = {
            "accuracy": statistics.fmean(v.correct for v in verdicts),
            "padded": statistics.fmean(v.padded for v in verdicts),
            "words": statistics.fmean(v.words for v in verdicts),
        }
    steps = [int(name.split("_")[-1]) for name in names]
    accuracy = [absolute[name]["accuracy"] for name in names]
    full_scores = scores_of(full["bradley_terry"]["table"], names)
    full_by_name = dict(zip(names, full_scores, strict=True))
    full_ranks = tied_ranks(full_scores)
    construction_ranks = tied_ranks(steps)
    accuracy_ranks = tied_ranks(accuracy)

    # the incomplete design through run directories (answers generated again) equals the one through files
    check = compare(
        *map(str, contestants), "--prompts", str(prompts_file), "--judge", "preferences", "--max-new-tokens", "24",
        "--pairs-per-prompt", "1", "--seed", "0",
    )  # fmt: skip
    check_files = compare(*gen_args, "--prompts", str(prompts_file), "--judge", "preferences",
                          "--pairs-per-prompt", "1", "--seed", "0")  # fmt: skip
    same_path = [(r["name"], r["score"]) for r in check["bradley_terry"]["table"]] == [
        (r["name"], r["score"]) for r in check_files["bradley_terry"]["table"]
    ]

    designs = {"pairs_per_prompt_1": ["--pairs-per-prompt", "1"]}
    designs |= {f"comparisons_{c}": ["--comparisons", str(c)] for c in n["comparisons"]}
    incomplete: dict[str, list[dict]] = {}
    for label, extra in designs.items():
        for seed in range(n["design_seeds"]):
            s = compare(
                *gen_args, "--prompts", str(prompts_file), "--judge", "preferences", *extra, "--seed", str(seed)
            )
            table = s["bradley_terry"]["table"]
            sc = scores_of(table, names)
            rk = tied_ranks(sc)
            widths = [r["interval"][1] - r["interval"][0] for r in table if r["name"] != names[0]]
            covered = [
                r["interval"][0] <= full_by_name[r["name"]] <= r["interval"][1] for r in table if r["name"] != names[0]
            ]
            incomplete.setdefault(label, []).append(
                {
                    "seed": seed,
                    "comparisons": s["comparisons"],
                    "scores": sc,
                    "ranks": rk,
                    "exact_full": rk == full_ranks,
                    "exact_construction": rk == construction_ranks,
                    "exact_accuracy": rk == accuracy_ranks,
                    "tau_full": kendall(sc, full_scores),
                    "tau_construction": kendall(sc, steps),
                    "tau_accuracy": kendall(sc, accuracy),
                    "best_found": rk[int(np.argmax(steps))] == 1 and rk.count(1) == 1,
                    "mean_interval_width": statistics.fmean(widths),
                    "covers_full_score": statistics.fmean(covered),
                    "intervals": [next(r["interval"] for r in table if r["name"] == name) for name in names],
                }
            )
    full_widths = [r["interval"][1] - r["interval"][0] for r in full["bradley_terry"]["table"] if r["name"] != names[0]]
    return {
        "names": names,
        "steps": steps,
        "absolute": absolute,
        "full": {
            "comparisons": full["comparisons"],
            "table": full["bradley_terry"]["table"],
            "win_rates": full["win_rates"],
            "ranks": full_ranks,
            "position_bias": full["position_bias"],
            "exact_construction": full_ranks == construction_ranks,
            "exact_accuracy": full_ranks == accuracy_ranks,
            "tau_construction": kendall(full_scores, steps),
            "tau_accuracy": kendall(full_scores, accuracy),
            "mean_interval_width": statistics.fmean(full_widths),
        },
        "construction_ranks": construction_ranks,
        "accuracy_ranks": accuracy_ranks,
        "incomplete": incomplete,
        "run_dirs_equal_generation_files": same_path,
        "gen_args": gen_args,
        "programmatic_rows": str(full_rows_file),
    }


# --------------------------------------------------------------------------- part 2: LM judges


def side(p: float) -> float:
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def judge_report(summary: dict, rows: list[dict], reference: dict, names: list[str], seed: int = 0) -> dict:
    """Position bias and agreement with the programmatic verdicts (``reference``: (prompt, a, b) -> outcome)."""
    rng = random.Random(seed)
    index = {n: k for k, n in enumerate(names)}
    same = [r for r in rows if r["answer_a"].strip() == r["answer_b"].strip()]
    decisive = [r for r in rows if reference[r["prompt_index"], r["a"], r["b"]] != 0.5]
    tied = [r for r in rows if reference[r["prompt_index"], r["a"], r["b"]] == 0.5]

    def agree(verdict) -> dict:
        right = [verdict(r) == reference[r["prompt_index"], r["a"], r["b"]] for r in decisive]
        wrong = [verdict(r) == 1.0 - reference[r["prompt_index"], r["a"], r["b"]] for r in decisive]
        return {
            "agreement_all": statistics.fmean(verdict(r) == reference[r["prompt_index"], r["a"], r["b"]] for r in rows),
            "decisive_right": statistics.fmean(right) if right else None,
            "decisive_wrong": statistics.fmean(wrong) if wrong else None,
            "ties_on_programmatic_ties": statistics.fmean(verdict(r) == 0.5 for r in tied) if tied else None,
        }

    coin = {id(r): rng.random() < 0.5 for r in rows}
    verdicts = {
        "swap (both orders)": lambda r: r["outcome"],
        "one order, a first": lambda r: side(r["p_first_ab"]),
        "one order, random position": lambda r: side(r["p_first_ab"]) if coin[id(r)] else 1.0 - side(r["p_first_ba"]),
    }

    def bt_ranks(verdict) -> list[int]:
        bt = bradley_terry(len(names), [(index[r["a"]], index[r["b"]], verdict(r)) for r in rows])
        return tied_ranks(bt.scores)

    return {
        "judge": summary["judge"],
        "comparisons": summary["comparisons"],
        "position_bias": summary["position_bias"],
        "judge_truncated_prompts": summary.get("judge_truncated_prompts", 0),
        "identical_answer_pairs": len(same),
        "identical_first_wins": (
            statistics.fmean(side(p) == 1.0 for r in same for p in (r["p_first_ab"], r["p_first_ba"])) if same else None
        ),
        "identical_swap_ties": statistics.fmean(r["outcome"] == 0.5 for r in same) if same else None,
        "decisive_pairs": len(decisive),
        "agreement": {k: agree(v) for k, v in verdicts.items()},
        "bt_ranks": {k: bt_ranks(v) for k, v in verdicts.items()},
        "bt_table_swap": summary.get("bradley_terry", {}).get("table"),
    }


def study_judges(out: Path, part1: dict, judges: dict[str, tuple[Path, list[str]]], prompts_file: Path) -> dict:
    names = part1["names"]
    reference_rows = read_jsonl(Path(part1["programmatic_rows"]))
    reference = {(r["prompt_index"], r["a"], r["b"]): r["outcome"] for r in reference_rows}
    full = json.loads((out / "compare" / "full_preferences.json").read_text())
    results = {"preferences (programmatic)": judge_report(full, reference_rows, reference, names)}
    for label, (judge_dir, extra) in judges.items():
        rows_file = out / "compare" / f"full_{label}.jsonl"
        summary_file = out / "compare" / f"full_{label}.json"
        if not summary_file.is_file():
            s = compare(
                *part1["gen_args"],
                "--prompts",
                str(prompts_file),
                "--judge",
                str(judge_dir),
                *extra,
                "--out",
                str(rows_file),
            )
            summary_file.write_text(json.dumps(s, indent=1))
        results[label] = judge_report(json.loads(summary_file.read_text()), read_jsonl(rows_file), reference, names)
    # a judge that always prefers the answer shown first, through the command's own judging code
    prompts = [PromptItem(p, f"prompt {k}") for k, p in enumerate(r["prompt"] for r in read_jsonl(prompts_file))]
    answers: list[dict[int, str]] = [{} for _ in names]
    for r in reference_rows:
        answers[names.index(r["a"])][r["prompt_index"]] = r["answer_a"]
        answers[names.index(r["b"])][r["prompt_index"]] = r["answer_b"]
    design = comparison_design(len(names), len(prompts))
    first = judge_design(lambda prompt, a, b: 1.0, prompts, answers, design, names)
    s = {"judge": "always-first (constant)", **summarize(names, first, confidence=0.95, prior=1.0)}
    results["always_first"] = judge_report(s, first, reference, names)
    return results


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    p1 = res["ranking"]
    names = p1["names"]
    lines = ["### 1. Contestants (checkpoints of one run) and the full design", ""]
    lines += [
        "| contestant | steps | judged accuracy | padded | words | BT score (ref. = weakest) | 95% interval | BT rank |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    table = {r["name"]: r for r in p1["full"]["table"]}
    for name, st in zip(names, p1["steps"], strict=True):
        a, t = p1["absolute"][name], table[name]
        lines.append(
            f"| {name} | {st} | {a['accuracy']:.3f} | {a['padded']:.3f} | {a['words']:.2f} | {t['score']:.2f} "
            f"| [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}] | {t['rank']} |"
        )
    f = p1["full"]
    lines += [
        "",
        f"Full design: {f['comparisons']} comparisons ({len(names) * (len(names) - 1) // 2} pairs × "
        f"{res['sizes']['prompts']} prompts), each judged in both orders. BT ranking = construction order: "
        f"**{f['exact_construction']}** (Kendall τ with steps {f['tau_construction']:.2f}, with accuracy "
        f"{f['tau_accuracy']:.2f}); mean 95% interval width {f['mean_interval_width']:.2f}.",
        "",
        "Win rates (row over column, ties half; full design):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in names:
        cells = ["–" if a == b else f"{f['win_rates'][a][b]['rate']:.2f}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", f"### Incomplete designs ({res['sizes']['design_seeds']} design seeds each)", ""]
    lines += [
        "| design | comparisons | BT ranking = full-design ranking | = accuracy ranking | = construction order "
        "| Kendall τ vs full | τ vs steps | best uniquely first | mean 95% interval width "
        "| interval covers full-design score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| full | {f['comparisons']} | 1 | {float(f['exact_accuracy']):.0f} | {float(f['exact_construction']):.0f} "
        f"| 1 | {f['tau_construction']:.2f} | – | {f['mean_interval_width']:.2f} | – |"
    )
    for label, runs in p1["incomplete"].items():
        lines.append(
            f"| {label} | {runs[0]['comparisons']} | {fmt([float(r['exact_full']) for r in runs])} "
            f"| {fmt([float(r['exact_accuracy']) for r in runs])} | {fmt([float(r['exact_construction']) for r in runs])} | {fmt([r['tau_full'] for r in runs])} "
            f"| {fmt([r['tau_construction'] for r in runs])} | {fmt([float(r['best_found']) for r in runs])} "
            f"| {fmt([r['mean_interval_width'] for r in runs])} | {fmt([r['covers_full_score'] for r in runs])} |"
        )
    lines += [
        "",
        "Rates are means over design seeds ± 95% Student-t half-width. Interval width: the BT score's 95% Wald "
        "interval (contrast with the weakest contestant), averaged over the other three contestants. Rankings "
        "are compared with ties shared (equal BT scores get the same rank).",
        f"Incomplete design via run directories (answers generated again) = via generations files: "
        f"**{p1['run_dirs_equal_generation_files']}**.",
        "",
        "### 2. LM judges on the full design: position bias and the swap",
        "",
        "| judge | first-position wins | second-position wins | mean P(first) | consistency "
        "| identical-answer pairs: first wins (→ ties after swap) | agreement with programmatic (swap) "
        "| decisive pairs right / wrong (swap) | decisive right, one order (a first) | decisive right, one order "
        "(random position) | programmatic ties kept as ties (swap / one order) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, j in res["judges"].items():
        pb, ag = j["position_bias"], j["agreement"]
        sw, fx, rnd = ag["swap (both orders)"], ag["one order, a first"], ag["one order, random position"]
        ident = (
            f"{j['identical_first_wins']:.2f} of {j['identical_answer_pairs']} (→ {j['identical_swap_ties']:.2f})"
            if j["identical_answer_pairs"]
            else "–"
        )
        lines.append(
            f"| {label} | {pb['first_wins']:.3f} | {pb['second_wins']:.3f} | {pb['mean_p_first']:.3f} "
            f"| {pb['consistency']:.3f} | {ident} | {sw['agreement_all']:.3f} "
            f"| {sw['decisive_right']:.3f} / {sw['decisive_wrong']:.3f} | {fx['decisive_right']:.3f} "
            f"| {rnd['decisive_right']:.3f} | {sw['ties_on_programmatic_ties']:.3f} / "
            f"{fx['ties_on_programmatic_ties']:.3f} |"
        )
    lines += ["", "BT ranks (contestants in order " + ", ".join(names) + "; 1 = best, equal scores share a rank):", ""]
    lines += ["| judge | swap | one order, a first | one order, random position |", "|---|---|---|---|"]
    for label, j in res["judges"].items():
        r = j["bt_ranks"]
        lines.append(
            f"| {label} | {r['swap (both orders)']} | {r['one order, a first']} | {r['one order, random position']} |"
        )
    lines += ["", f"Wall time {res['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/pairwise_judging", help="study directory (finished runs are reused)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of about 20 s")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = sizes(args.quick)
    start = time.perf_counter()
    world = PreferenceWorld(sft_mix=SFT_MIX)
    docs = write_jsonl(out / "data" / "sft_docs.jsonl", ({"text": d} for d in world.documents(0, n["docs"])))
    prompts_file = write_jsonl(
        out / "data" / "prompts.jsonl", ({"prompt": r["prompt"]} for r in world.pairs(1, n["prompts"], "test"))
    )
    # the judge's corpus: comparison prompts with verdicts, and half as many question/answer documents
    # (so it can know the answers it has to check), shuffled
    corpus = judge_documents(n["judge_docs"], template=JUDGE_TEMPLATE)
    corpus += list(world.documents(5, n["judge_docs"] // 2))
    random.Random(0).shuffle(corpus)
    judge_docs = write_jsonl(out / "data" / "judge_docs.jsonl", ({"text": d} for d in corpus))
    template_file = out / "data" / "judge_template.txt"
    template_file.write_text(JUDGE_TEMPLATE)

    print("contestants: one run, checkpoints", n["checkpoints"], flush=True)
    run = out / "contestants"
    every = math.gcd(*n["checkpoints"])
    train(run, docs, n["steps"], every, 64, 32, "pj-contestants")
    contestants = [run / "checkpoints" / f"step_{s:07d}" for s in n["checkpoints"]]
    names = [c.name for c in contestants]

    print("dedicated LM judge ...", flush=True)
    judge_run = out / "judge"
    train(judge_run, judge_docs, n["judge_steps"], n["judge_steps"], 64, 32, "pj-judge")

    print("part 1: ranking from few comparisons ...", flush=True)
    res: dict = {"sizes": n, "sft_mix": SFT_MIX}
    res["ranking"] = study_ranking(out, contestants, names, prompts_file, n)
    print("part 2: LM judges ...", flush=True)
    judges = {
        "best_contestant_as_judge": (contestants[-1], []),
        "trained_judge": (judge_run, ["--judge-template", str(template_file)]),
    }
    res["judges"] = study_judges(out, res["ranking"], judges, prompts_file)
    res["wall_time_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
