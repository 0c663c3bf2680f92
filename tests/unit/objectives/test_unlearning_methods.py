"""The unlearning methods' registry: options per method, the parts each scores, and each loss from scored tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.objectives.unlearning import npo_loss, retain_kl
from lmlab.objectives.unlearning_methods import UNLEARNING_METHODS, Scored


def scored(logps, lengths, *, logits=None, hidden=None) -> Scored:
    logps, lengths = torch.tensor(logps, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    token = (logps / lengths)[:, None] * mask  # the sum spread evenly over the answer tokens
    return Scored(logps, lengths, token, mask, logits, hidden)


def method(kind: str, **options):
    return load_config(
        None, [f"unlearn.method.kind={kind}", *(f"unlearn.method.{k}={v}" for k, v in options.items())]
    ).unlearn.method


def test_every_method_is_a_registry_row_with_its_own_options():
    assert set(UNLEARNING_METHODS) == {"ga", "grad_diff", "npo", "simnpo", "idk_dpo", "idk_nll", "flat", "rmu", "uld"}
    assert load_config(None, []).unlearn.method.kind == "npo"
    with pytest.raises(ConfigError, match=r"unlearn.method.beta is an option of .*npo.*not of kind=rmu"):
        method("rmu", beta=0.1)
    with pytest.raises(ConfigError, match=r"unlearn.method.retain is an option of .*not of kind=flat"):
        method("flat", retain="nll")
    with pytest.raises(ConfigError, match="unknown config key 'unlearn.method.colour'"):
        method("npo", colour=1)
    with pytest.raises(ConfigError, match="valid choices"):
        method("unlearn_everything")
    with pytest.raises(ConfigError, match="unlearn.method.beta=0.0 must be > 0"):
        method("simnpo", beta=0.0)
    with pytest.raises(ConfigError, match="steering_coeff"):
        method("rmu", steering_coeff=-1)


def test_parts_and_reference_parts():
    assert method("ga").parts == ("forget",) and method("ga").ref_parts == ()
    assert method("npo").parts == ("forget", "retain") and method("npo").ref_parts == ("forget",)
    assert method("npo", retain="none").parts == ("forget",)
    assert method("npo", retain="kl").ref_parts == ("forget", "retain") and method("npo", retain="kl").needs_logits
    assert method("simnpo").ref_parts == ()
    assert method("idk_dpo").parts == ("forget", "idk", "retain") and method("idk_dpo").ref_parts == ("forget", "idk")
    assert method("idk_nll").parts == ("idk", "retain")
    assert method("flat").parts == ("forget", "idk") and method("flat").ref_parts == ()
    rmu = method("rmu")
    assert rmu.parts == ("forget", "retain") and rmu.ref_parts == ("retain",) and rmu.hidden_block(8) == 4
    assert method("rmu", layer=1).hidden_block(8) == 1


def test_rmu_trains_the_down_projections_of_three_blocks_by_default():
    rmu = method("rmu", layer=3)
    trained = [i for i in range(6) if rmu.trainable(f"layers.{i}.mlp.down_proj.weight", 6)]
    assert trained == [1, 2, 3]
    assert not rmu.trainable("layers.3.mlp.up_proj.weight", 6) and not rmu.trainable("tok_embeddings.weight", 6)
    assert method("rmu", train="all").trainable("tok_embeddings.weight", 6)


def test_npo_with_retain_nll_combines_the_terms():
    policy = {"forget": scored([-4.0, -6.0], [2, 3]), "retain": scored([-2.0, -9.0], [2, 3])}
    reference = {"forget": scored([-4.0, -5.0], [2, 3])}
    out = method("npo", beta=0.5, retain_coeff=2.0).loss(policy, reference)
    forget = npo_loss(policy["forget"].logps, reference["forget"].logps, beta=0.5)
    assert (out.loss_sum / out.count).item() == pytest.approx(forget.mean().item() + 2.0 * (1.0 + 3.0) / 2)


def test_grad_diff_kl_uses_the_reference_logits():
    torch.manual_seed(0)
    a, b = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    policy = {"forget": scored([-4.0], [2]), "retain": scored([-1.0], [2], logits=a)}
    reference = {"retain": scored([-1.0], [2], logits=b)}
    out = method("grad_diff", retain="kl").loss(policy, reference)
    kl = retain_kl(a, b, policy["retain"].mask).item()
    assert out.loss_sum.item() == pytest.approx(-2.0 + kl, rel=1e-6)


def test_ga_simnpo_idk_and_flat_losses():
    forget = scored([-8.0], [4])
    assert method("ga").loss({"forget": forget}, None).loss_sum.item() == pytest.approx(-2.0)
    simnpo = method("simnpo", beta=2.5, forget_coeff=1.0, retain="none").loss({"forget": forget}, None)
    assert simnpo.loss_sum.item() == pytest.approx(0.00537228, abs=1e-7)
    idk = scored([-3.0], [3])
    nll = method("idk_nll", retain="none").loss({"idk": idk}, None)
    assert nll.loss_sum.item() == pytest.approx(1.0)
    zero = {"forget": scored([-2.0], [1]), "idk": scored([-3.0], [1])}
    dpo = method("idk_dpo", retain="none").loss(zero, zero)
    assert dpo.loss_sum.item() == pytest.approx(20 * math.log(2.0), rel=1e-6)
    flat = method("flat", divergence="kl").loss(
        {"forget": scored([math.log(0.7)], [1]), "idk": scored([math.log(0.2)], [1])}, None
    )
    assert flat.count.item() == 1 and flat.loss_sum.item() == pytest.approx(0.540818, abs=1e-6)


def test_rmu_loss_from_hidden_states():
    hidden = torch.zeros(1, 2, 4)
    policy = {"forget": scored([-1.0], [2], hidden=hidden), "retain": scored([-1.0], [2], hidden=hidden + 1.0)}
    reference = {"retain": scored([-1.0], [2], hidden=hidden)}
    out = method("rmu", steering_coeff=6.5, retain_coeff=3.0).loss(policy, reference)
    assert out.loss_sum.item() == pytest.approx(10.5625 + 3.0 * 1.0, rel=1e-6)
