"""μP (``model.parametrization: mup``): the docs/science.md §18 test vectors by hand, the per-layer learning rates
and weight decay, the attention scale and multipliers as equivalences with a standard model, the config errors,
and the Hugging Face export against ``transformers`` (same logits with the multipliers folded into the weights)."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import OptimConfig, RunConfig, TokenizerConfig, load_config, save_config
from lmlab.errors import ConfigError
from lmlab.models import hf
from lmlab.models.component import hidden_std, residual_std
from lmlab.models.decoder import Decoder
from lmlab.models.mup import attention_scale, fold_multipliers, logit_mult, mup_width_mult
from lmlab.models.static_cache import decode_step
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.optim import build_optimizer, hidden_matrices

from helpers import model_cfg

# §18's vectors: m_d = 256 / 64 = 4, σ = 0.02, L = 12, d_head = 64
S18 = dict(vocab_size=64, d_model=256, n_layers=12, n_heads=4, init_std=0.02)
MUP18 = dict(parametrization="mup", mup={"base_width": 64})
# a small μP model with every multiplier away from 1: m_d = 4, α_in = 2, α_out = 3
SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, ffn_multiple_of=16)
MUP = dict(parametrization="mup", mup={"base_width": 16, "input_mult": 2.0, "output_mult": 3.0})


def ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Every weight O(0.1) random (gains near 1) so a missed multiplier or a wrong attention scale shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)


def test_section18_vectors():
    mup, sp = model_cfg(**S18, **MUP18), model_cfg(**S18)
    assert mup.width_mult == 4.0 and sp.width_mult == 1.0
    assert hidden_std(mup) == pytest.approx(0.01, abs=1e-12)
    assert residual_std(mup) == pytest.approx(0.00204124, abs=1e-8)
    assert residual_std(sp) == pytest.approx(0.00408248, abs=1e-8)
    assert logit_mult(mup) == 0.25 and logit_mult(sp) is None
    assert attention_scale(mup) == 1 / 64 and attention_scale(sp) is None  # None: SDPA's 1/sqrt(64) = 1/8
    assert mup_width_mult(mup) == 4.0 and mup_width_mult(sp) is None


def test_init_stds_of_a_built_model():
    torch.manual_seed(0)
    model = Decoder(model_cfg(**S18, **MUP18))
    block = model.layers[0]
    for weight, expected in [
        (block.attn.q_proj.weight, 0.01),
        (block.mlp.gate_proj.weight, 0.01),
        (block.attn.o_proj.weight, 0.00204124),
        (block.mlp.down_proj.weight, 0.00204124),
        (model.tok_embeddings.weight, 0.02),
    ]:
        assert float(weight.detach().std()) == pytest.approx(expected, rel=0.03)
    assert block.attn.scale == 1 / 64


def test_standard_parametrization_is_unchanged():
    """The standard model's factors are the identities the code used before μP existed."""
    sp = model_cfg(**S18)
    assert hidden_std(sp) == 0.02 and residual_std(sp) == 0.02 / 24**0.5
    model = Decoder(model_cfg(**SMALL))
    assert model.input_mult is None and model.logit_mult is None and model.layers[0].attn.scale is None
    groups = build_optimizer(model, OptimConfig(), torch.device("cpu")).param_groups
    assert [len(g["params"]) for g in groups] == [14, 6] and not any("lr_scale" in g for g in groups)


