"""Does a model exported with ``lmlab export-hf`` behave in the Hugging Face ecosystem as it does in lmlab?

A small model is pretrained on the ``facts`` world and exported. With each side's defaults, the script counts
prompts where transformers' ``tokenizer(text)`` gives lmlab's ids and where greedy ``generate`` gives the text of
``lmlab generate --temperature 0``, and takes lm-eval's per-choice log-likelihoods on ``lmlab_facts_mc`` from its
``hf`` model on the export and from ``lmlab eval harness``'s model on the run. The "bare text" columns are what a
tokenizer without lmlab's document prefix gives (``add_special_tokens=False``; the exports before the prefix was
written into the tokenizer behaved so).

    python benchmarks/hf_round_trip.py --out runs/hf_round_trip      # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = [
    "Marta Oyelaran was born in",
    "The capital of",
    "Once upon a time",
    "Her favourite colour is",
    "He works as a",
    "Q: Where was",
]


def train(out: Path) -> Path:
    from lmlab.config import load_config
    from lmlab.recipes.pretrain import run_pretraining

    run = out / "run"
    if not (run / "summary.json").is_file():
        overrides = [
            "model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.max_seq_len=128", "tokenizer.vocab_size=1024", "tokenizer.train_docs=2000",
            "data.synthetic.world=facts", "data.synthetic.n_docs=2000", "data.val_fraction=0.02",
            "train.steps=300", "train.micro_batch_size=16", "train.seq_len=128", "train.eval_every=300",
            "train.ckpt_every=300", "train.progress=false", "train.device=cpu", "optim.lr=3e-3",
            "schedule.warmup_steps=20",
        ]  # fmt: skip
        run_pretraining(load_config(None, overrides), run, quiet=True, overwrite=True)
    return run


def lmlab_text(run: Path, prompt: str, new_tokens: int) -> str:
    import contextlib
    import io

    from lmlab.cli import main as lmlab_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        argv = ["generate", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(new_tokens)]
        assert lmlab_main(argv) == 0
    return buffer.getvalue().rstrip("\n")


def ecosystem(run: Path, exported: Path, new_tokens: int = 24) -> dict:
    import transformers

    from lmlab.train.pretrained import run_tokenizer

    tok = run_tokenizer(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    rows = []
    for prompt in PROMPTS:
        ours = lmlab_text(run, prompt, new_tokens)
        texts = {}
        for name, special in (("default", True), ("bare", False)):
            ids = hf_tok(prompt, add_special_tokens=special, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, do_sample=False, max_new_tokens=new_tokens)
            texts[name] = prompt + hf_tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append(
            {
                "prompt": prompt,
                "ids_equal": hf_tok(prompt)["input_ids"] == tok.encode_document(prompt),
                "ids_equal_bare": hf_tok(prompt, add_special_tokens=False)["input_ids"] == tok.encode_document(prompt),
                "generation_equal": texts["default"] == ours,
                "generation_equal_bare": texts["bare"] == ours,
                "lmlab": ours,
            }
        )
    return {"prompts": rows, **{k: sum(r[k] for r in rows) for k in rows[0] if k.endswith(("equal", "bare"))}}


def lm_eval_parity(run: Path, exported: Path, limit: int = 200) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmlab.eval.harness import TASKS_DIR, LmlabLM

    manager = TaskManager(include_path=[str(TASKS_DIR)], metadata={"n_people": 2000})
    common = {"tasks": ["lmlab_facts_mc"], "limit": limit, "log_samples": True, "task_manager": manager}
    ours = simple_evaluate(model=LmlabLM(run=str(run), batch_size=16), **common)
    eos = LmlabLM(run=str(run)).eot_token_id
    out = {}
    for name, extra in (("default", ""), ("bare", ",add_bos_token=False")):
        args = f"pretrained={exported},dtype=float32,prefix_token_id={eos}{extra}"
        hf = simple_evaluate(model="hf", model_args=args, device="cpu", batch_size=16, **common)
        diffs = [
            abs(float(a[0][0]) - float(b[0][0]))
            for ra, rb in zip(hf["samples"]["lmlab_facts_mc"], ours["samples"]["lmlab_facts_mc"])
            for a, b in zip(ra["resps"], rb["resps"])
        ]
        out[name] = {
            "choices": len(diffs),
            "max_abs_loglik_diff": max(diffs),
            "acc_hf": hf["results"]["lmlab_facts_mc"]["acc,none"],
        }
    out["acc_lmlab"] = ours["results"]["lmlab_facts_mc"]["acc,none"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hf_round_trip")
    args = p.parse_args()
    from lmlab.recipes.hf_commands import export_hf

    out = Path(args.out)
    run = train(out)
    exported = export_hf(run, out / "export", overwrite=True)
    results = {"ecosystem": ecosystem(run, exported), "lm_eval": lm_eval_parity(run, exported)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
