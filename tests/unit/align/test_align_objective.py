"""The align loss wiring: completion log-probs by hand, DPO at the reference, cached reference,
the gradient-entanglement probe, config checks and the reference-tokenizer check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmlab.config import AlignConfig, load_config
from lmlab.data.preference import collate_pairs, load_preference_file, pad_id_of
from lmlab.errors import ConfigError, DataError
from lmlab.recipes.align import (
    build_align_loss,
    cached_reference,
    check_align_config,
    completion_logps,
    entanglement_probe,
    load_reference_model,
    reference_table,
)
from lmlab.train.pretrained import load_model


class FixedLogits(nn.Module):
    """Logits that depend only on the position: row t is ``table[t]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1)


def test_completion_logps_by_hand():
    # V = 2; position 0 predicts token 1 with logits (0, ln 3) -> p = 3/4; position 1 uniform -> 1/2.
    model = FixedLogits(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 0.0]]))
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    logps, n = completion_logps(model, ids, mask)
    assert n.tolist() == [2.0]
    assert logps.item() == pytest.approx(math.log(0.75) + math.log(0.5), abs=1e-6)
    logps, n = completion_logps(model, ids, torch.tensor([[False, False, True]]))  # prompt masked
    assert logps.item() == pytest.approx(math.log(0.5), abs=1e-6) and n.item() == 1.0


@pytest.fixture(scope="module")
def base(tiny_run):
    model, cfg, tok = load_model(tiny_run)
    return model, cfg, tok


@pytest.fixture(scope="module")
def batch(base, pair_files):
    _, _, tok = base
    data = load_preference_file(pair_files["train"], tok)
    return data, collate_pairs(data.pairs[:4], pad_id_of(tok), range(4))


def test_dpo_at_the_reference_is_log2_and_logs_logps(base, batch):
    model, _, _ = base
    _, b = batch
    out = build_align_loss(AlignConfig(loss="dpo"), model)(model, b)
    assert int(out.count) == 4
    assert float(out.loss_sum.detach()) / 4 == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(out.metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out.metrics["logps/chosen"]) == pytest.approx(float(out.metrics["ref_logps/chosen"]), abs=1e-5)
    lengths = b["completion_mask"][:, 1:].sum(-1).float()
    assert float(out.metrics["length/chosen"]) == float(lengths[:4].sum())
    assert float(out.metrics["length/rejected"]) == float(lengths[4:].sum())


def test_precomputed_reference_gives_the_same_loss(base, batch, tiny_run):
    model, _, tok = base
    data, _ = batch
    torch.manual_seed(0)
    policy, _, _ = load_model(tiny_run)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    table = reference_table(model, data, pad_id_of(tok), 5, "cpu")
    b = collate_pairs(data.pairs[:6], pad_id_of(tok), range(6))
    live = build_align_loss(AlignConfig(loss="ln_dpo", beta=2.0), model)(policy, b)
    b_cached = {**b, "ref_chosen_logps": table[:6, 0], "ref_rejected_logps": table[:6, 1]}
    cached = build_align_loss(AlignConfig(loss="ln_dpo", beta=2.0), None)(policy, b_cached)
    assert float(cached.loss_sum.detach()) == pytest.approx(float(live.loss_sum.detach()), abs=1e-5)
    assert float(live.loss_sum.detach()) != pytest.approx(6 * math.log(2.0), abs=1e-4)  # the policy moved


def test_reference_free_losses_need_no_reference(base, batch):
    model, _, _ = base
    _, b = batch
    for loss in ("simpo", "orpo"):
        out = build_align_loss(AlignConfig(loss=loss, beta=2.0, sft_weight=0.5), None)(model, b)
        assert math.isfinite(float(out.loss_sum.detach())) and "ref_logps/chosen" not in out.metrics
        assert "sft" in out.metrics
    with pytest.raises(RuntimeError, match="needs reference"):
        build_align_loss(AlignConfig(loss="dpo"), None)(model, b)


