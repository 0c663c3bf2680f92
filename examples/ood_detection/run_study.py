"""Likelihood-ratio OOD detection on synthetic domain shifts (issue 10, item 3c; paper E13).

Zhang et al. 2024, *Your Finetuned Large Language Model is Already a Powerful Out-of-distribution Detector*,
arXiv 2404.08679: after fine-tuning a base model on domain A, log p_finetuned(x) − log p_base(x) separates A
from other text. Per seed, this script

1. trains a base model on an equal mixture of four synthetic domains: ``stories``, ``facts`` (biographies) and
   two related languages of the ``languages`` world, ``norra`` and ``vesk`` (one family: shared cognate roots,
   different sound changes and word order);
2. fine-tunes it (continued pretraining, ``init_from``) on ``stories`` only, and separately on ``norra`` only,
   each twice: a *full* fine-tune (100 steps, lr 1e-3), which also makes the model forget the other domains, and
   a *light* one (25 steps, lr 3e-4) that moves it much less;
3. fine-tunes it the same two ways on the ``preferences`` world's SFT documents (a domain the base never saw);
4. runs ``lmlab eval ood`` on held-out documents for eight pairs (in-domain vs out-of-domain), and reports the
   AUROC of the ratio next to those of the fine-tuned and the base model's own log-likelihood, as mean ± 95%
   CI (Student t) over seeds, per token and summed over the document.

The first four pairs (stories vs facts, stories vs norra, norra vs vesk, norra vs stories) put the ratio at the
ceiling; the other four are nearer or less familiar shifts: norra vs ``ollin`` (the family's third language,
left out of the base's data), and the preferences world's SFT documents, or its concise train-style questions,
vs its ``ood`` split (reworded questions, numbers 10-30) or vs the ``ood`` wording alone (numbers 0-9).

Held-out documents come from the same streams as the training data, at indices far beyond those trained on.
Runs and reports already in ``--out`` are reused. Results go to ``OUT/results.json`` and ``OUT/results.md``.

    python examples/ood_detection/run_study.py --out runs/ood_detection            # ~3 min on 2 idle cores
    python examples/ood_detection/run_study.py --out /tmp/ood --quick --seeds 1    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config
from lmlab.data.cache import world_documents
from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.preference_world import COLOURS, OOD_TEMPLATES, format_prompt
from lmlab.eval.ood import DocumentLogprob, auroc, likelihood_ratio_scores, loglik_scores
from lmlab.recipes.pretrain import run_pretraining

DOMAINS = {  # name -> (world, subset): a stream of documents that a model is trained on or scored on
    "stories": ("stories", None),
    "facts": ("facts", None),
    "norra": ("languages", "norra"),
    "vesk": ("languages", "vesk"),
    "ollin": ("languages", "ollin"),  # norra's and vesk's third sister language: never in the base's data
    "preferences": ("preferences", None),  # the preferences world's SFT documents: never in the base's data
}
BASE_DOMAINS = ("stories", "facts", "norra", "vesk")  # the base's equal mixture
PREFERENCE_SETS = {  # held-out set -> split of PreferenceWorld.pairs, each rendered as prompt + chosen
    "preferences_concise": "test",  # train-style questions (numbers 0-9), concise correct answers
    "preferences_ood": "ood",  # reworded questions, numbers 10-30 (the concise answer has no filler)
}
REWORDED = "preferences_reworded"  # held-out set: the ood split's wording, the train split's numbers 0-9
TUNED_ON = {"preferences_concise": "preferences"}  # in-domain set -> its fine-tune's domain (default: itself)
PAIRS = {  # name -> (in-domain = the fine-tune's domain or a part of it, out-of-domain)
    "stories_vs_facts": ("stories", "facts"),
    "stories_vs_norra": ("stories", "norra"),
    "norra_vs_vesk": ("norra", "vesk"),
    "norra_vs_stories": ("norra", "stories"),
    # harder, near shifts (added after the four above sat at AUROC 1.000)
    "norra_vs_ollin": ("norra", "ollin"),
    "preferences_vs_ood": ("preferences", "preferences_ood"),
    "preferences_concise_vs_ood": ("preferences_concise", "preferences_ood"),
    "preferences_concise_vs_reworded": ("preferences_concise", REWORDED),
}
HELDOUT_START = 100_000  # held-out documents: this index on of each training stream (trained on: < n_docs)
FINETUNES = {  # name -> (steps at full size, peak lr); the run directory's suffix is "" for full
    "full": (100, 1e-3),
    "light": (25, 3e-4),
}
METHODS = ("likelihood_ratio", "finetuned_loglik", "base_loglik")


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(docs=600, base_steps=20, ft_scale=10, eval_docs=24)
    return dict(docs=6000, base_steps=300, ft_scale=1, eval_docs=200)


def common(seed: int) -> list[str]:
    return [
        "train.device=cpu",
        "train.progress=false",
        "train.keep_last=1",
        "train.log_every=50",
        "train.eval_tokens=16384",
        "train.seq_len=128",
        "train.micro_batch_size=16",
        f"train.seed={seed}",
        "data.num_workers=1",
        "data.val_fraction=0.05",
        "sample.prompts=['']",
        "sample.max_new_tokens=16",
    ]


def source(name: str, n_docs: int, seed: int = 0) -> str:
    world, subset = DOMAINS[name]
    return f"{{world: {world}, n_docs: {n_docs}, seed: {seed}" + (f", subset: {subset}}}" if subset else "}")


def finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["status"] == "finished"


def train_base(run_dir: Path, n: dict[str, int], seed: int) -> Path:
    mixture = ", ".join(f"{{name: {d}, weight: 1.0, synthetic: {source(d, n['docs'])}}}" for d in BASE_DOMAINS)
    overrides = [
        *common(seed),
        "name=ood-base",
        "data.source=mixture",
        f"data.mixture=[{mixture}]",
        "tokenizer.vocab_size=768",
        "tokenizer.train_docs=4000",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.max_seq_len=128",
        f"train.steps={n['base_steps']}",
        f"train.eval_every={n['base_steps']}",
        f"train.ckpt_every={n['base_steps']}",
        "optim.lr=3e-3",
        f"schedule.warmup_steps={min(20, n['base_steps'])}",
    ]
    if not finished(run_dir):
        run_pretraining(load_config(None, overrides), run_dir, quiet=True)
    return run_dir


def fine_tune(run_dir: Path, base: Path, domain: str, finetune: str, n: dict[str, int], seed: int) -> Path:
    """Continued pretraining of ``base`` on ``domain`` alone (documents of another stream seed than the base's)."""
    world, subset = DOMAINS[domain]
    steps, lr = FINETUNES[finetune]
    steps = max(1, steps // n["ft_scale"])
    overrides = [
        *common(seed),
        f"name=ood-ft-{domain}",
        f"init_from={base}",
        f"data.synthetic.world={world}",
        f"data.synthetic.n_docs={n['docs']}",
        "data.synthetic.seed=1",
        *([f"data.synthetic.subset={subset}"] if subset else []),
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        f"optim.lr={lr}",
        f"schedule.warmup_steps={steps // 10}",
    ]
    if not finished(run_dir):
        run_pretraining(load_config(None, overrides), run_dir, quiet=True)
    return run_dir


def write_heldout(path: Path, domain: str, seed: int, n_docs: int) -> Path:
    """``n_docs`` documents of the domain's seed-0 stream from index HELDOUT_START + seed·n_docs (never trained).

    A PREFERENCE_SETS name instead gets ``n_docs`` pairs of its split (stream seed 100 + seed), as prompt + chosen,
    and REWORDED ``n_docs`` questions from :func:`reworded_question`.
    """
    if not path.is_file():
        if domain in PREFERENCE_SETS:
            pairs = get_world("preferences").pairs(100 + seed, n_docs, PREFERENCE_SETS[domain])
            docs = (r["prompt"] + r["chosen"] for r in pairs)
        elif domain == REWORDED:
            docs = (reworded_question(random.Random(f"reworded:{seed}:{i}")) for i in range(n_docs))
        else:
            world, subset = DOMAINS[domain]
            start = HELDOUT_START + seed * n_docs
            docs = itertools.islice(world_documents(get_world(world), 0, None, subset), start, start + n_docs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def reworded_question(rng: random.Random) -> str:
    """A ``preferences`` question in the ood split's wording but the train split's numbers (0-9), + its answer."""
    kind = rng.choice(tuple(OOD_TEMPLATES))
    if kind == "colour":
        obj = rng.choice(tuple(COLOURS))
        question, answer = OOD_TEMPLATES[kind].format(obj=obj), COLOURS[obj]
    else:
        a, b = rng.sample(range(10), 2) if kind == "larger" else (rng.randint(0, 9), rng.randint(0, 9))
        question, answer = OOD_TEMPLATES[kind].format(a=a, b=b), str(max(a, b) if kind == "larger" else a + b)
    return format_prompt(question) + f" {answer}."


def eval_ood(run: Path, base: Path, in_file: Path, out_file: Path, scores: Path) -> dict:
    """``lmlab eval ood`` through the CLI (in-process); the JSON it prints is kept beside the scores."""
    report_file = scores.with_suffix(".json")
    if report_file.is_file() and scores.is_file():
        return json.loads(report_file.read_text())
    argv = ["eval", "ood", str(run), "--base", str(base), "--in", str(in_file), "--out", str(out_file)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = lmlab_main([*argv, "--scores", str(scores)])
    if code != 0:
        raise SystemExit(f"lmlab {' '.join(argv)} failed with exit code {code}")
    report_file.write_text(buf.getvalue())
    return json.loads(buf.getvalue())


def summarize_scores(scores: Path) -> dict:
    """AUROCs of the three scores summed over each document, and mean per-token log-likelihoods, from the rows."""
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    docs = {
        (side, model): [DocumentLogprob(r[f"logp_{model}"], r["tokens"]) for r in rows if r["set"] == side]
        for side in ("in", "out")
        for model in ("finetuned", "base")
    }
    sums = {
        "likelihood_ratio": auroc(
            likelihood_ratio_scores(docs["in", "finetuned"], docs["in", "base"], per_token=False),
            likelihood_ratio_scores(docs["out", "finetuned"], docs["out", "base"], per_token=False),
        ),
        **{
            f"{model}_loglik": auroc(
                loglik_scores(docs["in", model], per_token=False), loglik_scores(docs["out", model], per_token=False)
            )
            for model in ("finetuned", "base")
        },
    }
    mean_logp = {
        f"{model}/{side}": sum(d.total for d in docs[side, model]) / sum(d.tokens for d in docs[side, model])
        for side in ("in", "out")
        for model in ("finetuned", "base")
    }
    return {"auroc_sum": sums, "mean_logp_per_token": mean_logp}


def study_seed(out: Path, n: dict[str, int], seed: int) -> dict:
    """``{finetune: {pair: row}}`` for one seed: its base, its fine-tunes and one ``lmlab eval ood`` per pair."""
    seed_dir = out / f"s{seed}"
    base = train_base(seed_dir / "base", n, seed)
    results: dict[str, dict] = {}
    for finetune in FINETUNES:
        suffix = "" if finetune == "full" else f"_{finetune}"
        tuned = {a: fine_tune(seed_dir / f"ft_{a}{suffix}", base, a, finetune, n, seed) for a in tuned_domains()}
        for pair, (a, b) in PAIRS.items():
            files = {
                d: write_heldout(out / "data" / f"s{seed}" / f"{d}.jsonl", d, seed, n["eval_docs"]) for d in (a, b)
            }
            scores = seed_dir / f"ood_{pair}{suffix}.jsonl"
            report = eval_ood(tuned[TUNED_ON.get(a, a)], base, files[a], files[b], scores)
            per_token = {"likelihood_ratio": report["auroc"]}
            per_token.update({name: r["auroc"] for name, r in report["baselines"].items()})
            results.setdefault(finetune, {})[pair] = {
                "auroc_per_token": per_token,
                "interval_per_token": report["interval"],
                "n_in": report["n_in"],
                "n_out": report["n_out"],
                "truncated": report["truncated"],
                **summarize_scores(scores),
            }
            print(f"  seed {seed} {finetune} {pair}: {per_token}, ratio interval {report['interval']}", flush=True)
    return results


def tuned_domains() -> list[str]:
    return sorted({TUNED_ON.get(a, a) for a, _ in PAIRS.values()})


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def fmt(values: list[float], digits: int = 3) -> str:
    m, h = mean_ci(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def markdown(res: dict) -> str:
    seeds, per_seed = res["seeds"], res["per_seed"]

    def values(finetune: str, pair: str, *keys: str) -> list[float]:
        out = []
        for s in seeds:
            value = per_seed[str(s)][finetune][pair]
            for k in keys:
                value = value[k]
            out.append(value)
        return out

    lines = []
    for reduction, title in (("auroc_per_token", "per token (the default)"), ("auroc_sum", "summed over the document")):
        lines += [f"### AUROC, in-domain = positive, scores {title}", ""]
        lines += [
            "| fine-tune | in (tuned on) vs out | " + " | ".join(METHODS) + " |",
            "|---" * (len(METHODS) + 2) + "|",
        ]
        for finetune in FINETUNES:
            for pair, (a, b) in PAIRS.items():
                cells = [fmt(values(finetune, pair, reduction, m)) for m in METHODS]
                lines.append(f"| {finetune} | {a} vs {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Mean log-likelihood per token (nats) of the held-out documents", ""]
    lines += ["| fine-tune | in vs out | fine-tuned (in) | fine-tuned (out) | base (in) | base (out) |"]
    lines += ["|---|---|---|---|---|---|"]
    for finetune in FINETUNES:
        for pair, (a, b) in PAIRS.items():
            keys = ("finetuned/in", "finetuned/out", "base/in", "base/out")
            cells = [fmt(values(finetune, pair, "mean_logp_per_token", k), 2) for k in keys]
            lines.append(f"| {finetune} | {a} vs {b} | " + " | ".join(cells) + " |")
    lines += ["", "### Per seed: ratio AUROC (per token) with its Hanley–McNeil 95% interval", ""]
    lines += ["| fine-tune | in vs out | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---" * (len(seeds) + 2) + "|"]
    for finetune in FINETUNES:
        for pair, (a, b) in PAIRS.items():
            cells = []
            for s in seeds:
                r = per_seed[str(s)][finetune][pair]
                lo, hi = r["interval_per_token"]
                cells.append(f"{r['auroc_per_token']['likelihood_ratio']:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {finetune} | {a} vs {b} | " + " | ".join(cells) + " |")
    n = res["sizes"]["eval_docs"]
    lines += ["", f"Seeds {seeds}; {n} + {n} held-out documents per pair and seed; mean ± 95% CI (Student t over"]
    lines += [f"seeds); wall time {res['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (runs and reports are reused when present)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = sizes(args.quick)
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    res: dict = {"seeds": seeds, "sizes": n, "pairs": PAIRS, "finetunes": FINETUNES, "per_seed": {}}
    for seed in seeds:
        print(f"seed {seed} ...", flush=True)
        res["per_seed"][str(seed)] = study_seed(out, n, seed)
    res["summary"] = {
        finetune: {
            pair: {
                reduction: {
                    m: dict(
                        zip(
                            ("mean", "ci95"),
                            mean_ci([res["per_seed"][str(s)][finetune][pair][reduction][m] for s in seeds]),
                        )
                    )
                    for m in METHODS
                }
                for reduction in ("auroc_per_token", "auroc_sum")
            }
            for pair in PAIRS
        }
        for finetune in FINETUNES
    }
    res["wall_time_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
