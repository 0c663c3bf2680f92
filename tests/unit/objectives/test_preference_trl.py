"""Parity of lmlab's preference losses with TRL's own loss code (docs/design.md, principle 6; docs/science.md §7.1).

TRL (1.16) has no standalone DPO loss function: ``DPOTrainer._compute_loss`` runs the model itself.
So these tests build a tiny random ``LlamaForCausalLM`` policy and reference (float64), give them
TRL's fused LM head exactly as ``DPOTrainer.__init__`` does, and call TRL's unmodified methods on a
minimal stand-in for the trainer object (``types.SimpleNamespace`` carrying the attributes the
methods read). For the DPO family lmlab's losses get identical inputs: the per-example summed
log-probs TRL's fused head returns for the same models. That head computes in float32 tiles, so
log-probs extracted independently in float64 agree with it only to ~1e-5 (checked separately);
given identical log-probs the losses agree to 1e-6 (docs/science.md §7 "Numerical check recipe").
SimPO and ORPO use plain logits in TRL, so there lmlab's independent float64 extraction is fed
directly. SimPO runs through
``trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics`` (``loss_type="simpo"``,
``cpo_alpha=0``) and ORPO through ``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics``.
Nothing of TRL's math is mocked.
"""

from __future__ import annotations

import types
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from lmlab.objectives.lm import causal_lm_loss  # noqa: E402
from lmlab.objectives.preference import dpo_loss, ipo_loss, ln_dpo_loss, orpo_loss, simpo_loss  # noqa: E402

TOL = 1e-6  # absolute, or relative above 1: TRL's DPO losses are float32 (the IPO loss is ~25)
VOCAB = 64
N_PAIRS = 3


def _tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def models():
    policy, reference = _tiny_llama(0), _tiny_llama(1)
    # as DPOTrainer.__init__ does (outputs its _compute_loss reads for logging)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    return policy, reference