def test_entanglement_probe_matches_backward_and_leaves_grads(base, batch):
    model, _, _ = base
    _, b = batch
    for p in model.parameters():
        p.grad = None
    d = entanglement_probe(model, b)
    assert all(p.grad is None for p in model.parameters())
    # reference computation with .backward()
    grads = []
    for rows in (slice(0, 4), slice(4, 8)):
        model.zero_grad()
        logps, _ = completion_logps(model, b["input_ids"][rows], b["completion_mask"][rows])
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    g_w, g_l = grads
    assert d["grad_norm_chosen"] == pytest.approx(float(g_w.norm()), rel=1e-4)
    assert d["grad_norm_rejected"] == pytest.approx(float(g_l.norm()), rel=1e-4)
    assert d["grad_cos"] == pytest.approx(float(torch.nn.functional.cosine_similarity(g_w, g_l, dim=0)), abs=1e-4)
    assert d["probe_margin"] == pytest.approx(d["probe_logps/chosen"] - d["probe_logps/rejected"], abs=1e-5)
    # identical chosen and rejected: the two gradients coincide
    same = {
        **b,
        "input_ids": torch.cat([b["input_ids"][:4]] * 2),
        "completion_mask": torch.cat([b["completion_mask"][:4]] * 2),
    }
    assert entanglement_probe(model, same)["grad_cos"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("align.beta=0", "align.beta=0.0 must be > 0"),
        ("align.beta=-1", "align.beta=-1.0 must be > 0"),
    ],
)
def test_beta_not_positive_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_check_align_config():
    ok = load_config(None, ["align.train_file=x.jsonl", "model.max_seq_len=256"])
    check_align_config(ok)
    for override, message in [
        ("align.label_smoothing=0.5", "label_smoothing"),
        ("align.max_len=512", "exceeds the model's max_seq_len"),
        ("align.max_prompt_len=300", "max_prompt_len"),
        ("align.train_file=null", "align.train_file is required"),
    ]:
        with pytest.raises(ConfigError, match=message):  # refused when the config loads, or by the recipe
            check_align_config(load_config(None, ["align.train_file=x.jsonl", "model.max_seq_len=256", override]))


def test_reference_with_another_tokenizer_is_refused(base, foreign_run):
    _, _, tok = base
    with pytest.raises(DataError, match="uses a different tokenizer than the policy"):
        load_reference_model(foreign_run, tok, "cpu")


def test_reference_cache_is_reused_only_for_the_same_data(base, pair_files, tmp_path):
    model, _, tok = base
    calls = []

    def load():
        calls.append(1)
        return model

    train = load_preference_file(pair_files["train"], tok)
    val = load_preference_file(pair_files["val"], tok)
    first = cached_reference(tmp_path, "ref", {"train": train}, load, pad_id_of(tok), 8, "cpu")
    again = cached_reference(tmp_path, "ref", {"train": train}, load, pad_id_of(tok), 8, "cpu")
    assert len(calls) == 1 and torch.equal(first["train"], again["train"])
    assert torch.allclose(first["train"], reference_table(model, train, pad_id_of(tok), 3, "cpu"), atol=1e-5)
    cached_reference(tmp_path, "ref", {"train": train, "val": val}, load, pad_id_of(tok), 8, "cpu")
    cached_reference(tmp_path, "other_ref", {"train": train, "val": val}, load, pad_id_of(tok), 8, "cpu")
    assert len(calls) == 3  # new split, then another reference: recomputed


def test_dispatch_passes_the_config_to_each_loss():
    from lmlab.objectives import preference as P
    from lmlab.objectives.preference import PairLogps, preference_losses

    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5) * 3 - 10 for _ in range(4))
    lc, lr = torch.tensor([3.0, 4, 5, 6, 7]), torch.tensor([2.0, 8, 5, 1, 9])
    cases = {
        "dpo": P.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1),
        "ipo": P.ipo_loss(pc, pr, rc, rr, lc, lr, beta=0.3),
        "ln_dpo": P.ln_dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.3),
        "simpo": P.simpo_loss(pc, pr, lc, lr, beta=0.3, gamma=0.7, label_smoothing=0.1),
        "orpo": P.orpo_loss(pc, pr, lc, lr, lam=0.2),
    }
    for loss, expected in cases.items():
        a = AlignConfig(loss=loss, beta=0.3, gamma=0.7, label_smoothing=0.1, orpo_lambda=0.2)
        got = preference_losses(a, PairLogps(pc, pr, rc, rr, lc, lr))
        assert torch.allclose(got.losses, expected.losses), loss
        assert torch.allclose(got.chosen_rewards, expected.chosen_rewards), loss
    a = AlignConfig(loss="dpo", beta=0.3, sft_weight=0.5)
    got = preference_losses(a, PairLogps(pc, pr, rc, rr, lc, lr))
    expected = P.dpo_loss(pc, pr, rc, rr, beta=0.3).losses + 0.5 * (-pc / lc)
    assert torch.allclose(got.losses, expected)
