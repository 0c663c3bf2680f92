"""Model soups on a synthetic world: is a greedy soup of fine-tuned runs at least as good as the best single run?

Wortsman et al. 2022 ("Model soups", arXiv 2203.05482) average the weights of models fine-tuned from one base with
different hyperparameters; the *greedy* soup adds a model only if held-out accuracy does not drop, and matches or
beats the best single model. This script checks the claim at CPU scale with ``lmlab merge``'s functions:

- **Base**: a small decoder pretrained on the ``facts`` world's biographies (``BASE``).
- **Fine-tuning**: question-answer conversations about the same people (the facts world's Q&A), split into SFT
  train / val (for choosing) / test (for reporting). Per study seed, ``len(RECIPES)`` SFT runs of the base with
  different learning rates and data orders (``RECIPES``).
- **Metric**: mean loss on the assistant tokens of the *test* conversations (lower is better). The best single run
  is the one with the lowest *val* loss (as one would choose it); the greedy soup is built on val too.
- **Reported**: per seed the test loss of the best single run, the uniform soup and the greedy soup; over seeds the
  mean ± the half-width of the 95% Student-t interval of (best single − greedy soup), > 0 when the soup is better.

    python examples/merging/run_study.py --out runs/merging          # ~8 min on 2 CPU cores
    python examples/merging/run_study.py --out /tmp/merge --quick    # smoke test

Finished runs are reused, so an interrupted study continues where it stopped. Results: ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from lmlab.config import load_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.models import merging
from lmlab.recipes.merge_command import held_out_score
from lmlab.recipes.pretrain import run_pretraining
from lmlab.recipes.sft import run_sft
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.pretrained import load_run_model

N_PEOPLE = 600
MODEL = ["model.d_model=96", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=128"]
BASE = [
    *MODEL, "tokenizer.vocab_size=1024", "data.synthetic.world=facts", f"data.synthetic.n_docs={N_PEOPLE}",
    "train.steps=600", "train.micro_batch_size=16", "train.seq_len=128", "optim.lr=3e-3", "schedule.warmup_steps=30",
    "train.eval_every=600", "train.ckpt_every=600", "train.progress=false", "train.device=cpu", "train.threads=2",
]  # fmt: skip
RECIPES = [(5e-4, 0), (1e-3, 1), (1e-3, 2), (2e-3, 3), (3e-3, 4)]  # (learning rate, data-order offset)
SEEDS = (0, 1, 2)


def write_splits(out: Path, quick: bool) -> dict[str, Path]:
    """SFT train / val / test JSONL of the facts world's Q&A about the pretrained people (70 / 15 / 15%)."""
    convs = FactsWorld().qa_conversations(0, N_PEOPLE if not quick else 60, "train")
    random.Random(0).shuffle(convs)
    n = len(convs)
    parts = {"train": convs[: int(0.7 * n)], "val": convs[int(0.7 * n) : int(0.85 * n)], "test": convs[int(0.85 * n) :]}
    paths = {}
    for name, rows in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in rows))
    return paths


def finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/merging")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_splits(out, args.quick)
    base = out / "base"
    steps = ["train.steps=20", "schedule.warmup_steps=2"] if args.quick else []
    if not finished(base):
        run_pretraining(load_config(None, [*BASE, *steps]), base, quiet=True, overwrite=True)
    sft_steps = 10 if args.quick else 200
    seeds = SEEDS[:1] if args.quick else SEEDS
    results = {"recipes": RECIPES, "seeds": {}}
    for seed in seeds:
        runs = []
        for lr, offset in RECIPES:
            run = out / f"seed{seed}" / f"lr{lr:g}_order{offset}"
            if not finished(run):
                cfg = load_config(
                    None,
                    [
                        f"init_from={base}", f"sft.train_file={data['train']}", f"sft.val_file={data['val']}",
                        f"optim.lr={lr}", f"train.steps={sft_steps}", "train.micro_batch_size=16", "train.seq_len=128",
                        "schedule.name=cosine", "schedule.warmup_steps=10", f"train.seed={seed * 100 + offset}",
                        f"data.seed={seed * 100 + offset}", f"train.eval_every={sft_steps}",
                        f"train.ckpt_every={sft_steps}", "train.progress=false", "train.device=cpu", "train.threads=2",
                        "sample.prompts=[]",
                    ],
                )  # fmt: skip
                run_sft(cfg, run, quiet=True, overwrite=True)
            runs.append(run)
        loaded = [load_run_model(r, "cpu") for r in runs]
        states = [ckpt_io.model_state_dict(x.model) for x in loaded]
        cfg, tok = loaded[0].cfg, loaded[0].tokenizer
        val, test = held_out_score(cfg, tok, str(data["val"])), held_out_score(cfg, tok, str(data["test"]))
        soup, chosen, val_losses = merging.greedy_soup(states, val)
        best = min(range(len(runs)), key=lambda i: val_losses[i])
        row = {
            "val_loss": val_losses,
            "test_loss": [test(s) for s in states],
            "best_single": runs[best].name,
            "greedy_chosen": [runs[i].name for i in chosen],
            "greedy_val": val(soup),
            "greedy_test": test(soup),
            "uniform_test": test(merging.average(states)),
        }
        row["best_single_test"] = row["test_loss"][best]
        results["seeds"][seed] = row
        print(json.dumps({"seed": seed, **{k: v for k, v in row.items() if k != "val_loss"}}))
    gains = [r["best_single_test"] - r["greedy_test"] for r in results["seeds"].values()]
    results["gain_best_minus_greedy"] = mean_ci(gains)
    results["gain_best_minus_uniform"] = mean_ci(
        [r["best_single_test"] - r["uniform_test"] for r in results["seeds"].values()]
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("gain")}, indent=1))


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of the 95% Student-t interval (0 for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": 0.0, "n": len(values)}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "ci95": half, "n": len(values)}


if __name__ == "__main__":
    main()
