"""Adapter runs leave lmlab as transformers and PEFT expect (issue 13 item 4): ``export-hf RUN OUT`` writes the
merged model, whose logits equal lmlab's; ``--adapter`` writes a PEFT adapter that ``peft.PeftModel`` loads onto
the base's export with logits equal lmlab's within 1e-4; ``import-hf ADAPTER --base RUN`` reads it back into an
adapter run with the same logits. LoRA, DoRA and a CorDA-initialised LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.recipes.sft import SFTRecipe
from lmlab.train.engine import execute
from lmlab.train.pretrained import load_run_model

from helpers import tiny_config, write_pairs_and_chat

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_export")
    execute(PretrainRecipe(), tiny_config("train.steps=10", "model.max_seq_len=96"), root / "base", quiet=True)
    write_pairs_and_chat(root, 16)
    for name, kind, init in (("lora", "lora", "lora"), ("dora", "dora", "lora"), ("corda", "lora", "corda_ipm")):
        cfg = tiny_config(
            f"init_from={root / 'base'}", f"sft.train_file={root / 'chat.jsonl'}", "model.max_seq_len=96",
            "train.steps=3", "optim.lr=2e-2", f"adapter.kind={kind}", "adapter.rank=4", "adapter.alpha=8",
            "adapter.rslora=true", "adapter.targets=[q_proj,v_proj,down_proj]", "schedule.warmup_steps=0",
            f"adapter.init={init}", "adapter.corda_samples=4",
        )  # fmt: skip
        execute(SFTRecipe(), cfg, root / name, quiet=True)
    assert main(["export-hf", str(root / "base"), str(root / "base_hf")]) == 0
    return root


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["lora", "dora", "corda"])
def test_merged_export_equals_lmlab(runs, kind):
    assert main(["export-hf", str(runs / kind), str(runs / f"{kind}_merged")]) == 0
    ours = load_run_model(runs / kind).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(runs / f"{kind}_merged").eval()
    x = ids(ours.cfg.vocab_size)
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, ours(x), atol=TOL)


@pytest.mark.parametrize("kind", ["lora", "dora", "corda"])
def test_peft_adapter_export_and_import(runs, kind):
    """A CorDA run's adapter (B A − B₀A₀) is written as one rank-2r LoRA."""
    out = runs / f"{kind}_peft"
    assert main(["export-hf", str(runs / kind), str(out), "--adapter"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is (kind == "dora") and config["use_rslora"] is True
    assert config["r"] == (8 if kind == "corda" else 4)
    ours = load_run_model(runs / kind).model
    base = transformers.AutoModelForCausalLM.from_pretrained(runs / "base_hf")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    x = ids(ours.cfg.vocab_size)
    with torch.no_grad():
        expected = ours(x)
        assert torch.allclose(theirs(x).logits, expected, atol=TOL)
    # and back: the PEFT directory as an adapter run on the same base
    back = runs / f"{kind}_back"
    assert main(["import-hf", str(out), "--base", str(runs / "base"), "--out", str(back)]) == 0
    with torch.no_grad():
        assert torch.allclose(load_run_model(back).model(x), expected, atol=TOL)


def test_adapter_export_refusals(runs, capsys):
    assert main(["export-hf", str(runs / "base"), str(runs / "nope"), "--adapter"]) == 1
    assert "adapter.kind=none" in capsys.readouterr().err
    assert main(["import-hf", str(runs / "base_hf"), "--out", str(runs / "y"), "--base", str(runs / "base")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["export-hf", str(runs / "lora"), str(runs / "lora_as_peft"), "--adapter"]) == 0
    assert main(["import-hf", str(runs / "lora_as_peft"), "--out", str(runs / "z")]) == 1
    assert "--base RUN" in capsys.readouterr().err
