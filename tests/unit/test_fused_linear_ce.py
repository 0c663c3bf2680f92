"""Fused linear cross-entropy (issue 16 item 4): the loss of ``causal_lm_loss(F.linear(h, W))`` with the
gradient computed chunk by chunk in the forward pass, and its use as ``objective.loss_impl``.

Checked against plain autograd in float32 (1e-5 relative): value, metrics, ∂h and ∂W with ignored tokens, a
keep mask, label smoothing and z-loss, chunk sizes that do and do not divide N, tied and untied heads; bf16
autocast and float16 inputs more loosely. No op of the fused forward or backward makes an [N, V] tensor, and
autograd saves none. The LM objective's ``fused`` and ``chunked`` implementations give the ``standard`` losses
and gradients, in the Trainer and a pretraining run on one process and on 2 gloo ranks under DDP and FSDP2.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from unit.distributed.dist_harness import config, spawn
from unit.distributed.fused_ce_worker import FUSED_RUNS, OPTIONS, fused_worker, train_objective

from lmlab.config import DistillConfig, GoldfishConfig, ObjectiveConfig, load_config, validate
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.objectives.fused_linear_ce import fused_linear_cross_entropy
from lmlab.objectives.lm import causal_lm_loss
from lmlab.objectives.lm_objective import build_lm_loss
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics

from helpers import tiny_config

B, T, D, V = 3, 8, 16, 50  # N = 24 tokens


def inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, D, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # ignored tokens, including a whole first chunk for chunk sizes <= 5
    labels[2, -1] = -100
    keep = torch.rand(B, T, generator=g) > 0.25
    return hidden, weight, labels, keep


def grads(out, hidden, weight, scale=1.0):
    """∂/∂(hidden, weight) of ``scale · loss_sum`` (the upstream gradient is not 1 in general)."""
    return torch.autograd.grad(scale * out.loss_sum, (hidden, weight))


def assert_close(got, want, rtol=1e-5):
    """Relative to the tensor's scale: elements near zero are compared with ``rtol · max|want|``."""
    atol = rtol * float(want.abs().max().clamp(min=1e-12))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


OPTION_CASES = {
    "plain": {},
    "mask": {"loss_mask": "keep"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-3, "loss_mask": "keep"},
}


def check_matches_plain(loss, case: str) -> None:
    """``loss(hidden, weight, labels, **options) -> LossOutput`` gives the value, metrics and gradients of
    autograd on ``causal_lm_loss(F.linear(hidden, weight), ...)`` for the options of ``OPTION_CASES[case]``."""
    hidden, weight, labels, keep = inputs()
    options = {k: (keep if v == "keep" else v) for k, v in OPTION_CASES[case].items()}
    want = causal_lm_loss(F.linear(hidden, weight), labels, **options)
    got = loss(hidden, weight, labels, **options)
    assert int(got.count) == int(want.count)
    assert sorted(got.metrics) == sorted(want.metrics)
    assert_close(got.loss_sum.detach(), want.loss_sum.detach())
    for name in want.metrics:
        assert_close(got.metrics[name], want.metrics[name])
    assert not any(m.requires_grad for m in got.metrics.values())
    for g, w in zip(grads(got, hidden, weight, 1.7), grads(want, hidden, weight, 1.7)):
        assert_close(g, w)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 24, 100])  # 8 divides N = 24; 5 does not; 100 > N
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_matches_autograd_of_the_plain_loss(case, chunk_size):
    check_matches_plain(partial(fused_linear_cross_entropy, chunk_size=chunk_size), case)


