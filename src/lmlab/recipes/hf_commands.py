"""``lmlab import-hf`` and ``lmlab export-hf``: move models between Hugging Face directories
and lmlab run directories (docs/CONTRACTS.md, Run directory).

Import writes ``config.yaml`` (a ``RunConfig`` whose model section describes the HF model),
``tokenizer.json`` and the weights as a step-0 checkpoint, so every lmlab command (generate,
eval, sft, align, a teacher for distillation) can use the model. Export writes
``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json`` that ``transformers`` loads with ``AutoModelForCausalLM`` /
``AutoTokenizer``. Import reads a local directory, or a Hub id (``org/name``) through ``huggingface_hub``:
its cache first, and the network only when ``HF_HUB_OFFLINE`` is not set (``resolve_hf_source``); export is
local-only. Export writes into a fresh or empty
directory; a non-empty one is replaced only with ``--overwrite``, and then wholly (its old files are
removed), so no file of another model (say a ``modeling_*.py`` that ``auto_map`` would run) is left
beside the new weights. An adapter run exports merged, or with ``--adapter`` as a PEFT adapter; a PEFT adapter
directory imports with ``--base RUN`` as an adapter run on that run (``lmlab.recipes.peft_commands``). An imported
chat template without ``{% generation %}`` markers gets them on export where they can be placed and checked
(``lmlab.data.template_markers``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmlab.config import RunConfig, TokenizerConfig, TrainConfig, save_config, validate
from lmlab.data.chat import BUILTIN_TEMPLATE
from lmlab.data.rows import is_hub_id
from lmlab.data.template_markers import add_generation_markers, has_markers
from lmlab.data.tokenizer import CHAT_TOKENS, TextTokenizer, read_backend
from lmlab.data.tokenizer_files import CHAT_TEMPLATE_FILE, GENERATION_CONFIG, TOKENIZER_CONFIG, read_declared
from lmlab.errors import CheckpointError, DataError, UserError
from lmlab.models import hf
from lmlab.models.decoder import Decoder
from lmlab.recipes.peft_commands import export_adapter, import_peft_adapter, is_peft_adapter
from lmlab.safe_io import write_bytes_atomic
from lmlab.train.checkpoint import model_state_dict, save_checkpoint
from lmlab.train.pretrained import load_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- import


# The files import reads (weights, configs, tokenizer, chat template): what a Hub download fetches.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve_hf_source(source: str | Path, revision: str | None = None) -> Path:
    """A local model directory as given, or the snapshot of a Hub id (``org/name``) from ``huggingface_hub``'s
    cache (``HF_HUB_CACHE``), downloaded only when it is missing there and ``HF_HUB_OFFLINE`` is not set."""
    path = Path(source)
    if not is_hub_id(source):  # "runs/x" with a runs/ folder here is a local path
        if not path.is_dir():
            raise UserError(f"Hugging Face directory not found: {path} (nor is it a Hub id like org/name)")
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(
            f"{source} is not a local directory; reading a Hub id needs huggingface_hub (pip install 'lmlab[hf]')"
        ) from None
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{source}: directory not found, and as a Hub id it is not in the Hugging Face cache while downloading "
            "is off (HF_HUB_OFFLINE) or the Hub is unreachable; download it once with HF_HUB_OFFLINE=0, or give "
            "a local directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"{source}: could not be fetched from the Hugging Face Hub ({err})") from None


def import_hf(
    hf_dir: str | Path, run_dir: str | Path, *, name: str | None = None, revision: str | None = None
) -> RunConfig:
    """Turn a local HF model directory, or a Hub id (``resolve_hf_source``), into an lmlab run directory;
    return its ``RunConfig``."""
    src, out = resolve_hf_source(hf_dir, revision), Path(run_dir)
    if (out / "config.yaml").exists():
        raise UserError(f"{out} already holds a run (config.yaml); choose a new --out directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory; choose a new --out directory")
    hf_config = hf.read_hf_config(src)
    model_cfg = hf.hf_config_to_model_config(hf_config, source=str(src / "config.json"))
    tok_src = src / "tokenizer.json"
    if tok_src.is_file():
        tok_src = hf.shard_path(src, "tokenizer.json", src)  # a symlink out of the model directory is refused
    else:
        raise DataError(
            f"{src} has no tokenizer.json; save the fast tokenizer first "
            "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
        )
    tokenizer = declared_tokenizer(src, tok_src, hf_config)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise DataError(
            f"{tok_src} has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}"
        )
    state = hf.hf_state_dict_to_lmlab(hf.load_hf_state_dict(src), model_cfg)
    with torch.device("meta"):  # check names and shapes without allocating the model
        skeleton = Decoder(model_cfg)
    hf.check_state_dict(skeleton, state, source=str(src))
    hub_name = str(hf_dir).split("/")[-1] if not Path(hf_dir).is_dir() else None
    cfg = RunConfig(
        name=name or hub_name or src.resolve().name,
        model=model_cfg,
        tokenizer=TokenizerConfig(path=str((out / "tokenizer.json").resolve())),
        train=replace(TrainConfig(), seq_len=min(TrainConfig().seq_len, model_cfg.max_seq_len)),
    )
    validate(cfg)

    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "tokenizer.json", tok_src.read_bytes())
    for file_name, text in tokenizer.companion_files().items():  # declared tokens, stop tokens, chat template
        write_bytes_atomic(out / file_name, text.encode())
    save_checkpoint(
        out,
        0,
        state,
        model_cfg=model_cfg,
        meta={
            "source": "import-hf",
            "hf_dir": str(src.resolve()),
            "architecture": hf.hf_architecture(hf_config, str(src)),
        },
    )
    save_config(cfg, out / "config.yaml")
    return cfg


def declared_tokenizer(src: Path, tok_src: Path, hf_config: dict[str, Any]) -> TextTokenizer:
    """The model's tokenizer with the special tokens its files declare: ``tokenizer_config.json`` (and
    ``chat_template.jinja``, ``generation_config.json``) beside it, else the ids of ``config.json``. A model
    that declares no end-of-sequence token anywhere is refused rather than guessed."""
    for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG):
        if (src / name).exists():
            hf.shard_path(src, name, src)  # a symlink out of the model directory is refused
    declared = read_declared(src)
    raw = read_backend(tok_src)
    by_id = {role: hf_config.get(f"{role}_token_id") for role in ("bos", "eos", "pad")}
    fallback: dict[str, str | None] = {}
    for role, tid in by_id.items():
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        fallback[role] = raw.id_to_token(tid) if isinstance(tid, int) else None
    eos = declared.eos or (raw.id_to_token(declared.stop_ids[0]) if declared.stop_ids else None) or fallback["eos"]
    if eos is None:
        raise DataError(
            f"{src} declares no end-of-sequence token (eos_token in {TOKENIZER_CONFIG}, eos_token_id in "
            f"{GENERATION_CONFIG} or config.json); add one so generation knows where to stop"
        )
    config_ids = by_id["eos"] if isinstance(by_id["eos"], list) else []
    try:
        return TextTokenizer(
            raw,
            bos=declared.bos or fallback["bos"],
            eos=eos,
            pad=declared.pad or fallback["pad"],
            extra_stop_ids=[*declared.stop_ids, *config_ids],
            chat_template=declared.chat_template,
            template_origin=declared.template_origin,
            guess_missing=False,
            source=str(tok_src),
        )
    except DataError as err:
        where = f"{src / TOKENIZER_CONFIG}, {GENERATION_CONFIG} or config.json"
        raise DataError(f"{err} (as declared by {where})") from None


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab import-hf",
        description=(
            "Import a Hugging Face checkpoint (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Phi-3, Mixtral, Qwen3-MoE; "
            "safetensors) as a run."
        ),
    )
    parser.add_argument(
        "hf_dir",
        help="directory with config.json, model.safetensors[.index.json], tokenizer.json; or a Hub id (org/name), "
        "read from the Hugging Face cache (downloaded only when HF_HUB_OFFLINE is not set)",
    )
    parser.add_argument("--revision", default=None, help="a Hub id's branch, tag or commit (default: main)")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--name", default=None, help="run name (default: the HF directory's name)")
    parser.add_argument(
        "--base",
        default=None,
        help="for a PEFT adapter directory (adapter_config.json): the lmlab run it applies to; the import is an "
        "adapter run on it",
    )
    args = parser.parse_args(argv)
    if is_peft_adapter(args.hf_dir) or args.base:
        if not args.base:
            raise UserError(f"{args.hf_dir} is a PEFT adapter: name the run it applies to with --base RUN")
        if not is_peft_adapter(args.hf_dir):
            raise UserError(f"--base is for PEFT adapters, but {args.hf_dir} has no adapter_config.json")
        cfg = import_peft_adapter(Path(args.hf_dir), Path(args.out), args.base, name=args.name)
        a = cfg.adapter
        print(f"imported the {a.kind} adapter {args.hf_dir} (rank {a.rank}) on {args.base} -> {args.out}")
        return 0
    cfg = import_hf(args.hf_dir, args.out, name=args.name, revision=args.revision)
    m = cfg.model
    print(
        f"imported {args.hf_dir} -> {args.out}: {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads} heads ({m.kv_heads} kv), vocab {m.vocab_size}"
    )
    return 0


# --------------------------------------------------------------------------- export


def _tokenizer_config(tokenizer: TextTokenizer, max_seq_len: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``PreTrainedTokenizerFast``: the special tokens and the chat template
    (the run's own, else lmlab's built-in one when the vocabulary has lmlab's chat tokens), with ``{% generation %}``
    markers: the built-in template has them; the run's own gets them where ``add_generation_markers`` can place
    them so that they select lmlab's loss mask, and is written unchanged otherwise."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len}
    out.update(tokenizer.special_tokens_config())
    own = out.get("chat_template")
    if own and not has_markers(own):
        out["chat_template"] = add_generation_markers(own, tokenizer) or own
    if "chat_template" not in out and all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS):
        out["chat_template"] = BUILTIN_TEMPLATE
    return out


def _generation_config(tokenizer: TextTokenizer) -> dict[str, Any]:
    """The token ids generation needs (every stop token as ``eos_token_id``), and no sampling settings: a
    user's ``generate`` call decides those."""
    out: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        **tokenizer.stop_config(),
    }
    if tokenizer.pad_id is not None:
        out["pad_token_id"] = tokenizer.pad_id
    return out