@pytest.fixture(scope="module")
def pairs():
    """N_PAIRS (prompt, chosen, rejected) pairs of varied lengths, right-padded to one length.

    Returns input_ids, attention_mask, completion_mask for the chosen rows and for the rejected rows.
    """
    generator = torch.Generator().manual_seed(2)
    prompt_lens, chosen_lens, rejected_lens = [3, 5, 2], [4, 2, 6], [5, 3, 2]
    seq_len = max(p + max(c, r) for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens))

    def side(completion_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.zeros(N_PAIRS, seq_len, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
            ids[i, : p + c] = torch.randint(1, VOCAB, (p + c,), generator=generator)
            attention[i, : p + c] = 1
            completion[i, p : p + c] = 1
        return ids, attention, completion

    return side(chosen_lens), side(rejected_lens)


def _our_logps(model, ids, attention, completion) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths, computed without TRL (plain forward)."""
    with torch.no_grad():
        logits = model(ids, attention_mask=attention).logits.double()  # [N, L, V]
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [N, L-1]
    mask = completion[:, 1:].bool()
    return (logprobs * mask).sum(-1), mask.sum(-1).double()


def _trl_logps(model, ids, attention, completion) -> torch.Tensor:
    """Summed completion log-probs from TRL's fused LM head, called as DPOTrainer._compute_loss calls it."""
    labels = ids.masked_fill(completion == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(dim=1).double()


def _accelerator() -> types.SimpleNamespace:
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _dpo_stub(policy, reference, loss_type: str, beta: float) -> types.SimpleNamespace:
    """The attributes DPOTrainer._compute_loss reads, with their DPOConfig defaults."""
    return types.SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=_accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _trl_dpo(stub, chosen, rejected, rows: list[int]) -> tuple[float, float, float]:
    """TRL's loss and mean logged rewards for the pairs ``rows`` (batch = [chosen rows; rejected rows])."""
    inputs = {
        key: torch.cat([chosen[j][rows], rejected[j][rows]])
        for j, key in enumerate(("input_ids", "attention_mask", "completion_mask"))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    logged = stub._metrics["eval"]
    return loss.item(), logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]


@pytest.mark.parametrize(
    ("loss_type", "beta"),
    [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5), ("sigmoid_norm", 1.0), ("sigmoid_norm", 3.0)],
)
def test_dpo_family_matches_trl_compute_loss(models, pairs, loss_type, beta):
    policy, reference = models
    chosen, rejected = pairs
    pol_c, pol_r = (_trl_logps(policy, *side) for side in (chosen, rejected))
    ref_c, ref_r = (_trl_logps(reference, *side) for side in (chosen, rejected))
    len_c, len_r = chosen[2].sum(1).double(), rejected[2].sum(1).double()
    if loss_type == "sigmoid":
        ours = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta)
    elif loss_type == "ipo":
        ours = ipo_loss(pol_c, pol_r, ref_c, ref_r, len_c, len_r, beta=beta)
    else:
        ours = ln_dpo_loss(pol_c, pol_r, ref_c, ref_r, len_c, len_r, beta=beta)

    stub = _dpo_stub(policy, reference, loss_type, beta)
    for i in range(N_PAIRS):  # one pair per call: TRL's loss and logged rewards are then per-example
        loss, chosen_reward, rejected_reward = _trl_dpo(stub, chosen, rejected, [i])
        assert ours.losses[i].item() == pytest.approx(loss, rel=TOL, abs=TOL)
        assert ours.chosen_rewards[i].item() == pytest.approx(chosen_reward, abs=TOL)
        assert ours.rejected_rewards[i].item() == pytest.approx(rejected_reward, abs=TOL)
    loss, chosen_reward, rejected_reward = _trl_dpo(stub, chosen, rejected, list(range(N_PAIRS)))
    assert ours.losses.mean().item() == pytest.approx(loss, rel=TOL, abs=TOL)
    assert ours.chosen_rewards.mean().item() == pytest.approx(chosen_reward, abs=TOL)
    assert ours.rejected_rewards.mean().item() == pytest.approx(rejected_reward, abs=TOL)
    assert 0.0 < loss  # a real, non-degenerate comparison


def test_independent_log_prob_extraction_agrees_with_trl_fused_head(models, pairs):
    policy, reference = models
    for model in (policy, reference):
        for side in pairs:
            ours, lengths = _our_logps(model, *side)
            torch.testing.assert_close(ours, _trl_logps(model, *side), atol=1e-5, rtol=0)
            torch.testing.assert_close(lengths, side[2].sum(1).double())


def _paired_batch(chosen, rejected) -> dict[str, torch.Tensor]:
    """The tokenized batch the CPO/ORPO trainers consume: labels are -100 outside the completion."""
    batch = {}
    for name, (ids, attention, completion) in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{name}_input_ids"] = ids
        batch[f"{name}_attention_mask"] = attention
        batch[f"{name}_labels"] = ids.masked_fill(completion == 0, -100)
    return batch


def _bind(stub: types.SimpleNamespace, trainer_cls: type, *methods: str) -> types.SimpleNamespace:
    for name in methods:
        setattr(stub, name, types.MethodType(getattr(trainer_cls, name), stub))
    stub.concatenated_inputs = trainer_cls.concatenated_inputs  # static methods
    stub.get_batch_logps = trainer_cls.get_batch_logps
    return stub


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (10.0, 3.0, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_trainer(models, pairs, beta, gamma, label_smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo")
    policy, _ = models
    chosen, rejected = pairs
    pol_c, len_c = _our_logps(policy, *chosen)
    pol_r, len_r = _our_logps(policy, *rejected)
    ours = simpo_loss(pol_c, pol_r, len_c, len_r, beta=beta, gamma=gamma, label_smoothing=label_smoothing)

    stub = types.SimpleNamespace(
        accelerator=_accelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        cpo_alpha=0.0,  # pure SimPO: no NLL/BC term (docs/science.md §7.1 pitfall)
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
        alpha=0.0,
    )
    _bind(stub, cpo.CPOTrainer, "concatenated_forward", "cpo_loss")
    batch = _paired_batch(chosen, rejected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        avg_c, avg_r = stub.concatenated_forward(policy, batch)[:2]
        losses, chosen_rewards, rejected_rewards = stub.cpo_loss(avg_c, avg_r)
        loss, metrics = cpo.CPOTrainer.get_batch_loss_metrics(stub, policy, batch, train_eval="eval")
    torch.testing.assert_close(ours.losses, losses.double(), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards.double(), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards.double(), atol=TOL, rtol=0)
    assert ours.losses.mean().item() == pytest.approx(loss.item(), abs=TOL)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["eval_rewards/chosen"], abs=TOL)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_trl_orpo_trainer(models, pairs, lam):
    orpo = pytest.importorskip("trl.experimental.orpo")
    policy, _ = models
    chosen, rejected = pairs
    pol_c, len_c = _our_logps(policy, *chosen)
    pol_r, len_r = _our_logps(policy, *rejected)
    # TRL's NLL term: one mean token cross-entropy over the chosen prompt + answer (padding excluded)
    ids, attention, _ = chosen
    with torch.no_grad():
        logits = policy(ids, attention_mask=attention).logits
    nll_out = causal_lm_loss(logits[:, :-1], ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100))
    nll = (nll_out.loss_sum / nll_out.count).double().expand(N_PAIRS)
    ours = orpo_loss(pol_c, pol_r, len_c, len_r, lam=lam, chosen_nll=nll)

    stub = types.SimpleNamespace(
        accelerator=_accelerator(), is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=lam
    )
    _bind(stub, orpo.ORPOTrainer, "concatenated_forward", "odds_ratio_loss")
    batch = _paired_batch(chosen, rejected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        avg_c, avg_r = stub.concatenated_forward(policy, batch)[:2]
        neg_or, chosen_rewards, rejected_rewards, _, _ = stub.odds_ratio_loss(avg_c, avg_r)
        loss, metrics = orpo.ORPOTrainer.get_batch_loss_metrics(stub, policy, batch, train_eval="eval")
    # TRL returns λ·log σ(log odds ratio) per example (subtracted from the NLL)
    torch.testing.assert_close(lam * ours.metrics["or_loss"], -neg_or.double(), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards.double(), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards.double(), atol=TOL, rtol=0)
    assert metrics["eval_nll_loss"] == pytest.approx(nll[0].item(), abs=TOL)
    assert ours.losses.mean().item() == pytest.approx(loss.item(), abs=TOL)
