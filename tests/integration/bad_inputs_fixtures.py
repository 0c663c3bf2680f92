"""The workspace that tests/integration/test_bad_inputs.py runs its bad inputs against.

``build_workspace(root)`` lays out, with paths relative to ``root`` (the tests run with ``root`` as the
working directory, as in docs BAD-INPUTS.md): configs in ``cfg/``, good data and prepared shards in
``data/``, tokenizers in ``tok512/`` and ``tok600/``, tiny finished runs in ``runs/``, Hugging Face
directories in ``hf/`` and the malformed inputs in ``bad/``. Everything is made locally in seconds:
tiny models, a few hundred synthetic documents, no network.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from lmlab.cli import main
from lmlab.config import load_config
from lmlab.data.synthetic import get_world
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.data.synthetic.preference_world import PreferenceWorld
from lmlab.models.decoder import Decoder
from lmlab.recipes.hf_commands import export_hf
from lmlab.train.checkpoint import CKPT_DIR, save_checkpoint

# configs/demo.yaml at a size that trains in about a second on one core
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 128},
    "tokenizer": {"vocab_size": 512, "train_docs": 200},
    "data": {"synthetic": {"n_docs": 300}, "val_fraction": 0.1, "num_workers": 1},
    "schedule": {"warmup_steps": 2},
    "train": {
        "steps": 6,
        "micro_batch_size": 4,
        "seq_len": 32,
        "eval_every": 3,
        "eval_tokens": 256,
        "log_every": 1,
        "ckpt_every": 3,
        "progress": False,
        "device": "cpu",
    },
    "sample": {"max_new_tokens": 8},
}
RUN_TRAIN = {  # the train section of the fine-tuning configs (sft, align, reward)
    "steps": 4,
    "micro_batch_size": 4,
    "eval_every": 2,
    "log_every": 1,
    "ckpt_every": 4,
    "device": "cpu",
    "progress": False,
}
BINARY = bytes([0xCF, 0x80, 0xFF, 0xFE, 0x00, 0x01, 0x9C]) * 64  # not UTF-8 at byte 0
UNICODE_TEXTS = ["🚀 日本語のテキスト \u200b zero width", "Ünïcödé çåfé — naïve résumé ✓", "emoji 🎉🐍🔥 and Ελληνικά"]


def cli(*argv: str) -> None:
    """Run one lmlab command in-process (cwd must be the workspace); fail loudly if it does not succeed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"workspace setup: lmlab {' '.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}")


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def copy_run(src: Path, dst: Path, *, checkpoints: bool = True) -> Path:
    ignore = None if checkpoints else shutil.ignore_patterns(CKPT_DIR)
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def build_workspace(root: Path) -> Path:
    """Create every input of the catalogue under ``root``; return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(root)
    try:
        _build_configs_and_data()
        _build_runs()
        _build_hf_dirs()
        _build_bad_files()
    finally:
        os.chdir(previous)
    return root


def _build_configs_and_data() -> None:
    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    write_yaml(Path("cfg/tiny.yaml"), deep_merge(demo, TINY))
    stories = list(get_world("stories").documents(1, 200))
    write_jsonl(Path("data/stories.jsonl"), [{"text": t} for t in stories])
    write_jsonl(Path("data/other.jsonl"), [{"text": t} for t in get_world("stories").documents(7, 60)])
    for vocab in (512, 600):
        cli("tokenizer", "train", "data/stories.jsonl", "--vocab-size", str(vocab), "--out", f"tok{vocab}")
        cli("data", "prepare", "data/stories.jsonl", "--tokenizer", f"tok{vocab}", "--out", f"data/prep{vocab}")
    # a prepared directory of other data, the victim of C53
    cli("data", "prepare", "data/other.jsonl", "--tokenizer", "tok512", "--out", "data/prep512_copy")

    facts = FactsWorld().qa_conversations(0, 12, "train")
    write_jsonl(Path("data/sft.jsonl"), [{"messages": c["messages"]} for c in facts])
    world = PreferenceWorld()
    world.write_pairs("data/pref.jsonl", 0, 24, "train")
    world.write_pairs("data/pref_val.jsonl", 1, 6, "test")
    write_yaml(
        Path("cfg/sft.yaml"),
        {
            "name": "sft-tiny",
            "init_from": "runs/base1",
            "sft": {"train_file": "data/sft.jsonl", "loss_on": "assistant", "packing": True},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "train": {**RUN_TRAIN, "seq_len": 64},
            "sample": {"max_new_tokens": 4},
        },
    )
    write_yaml(
        Path("cfg/align.yaml"),
        {
            "name": "align-tiny",
            "init_from": "runs/base1",
            "optim": {"lr": 3e-3},
            "schedule": {"name": "constant"},
            "train": RUN_TRAIN,
            "sample": {"max_new_tokens": 4},
            "align": {
                "train_file": "data/pref.jsonl",
                "val_file": "data/pref_val.jsonl",
                "diagnostics_every": 0,
                "max_prompt_len": 48,
                "max_len": 96,
            },
        },
    )


def _build_runs() -> None:
    base = Path("runs/base1")
    cli("train", "cfg/tiny.yaml", "--out", str(base), "--quiet")
    cli("reward", "train", "cfg/align.yaml", "--out", "runs/rm1", "train.steps=2", "--quiet")
    copy_run(base, Path("runs/ref_train_300"))
    copy_run(base, Path("runs/other_size"))
    copy_run(base, Path("runs/holds_run_nockpt"), checkpoints=False)  # metrics, config, summary; no checkpoint
    copy_run(base, Path("runs/onerun/r1"))
    # a run whose latest checkpoint holds another model (d_model 64 where config.yaml says 32)
    symck = copy_run(base, Path("runs/symck"))
    cfg = load_config(symck / "config.yaml", ["model.d_model=64"])
    torch.manual_seed(0)
    save_checkpoint(symck, 99, Decoder(cfg.model), model_cfg=cfg.model)
    Path("runs/fitok").mkdir()
    fit = {"law": "annealing", "params": {"L0": 2.0, "A": 1.0, "C": 0.5, "alpha": 0.5}, "momentum": 0.999}
    (Path("runs/fitok") / "fit.json").write_text(json.dumps(fit))


def _build_hf_dirs() -> None:
    hf = Path("hf")
    good = export_hf("runs/base1", hf / "llama")
    (hf / "gpt2").mkdir()
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "vocab_size": 512}
    (hf / "gpt2" / "config.json").write_text(json.dumps(gpt2))
    (hf / "badjson").mkdir()
    (hf / "badjson" / "config.json").write_text('{"model_type": "llama",\n}\n')
    (hf / "ptbin").mkdir()
    shutil.copyfile(good / "config.json", hf / "ptbin" / "config.json")
    shutil.copyfile(good / "tokenizer.json", hf / "ptbin" / "tokenizer.json")
    (hf / "ptbin" / "pytorch_model.bin").write_bytes(b"a pickle lmlab must never open")
    wrong = shutil.copytree(good, hf / "wrongshape")
    config = json.loads((wrong / "config.json").read_text())
    config["vocab_size"] += 64  # the embedding tables keep the old number of rows
    (wrong / "config.json").write_text(json.dumps(config, indent=2))
    # another model's HF directory, with remote code (auto_map) beside its weights: C85's victim
    automap = shutil.copytree(good, hf / "automap")
    config = json.loads((automap / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (automap / "config.json").write_text(json.dumps(config, indent=2))
    (automap / "modeling_evil.py").write_text("raise SystemExit('remote code must never run')\n")


def _build_bad_files() -> None:
    bad = Path("bad")
    bad.mkdir()
    (bad / "afile.txt").write_text("just a file, not a run, a config or a directory\n")
    (bad / "empty.yaml").write_text("")
    (bad / "binary.yaml").write_bytes(b"\x00\x80" + BINARY)
    (bad / "list.yaml").write_text("- model\n- train\n")
    (bad / "badindent.yaml").write_text("model:\n  d_model: 32\n    n_layers: 2\n")
    (bad / "wrongtype.yaml").write_text("train:\n  steps: many\n")
    (bad / "wrongtype2.yaml").write_text("train:\n  steps: [1, 2]\n")
    (bad / "dupkeys.yaml").write_text("train:\n  steps: 10\n  seq_len: 32\n  steps: 20\n")
    (bad / "empty.jsonl").write_text("")
    (bad / "blank.jsonl").write_text("\n\n   \n\n")
    (bad / "blank.txt").write_text("\n\n\n")
    (bad / "binary.jsonl").write_bytes(BINARY)
    (bad / "binary.txt").write_bytes(BINARY)
    # line 2 holds a raw control character (a tab) inside a JSON string
    (bad / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": "tab\there"}\n')
    write_jsonl(bad / "wrongfield.jsonl", [{"body": "the text is under another name"}])
    write_jsonl(bad / "wrongtype.jsonl", [{"text": 42}])
    write_jsonl(bad / "array.jsonl", [["a", "list", "not", "an", "object"]])
    write_jsonl(bad / "unicode.jsonl", [{"text": UNICODE_TEXTS[i % 3] + f" {i}"} for i in range(40)])
    write_jsonl(bad / "sft_wrongfield.jsonl", [{"question": "Who?", "answer": "Me."}])
    write_jsonl(bad / "sft_badroles.jsonl", [{"messages": [{"role": "wizard", "content": "abracadabra"}]}])
    write_jsonl(bad / "pref_missing.jsonl", [{"prompt": "Q?", "chosen": " yes."}])
    write_jsonl(bad / "pref_identical.jsonl", [{"prompt": "Q?", "chosen": " same.", "rejected": " same."}] * 20)
    write_jsonl(bad / "pref_types.jsonl", [{"prompt": "Q?", "chosen": 2, "rejected": " no."}])
    write_yaml(bad / "sweep_badkey.yaml", {"base": "../cfg/tiny.yaml", "runs": [{"model.d_modell": 64}]})
    write_yaml(bad / "sweep_nobase.yaml", {"base": "nothere.yaml", "runs": [{"train.steps": 5}]})