def test_gradient_formula_by_hand():
    """One token, V = 3, ε and c on: ∂ℓ/∂x = p·(1 + 2c·log Z) − (1 − ε)·onehot(y) − ε/V."""
    eps, c = 0.3, 0.05
    x = torch.tensor([[0.5, -1.0, 2.0]])
    p, log_z = x.softmax(-1), x.logsumexp(-1)
    want = p * (1 + 2 * c * log_z) - (1 - eps) * torch.tensor([[0.0, 1.0, 0.0]]) - eps / 3
    hidden = torch.eye(3).requires_grad_()[:1]  # logits = weight[:, 0] = x with weight = xᵀ as a column
    weight = torch.cat([x.t(), torch.zeros(3, 2)], dim=1).requires_grad_()
    out = fused_linear_cross_entropy(hidden, weight, torch.tensor([1]), label_smoothing=eps, z_loss=c)
    (grad_weight,) = torch.autograd.grad(out.loss_sum, weight)
    torch.testing.assert_close(grad_weight[:, 0], want[0])  # ∂W = (∂ℓ/∂x)ᵀ·h with h = e_0
    expected = (1 - eps) * (log_z - x[0, 1]) + eps * (log_z - x.mean()) + c * log_z**2
    torch.testing.assert_close(out.loss_sum, expected[0])


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_gradients_add_up(tied):
    """With the head tied to the embedding, ∂E is the lookup's gradient plus the head's."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    mix = torch.randn(D, D, generator=g) / D**0.5

    def run(loss):
        emb = torch.nn.Embedding(V, D)
        head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(V, D, generator=torch.Generator().manual_seed(2)))
            head.weight.copy_(torch.randn(V, D, generator=torch.Generator().manual_seed(3)))
        hidden = torch.tanh(emb(ids) @ mix)
        weight = emb.weight if tied else head.weight
        loss(hidden, weight).loss_sum.backward()
        return emb.weight.grad, head.weight.grad

    got = run(lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=7, z_loss=1e-3))
    want = run(lambda h, w: causal_lm_loss(F.linear(h, w), labels, z_loss=1e-3))
    assert_close(got[0], want[0])
    if tied:
        assert got[1] is None and want[1] is None
    else:
        assert_close(got[1], want[1])


def test_no_grad_and_frozen_weight():
    hidden, weight, labels, keep = inputs()
    want = causal_lm_loss(F.linear(hidden, weight), labels, z_loss=1e-3, loss_mask=keep)
    with torch.no_grad():
        off = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=5, z_loss=1e-3, loss_mask=keep)
    assert off.loss_sum.grad_fn is None
    assert_close(off.loss_sum, want.loss_sum.detach())
    frozen = weight.detach()
    out = fused_linear_cross_entropy(hidden, frozen, labels, chunk_size=5, z_loss=1e-3, loss_mask=keep)
    (grad_hidden,) = torch.autograd.grad(out.loss_sum, hidden)
    assert_close(grad_hidden, torch.autograd.grad(want.loss_sum, hidden)[0])


def test_bf16_autocast_close_to_the_autocast_reference():
    """Under autocast the logits are bf16 in both paths (the head matmul), the softmax float32."""
    hidden, weight, labels, keep = inputs()
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "loss_mask": keep}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = causal_lm_loss(F.linear(hidden, weight), labels, **options)
        got = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=7, **options)
    assert got.loss_sum.dtype == torch.float32
    assert float(got.loss_sum.detach()) == pytest.approx(float(want.loss_sum.detach()), rel=1e-3)
    fp32 = causal_lm_loss(F.linear(hidden, weight), labels, **options)
    assert float(got.loss_sum.detach()) != pytest.approx(float(fp32.loss_sum.detach()), rel=1e-6)  # bf16 really ran
    for g, w in zip(grads(got, hidden, weight), grads(want, hidden, weight)):
        assert g.dtype == torch.float32
        assert float((g - w).norm() / w.norm()) < 2e-2


def test_float16_inputs_keep_small_gradients():
    """float16 hidden and weight: the gradient matmuls run in float32 (an unscaled float16 softmax gradient
    would flush small probabilities to zero), the gradients come back in float16."""
    hidden, weight, labels, keep = inputs()
    half_hidden, half_weight = (t.detach().half().requires_grad_() for t in (hidden, weight))
    got = fused_linear_cross_entropy(half_hidden, half_weight, labels, chunk_size=7, z_loss=1e-3, loss_mask=keep)
    ref_hidden, ref_weight = (t.detach().float().requires_grad_() for t in (half_hidden, half_weight))
    want = causal_lm_loss(F.linear(ref_hidden, ref_weight), labels, z_loss=1e-3, loss_mask=keep)
    assert float(got.loss_sum.detach()) == pytest.approx(float(want.loss_sum.detach()), rel=1e-3)
    for g, w in zip(grads(got, half_hidden, half_weight), grads(want, ref_hidden, ref_weight)):
        assert g.dtype == torch.float16
        assert float((g.float() - w).norm() / w.norm()) < 5e-3


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produces while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits():
    """N·V = 64·200: no op of the fused forward or backward produces ≥ N·V elements (the plain path does),
    and the tensors autograd keeps for backward are the [N, d] and [V, d] gradients only."""
    n, d, vocab, chunk = 64, 16, 200, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    saved: list[tuple[int, ...]] = []

    def run(loss):
        saved.clear()
        with (
            LargestTensor() as probe,
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t),
        ):
            loss().loss_sum.backward()
        return probe.largest

    plain = run(lambda: causal_lm_loss(F.linear(hidden, weight), labels, z_loss=1e-3))
    assert plain >= n * vocab and (n, vocab) in saved  # the probe can tell
    fused = run(lambda: fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, z_loss=1e-3))
    assert fused <= chunk * vocab
    assert sorted(saved) == sorted([(n, d), (vocab, d)])


def test_argument_errors():
    hidden, weight, labels, _ = inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=1.0)


# --------------------------------------------------------------------------- the LM objective


def decoder(tied: bool = True) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny_config("model.vocab_size=64", f"model.tie_embeddings={str(tied).lower()}").model)


def lm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 64, (2, 40), generator=g)
    y = torch.roll(x, -1, 1)
    y[1, :7] = -100
    return {"input_ids": x, "labels": y}


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("tied", [True, False])
def test_objective_loss_impls_match_standard(impl, tied):
    switches = {
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "goldfish": GoldfishConfig(enabled=True, k=4, strategy="static"),
        "loss_chunk_tokens": 7,
    }
    batch = lm_batch()

    def run(loss_impl):
        model = decoder(tied)
        out = build_lm_loss(ObjectiveConfig(loss_impl=loss_impl, **switches))(model, batch)
        out.loss_sum.backward()
        return out, {name: p.grad for name, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = run("standard"), run(impl)
    assert 0 < int(got.count) == int(want.count) < 80 - 7  # ignored, then goldfish-dropped
    assert sorted(got.metrics) == sorted(want.metrics) == ["ce", "goldfish_dropped", "smoothed", "z_loss"]
    assert_close(got.loss_sum.detach(), want.loss_sum.detach())
    for name in want.metrics:
        assert_close(got.metrics[name], want.metrics[name])
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, rtol=1e-4)  # through the blocks: float32 reordering


def test_standard_objective_is_the_model_logits_loss():
    """``loss_impl=standard`` through the ``head_fn`` is bitwise ``causal_lm_loss(model(x))``."""
    model, batch = decoder(tied=False), lm_batch()
    out = build_lm_loss(ObjectiveConfig())(model, batch)
    assert torch.equal(out.loss_sum, causal_lm_loss(model(batch["input_ids"]), batch["labels"]).loss_sum)


def test_trainer_steps_fused_equal_standard(tmp_path):
    """Five Trainer steps (ragged label masks, z-loss, smoothing): the fused head gives the standard losses
    and gradient norms."""
    runs = {}
    for impl in ("standard", "fused", "chunked"):
        cfg = config(1, f"objective.loss_impl={impl}", *OPTIONS, "train.steps=5")
        runs[impl] = train_objective(cfg, tmp_path / impl)
    assert len(runs["standard"]) == 5
    for impl in ("fused", "chunked"):
        for (_, loss, norm), (_, want_loss, want_norm) in zip(runs[impl], runs["standard"]):
            assert loss == pytest.approx(want_loss, abs=1e-5)
            assert norm == pytest.approx(want_norm, rel=1e-4)


def test_pretrain_run_with_the_fused_head(tmp_path):
    """``lmlab train`` end to end: ``objective.loss_impl=fused`` logs the standard run's losses."""
    losses = {}
    for impl in ("standard", "fused"):
        cfg = tiny_config(f"objective.loss_impl={impl}", "objective.loss_chunk_tokens=48", "train.steps=3")
        run_pretraining(cfg, tmp_path / impl, quiet=True)
        losses[impl] = [r["loss"] for r in read_metrics(tmp_path / impl) if r["kind"] == "train"]
    assert len(losses["standard"]) == 3
    assert losses["fused"] == pytest.approx(losses["standard"], abs=1e-5)


