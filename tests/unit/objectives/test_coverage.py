"""Direct Coverage Optimization (docs/science.md §20): the test vectors, its gradient factor, its numerics,
the sequence log-probs of packed batches and the ``objective.coverage_n`` switch of SFT."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.config import ModelConfig, ObjectiveConfig, load_config
from lmlab.data.packing import collate, pack_best_fit, single_rows
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.objectives.coverage import coverage_loss, coverage_nll, coverage_weight, sequence_logps
from lmlab.objectives.lm import causal_lm_loss
from lmlab.objectives.lm_objective import build_lm_loss, model_inputs
from lmlab.recipes.sft import run_sft
from lmlab.train.metrics import read_metrics

# docs/science.md §20: (p, N, ℓ, F). ℓ(0.9, 16) is 1.0e-16 exactly (−log(1 − 10⁻¹⁶)); the table's 1.1e-16 is
# what the naive float64 formula returns, because 1 − 10⁻¹⁶ rounds to 1 − 1.11e-16.
VECTORS = [
    (0.5, 1, 0.693147, 1.0),
    (0.5, 4, 0.0645385, 0.266667),
    (0.1, 16, 0.204938, 0.404353),
    (0.01, 100, 0.455757, 0.583200),
    (0.9, 16, 1.0e-16, 1.44e-14),
    (1e-9, 4, 19.336971, None),
]


def _loss_and_factor(logp: float, n: int) -> tuple[float, float]:
    """ℓ and F = dℓ/d(−log p) by autograd, in float64."""
    x = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    loss = coverage_nll(x, n)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return float(loss.detach()), -float(grad)


@pytest.mark.parametrize("p,n,loss,factor", VECTORS)
def test_science_vectors_and_the_gradient_factor(p, n, loss, factor):
    got_loss, got_factor = _loss_and_factor(math.log(p), n)
    assert got_loss == pytest.approx(loss, rel=1e-5)
    closed_form = n * p * (1 - p) ** (n - 1) / -math.expm1(n * math.log1p(-p))
    assert got_factor == pytest.approx(closed_form, rel=1e-9)
    if factor is not None:
        assert got_factor == pytest.approx(factor, rel=1e-5)
    assert float(coverage_weight(torch.tensor([math.log(p)], dtype=torch.float64), n)) == pytest.approx(
        got_factor, rel=1e-9
    )


def test_n_equal_one_is_the_sequence_cross_entropy_bitwise():
    logp = torch.tensor([-0.3, -2.0, -40.0, 0.0])
    assert torch.equal(coverage_nll(logp, 1), -logp)
    assert torch.equal(coverage_weight(logp, 1), torch.ones(4))


def test_hand_computed_loss_without_the_stable_form():
    # p = 0.2, N = 3: 1 − 0.8³ = 0.488, ℓ = −log 0.488; F = 3·0.2·0.64/0.488
    loss, factor = _loss_and_factor(math.log(0.2), 3)
    assert loss == pytest.approx(-math.log(0.488), rel=1e-12)
    assert factor == pytest.approx(3 * 0.2 * 0.64 / 0.488, rel=1e-12)


def test_extremes_are_finite_with_the_limiting_gradients():
    # p = 1 (log p = 0 exactly, as a certain float32 model gives): ℓ = 0 and no push; p → 0: ℓ = −log(N·p), F = 1
    x = torch.tensor([0.0, -1e-20, -1e-8, -60.0, -2000.0], dtype=torch.float64, requires_grad=True)
    loss = coverage_nll(x, 16)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    loss = loss.detach()
    assert float(loss[0]) == pytest.approx(0.0, abs=1e-300) and float(grad[0]) == 0.0
    assert float(loss[2]) == pytest.approx(1e-128, rel=1e-6)  # ℓ = −log(1 − (1 − p)^N) ≈ (1e-8)^16
    assert float(loss[4]) == pytest.approx(2000.0 - math.log(16), rel=1e-12)
    assert float(grad[3]) == pytest.approx(-1.0) and float(grad[4]) == pytest.approx(-1.0)


def test_float32_inputs_keep_their_dtype_and_stay_finite():
    x = torch.tensor([0.0, -1e-7, -0.5, -30.0, -800.0], requires_grad=True)
    loss = coverage_nll(x, 64)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def test_gradcheck_across_the_branches():
    # both branches of log1mexp (log(1 − p) near 0 and far from it) and both sides of the log p < −50 tail
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -3.0, -49.9, -50.1, -300.0], dtype=torch.float64, requires_grad=True)
    for n in (2, 16, 1000):
        assert torch.autograd.gradcheck(lambda t, n=n: coverage_nll(t, n), (x,))


def test_tail_and_main_formula_meet_at_the_switch():
    below, above = torch.tensor([-50.0 - 1e-9], dtype=torch.float64), torch.tensor([-50.0 + 1e-9], dtype=torch.float64)
    for n in (2, 64, 10**6):
        # dℓ/dlog p = −1 there, so the two sides differ by the 2e-9 step and nothing else
        assert float(coverage_nll(below, n)) == pytest.approx(float(coverage_nll(above, n)) + 2e-9, abs=1e-12)


def test_loss_falls_with_n_and_the_factor_with_confidence():
    logp = torch.log(torch.tensor([0.01, 0.1, 0.3, 0.6, 0.9], dtype=torch.float64))
    for n in (2, 8, 64):
        assert (coverage_nll(logp, n) < coverage_nll(logp, n // 2 if n > 2 else 1)).all()
        f = coverage_weight(logp, n)
        assert ((f > 0) & (f <= 1)).all() and (f.diff() < 0).all()


def test_coverage_loss_counts_sequences_and_masks_empty_slots():
    logp = torch.tensor([-0.5, 0.0, -2.0])
    mask = torch.tensor([True, False, True])
    out = coverage_loss(logp, 4, mask=mask)
    assert int(out.count) == 2
    expected = coverage_nll(logp[[0, 2]], 4).sum()
    assert torch.allclose(out.loss_sum, expected)
    assert torch.allclose(out.metrics["seq_nll"], torch.tensor(2.5))
    assert torch.allclose(out.metrics["coverage_weight"], coverage_weight(logp[[0, 2]], 4).sum())


# --------------------------------------------------------------------------- sequences in batches


def _examples(lengths, seed=0, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        mask = [t > n // 2 for t in range(n)]  # a prompt, then the answer
        out.append((ids, mask))
    return out


def _decoder():
    torch.manual_seed(0)
    return Decoder(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)).eval()


def test_sequence_logps_of_rows_by_hand():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[-100, 3, 4, -100, -100], [1, -100, -100, -100, 6]])
    logps, counts = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    assert counts.view(2, 5)[:, 0].tolist() == [2, 2] and int(counts.sum()) == 4
    assert torch.allclose(logps.view(2, 5)[0, 0], lp[0, 1, 3] + lp[0, 2, 4])
    assert torch.allclose(logps.view(2, 5)[1, 0], lp[1, 0, 1] + lp[1, 4, 6])


def test_packed_dco_equals_unpacked_dco():
    model, examples = _decoder(), _examples([9, 6, 5, 4, 3, 11, 7], seed=2)
    packed_rows, single = pack_best_fit(examples, 16), single_rows(examples)
    assert len(packed_rows) < len(examples)
    loss_fn = build_lm_loss(ObjectiveConfig(coverage_n=8))
    packed = loss_fn(model, collate(packed_rows, pad_id=0, pad_to=16))
    alone = loss_fn(model, collate(single, pad_id=0, pad_to=16, with_docs=False))
    assert int(packed.count) == int(alone.count) == len(examples)
    assert torch.allclose(packed.loss_sum, alone.loss_sum, rtol=1e-5)
    assert torch.allclose(packed.metrics["coverage_weight"], alone.metrics["coverage_weight"], rtol=1e-5)


def test_coverage_objective_gradient_is_f_weighted_cross_entropy():
    """∇ Σ ℓ_DCO = Σ F_i ∇(−log p_i): the DCO gradient is CE's, each sequence scaled by its detached F."""
    model, examples = _decoder(), _examples([9, 6, 5, 11], seed=3)
    batch = collate(pack_best_fit(examples, 16), pad_id=0, pad_to=16)
    out = build_lm_loss(ObjectiveConfig(coverage_n=4))(model, batch)
    dco_grads = torch.autograd.grad(out.loss_sum, list(model.parameters()))
    logps, counts = sequence_logps(model(batch["input_ids"], **model_inputs(batch)), batch["labels"], batch["doc_ids"])
    weighted = -(coverage_weight(logps.detach().double(), 4).float() * logps)[counts > 0].sum()
    ce_grads = torch.autograd.grad(weighted, list(model.parameters()))
    for a, b in zip(dco_grads, ce_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert torch.allclose(out.metrics["ce"], causal_lm_loss(model(batch["input_ids"], **model_inputs(batch)),
                                                            batch["labels"]).loss_sum, rtol=1e-5)  # fmt: skip


def test_coverage_one_keeps_the_token_objective():
    model, examples = _decoder(), _examples([9, 6], seed=4)
    batch = collate(single_rows(examples), pad_id=0, with_docs=False)
    out = build_lm_loss(ObjectiveConfig(coverage_n=1))(model, batch)
    assert int(out.count) == int((batch["labels"] != -100).sum())  # tokens, not sequences
    logps, counts = sequence_logps(model(batch["input_ids"]), batch["labels"])
    assert torch.allclose(out.loss_sum, -logps[counts > 0].sum(), rtol=1e-6)  # Σ token CE = Σ sequence CE


# --------------------------------------------------------------------------- the config switch and a run


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"label_smoothing": 0.1}, "objective.label_smoothing"),
        ({"z_loss": 1e-4}, "objective.z_loss"),
        ({"goldfish": {"enabled": True}}, "objective.goldfish.enabled"),
        ({"distill": {"teacher": "runs/t"}}, "objective.distill.teacher"),
    ],
)
def test_token_level_switches_are_refused_with_coverage(extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["objective.coverage_n=8", *_flat(extra)])
    load_config(None, ["objective.coverage_n=1", *_flat(extra)])  # each is fine with plain cross-entropy