def check_export_dir(out: Path, run_root: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty directory (unless ``overwrite``) and, always, one holding the run itself."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose a new directory to export into")
    if not out.is_dir():
        return
    if run_root.exists() and run_root.resolve().is_relative_to(out.resolve()):
        raise UserError(f"{out} holds the run {run_root} itself; export into another directory")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(
            f"{out} is not empty ({shown}); pass --overwrite to replace its contents, or choose a new directory"
        )


def _publish_dir(tmp: Path, out: Path) -> None:
    """Make ``out`` hold exactly the files of ``tmp`` (``out``'s old entries are removed), then drop ``tmp``."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for old in out.iterdir():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for new in tmp.iterdir():
        os.replace(new, out / new.name)
    tmp.rmdir()


def export_hf(
    run_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False, adapter: bool = False
) -> Path:
    """Write the run's (latest, or the given checkpoint directory's) model in HF format to ``out_dir``: an
    adapter run's base with its adapters merged, or with ``adapter`` its adapters alone in PEFT's format.

    ``out_dir`` must be new or empty unless ``overwrite``, which replaces all of its contents. The files
    are written to a temporary sibling first, so a failed export leaves ``out_dir`` as it was.
    """
    run = Path(run_dir)
    run_root = run.parent.parent if (run / "meta.json").is_file() else run
    out = Path(out_dir)
    check_export_dir(out, run_root, overwrite)
    target = out.resolve()  # "." has no name; the temporary sibling must not sit inside ``out``
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    if adapter:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_adapter(run_dir, tmp)
            _publish_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return out
    model, cfg, tokenizer = load_model(run_dir)
    if tokenizer is None:
        raise CheckpointError(f"{run_dir}: the run has no tokenizer.json; a Hugging Face export needs one")
    hf_config = hf.model_config_to_hf_config(
        cfg.model, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, dtype=dtype
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = hf.lmlab_state_dict_to_hf(model_state_dict(model), cfg.model)  # MoE: the family's names
        weights = {k: v.to(_DTYPES[dtype]) for k, v in state.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2))
        (tmp / "tokenizer.json").write_text(tokenizer.json_with_prefix())  # adds lmlab's document prefix
        tok_cfg = _tokenizer_config(tokenizer, cfg.model.max_seq_len)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        _publish_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab export-hf",
        description="Export a run (its latest checkpoint, or a checkpoint directory) in Hugging Face format.",
    )
    parser.add_argument("run_dir", help="run directory, or one of its checkpoints/step_* directories")
    parser.add_argument("out_dir", help="directory to write config.json, model.safetensors, tokenizer files")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty OUT_DIR (all its files)"
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="write an adapter run's LoRA/DoRA adapters in PEFT's format (adapter_config.json, "
        "adapter_model.safetensors) instead of the merged model",
    )
    args = parser.parse_args(argv)
    out = export_hf(args.run_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, adapter=args.adapter)
    if args.adapter:
        print(
            f"exported the adapters of {args.run_dir} -> {out} (PEFT); load them onto the base's export: "
            f"lmlab export-hf BASE_RUN BASE_HF, then peft.PeftModel.from_pretrained(model_of_BASE_HF, {out})"
        )
        return 0
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.run_dir} -> {out} ({arch}, {args.dtype})")
    return 0