@pytest.mark.slow
def test_two_ranks_fused_match_one_process_standard(tmp_path):
    """DDP and FSDP2 (tied and untied head) on 2 gloo ranks with the fused (or chunked) head: the losses and
    gradient norms of one process with the standard loss, so the head weight's gradient reaches the
    reduction like any other (the head runs inside the root module's forward)."""
    spawn(fused_worker, 2, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == sorted(FUSED_RUNS)
    references = {}
    for name, records in results.items():
        tied = "untied" not in name
        if tied not in references:
            cfg = config(1, *OPTIONS, f"model.tie_embeddings={str(tied).lower()}")
            references[tied] = train_objective(cfg, tmp_path / f"ref_{tied}")
        want = references[tied]
        assert [s for s, _, _ in records] == [s for s, _, _ in want]
        for (step, loss, norm), (_, want_loss, want_norm) in zip(records, want):
            assert loss == pytest.approx(want_loss, abs=1e-5), f"{name}: loss at step {step}"
            assert norm == pytest.approx(want_norm, abs=1e-5, rel=1e-4), f"{name}: grad norm at step {step}"


# --------------------------------------------------------------------------- configuration


def test_loss_impl_config_validation():
    assert ObjectiveConfig().loss_impl == "standard"
    cfg = load_config(None, ["objective.loss_impl=fused", "objective.loss_chunk_tokens=1024"])
    assert (cfg.objective.loss_impl, cfg.objective.loss_chunk_tokens) == ("fused", 1024)
    with pytest.raises(ConfigError, match="objective.loss_impl='fast' is not a valid choice; valid choices: standard"):
        load_config(None, ["objective.loss_impl=fast"])
    with pytest.raises(ConfigError, match=r"objective.loss_chunk_tokens=0 must be > 0"):
        validate(load_config(None, ["objective.loss_chunk_tokens=0"]))
    with pytest.raises(
        ConfigError,
        match="objective.loss_impl=fused never forms the full logits, which "
        "objective.coverage_n=4 needs; set objective.loss_impl=standard",
    ):
        ObjectiveConfig(loss_impl="fused", coverage_n=4).validate()
    with pytest.raises(ConfigError, match="objective.loss_impl=chunked never forms .* objective.distill.teacher='t'"):
        ObjectiveConfig(loss_impl="chunked", distill=DistillConfig(teacher="t")).validate()


def test_loss_impl_needs_a_decoder():
    class NotADecoder(torch.nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 64)

    with pytest.raises(ConfigError, match="objective.loss_impl=fused needs an lmlab Decoder"):
        build_lm_loss(ObjectiveConfig(loss_impl="fused"))(NotADecoder(), lm_batch())