def test_per_layer_learning_rates_and_weight_decay():
    """Hidden matrices at η/m_d with decay λ·m_d (η·λ per step at every width); embedding, head, gains at η."""
    model = Decoder(model_cfg(**SMALL, **MUP, tie_embeddings=False))
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.1, eps=1e-15), torch.device("cpu"), 4.0)
    hidden, head, rest = opt.param_groups
    assert {id(p) for p in hidden["params"]} == {id(p) for p in hidden_matrices(model)}
    assert len(hidden["params"]) == 14  # q, k, v, o, gate, up, down in 2 blocks
    assert hidden["lr"] == pytest.approx(0.0025) and hidden["lr_scale"] == 0.25
    assert hidden["lr"] * hidden["weight_decay"] == pytest.approx(0.01 * 0.1)
    assert [id(p) for p in head["params"]] == [id(model.lm_head.weight)] and head["lr"] == 0.01
    assert id(model.tok_embeddings.weight) in {id(p) for p in rest["params"]} and rest["weight_decay"] == 0.0

    # Adam's first step moves every coordinate by its LR (times sign; ε too small to matter), plus the decay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(ids()).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    q = model.layers[0].attn.q_proj.weight.detach()
    step_q = (q - before["layers.0.attn.q_proj.weight"] * (1 - 0.01 * 0.1)).abs()
    assert float(step_q.max()) == pytest.approx(0.0025, rel=1e-3)
    step_emb = (model.tok_embeddings.weight.detach() - before["tok_embeddings.weight"]).abs()
    assert float(step_emb.max()) == pytest.approx(0.01, rel=1e-3)


def test_scale_eps_follows_the_hidden_gradients():
    """Under μP the hidden matrices' per-entry gradients shrink as 1/m_d (measured at init, widths 64–512), so
    ``model.mup.scale_eps`` gives their group ε/m_d: ε's weight against the gradient is then the same at every
    width, where a fixed ε weighs 8× more at width 512 than at 64."""
    x = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(3))
    rms, eps = {}, {}
    for width in (64, 128, 256, 512):
        torch.manual_seed(0)
        cfg = model_cfg(vocab_size=97, d_model=width, n_layers=2, n_heads=width // 16, max_seq_len=64, **MUP18)
        model = Decoder(cfg)
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1)).backward()
        rms[width] = float(torch.cat([p.grad.flatten() for p in hidden_matrices(model)]).pow(2).mean().sqrt())
        opt = build_optimizer(model, OptimConfig(eps=1e-8), torch.device("cpu"), width / 64, scale_eps=True)
        eps[width] = opt.param_groups[0]["eps"]
        assert all(g["eps"] == 1e-8 for g in opt.param_groups[1:])  # embedding, head, gains keep ε
        fixed = build_optimizer(model, OptimConfig(eps=1e-8), torch.device("cpu"), width / 64)
        assert fixed.param_groups[0]["eps"] == 1e-8  # off by default
    assert eps == {w: pytest.approx(1e-8 * 64 / w) for w in rms}
    assert rms[512] / rms[64] == pytest.approx(1 / 8, rel=0.15)
    ratios = [eps[w] / rms[w] for w in rms]
    assert max(ratios) / min(ratios) < 1.15
    cfg = load_config(None, ["model.parametrization=mup", "model.mup.base_width=64", "model.mup.scale_eps=true"])
    assert cfg.model.mup.scale_eps is True


def test_attention_scale_is_one_over_d_head():
    """A μP attention equals a standard one whose q is scaled by 1/sqrt(d_head): q·k/d = (q/sqrt(d))·k/sqrt(d).
    Checked on every attention path: SDPA, the explicit bf16 CPU path, the diagnostic probabilities, top-k."""
    dims = {**SMALL, "n_kv_heads": None}  # the explicit bf16 path needs as many key as query heads
    mup_cfg, sp_cfg = model_cfg(**dims, **MUP), model_cfg(**dims)
    torch.manual_seed(0)
    mup_attn = mup_cfg.attention.build(mup_cfg, 0)
    randomize(mup_attn)
    sp_attn = sp_cfg.attention.build(sp_cfg, 0)
    sp_attn.load_state_dict(mup_attn.state_dict())
    with torch.no_grad():
        sp_attn.q_proj.weight.mul_(mup_cfg.head_dim**-0.5)
    model = Decoder(sp_cfg)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5))
    rope = model.rope(torch.arange(12).expand(2, 12), 11)
    with torch.no_grad():
        torch.testing.assert_close(mup_attn(x, rope), sp_attn(x, rope), atol=1e-5, rtol=0)
        torch.testing.assert_close(mup_attn.attention_probs(x, rope), sp_attn.attention_probs(x, rope))
        mup_attn.topk = sp_attn.topk = 4
        torch.testing.assert_close(mup_attn(x, rope), sp_attn(x, rope), atol=1e-5, rtol=0)
        mup_attn.topk = sp_attn.topk = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(mup_attn(x, rope), sp_attn(x, rope), atol=2e-2, rtol=0)