def _flat(d, prefix="objective."):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, bool) else v}")
    return out


def test_coverage_n_below_one_is_refused_and_neftune_combines():
    with pytest.raises(ConfigError, match="coverage_n=0"):
        ObjectiveConfig(coverage_n=0).validate()
    ObjectiveConfig(coverage_n=16, neftune_alpha=5.0).validate()


def test_sft_run_with_coverage_logs_its_metrics(tmp_path):
    convs = FactsWorld().qa_conversations(0, 8, "train")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in convs))
    texts = [m["content"] for c in convs for m in c["messages"]] * 5
    tok = TextTokenizer.train_bpe(texts, 320).save(tmp_path / "tok" / "tokenizer.json")
    cfg = load_config(
        None,
        [
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=128",
            "train.seq_len=128", "train.steps=2", "train.micro_batch_size=2", "train.eval_every=2",
            "train.log_every=1", "train.ckpt_every=2", "train.progress=false", "train.device=cpu",
            "sample.max_new_tokens=2", "sample.prompts=[hi]", f"tokenizer.path={tok}",
            f"sft.train_file={tmp_path / 'train.jsonl'}", "objective.coverage_n=16",
        ],
    )  # fmt: skip
    summary = run_sft(cfg, tmp_path / "r", quiet=True)
    assert summary["status"] == "finished"
    train = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "train"]
    assert 0 < train[0]["coverage_weight"] <= 1 and train[0]["seq_nll"] > train[0]["loss"] > 0


def test_pretraining_refuses_the_coverage_loss(tmp_path):
    from lmlab.errors import ConfigError
    from lmlab.recipes.pretrain import run_pretraining

    from helpers import tiny_config

    with pytest.raises(ConfigError, match="runs under lmlab sft"):
        run_pretraining(tiny_config("objective.coverage_n=4"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
