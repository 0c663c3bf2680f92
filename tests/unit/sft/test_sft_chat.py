"""Chat rendering, assistant masks, templates and record parsing (lmlab.data.chat)."""

from __future__ import annotations

import json

import pytest

from lmlab.data.chat import (
    BUILTIN_TEMPLATE,
    ChatTemplate,
    SFTRecord,
    end_of_turn_id,
    read_records,
    render_conversation,
    render_prompt,
    resolve_template,
)
from lmlab.errors import DataError

CONV = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "there"},
]


def _supervised_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_builtin_layout_and_multi_turn_assistant_mask(sft_tokenizer):
    tok = sft_tokenizer
    ids, mask = render_conversation(tok, CONV)
    assert tok.decode(ids) == (
        "<|system|>Be kind.<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>more<|end|><|assistant|>there<|end|>"
    )
    # exactly both replies and their end-of-turn markers are learned, never the headers or user text
    assert _supervised_text(tok, ids, mask) == "hello<|end|>there<|end|>"
    assert ids[mask.index(True) - 1] == tok.token_to_id("<|assistant|>")


def test_loss_on_all_marks_every_token_but_the_first(sft_tokenizer):
    ids, mask = render_conversation(sft_tokenizer, CONV, loss_on="all")
    assert mask == [False] + [True] * (len(ids) - 1)


def test_builtin_template_marks_what_an_assistant_turn_learns():
    """The ``{% generation %}`` markers (HF's convention) render as their content and surround exactly the
    text lmlab supervises: the reply and its end-of-turn marker."""
    assert BUILTIN_TEMPLATE.count("{% generation %}") == 1
    text = ChatTemplate.builtin().render(CONV)
    assert "generation" not in text and text.endswith("<|assistant|>there<|end|>")
    marked = BUILTIN_TEMPLATE.split("{% generation %}")[1].split("{% endgeneration %}")[0]
    assert marked == "{{ message['content'] }}<|end|>"


def test_render_prompt_opens_an_assistant_turn(sft_tokenizer):
    tok = sft_tokenizer
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|user|>hi<|end|><|assistant|>"
    assert end_of_turn_id(tok) == tok.token_to_id("<|end|>")


def test_tokenizer_own_template_is_used(sft_tokenizer, tmp_path):
    """A chat_template in tokenizer_config.json beside tokenizer.json wins over the built-in one."""
    sft_tokenizer.save(tmp_path)
    own = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]: {% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    from lmlab.data.tokenizer import TextTokenizer

    tok = TextTokenizer.load(tmp_path)
    assert resolve_template(tok).source == own
    ids, mask = render_conversation(tok, CONV[1:3])
    assert tok.decode(ids) == "<|bos|>[user]: hi<|eos|>[assistant]: hello<|eos|>"
    assert _supervised_text(tok, ids, mask) == "hello<|eos|>"
    assert render_conversation(tok, CONV[1:3], "builtin")[0] != ids


def test_template_that_is_not_prefix_stable_is_refused(sft_tokenizer):
    odd = ChatTemplate("{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}", "odd")
    with pytest.raises(DataError, match="prefix-stable"):
        render_conversation(sft_tokenizer, CONV[1:3], odd)


def test_conversation_without_assistant_turn_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {"messages": CONV[1:3]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": CONV[:2]}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: the conversation has no assistant turn"):
        read_records(path)


def test_unknown_role_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}, CONV[2]]}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: message 0 has unknown role 'tool'"):
        read_records(path)


def test_bad_json_and_unknown_record_shapes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: not valid JSON"):
        read_records(path)
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: unknown record"):
        read_records(path)
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="needs both"):
        read_records(path)


def test_prompt_completion_and_text_records(tmp_path, sft_tokenizer):
    path = tmp_path / "d.jsonl"
    lines = [
        {"prompt": "hi", "completion": "hello", "system": "Be kind."},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
        {"text": "hello there"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = read_records(path)
    assert recs[0].messages == tuple(CONV[:3])
    assert recs[1].messages[1] == {"role": "assistant", "content": "yo"}
    assert recs[2] == SFTRecord(f"{path}:3", text="hello there")
    ids, mask = recs[2].encode(sft_tokenizer)
    assert ids[0] == ids[-1] == sft_tokenizer.eos_id and mask == [False] + [True] * (len(ids) - 1)


def test_builtin_template_needs_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmlab.data.tokenizer import TextTokenizer

    raw = Tokenizer(models.WordLevel({"<|eos|>": 0, "<|bos|>": 1, "a": 2}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = TextTokenizer(raw)
    with pytest.raises(DataError, match="no chat tokens"):
        render_conversation(tok, CONV[1:3])


def test_prompt_completion_learns_only_the_completion(tmp_path, sft_tokenizer):
    """Assistant turns inside a list-valued prompt are context; only the completion is learned."""
    path = tmp_path / "pc.jsonl"
    record = {"prompt": CONV[:4], "completion": [{"role": "assistant", "content": "there"}]}
    path.write_text(
        json.dumps(record) + "\n" + json.dumps({"prompt": "q", "completion": [{"role": "user", "content": "x"}]}) + "\n"
    )
    with pytest.raises(DataError, match=r"pc\.jsonl:2: the completion has no assistant turn"):
        read_records(path)
    path.write_text(json.dumps(record) + "\n")
    (rec,) = read_records(path)
    ids, mask = rec.encode(sft_tokenizer)
    assert _supervised_text(sft_tokenizer, ids, mask) == "there<|end|>"
    assert ids == render_conversation(sft_tokenizer, CONV)[0]
