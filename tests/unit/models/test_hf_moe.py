"""Hugging Face interop of mixture-of-experts models: Mixtral and Qwen3-MoE import and export, checked against
``transformers`` itself on tiny random models (logits to 1e-4 fp32 in eval mode, weight-exact round trips, the
same top-k experts), both weight layouts (one tensor per expert; transformers 5's fused 3-D experts), Qwen3-MoE's
dense blocks, and the refusals of what no family represents (shared experts, SparseMixer, Qwen2-MoE, OLMoE,
a selection bias in effect)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unit.models.conftest import write_hf_tokenizer  # noqa: E402
from unit.models.test_hf import COMMON as HF_COMMON  # noqa: E402
from unit.models.test_hf import VOCAB, _ids, _randomize  # noqa: E402

from lmlab.cli import main as cli_main  # noqa: E402
from lmlab.config import RunConfig, TokenizerConfig, save_config  # noqa: E402
from lmlab.errors import UserError  # noqa: E402
from lmlab.models import hf  # noqa: E402
from lmlab.models.decoder import Decoder  # noqa: E402
from lmlab.models.mlp import SwiGLUConfig  # noqa: E402
from lmlab.models.moe import MoE, MoEConfig  # noqa: E402
from lmlab.recipes.hf_commands import export_main, import_main  # noqa: E402
from lmlab.train.checkpoint import save_checkpoint  # noqa: E402
from lmlab.train.pretrained import load_model  # noqa: E402

from helpers import model_cfg  # noqa: E402

COMMON = {k: v for k, v in HF_COMMON.items() if k != "intermediate_size"}  # each family sets its widths
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01)
QWEN3_MOE = dict(head_dim=16, intermediate_size=96, moe_intermediate_size=48, num_experts=4, **MOE)
FAMILIES = {
    # router_jitter_noise is training-time only: eval mode has none, and lmlab ignores it
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=4, router_jitter_noise=0.1, **MOE
    ),
    "mixtral_window_tied": lambda: transformers.MixtralConfig(
        **{**COMMON, "num_hidden_layers": 3},
        intermediate_size=32,
        num_local_experts=4,
        sliding_window=64,
        tie_word_embeddings=True,
        **{**MOE, "num_experts_per_tok": 3},
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, norm_topk_prob=True, **QWEN3_MOE),
    # dense blocks 0 and 2 (mlp_only_layers), OLMoE-style gates that keep their softmax mass
    "qwen3_moe_dense": lambda: transformers.Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 4}, norm_topk_prob=False, mlp_only_layers=[0, 2], **QWEN3_MOE
    ),
    # experts every second block (decoder_sparse_step=2): blocks 1 and 3; tied embeddings
    "qwen3_moe_step": lambda: transformers.Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 4}, decoder_sparse_step=2, tie_word_embeddings=True, **QWEN3_MOE
    ),
}
EXPORTED_AS = {"mixtral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def _hf_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    _randomize(model, seed=1)
    return model


def _hf_dir(root: Path, family: str, tokenizer_file: Path, **save_kwargs) -> tuple[Path, torch.nn.Module]:
    model = _hf_model(family)
    path = root / family
    model.save_pretrained(path, **save_kwargs)
    write_hf_tokenizer(path, tokenizer_file)
    return path, model


def _lmlab_run(root: Path, cfg, tokenizer_file: Path, seed: int = 4) -> tuple[Path, Decoder]:
    """A run directory holding a random lmlab model of ``cfg`` (every parameter random)."""
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    _randomize(model, seed=seed)
    run = root / "run"
    save_checkpoint(run, 10, model, model_cfg=cfg)
    save_config(RunConfig(model=cfg, tokenizer=TokenizerConfig(path=str(tokenizer_file))), run / "config.yaml")
    (run / "tokenizer.json").write_text(tokenizer_file.read_text())
    return run, model


# --------------------------------------------------------------------------- HF -> lmlab -> HF


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_round_trip(family, tmp_path, tokenizer_file):
    hf_path, hf_model = _hf_dir(tmp_path, family, tokenizer_file)
    x = _ids()
    with torch.no_grad():
        expected = hf_model(x).logits
    assert expected.std() > 0.1  # a model that computes something

    # import: a run with ffn.kind=moe and the same logits
    assert import_main([str(hf_path), "--out", str(tmp_path / "run")]) == 0
    model, cfg, _ = load_model(tmp_path / "run")
    ffn = cfg.model.ffn
    assert isinstance(ffn, MoEConfig) and (ffn.experts, ffn.router, ffn.shared_experts) == (4, "softmax", 0)
    assert ffn.top_k == hf_model.config.num_experts_per_tok
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, atol=1e-4, rtol=0)

    # export: transformers loads it as the same family with the same logits; weights bit-identical
    assert export_main([str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded).__name__ == EXPORTED_AS[family.split("_")[0]]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-4, rtol=0)
    original = hf.load_hf_state_dict(hf_path)  # save_pretrained's default: one tensor per expert
    exported = hf.load_hf_state_dict(tmp_path / "export")
    if cfg.model.tie_embeddings:
        original.pop("lm_head.weight", None)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_qwen3_moe_dense_blocks_and_gates(tmp_path, tokenizer_file):
    dense, _ = _hf_dir(tmp_path, "qwen3_moe_dense", tokenizer_file)
    model, cfg = hf.load_hf_model(dense)
    assert cfg.attention.qk_norm
    assert (cfg.ffn.layers, cfg.ffn.hidden, cfg.ffn.dense_hidden, cfg.ffn.renormalize) == ([1, 3], 48, 96, False)
    assert [isinstance(block.mlp, MoE) for block in model.layers] == [False, True, False, True]
    assert model.layers[0].mlp.gate_proj.weight.shape == (96, 64)
    step = hf.hf_config_to_model_config(FAMILIES["qwen3_moe_step"]().to_dict())
    assert step.ffn.layers == [1, 3] and step.ffn.renormalize is False  # HF's default norm_topk_prob=false
    # the export describes the same blocks: mlp_only_layers, decoder_sparse_step 1, the hub's num_experts
    out = hf.model_config_to_hf_config(cfg)
    assert out["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (out["mlp_only_layers"], out["decoder_sparse_step"], out["num_experts"]) == ([0, 2], 1, 4)
    assert (out["intermediate_size"], out["moe_intermediate_size"], out["norm_topk_prob"]) == (96, 48, False)


@pytest.mark.parametrize(
    ("change", "layers"),
    [
        ({"decoder_sparse_step": 2}, [1, 3]),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1]),
        ({"mlp_only_layers": [0]}, [1, 2, 3]),
        ({}, None),  # every block sparse
    ],
)
def test_qwen3_moe_sparse_blocks(change, layers):
    config = {"architectures": ["Qwen3MoeForCausalLM"], **COMMON, "num_hidden_layers": 4, **QWEN3_MOE, **change}
    assert hf.hf_config_to_model_config(config).ffn.layers == layers


def test_config_translation_details():
    mixtral = hf.hf_config_to_model_config(FAMILIES["mixtral_window_tied"]().to_dict())  # found by model_type
    assert mixtral.attention.kind == "sliding" and mixtral.attention.window == 64  # Mixtral's window, as Mistral's
    ffn = mixtral.ffn
    assert (ffn.hidden, ffn.top_k, ffn.renormalize, ffn.layers, mixtral.tie_embeddings) == (32, 3, True, None, True)
    assert not mixtral.attention.qk_norm
    # HF's balancing loss is k times ours; the families have no z-loss; the export maps back
    assert ffn.load_balance_coef == pytest.approx(0.03) and ffn.z_loss_coef == 0
    out = hf.model_config_to_hf_config(mixtral)
    assert (out["num_local_experts"], out["intermediate_size"], out["router_jitter_noise"]) == (4, 32, 0.0)
    assert out["router_aux_loss_coef"] == pytest.approx(0.01) and out["sliding_window"] == 64
    # the hub's Qwen3-MoE config says num_experts, transformers 5's save_pretrained num_local_experts
    hub = {"architectures": ["Qwen3MoeForCausalLM"], **COMMON, **QWEN3_MOE, "num_experts": 8}
    assert hf.hf_config_to_model_config(hub).ffn.experts == 8
    saved = {k: v for k, v in hub.items() if k != "num_experts"} | {"num_local_experts": 6}
    assert hf.hf_config_to_model_config(saved).ffn.experts == 6
    # no experts anywhere: a dense Qwen3 with the dense width
    none = hf.hf_config_to_model_config(hub | {"num_experts": 0})
    assert none.ffn == SwiGLUConfig(hidden=96) and none.attention.qk_norm


# --------------------------------------------------------------------------- layouts and routing


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe_dense"])
def test_fused_expert_layout_imports(family, tmp_path, tokenizer_file):
    """transformers 5's module layout (save_original_format=False): experts.gate_up_proj [E, 2h, d] and
    experts.down_proj [E, d, h], router mlp.gate also for Mixtral."""
    path, hf_model = _hf_dir(tmp_path, family, tokenizer_file, save_original_format=False)
    state = hf.load_hf_state_dict(path)
    fused = [k for k in state if k.endswith("experts.gate_up_proj")]
    assert fused and state[fused[0]].shape == (4, 2 * 48, 64)
    model, cfg = hf.load_hf_model(path)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf_model(x).logits, atol=1e-4, rtol=0)
    # and the per-expert export of it equals what save_pretrained writes by default
    per_expert = hf.load_hf_state_dict(_hf_dir(tmp_path / "default", family, tokenizer_file)[0])
    exported = hf.lmlab_state_dict_to_hf(model.state_dict(), cfg)
    assert set(exported) == set(per_expert) and all(torch.equal(exported[k], per_expert[k]) for k in per_expert)


def _routes(hf_model, model, x) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE block: (HF's top-k experts, ours, HF's router probabilities) for the tokens of ``x``."""
    theirs, ours = [], []
    hooks = [
        block.mlp.gate.register_forward_hook(lambda m, i, out: theirs.append((out[2], out[0].float().softmax(-1))))
        for block in hf_model.model.layers
        if hasattr(block.mlp, "gate")
    ]
    hooks += [
        block.mlp.router.register_forward_hook(lambda m, i, out, moe=block.mlp: ours.append(moe.route(out)[1]))
        for block in model.layers
        if isinstance(block.mlp, MoE)
    ]
    with torch.no_grad():
        hf_model(x), model(x)
    for hook in hooks:
        hook.remove()
    assert len(theirs) == len(ours) > 0
    return [(t, o, p) for (t, p), o in zip(theirs, ours)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_router_picks_the_same_experts_when_logits_are_close(family, tmp_path, tokenizer_file):
    """Eval mode (no jitter): the same k experts, in the same order, for every token; the router rows of
    experts 0 and 1 differ by 1e-4 relative, so many tokens have nearly tied logits, and the tie still
    breaks alike (only a gap within float32 noise, below 1e-6, could break it differently)."""
    hf_model = _hf_model(family)
    with torch.no_grad():
        for block in hf_model.model.layers:
            weight = block.mlp.gate.weight
            weight[1] = weight[0] * (
                1 + 1e-4 * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(5))
            )
    hf_model.save_pretrained(tmp_path / "hf")
    model, _ = hf.load_hf_model(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(6))
    close = 0
    for theirs, ours, probs in _routes(hf_model, model.eval(), x):
        ranked = probs.sort(dim=-1, descending=True).values
        k = theirs.shape[-1]
        gap = ranked[:, k - 1] - ranked[:, k]  # between the last expert chosen and the first left out
        sure = gap > 1e-6
        assert torch.equal(ours[sure], theirs[sure])
        assert (ours != theirs).any(dim=-1).sum() <= (~sure).sum()
        pair = probs[:, :2]
        close += int(((pair[:, 0] - pair[:, 1]).abs() < 1e-4 * pair.max(dim=-1).values).sum())
    assert close > 50  # the near-ties really are there


