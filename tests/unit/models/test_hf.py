"""Hugging Face interop: import and export of Llama / Mistral / Qwen2 / Qwen3 checkpoints,
checked against ``transformers`` itself on tiny random models (logits to 1e-4 fp32,
weight-exact round trips, greedy generation), plus the user errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unit.models.conftest import HF_VOCAB, write_hf_tokenizer  # noqa: E402

from lmlab.cli import main as cli_main  # noqa: E402
from lmlab.config import RunConfig, TokenizerConfig, load_config, save_config  # noqa: E402
from lmlab.errors import CheckpointError, UserError  # noqa: E402
from lmlab.models import hf  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.models.generation import generate  # noqa: E402
from lmlab.models.rope import RopeScalingConfig  # noqa: E402
from lmlab.recipes.hf_commands import export_main, import_main  # noqa: E402
from lmlab.train.checkpoint import save_checkpoint  # noqa: E402
from lmlab.train.pretrained import load_model  # noqa: E402

from helpers import model_cfg  # noqa: E402

VOCAB = HF_VOCAB
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip
PHI3_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)  # its defaults (32000 …) exceed the test vocabulary
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500.0, tie_word_embeddings=False),
    "smollm_tied": lambda: transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=64, tie_word_embeddings=False),
    # a window shorter than the test sequences (24 tokens): lmlab's sliding-window attention against Mistral's
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    # Qwen3's real shapes: heads wider than hidden / heads (0.6B: 16 heads of 128 on a 1024-wide stream)
    "qwen3_wide_heads": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
    # Llama 3.1/3.2: RoPE frequency scaling; an original context shorter than the test sequences uses all its bands
    "llama3_scaled": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(LLAMA3_SCALING),  # transformers adds keys to it
    ),
    # Phi-3: fused qkv_proj and gate_up_proj; its window as Mistral's
    "phi3": lambda: transformers.Phi3Config(**COMMON, **PHI3_IDS, tie_word_embeddings=False, sliding_window=None),
    "phi3_window": lambda: transformers.Phi3Config(**COMMON, **PHI3_IDS, tie_word_embeddings=False, sliding_window=8),
}
EXPORTED_AS = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_wide_heads": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mistral_window": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",  # written back with its fused projections
    "phi3_window": "Phi3ForCausalLM",
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norm gains near 1, biases non-zero) so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)


def _hf_dir(root: Path, family: str, tokenizer_file: Path, **save_kwargs) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    _randomize(model, seed=1)
    path = root / family
    model.save_pretrained(path, **save_kwargs)
    write_hf_tokenizer(path, tokenizer_file)
    return path, model


def _ids(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_round_trip(family, tmp_path, tokenizer_file):
    hf_path, hf_model = _hf_dir(tmp_path, family, tokenizer_file)
    x = _ids()
    with torch.no_grad():
        expected = hf_model(x).logits

    # import: a run directory that lmlab loads, with the same logits
    assert import_main([str(hf_path), "--out", str(tmp_path / "run")]) == 0
    model, cfg, tokenizer = load_model(tmp_path / "run")
    assert tokenizer.vocab_size == VOCAB
    assert cfg.tokenizer.path == str((tmp_path / "run" / "tokenizer.json").resolve())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)

    # export: transformers loads it and gives the same logits; weights are bit-identical
    assert export_main([str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded).__name__ == EXPORTED_AS.get(family, "LlamaForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-4, rtol=0)
    original = hf.load_hf_state_dict(hf_path)
    exported = hf.load_hf_state_dict(tmp_path / "export")
    if cfg.model.tie_embeddings:
        original.pop("lm_head.weight", None)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    # a bare text gets lmlab's document prefix (EOS) in transformers too; without special tokens the bare ids
    assert hf_tok("the lazy fox")["input_ids"] == tokenizer.encode_document("the lazy fox")
    assert hf_tok("the lazy fox")["input_ids"][0] == tokenizer.eos_id
    assert hf_tok("the lazy fox", add_special_tokens=False)["input_ids"] == tokenizer.encode("the lazy fox")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generation_matches_transformers(family, tmp_path, tokenizer_file):
    hf_path, hf_model = _hf_dir(tmp_path, family, tokenizer_file)
    model, _ = hf.load_hf_model(hf_path)
    prompt = [5, 17, 42, 99, 7]
    ours = generate(model.eval(), prompt, max_new_tokens=20, temperature=0)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert ours == theirs[0, len(prompt) :].tolist()
    assert len(set(ours)) > 3  # a varied continuation, not one repeated token


def test_sharded_checkpoint_loads(tmp_path, tokenizer_file):
    hf_path, hf_model = _hf_dir(tmp_path, "llama", tokenizer_file, max_shard_size="50KB")
    assert (hf_path / "model.safetensors.index.json").is_file() and not (hf_path / "model.safetensors").exists()
    state = hf.load_hf_state_dict(hf_path)
    assert set(state) == set(hf_model.state_dict())
    model, _ = hf.load_hf_model(hf_path)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-4, rtol=0)
    # a shard named by the index but missing is a clear error
    shard = sorted(hf_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        hf.load_hf_state_dict(hf_path)


def test_export_of_an_lmlab_run_with_chat_template(tmp_path, tokenizer_file):
    cfg = RunConfig(
        model=model_cfg(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=16),
        tokenizer=TokenizerConfig(path=str(tokenizer_file)),
    )
    torch.manual_seed(0)
    model = Decoder(cfg.model).eval()
    run = tmp_path / "run"
    save_checkpoint(run, 10, model, model_cfg=cfg.model)
    save_config(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_text(tokenizer_file.read_text())
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    # every token that ends a generation (EOS and the end of a chat turn), and no invented sampling settings
    assert gen["eos_token_id"] == [hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids("<|end|>")]
    assert not {"do_sample", "temperature", "top_k", "top_p"} & set(gen)


def test_export_bf16_and_qk_norm_with_bias_refused(tmp_path, tokenizer_file):
    base = model_cfg(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, ffn_multiple_of=16)
    assert hf.export_architecture(base) == "LlamaForCausalLM"
    assert hf.export_architecture(model_cfg(base, attn_bias=True)) == "Qwen2ForCausalLM"
    assert hf.export_architecture(model_cfg(base, qk_norm=True)) == "Qwen3ForCausalLM"
    with pytest.raises(UserError, match="qk_norm together with model.attention.qkv_bias"):
        hf.model_config_to_hf_config(model_cfg(base, qk_norm=True, attn_bias=True))
    cfg = RunConfig(model=base, tokenizer=TokenizerConfig(path=str(tokenizer_file)))
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run, 1, Decoder(base), model_cfg=base)
    save_config(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_text(tokenizer_file.read_text())
    assert export_main([str(run), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    state = hf.load_hf_state_dict(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def test_config_mapping_details():
    mistral = hf.hf_config_to_model_config(FAMILIES["mistral"]().to_dict() | {"architectures": ["MistralForCausalLM"]})
    assert mistral.attention.kind == "sliding" and mistral.attention.window == 64  # lmlab's own sliding window
    assert (mistral.n_kv_heads, mistral.ffn.hidden, mistral.norm_eps) == (2, 176, 1e-6)
    qwen2 = hf.hf_config_to_model_config(FAMILIES["qwen2"]().to_dict())  # found by model_type
    assert qwen2.attention.qkv_bias and qwen2.tie_embeddings and qwen2.rope_theta == 1e6 and not qwen2.attention.qk_norm
    legacy = {"architectures": ["LlamaForCausalLM"], **COMMON, "rope_theta": 123.0, "rope_scaling": None}
    assert hf.hf_config_to_model_config(legacy).rope_theta == 123.0  # transformers 4 layout
    llama3 = hf.hf_config_to_model_config({**legacy, "rope_scaling": LLAMA3_SCALING})  # transformers 4 layout
    assert llama3.rope_scaling == RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 16)
    v5 = FAMILIES["llama3_scaled"]().to_dict() | {"architectures": ["LlamaForCausalLM"]}  # rope_parameters
    assert "rope_parameters" in v5 and hf.hf_config_to_model_config(v5).rope_scaling == llama3.rope_scaling
    assert hf.model_config_to_hf_config(llama3)["rope_scaling"] == {**LLAMA3_SCALING}
    wide = hf.hf_config_to_model_config(FAMILIES["qwen3_wide_heads"]().to_dict())
    assert (wide.head_size, wide.head_dim, wide.d_model // wide.n_heads) == (32, 32, 16)
    with pytest.raises(UserError, match="Qwen2, the family with q/k/v bias, has no head_dim"):
        hf.model_config_to_hf_config(dataclasses.replace(wide, attention=dataclasses.replace(
            wide.attention, qk_norm=False, qkv_bias=True)))  # fmt: skip


def test_llama3_rope_scaling_by_hand():
    """Llama 3's bands for an original context L = 16, factor 8, low 1, high 4: wavelengths below L/4 = 4 are
    kept, above L/1 = 16 divided by 8, and λ = 8 interpolated with s = (16/8 − 1)/(4 − 1) = 1/3:
    f' = (1 − 1/3)·f/8 + (1/3)·f = (5/12)·f."""
    scaling = RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 16)
    f = 2 * math.pi / torch.tensor([2.0, 8.0, 32.0])
    expected = torch.stack([f[0], f[1] * 5 / 12, f[2] / 8])
    torch.testing.assert_close(scaling.scale(f), expected)
    assert torch.equal(RopeScalingConfig().scale(f), f)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "RoPE scaling 'longrope'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling of type 'llama3' needs"),
        ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"architectures": ["Gemma2ForCausalLM"]}, "soft-caps attention scores and final logits"),
        ({"architectures": [], "model_type": "gemma3_text"}, "sandwich norms"),
    ],
)
def test_unsupported_configs_are_user_errors(change, message):
    config = {"architectures": ["LlamaForCausalLM"], **COMMON, **change}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        hf.hf_config_to_model_config(config)


