"""Preference JSONL loading, masking, bad input and the resumable batch source."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.data.preference import PreferenceBatches, collate_pairs, load_preference_file, pad_id_of
from lmlab.errors import DataError


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_text_prompt_is_masked_and_answers_end_with_eos(tmp_path, tokenizer):
    f = write(
        tmp_path / "p.jsonl", [{"prompt": "Question: What is 1 plus 2?\nAnswer:", "chosen": " 3.", "rejected": " 4."}]
    )
    data = load_preference_file(f, tokenizer)
    pair = data.pairs[0]
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode("Question: What is 1 plus 2?\nAnswer:")]
    assert pair.chosen_ids == prompt_ids + tokenizer.encode(" 3.") + [tokenizer.eos_id]
    assert pair.chosen_start == len(prompt_ids) and pair.prompt_ids == prompt_ids
    batch = collate_pairs(data.pairs, pad_id_of(tokenizer))
    assert batch["input_ids"].shape[0] == 2  # chosen row then rejected row
    assert batch["input_ids"][1].tolist()[: len(pair.rejected_ids)] == pair.rejected_ids
    mask = batch["completion_mask"][0]
    assert not mask[: len(prompt_ids)].any()
    assert int(mask.sum()) == pair.chosen_len == len(tokenizer.encode(" 3.")) + 1


def test_identical_pair_is_counted_and_skipped(tmp_path, tokenizer):
    f = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q", "chosen": " same.", "rejected": " same."},
            {"prompt": "Q", "chosen": " a.", "rejected": " b."},
        ],
    )
    data = load_preference_file(f, tokenizer, identical_pairs="skip")
    assert len(data) == 1 and data.identical == 1 and data.summary()["identical_skipped"] == 1


def test_identical_pair_refused_names_file_and_line(tmp_path, tokenizer):
    f = write(
        tmp_path / "p.jsonl",
        [{"prompt": "Q", "chosen": " a.", "rejected": " b."}, {"prompt": "Q", "chosen": " x", "rejected": " x"}],
    )
    with pytest.raises(DataError, match=rf"{f}:2: chosen and rejected are identical"):
        load_preference_file(f, tokenizer, identical_pairs="error")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_missing_field_names_file_line_and_field(tmp_path, tokenizer, field):
    rec = {"prompt": "Q", "chosen": " a.", "rejected": " b."}
    bad = {k: v for k, v in rec.items() if k != field}
    f = write(tmp_path / "p.jsonl", [rec, "", bad])
    with pytest.raises(DataError, match=rf"{f}:3: missing field '{field}'"):
        load_preference_file(f, tokenizer)


def test_bad_json_and_wrong_types(tmp_path, tokenizer):
    f = write(tmp_path / "a.jsonl", ['{"prompt": "Q", "chosen": '])
    with pytest.raises(DataError, match=rf"{f}:1: not valid JSON"):
        load_preference_file(f, tokenizer)
    f = write(tmp_path / "b.jsonl", [{"prompt": "Q", "chosen": 3, "rejected": " b."}])
    with pytest.raises(DataError, match="'chosen' must be a string"):
        load_preference_file(f, tokenizer)
    with pytest.raises(DataError, match="not found"):
        load_preference_file(tmp_path / "missing.jsonl", tokenizer)


def test_truncation_keeps_prompt_end_and_cuts_answer(tmp_path, tokenizer):
    prompt = "one two three four five six seven eight nine ten " * 4
    f = write(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": " yes " * 40, "rejected": " no."}])
    data = load_preference_file(f, tokenizer, max_prompt_len=8, max_len=20)
    pair = data.pairs[0]
    full_prompt = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    assert pair.chosen_start == 8 and pair.chosen_ids[:8] == full_prompt[-8:]
    assert len(pair.chosen_ids) == 20 and data.truncated == 1
    assert pair.rejected_ids[8:] == tokenizer.encode(" no.") + [tokenizer.eos_id]


def test_messages_prompt_uses_the_chat_template(tmp_path, tokenizer):
    chat = pytest.importorskip("lmlab.data.chat")
    messages = [{"role": "user", "content": "What is 1 plus 2?"}]
    f = write(tmp_path / "p.jsonl", [{"prompt": messages, "chosen": "3.", "rejected": "4."}])
    pair = load_preference_file(f, tokenizer).pairs[0]
    prompt_ids = chat.render_prompt(tokenizer, messages)
    assert pair.prompt_ids == prompt_ids
    assert pair.chosen_ids[: pair.chosen_start] == prompt_ids
    assert pair.chosen_ids[: pair.chosen_start] == pair.rejected_ids[: pair.rejected_start]


def test_batches_are_deterministic_resumable_and_carry_reference(pair_files, tokenizer):
    data = load_preference_file(pair_files["train"], tokenizer)
    table = torch.arange(2 * len(data), dtype=torch.float32).view(-1, 2)
    a = PreferenceBatches(data, pad_id_of(tokenizer), seed=3, reference=table)
    for _ in range(7):  # crosses an epoch boundary (48 pairs, 7 x 8)
        a.next_batch(8)
    state = a.state_dict()
    expected = a.next_batch(8)
    b = PreferenceBatches(data, pad_id_of(tokenizer), seed=3, reference=table)
    b.load_state_dict(state)
    got = b.next_batch(8)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["ref_chosen_logps"], table[got["pair_index"], 0])
    assert torch.equal(got["ref_rejected_logps"], table[got["pair_index"], 1])
    # one epoch visits every pair exactly once
    c = PreferenceBatches(data, pad_id_of(tokenizer), seed=0)
    seen = torch.cat([c.next_batch(8)["pair_index"] for _ in range(6)])
    assert sorted(seen.tolist()) == list(range(len(data)))


def test_multi_turn_prompt_assistant_turns_are_not_the_completion(tmp_path):
    """Regression: an assistant turn inside the prompt must not be taken as the start of the answer."""
    from lmlab.data import chat
    from lmlab.data.preference import _render_messages
    from lmlab.data.tokenizer import TextTokenizer

    tok = TextTokenizer.train_bpe(["hello there general kenobi"] * 20, 300, 1)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again?"},
    ]
    ids, start, prompt_ids = _render_messages(tok, msgs, "there", None, "t.jsonl:1")
    assert prompt_ids == list(chat.render_prompt(tok, msgs))
    assert ids[: len(prompt_ids)] == prompt_ids
    assert start == len(prompt_ids)  # the answer starts after the whole prompt, not at the first assistant turn