# --------------------------------------------------------------------------- lmlab -> HF -> lmlab


LMLAB_MOE = [
    # every block sparse, renormalised gates, no qk-norm: Mixtral
    (dict(ffn=dict(kind="moe", experts=4, top_k=2, hidden=32)), "MixtralForCausalLM"),
    # qk-norm, dense block 1, un-renormalised top-3 gates, untied: Qwen3-MoE
    (
        dict(
            qk_norm=True,
            tie_embeddings=False,
            ffn=dict(kind="moe", experts=4, top_k=3, hidden=32, renormalize=False, layers=[0, 2], dense_hidden=80),
        ),
        "Qwen3MoeForCausalLM",
    ),
]


@pytest.mark.parametrize(("settings", "arch"), LMLAB_MOE)
def test_lmlab_moe_round_trip(settings, arch, tmp_path, tokenizer_file):
    cfg = model_cfg(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, **settings)
    run, model = _lmlab_run(tmp_path, cfg, tokenizer_file)
    assert hf.export_architecture(cfg) == arch
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == arch
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-4, rtol=0)

    assert import_main([str(tmp_path / "out"), "--out", str(tmp_path / "back")]) == 0
    back, back_cfg, _ = load_model(tmp_path / "back")
    assert back_cfg.model.ffn.layers == cfg.ffn.layers and back_cfg.model.ffn.renormalize == cfg.ffn.renormalize
    before, after = model.state_dict(), back.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_name_mapping_of_moe_families_is_a_bijection():
    for settings, arch in LMLAB_MOE:
        cfg = model_cfg(vocab_size=50, d_model=32, n_layers=3, n_heads=2, **settings)
        names = [n for n in Decoder(replace(cfg, tie_embeddings=False)).state_dict() if not n.endswith("expert_bias")]
        hf_names = [hf.lmlab_to_hf_name(n, arch) for n in names]
        assert len(set(hf_names)) == len(names)
        assert [hf.hf_to_lmlab_name(n, arch) for n in hf_names] == names
    assert hf.lmlab_to_hf_name("layers.2.mlp.experts.3.up_proj.weight", "MixtralForCausalLM") == (
        "model.layers.2.block_sparse_moe.experts.3.w3.weight"
    )
    assert hf.hf_to_lmlab_name("model.layers.0.mlp.gate.weight", "Qwen3MoeForCausalLM") == "layers.0.mlp.router.weight"
    with pytest.raises(ValueError, match="no architecture given"):
        hf.lmlab_to_hf_name("layers.0.mlp.router.weight")
    with pytest.raises(Exception, match="not part of a MixtralForCausalLM"):  # Qwen3-MoE's names in a Mixtral
        hf.hf_to_lmlab_name("model.layers.0.mlp.experts.0.gate_proj.weight", "MixtralForCausalLM")


