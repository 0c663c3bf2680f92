"""Preference-optimisation study on the synthetic ``preferences`` world (issue 4, item 6).

From one SFT model (a tiny decoder trained on the world's question/answer documents, where answers are
concise, padded or wrong), this script:

1. trains DPO, LN-DPO and SimPO on the same preference pairs for several seeds and reports, as
   mean ± 95% CI (Student t over seeds): held-out preference accuracy (implied-reward accuracy on
   in-distribution test pairs), judged correctness and mean length (words) of answers sampled at
   temperature 1 on held-out prompts, and the Monte-Carlo KL(πθ ‖ πref) on those samples;
2. runs DPO with a large learning rate and logs, every few steps, the chosen and rejected log-probs,
   the margin and the gradient-entanglement cosine (Yuan et al. 2024, arXiv 2410.13828), to look for the chosen log-prob
   falling while the margin grows;
3. trains plain and regularised (LM-loss) reward models and compares their pairwise accuracy on the
   in-distribution and the out-of-distribution split (Yang et al. 2024, arXiv 2406.10216).

Everything runs in-process through ``lmlab.recipes.pretrain.run_pretraining``, ``lmlab.recipes.align.run_align``
and ``lmlab.recipes.reward.run_reward``. Results go to ``OUT/results.json`` and ``OUT/results.md``.

    python examples/preference_study/run_study.py --out runs/preference_study          # full (minutes on CPU)
    python examples/preference_study/run_study.py --out /tmp/study --quick             # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.data.synthetic.preference_world import PreferenceWorld, judge
from lmlab.recipes.align import run_align
from lmlab.recipes.pretrain import run_pretraining
from lmlab.recipes.reward import run_reward
from lmlab.train.metrics import read_metrics

LOSSES = {  # method -> overrides; β values: DPO's default, SimPO's official, LN-DPO larger (normalised ratios)
    "dpo": ["align.loss=dpo", "align.beta=0.1"],
    "ln_dpo": ["align.loss=ln_dpo", "align.beta=2.0"],
    "simpo": ["align.loss=simpo", "align.beta=2.0", "align.gamma=0.5"],
}


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(docs=600, sft_steps=20, pairs=64, test=16, ood=16, align_steps=4, rm_steps=4, probe_steps=6)
    return dict(docs=6000, sft_steps=300, pairs=640, test=128, ood=128, align_steps=40, rm_steps=60, probe_steps=60)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, half


def fmt(values: list[float], digits: int = 3) -> str:
    m, h = mean_ci(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def common() -> list[str]:
    return ["train.device=cpu", "train.progress=false", "train.keep_last=1", "data.num_workers=1"]


def train_sft(out: Path, n: dict[str, int]) -> Path:
    import lmlab.data.synthetic.preference_world  # noqa: F401  (registers the world)

    cfg = load_config(
        None,
        [
            *common(),
            "name=pref-sft",
            "data.synthetic.world=preferences",
            f"data.synthetic.n_docs={n['docs']}",
            "tokenizer.vocab_size=512",
            "tokenizer.train_docs=2000",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.max_seq_len=96",
            "train.seq_len=64",
            "train.micro_batch_size=32",
            f"train.steps={n['sft_steps']}",
            f"train.eval_every={n['sft_steps']}",
            f"train.ckpt_every={n['sft_steps']}",
            "train.eval_tokens=8192",
            "train.log_every=50",
            "optim.lr=3e-3",
            f"schedule.warmup_steps={min(20, n['sft_steps'])}",
            "sample.prompts=['Question: What is 2 plus 3?']",
            "sample.max_new_tokens=16",
        ],
    )
    run_dir = out / "sft"
    if (
        not (run_dir / "summary.json").is_file()
        or json.loads((run_dir / "summary.json").read_text())["status"] != "finished"
    ):
        run_pretraining(cfg, run_dir, quiet=True)
    return run_dir


def align_overrides(sft: Path, files: dict[str, Path], steps: int, seed: int, extra: list[str]) -> list[str]:
    return [
        *common(),
        f"init_from={sft}",
        f"align.train_file={files['train']}",
        f"align.val_file={files['test']}",
        "align.max_prompt_len=40",
        "align.max_len=96",
        f"align.diagnostics_every={max(1, steps // 6)}",
        f"train.steps={steps}",
        "train.micro_batch_size=16",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        "train.log_every=5",
        f"train.seed={seed}",
        "optim.lr=1e-4",
        "optim.weight_decay=0.0",
        "schedule.name=constant",
        "sample.max_new_tokens=32",
        *extra,
    ]


def judge_samples(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()]
    verdicts = [judge(r["prompt"], r["completion"]) for r in rows]
    n = max(len(verdicts), 1)
    return {
        "judged_correct": sum(v.correct for v in verdicts) / n,
        "words": sum(v.words for v in verdicts) / n,
        "padded": sum(v.padded for v in verdicts) / n,
    }


def greedy_judge(run_dir: Path, test_file: Path, n_prompts: int = 64, max_new_tokens: int = 32) -> dict[str, float]:
    """Judge greedy answers (temperature 0) of the run's model on the first ``n_prompts`` held-out prompts."""
    from lmlab.models.generation import generate
    from lmlab.train.pretrained import load_model

    model, _, tok = load_model(run_dir)
    rows = [json.loads(x) for x in test_file.read_text().splitlines()[:n_prompts]]
    verdicts = []
    for r in rows:
        new = generate(
            model, [tok.eos_id, *tok.encode(r["prompt"])], max_new_tokens, temperature=0.0, eos_id=tok.eos_id
        )
        verdicts.append(judge(r["prompt"], tok.decode(new, skip_special_tokens=True)))
    return {
        "greedy_correct": sum(v.correct for v in verdicts) / len(verdicts),
        "greedy_words": sum(v.words for v in verdicts) / len(verdicts),
    }


