"""Adapters between lmlab and PEFT: ``lmlab export-hf RUN OUT --adapter`` writes an adapter run's LoRA / DoRA as a
PEFT adapter directory, and ``lmlab import-hf ADAPTER_DIR --base RUN --out NEW`` turns a PEFT adapter into an
adapter run on ``RUN`` (``lmlab.train.adapters``), usable by every command that reads runs.

A PEFT adapter applies to the Hugging Face export of the base: ``lmlab export-hf BASE_RUN BASE_HF`` then
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), OUT)``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from lmlab.config import RunConfig, TokenizerConfig, load_config, save_config, validate
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError
from lmlab.models.build import build_model
from lmlab.models.peft_io import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from lmlab.safe_io import write_text_atomic
from lmlab.train import checkpoint as ckpt_io
from lmlab.train.adapters import BASE_KEY, base_record
from lmlab.train.pretrained import load_init_weights, load_run_model, run_directory, run_head


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def export_adapter(run_dir: str | Path, tmp: Path) -> None:
    """Write the adapters of an adapter run (or one of its checkpoints) into ``tmp`` in PEFT's format."""
    root = run_directory(run_dir)
    if run_head(root) == "reward":
        raise UserError(f"{run_dir} is a reward model: its head is not a PEFT adapter; export it without --adapter")
    loaded = load_run_model(run_dir, merged=False)
    if not loaded.cfg.adapter.enabled:
        raise UserError(f"{run_dir} trained every weight (adapter.kind=none); export it without --adapter")
    save_peft_adapter(loaded.model, loaded.cfg.adapter, tmp, base=loaded.cfg.init_from)


def import_peft_adapter(src: Path, out: Path, base: str | Path, *, name: str | None = None) -> RunConfig:
    """An adapter run in ``out`` holding the PEFT adapter of ``src`` on the lmlab run ``base``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory; choose a new --out directory")
    base_root = run_directory(base, "--base run directory")
    base_cfg = load_config(base_root / "config.yaml")
    if base_cfg.adapter.enabled:
        raise UserError(f"--base {base} is itself an adapter run; give the run its adapters were trained on")
    model = build_model(base_cfg.model)
    load_init_weights(model, base, base_cfg)  # the base's weights: DoRA's norms need them
    adapter = load_peft_adapter(model, src)
    tok_path = base_root / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"--base {base} has no tokenizer.json")
    tokenizer = TextTokenizer.load(tok_path)
    cfg = dataclasses.replace(
        base_cfg,
        name=name or src.resolve().name,
        init_from=str(Path(base).resolve()),
        adapter=adapter,
        tokenizer=TokenizerConfig(path=str((out / "tokenizer.json").resolve())),
    )
    validate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_text_atomic(out / "tokenizer.json", tokenizer.to_json())
        for file_name, text in tokenizer.companion_files().items():
            write_text_atomic(out / file_name, text)
        meta = {"source": "import-peft", "peft_dir": str(src.resolve()), BASE_KEY: base_record(base)}
        ckpt_io.save_checkpoint(out, 0, model, model_cfg=cfg.model, meta=meta)
        save_config(cfg, out / "config.yaml")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return cfg