def test_cli_reports_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert cli_main(["import-hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "unsupported Hugging Face architecture 'GPT2LMHeadModel'" in err and "Qwen2ForCausalLM" in err
    assert not (tmp_path / "run").exists()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        hf.load_hf_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf.load_hf_state_dict(tmp_path / "missing")


def test_name_mapping_is_a_bijection():
    cfg = model_cfg(vocab_size=50, d_model=32, n_layers=2, n_heads=2, qk_norm=True, attn_bias=True)
    names = list(Decoder(replace(cfg, tie_embeddings=False)).state_dict())
    hf_names = [hf.lmlab_to_hf_name(n) for n in names]
    assert len(set(hf_names)) == len(names)
    assert [hf.hf_to_lmlab_name(n) for n in hf_names] == names
    assert hf.lmlab_to_hf_name("layers.1.attn.q_proj.bias") == "model.layers.1.self_attn.q_proj.bias"
    assert hf.hf_to_lmlab_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.mlp_norm.weight"
    with pytest.raises(CheckpointError, match="unexpected"):
        hf.hf_to_lmlab_name("model.layers.0.block_sparse_moe.gate.weight")


def test_import_refuses_existing_run_and_loads_config(tmp_path, tokenizer_file):
    hf_path, _ = _hf_dir(tmp_path, "smollm_tied", tokenizer_file)
    assert import_main([str(hf_path), "--out", str(tmp_path / "run"), "--name", "smol"]) == 0
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.name == "smol" and cfg.model.tie_embeddings and cfg.model.n_kv_heads == 1
    with pytest.raises(UserError, match="already holds a run"):
        import_main([str(hf_path), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"abacus": {"enabled": True, "digit_ids": list(range(10))}}, "digit-place"),
        ({"n_layers": 3, "recurrence": {"enabled": True}}, "recurrent depth"),
        ({"attention": {"kind": "s2", "vert_stride": 2}}, "model.attention.kind=s2"),
        ({"attention": {"kind": "sliding", "window": 8, "global_every": 2}}, "same window in every layer"),
    ],
)
def test_what_no_hugging_face_family_has_does_not_export(settings, message):
    cfg = model_cfg(**{"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **settings})
    with pytest.raises(UserError, match=message):
        hf.export_architecture(cfg)


def test_import_from_a_hub_id_reads_the_cache(tmp_path, tokenizer_file, monkeypatch):
    """``import-hf org/name`` resolves through huggingface_hub: a snapshot already in the cache (laid out as the
    hub client writes it) is used with HF_HUB_OFFLINE=1 and nothing is downloaded; a missing one is one message."""
    constants = pytest.importorskip("huggingface_hub.constants")
    hf_path, hf_model = _hf_dir(tmp_path, "llama", tokenizer_file)
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--lmlab-test--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_path, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert import_main(["lmlab-test/tiny-llama", "--out", str(tmp_path / "run")]) == 0
    model, cfg, _ = load_model(tmp_path / "run")
    assert cfg.name == "tiny-llama"
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="not in the Hugging Face cache while downloading is off"):
        import_main(["lmlab-test/absent", "--out", str(tmp_path / "run2")])
    with pytest.raises(UserError, match="directory not found: nowhere .nor is it a Hub id"):
        import_main(["./nowhere", "--out", str(tmp_path / "run3")])
