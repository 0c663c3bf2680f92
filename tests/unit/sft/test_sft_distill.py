"""Distillation in the LM objective and the teacher (loading, checks, top-k cache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import (
    DistillConfig,
    GoldfishConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    save_config,
)
from lmlab.data.packing import pack_best_fit
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import ConfigError
from lmlab.models.decoder import Decoder
from lmlab.objectives.lm import IGNORE_INDEX
from lmlab.objectives.lm_objective import build_lm_loss
from lmlab.recipes.distill import cached_topk, load_teacher
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.pretrained import ModelMismatchError

V = 40


def _model(seed: int, vocab: int = V) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (2, 12), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, :3] = IGNORE_INDEX  # a prompt
    return {"input_ids": x, "labels": y}


def _expected(student_logits, teacher_logits, labels, keep, alpha, tau):
    """alpha·τ²·Σ KL(p_T^τ‖p_S^τ) + (1 − alpha)·Σ CE, written out."""
    valid = (labels != IGNORE_INDEX) & keep
    s, t = student_logits[valid].double(), teacher_logits[valid].double()
    p_t = torch.softmax(t / tau, -1)
    kl = (p_t * (torch.log_softmax(t / tau, -1) - torch.log_softmax(s / tau, -1))).sum()
    ce = -torch.log_softmax(s, -1).gather(-1, labels[valid][:, None]).sum()
    return alpha * tau**2 * kl + (1 - alpha) * ce, int(valid.sum())


def test_forward_kl_mixed_with_ce_by_hand_and_goldfish_applies_to_both():
    student, teacher = _model(0), _model(1)
    batch = _batch()
    obj = ObjectiveConfig(
        distill=DistillConfig(teacher="t", kind="forward_kl", temperature=2.0, alpha=0.3),
        goldfish=GoldfishConfig(enabled=True, k=3, strategy="static"),
    )
    out = build_lm_loss(obj, lambda b: teacher(b["input_ids"]))(student, batch)
    keep = torch.ones_like(batch["labels"], dtype=torch.bool)
    keep[:, ::3] = False
    with torch.no_grad():
        expected, count = _expected(
            student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], keep, 0.3, 2.0
        )
    assert int(out.count) == count
    assert float(out.loss_sum.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.metrics["kd"]) > 0 and float(out.metrics["lm_loss"]) == pytest.approx(float(out.metrics["ce"]))
    out.loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_topk_cache_with_full_support_equals_live_teacher():
    student, teacher = _model(0), _model(1)
    batch = _batch()
    obj = ObjectiveConfig(distill=DistillConfig(teacher="t", kind="jsd", beta=0.3, alpha=0.6))
    live = build_lm_loss(obj, lambda b: teacher(b["input_ids"]))(student, batch)
    with torch.no_grad():
        top = torch.log_softmax(teacher(batch["input_ids"]), -1).topk(V, -1)
    cached_batch = {**batch, "teacher_topk_logprobs": top.values, "teacher_topk_indices": top.indices.int()}
    cached = build_lm_loss(obj, topk_cached=True)(student, cached_batch)
    assert float(cached.loss_sum.detach()) == pytest.approx(float(live.loss_sum.detach()), rel=1e-5)


def test_distill_without_a_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="objective.distill.teacher"):
        build_lm_loss(ObjectiveConfig(distill=DistillConfig(teacher="runs/t")))


def test_plain_objective_unchanged_when_distill_is_off():
    student = _model(0)
    batch = _batch()
    out = build_lm_loss(ObjectiveConfig())(student, batch)
    with torch.no_grad():
        logits = student(batch["input_ids"])
    valid = batch["labels"] != IGNORE_INDEX
    assert float(out.loss_sum.detach()) == pytest.approx(
        float(F.cross_entropy(logits[valid], batch["labels"][valid], reduction="sum"))
    )


def _teacher_run(tmp_path, tokenizer: TextTokenizer, vocab: int):
    model = _model(1, vocab)
    cfg = RunConfig(model=model.cfg, train=TrainConfig(seq_len=16))
    run = tmp_path / f"teacher{vocab}"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run, 0, model, model_cfg=model.cfg)
    return run, model


def test_teacher_with_another_tokenizer_is_refused(tmp_path, sft_tokenizer):
    other = TextTokenizer.train_bpe(["completely different text"] * 5, 300)
    run, _ = _teacher_run(tmp_path, other, sft_tokenizer.vocab_size)
    with pytest.raises(ModelMismatchError, match="different tokenizer"):
        load_teacher(run, sft_tokenizer, sft_tokenizer.vocab_size, "cpu")
    wide, _ = _teacher_run(tmp_path, sft_tokenizer, 400)
    with pytest.raises(ModelMismatchError, match="model.vocab_size"):
        load_teacher(wide, sft_tokenizer, 352, "cpu")


def test_teacher_topk_cache_is_computed_once_then_loaded(tmp_path, sft_tokenizer):
    vocab = sft_tokenizer.vocab_size
    run, model = _teacher_run(tmp_path, sft_tokenizer, vocab)
    teacher = load_teacher(run, sft_tokenizer, vocab, "cpu")
    assert not any(p.requires_grad for p in teacher.model.parameters())
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, vocab, (n,), generator=g).tolist(), [False] + [True] * (n - 1)) for n in (5, 7, 3)]
    rows = pack_best_fit(examples, 10)
    path = tmp_path / "topk.pt"
    tables, hit = cached_topk(teacher, rows, 4, path, pad_id=0, pad_to=10, batch_size=2, device="cpu")
    assert not hit and tables["teacher_topk_logprobs"].shape == (len(rows), 10, 4)
    again, hit = cached_topk(teacher, rows, 4, path, pad_id=0, pad_to=10, batch_size=2, device="cpu")
    assert hit and torch.equal(again["teacher_topk_indices"], tables["teacher_topk_indices"])
    _, hit = cached_topk(teacher, rows, 3, path, pad_id=0, pad_to=10, batch_size=2, device="cpu")
    assert not hit  # another K is another cache
    # the cached values are the teacher's top log-probs on the packed rows
    from lmlab.data.packing import collate

    b = collate(rows[:1], 0, pad_to=10)
    with torch.no_grad():
        ref = torch.log_softmax(model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]), -1)
    assert torch.allclose(tables["teacher_topk_logprobs"][0], ref[0].topk(4, -1).values, atol=1e-5)