# --------------------------------------------------------------------------- refusals


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


BASE = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(ffn=dict(kind="moe", experts=4, shared_experts=1)), "model.ffn.shared_experts=1: no Hugging Face"),
        (dict(qk_norm=True, ffn=dict(kind="moe", experts=4, router="sparsemixer")), "model.ffn.router=sparsemixer"),
        (dict(ffn=dict(kind="moe", experts=4, renormalize=False)), "renormalize=false without model.attention.qk"),
        (dict(ffn=dict(kind="moe", experts=4, layers=[1])), r"model.ffn.layers=\[1\] \(dense blocks\)"),
        (dict(attn_bias=True, ffn=dict(kind="moe", experts=4)), "moe with model.attention.qkv_bias"),
        (dict(position="none"), "model.position=none: every Hugging Face family"),
    ],
)
def test_export_refuses_what_no_family_represents(settings, message):
    with pytest.raises(UserError, match=message) as err:
        hf.model_config_to_hf_config(model_cfg(**BASE, **settings))
    _one_line(err)


def test_selection_bias_in_effect_is_refused(tmp_path, tokenizer_file):
    cfg = model_cfg(**BASE, ffn=dict(kind="moe", experts=4, hidden=32, bias_update_rate=0.001))
    run, model = _lmlab_run(tmp_path, cfg, tokenizer_file)
    assert hf.export_architecture(cfg) == "MixtralForCausalLM"  # a zero bias routes as none: exported
    assert not any("expert_bias" in k for k in hf.lmlab_state_dict_to_hf(model.state_dict(), cfg))
    with torch.no_grad():
        model.layers[1].mlp.expert_bias.copy_(torch.tensor([0.001, -0.001, 0.001, -0.001]))
    with pytest.raises(UserError, match="layers.1.mlp.expert_bias: the DeepSeek-V3 selection bias") as err:
        hf.lmlab_state_dict_to_hf(model.state_dict(), cfg)
    _one_line(err)
    save_checkpoint(run, 20, model, model_cfg=cfg)
    assert cli_main(["export-hf", str(run), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written
    # with bias_update_rate 0, lmlab ignores the bias too: the export is exact and drops it
    off = replace(cfg, ffn=replace(cfg.ffn, bias_update_rate=0.0))
    state = hf.lmlab_state_dict_to_hf(model.state_dict(), off)
    assert not any("expert_bias" in k for k in state)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: transformers.Qwen2MoeConfig(**COMMON), "Qwen2MoeForCausalLM': its shared expert is scaled by"),
        (lambda: transformers.OlmoeConfig(**COMMON), "OlmoeForCausalLM': its q/k RMSNorm spans the whole projection"),
    ],
)
def test_import_refuses_qwen2_moe_and_olmoe(config, message, tmp_path, capsys):
    data = config().to_dict()  # found by model_type, no architectures
    with pytest.raises(UserError, match=message) as err:
        hf.hf_config_to_model_config(data)
    _one_line(err)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data | {"architectures": None}))
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