def study_losses(out: Path, sft: Path, files: dict[str, Path], n: dict, seeds: list[int]) -> dict:
    results: dict[str, list[dict]] = {}
    for method, extra in LOSSES.items():
        for seed in seeds:
            run_dir = out / f"{method}_s{seed}"
            if not (run_dir / "samples.jsonl").is_file():
                cfg = load_config(None, align_overrides(sft, files, n["align_steps"], seed, extra))
                run_align(cfg, run_dir, quiet=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            row = {
                "seed": seed,
                "val_accuracy": summary["final_val_accuracy"],
                "kl": summary.get("kl_to_reference"),
                **judge_samples(run_dir),
                **greedy_judge(run_dir, files["test"]),
            }
            results.setdefault(method, []).append(row)
            print(f"  {method} seed {seed}: {row}", flush=True)
    return results


def reference_samples(out: Path, sft: Path, files: dict[str, Path], seeds: list[int]) -> dict:
    """The SFT model itself, judged the same way (a zero-step SimPO run samples from the initial policy)."""
    rows = []
    for seed in seeds:
        run_dir = out / f"sft_samples_s{seed}"
        if not (run_dir / "samples.jsonl").is_file():
            cfg = load_config(None, align_overrides(sft, files, 1, seed, ["align.loss=simpo", "optim.lr=0.0"]))
            run_align(cfg, run_dir, quiet=True)
        rows.append({"seed": seed, **judge_samples(run_dir), **greedy_judge(sft, files["test"])})
    return {"sft": rows}


def study_entanglement(out: Path, sft: Path, files: dict[str, Path], n: dict) -> dict:
    run_dir = out / "dpo_entanglement"
    steps = n["probe_steps"]
    if not (run_dir / "summary.json").is_file():
        extra = ["align.loss=dpo", "align.beta=0.1", "optim.lr=3e-3", f"align.diagnostics_every={max(1, steps // 12)}"]
        cfg = load_config(None, align_overrides(sft, files, steps, 0, extra))
        run_align(cfg, run_dir, quiet=True)
    records = read_metrics(run_dir)
    diag = [r for r in records if r["kind"] == "diagnostic"]
    rows = [
        {
            "step": r["step"],
            "logp_chosen": r["probe_logps/chosen"],
            "logp_rejected": r["probe_logps/rejected"],
            "margin": r["probe_margin"],
            "grad_cos": r["grad_cos"],
            "norm_chosen": r["grad_norm_chosen"],
            "norm_rejected": r["grad_norm_rejected"],
        }
        for r in diag
    ]
    falls = bool(rows) and rows[-1]["logp_chosen"] < rows[0]["logp_chosen"] and rows[-1]["margin"] > rows[0]["margin"]
    return {"rows": rows, "chosen_falls_while_margin_grows": falls}


def study_reward(out: Path, sft: Path, files: dict[str, Path], n: dict, seeds: list[int]) -> dict:
    results: dict[str, list[dict]] = {}
    for name, weight in (("plain", 0.0), ("regularized", 1.0)):
        for seed in seeds:
            run_dir = out / f"rm_{name}_s{seed}"
            if not (run_dir / "summary.json").is_file():
                overrides = align_overrides(sft, files, n["rm_steps"], seed, ["optim.lr=1e-3"])
                overrides += [f"reward.lm_weight={weight}", f"reward.ood_file={files['ood']}"]
                run_reward(load_config(None, overrides), run_dir, quiet=True)
            s = json.loads((run_dir / "summary.json").read_text())
            row = {"seed": seed, "id_accuracy": s["val"]["accuracy"], "ood_accuracy": s["ood"]["accuracy"]}
            results.setdefault(name, []).append(row)
            print(f"  reward {name} seed {seed}: {row}", flush=True)
    return results


def markdown(res: dict) -> str:
    lines = ["### DPO vs LN-DPO vs SimPO from the same SFT model", ""]
    lines += [
        "| method | held-out pref. accuracy | judged correct, T=1 samples | judged correct, greedy "
        "| answer length (words, T=1) | greedy length (words) | padded answers (T=1) | KL to ref (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sft = res["reference"]["sft"]
    lines.append(
        f"| SFT (reference) | – | {fmt([r['judged_correct'] for r in sft])} | {sft[0]['greedy_correct']:.3f} "
        f"| {fmt([r['words'] for r in sft], 2)} | {sft[0]['greedy_words']:.2f} | {fmt([r['padded'] for r in sft])} | 0 |"
    )
    for method, rows in res["losses"].items():
        lines.append(
            f"| {method} | {fmt([r['val_accuracy'] for r in rows])} | {fmt([r['judged_correct'] for r in rows])} "
            f"| {fmt([r['greedy_correct'] for r in rows])} | {fmt([r['words'] for r in rows], 2)} "
            f"| {fmt([r['greedy_words'] for r in rows], 2)} | {fmt([r['padded'] for r in rows])} "
            f"| {fmt([r['kl'] for r in rows], 2)} |"
        )
    ent = res["entanglement"]
    lines += ["", "### Gradient entanglement (DPO, lr 3e-3, probe = 8 held-out pairs)", ""]
    lines += ["| step | log π(y_w) | log π(y_l) | margin | cos(∇log π(y_w), ∇log π(y_l)) | ‖∇w‖ | ‖∇l‖ |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in ent["rows"]:
        lines.append(
            f"| {r['step']} | {r['logp_chosen']:.2f} | {r['logp_rejected']:.2f} | {r['margin']:.2f} | "
            f"{r['grad_cos']:.3f} | {r['norm_chosen']:.2f} | {r['norm_rejected']:.2f} |"
        )
    lines += ["", f"Chosen log-prob fell while the margin grew: **{ent['chosen_falls_while_margin_grows']}**."]
    lines += ["", "### Reward models: plain vs regularised (LM loss weight 1.0)", ""]
    lines += ["| reward model | in-distribution accuracy | OOD accuracy |", "|---|---|---|"]
    for name, rows in res["reward"].items():
        lines.append(f"| {name} | {fmt([r['id_accuracy'] for r in rows])} | {fmt([r['ood_accuracy'] for r in rows])} |")
    lines += ["", f"Seeds: {res['seeds']}; mean ± 95% CI (Student t); wall time {res['wall_time_s']:.0f}s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (runs are reused when present)")
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
    world = PreferenceWorld(p_wrong=0.5)
    files = {
        "train": world.write_pairs(out / "data" / "train.jsonl", 0, n["pairs"], "train"),
        "test": world.write_pairs(out / "data" / "test.jsonl", 1, n["test"], "test"),
        "ood": world.write_pairs(out / "data" / "ood.jsonl", 2, n["ood"], "ood"),
    }
    print("SFT model ...", flush=True)
    sft = train_sft(out, n)
    print("preference losses ...", flush=True)
    res = {"seeds": seeds, "sizes": n}
    res["reference"] = reference_samples(out, sft, files, seeds)
    res["losses"] = study_losses(out, sft, files, n, seeds)
    print("gradient entanglement ...", flush=True)
    res["entanglement"] = study_entanglement(out, sft, files, n)
    print("reward models ...", flush=True)
    res["reward"] = study_reward(out, sft, files, n, seeds)
    res["wall_time_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