def test_folded_weights_give_the_same_logits_in_a_standard_model():
    """α_in, α_out/m_d and the attention scale, folded into a standard model's weights, reproduce the μP logits;
    the fused-loss head and the static-cache decode step see the multipliers too."""
    mup_cfg = model_cfg(**SMALL, **MUP)
    torch.manual_seed(0)
    model = Decoder(mup_cfg).eval()
    randomize(model)
    standard = Decoder(model_cfg(**SMALL, tie_embeddings=False)).eval()
    standard.load_state_dict(fold_multipliers(model.state_dict(), mup_cfg))
    x = ids()
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, standard(x), atol=1e-4, rtol=1e-5)
        head = model(x, head_fn=lambda hidden, weight: hidden @ weight.T)
        torch.testing.assert_close(head, logits)
        cache = model.new_kv_cache(max_len=32)
        model(x[:, :-1], kv_cache=cache)
        step = decode_step(model, cache, x[:, -1:], torch.full((2, 1), x.shape[1] - 1))
        torch.testing.assert_close(step, logits[:, -1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.parametrization=muP"], "valid choices: standard, mup"),
        (["model.parametrization=mup"], "needs the base width"),
        (["model.mup.base_width=64"], "model.parametrization=standard"),
        (["model.parametrization=mup", "model.mup.base_width=64", "model.mup.input_mult=0"], "input_mult=0.0"),
        (["model.parametrization=mup", "model.mup.base_width=64", "optim.name=muon"], "use optim.name=adamw"),
        (["model.parametrization=mup", "model.mup.base_width=64", "model.ffn.kind=moe"], "dense SwiGLU"),
        (["model.parametrization=mup", "model.mup.base_width=64", "adapter.kind=lora", "init_from=x"], "adapter"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_mup_with_tied_embeddings_is_a_valid_config():
    cfg = load_config(None, ["model.parametrization=mup", "model.mup.base_width=64", "model.d_model=256"])
    assert cfg.model.tie_embeddings and cfg.model.width_mult == 4.0


# --------------------------------------------------------------------------- Hugging Face export

transformers = pytest.importorskip("transformers")

from lmlab.recipes.hf_commands import export_main  # noqa: E402


@pytest.mark.parametrize(
    ("settings", "arch"),
    [
        (dict(tie_embeddings=False), "LlamaForCausalLM"),
        (dict(tie_embeddings=True), "LlamaForCausalLM"),
        (dict(qk_norm=True, head_size=32), "Qwen3ForCausalLM"),
        (dict(attn_bias=True), "Qwen2ForCausalLM"),
    ],
)
def test_export_matches_transformers(settings, arch):
    cfg = model_cfg(**SMALL, **MUP, **settings)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    randomize(model)
    hf_dict = hf.model_config_to_hf_config(cfg)
    assert hf_dict["architectures"] == [arch] and hf_dict["tie_word_embeddings"] is False
    hf_cfg = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, unexpected = theirs.load_state_dict(hf.lmlab_state_dict_to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), atol=1e-4, rtol=1e-5)


def test_export_hf_of_a_mup_run(tmp_path, tokenizer_file):
    """``lmlab export-hf`` of a tied μP run: transformers loads it untied and gives the run's logits."""
    cfg = RunConfig(
        model=model_cfg(**{**SMALL, "vocab_size": 320}, **MUP), tokenizer=TokenizerConfig(path=str(tokenizer_file))
    )
    torch.manual_seed(0)
    model = Decoder(cfg.model).eval()
    randomize(model)
    run = tmp_path / "run"
    save_checkpoint(run, 10, model, model_cfg=cfg.model)
    save_config(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_text(tokenizer_file.read_text())
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not reloaded.config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-4, rtol=1e-5)
