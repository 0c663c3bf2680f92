"""``run_sft`` end to end on tiny data: run directory, counts in the log, init_from, teachers, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import RunConfig, TrainConfig, load_config, save_config
from lmlab.data.synthetic.facts import FactsWorld
from lmlab.models.decoder import Decoder
from lmlab.recipes.sft import run_sft
from lmlab.train.checkpoint import latest_checkpoint, save_checkpoint
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrained import ModelMismatchError, load_model

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.steps=3",
    "train.micro_batch_size=4",
    "train.eval_every=3",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.progress=false",
    "train.device=cpu",
    "schedule.warmup_steps=0",
    "sample.max_new_tokens=4",
    "sample.prompts=[hi]",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    convs = FactsWorld().qa_conversations(0, 12, "train")
    lines = [json.dumps({"messages": c["messages"]}) for c in convs]
    lines.append(json.dumps({"prompt": "Tell me everything. " * 30, "completion": "No."}))  # over-long
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "val.jsonl").write_text("\n".join(lines[:4]) + "\n")
    return d


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, sft_tokenizer):
    return sft_tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _cfg(data, tok_path, *extra):
    return load_config(
        None,
        [
            *TINY,
            f"tokenizer.path={tok_path}",
            f"sft.train_file={data / 'train.jsonl'}",
            f"sft.val_file={data / 'val.jsonl'}",
            *extra,
        ],
    )


def test_run_directory_contract_and_counts(tmp_path, data, tok_path):
    summary = run_sft(
        _cfg(data, tok_path, "objective.goldfish.enabled=true", "objective.z_loss=1e-4"), tmp_path / "r", quiet=True
    )
    run = tmp_path / "r"
    for name in (
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "summary.json",
        "env.json",
        "loss.png",
        "samples.txt",
    ):
        assert (run / name).is_file(), name
    assert latest_checkpoint(run) is not None
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert summary["data"]["train_truncated"] == 1  # the over-long prompt, truncated and counted
    records = read_metrics(run)
    assert records[0]["kind"] == "data" and records[0]["train_truncated"] == 1
    train = [r for r in records if r["kind"] == "train"]
    assert {"goldfish_dropped", "z_loss", "loss"} <= set(train[0])
    assert [r for r in records if r["kind"] == "eval"][-1]["val_loss"] == summary["final_val_loss"]
    assert "user: hi" in (run / "samples.txt").read_text()


def test_overlong_drop_and_unpacked_rows(tmp_path, data, tok_path):
    summary = run_sft(
        _cfg(data, tok_path, "sft.overlong=drop", "sft.packing=false", "train.steps=1"), tmp_path / "r", quiet=True
    )
    assert summary["data"]["train_dropped_overlong"] == 1 and summary["data"]["train_truncated"] == 0
    assert summary["data"]["train_rows"] == summary["data"]["train_examples"] - 1


def test_epochs_set_the_number_of_steps(tmp_path, data, tok_path):
    cfg = _cfg(data, tok_path, "sft.epochs=2", "sft.packing=false", "train.micro_batch_size=16", "train.eval_every=100")
    summary = run_sft(cfg, tmp_path / "r", quiet=True)
    rows = summary["data"]["train_rows"]
    assert summary["steps"] == -(-2 * rows // 16)


def _base_run(tmp_path, tokenizer, vocab: int):
    torch.manual_seed(5)
    model = Decoder(load_config(None, TINY + [f"model.vocab_size={vocab}"]).model)
    run = tmp_path / f"base{vocab}"
    run.mkdir()
    save_config(RunConfig(model=model.cfg, train=TrainConfig(seq_len=128)), run / "config.yaml")
    tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run, 0, model, model_cfg=model.cfg)
    return run, model


def test_init_from_starts_from_the_run_weights(tmp_path, data, tok_path, sft_tokenizer):
    base, base_model = _base_run(tmp_path, sft_tokenizer, sft_tokenizer.vocab_size + 8)
    cfg = load_config(
        None,
        [
            *TINY,
            f"init_from={base}",
            "model.d_model=64",
            f"sft.train_file={data / 'train.jsonl'}",
            "optim.lr=0",
            "train.steps=1",
        ],
    )
    run_sft(cfg, tmp_path / "r", quiet=True)
    model, run_cfg, _ = load_model(tmp_path / "r")
    assert run_cfg.model == base_model.cfg  # the architecture comes from init_from
    for (name, p), q in zip(model.state_dict().items(), base_model.state_dict().values()):
        assert torch.equal(p, q), name  # lr = 0: still the initial weights


def test_vocabulary_mismatch_between_tokenizer_and_model_is_refused(tmp_path, data, tok_path, sft_tokenizer):
    base, _ = _base_run(tmp_path, sft_tokenizer, 300)
    cfg = load_config(
        None, [*TINY, f"init_from={base}", f"tokenizer.path={tok_path}", f"sft.train_file={data / 'train.jsonl'}"]
    )
    with pytest.raises(ModelMismatchError, match=r"has \d+ tokens but the model of init_from"):
        run_sft(cfg, tmp_path / "r", quiet=True)


def test_distillation_from_a_teacher_run_with_topk_cache(tmp_path, data, tok_path, sft_tokenizer):
    teacher, _ = _base_run(tmp_path, sft_tokenizer, sft_tokenizer.vocab_size)
    extra = [
        f"objective.distill.teacher={teacher}",
        "objective.distill.topk_cache=8",
        "objective.distill.kind=reverse_kl",
    ]
    summary = run_sft(_cfg(data, tok_path, *extra), tmp_path / "r", quiet=True)
    assert summary["teacher_topk_cache"] == "computed" and (tmp_path / "r" / "teacher_topk.pt").is_file()
    train = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "train"]
    assert train[0]["kd"] > 0 and "lm_loss" in train[0]
    live = run_sft(
        _cfg(data, tok_path, f"objective.distill.teacher={teacher}", "train.steps=1"), tmp_path / "l", quiet=True
    )
    assert live["teacher_topk_cache"] is None


def test_teacher_with_a_different_tokenizer_is_refused_by_sft(tmp_path, data, tok_path):
    from lmlab.data.tokenizer import TextTokenizer

    other = TextTokenizer.train_bpe(["some other corpus entirely"] * 5, 340)
    teacher, _ = _base_run(tmp_path, other, other.vocab_size)
    with pytest.raises(ModelMismatchError, match="different tokenizer"):
        run_sft(_cfg(data, tok_path, f"objective.distill.teacher={teacher}"), tmp_path / "r", quiet=True)


def test_facts_world_without_a_file(tmp_path, tok_path):
    cfg = load_config(
        None,
        [
            *TINY,
            f"tokenizer.path={tok_path}",
            "data.synthetic.world=facts",
            "data.synthetic.n_docs=10",
            "train.steps=1",
        ],
    )
    summary = run_sft(cfg, tmp_path / "r", quiet=True)
    assert summary["data"]["train_examples"] > 0 and summary["data"]["val_examples"] > 0
    acc = summary["facts_accuracy"]
    assert acc["train"]["n"] == summary["data"]["train_examples"] and acc["heldout"]["n"] > 0
    assert 0.0 <= acc["heldout"]["accuracy"] <= 1.0


def test_chat_responder_stops_at_end_of_turn(sft_tokenizer):
    from lmlab.eval.samples import chat_responder

    end = sft_tokenizer.token_to_id("<|end|>")
    hello = sft_tokenizer.encode("hello")

    class Scripted(torch.nn.Module):
        """Answers 'hello' then <|end|>, then would go on with 'hello' forever."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.script = [*hello, end]

        def new_kv_cache(self):
            return {"n": 0}

        def forward(self, ids, kv_cache=None):
            logits = torch.zeros(*ids.shape, sft_tokenizer.vocab_size)
            step = kv_cache["n"]
            kv_cache["n"] += 1
            logits[:, -1, self.script[step] if step < len(self.script) else hello[0]] = 1.0
            return logits

    respond = chat_responder(Scripted(), sft_tokenizer, max_new_tokens=10)
    assert respond([{"role": "user", "content": "hi"}]) == "hello"


def test_imported_hf_model_as_init_and_teacher(tmp_path, data, sft_tokenizer):
    """A model that went through export-hf / import-hf serves as init_from and as the distillation teacher."""
    from lmlab.recipes.hf_commands import export_hf, import_hf

    base, base_model = _base_run(tmp_path, sft_tokenizer, sft_tokenizer.vocab_size)
    imported = tmp_path / "imported"
    import_hf(export_hf(base, tmp_path / "hf"), imported)
    extra = [f"init_from={imported}", f"objective.distill.teacher={imported}", "objective.distill.alpha=1.0"]
    cfg = load_config(None, [*TINY, *extra, f"sft.train_file={data / 'train.jsonl'}", "optim.lr=0", "train.steps=1"])
    run_sft(cfg, tmp_path / "r", quiet=True)
    train = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "train"][0]
    # student = teacher (same weights, lr 0) and alpha = 1: the loss is the KL term, which is zero
    assert train["kd"] == pytest.approx(0.0, abs=1e-6) and train["loss"] == pytest.approx(0.0, abs=1e-6)
    assert train["lm_loss"] > 1.0
