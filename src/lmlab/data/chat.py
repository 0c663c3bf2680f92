"""Chat data: reading SFT records, rendering conversations with a chat template, and the assistant mask.

Records (one JSON object per line of a ``.jsonl`` file) come in the shapes fine-tuning datasets use:

- conversations: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`` (``user`` and
  ``assistant`` are accepted as ``from`` too), read as the same conversation;
- prompt/completion pairs: ``{"prompt": str | [messages], "completion": str | [messages]}``, optionally
  with ``"system": str``; a string prompt is one user turn and a string completion one assistant turn;
- Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``: one user turn (the instruction,
  then a blank line and the input when there is one) and the output as the learned assistant turn;
- plain documents: ``{"text": str}`` (continued pretraining with packing; every token is a target).

A chat template turns messages into text. The template is the tokenizer's own (``chat_template.jinja``
or the ``chat_template`` of a ``tokenizer_config.json`` next to its ``tokenizer.json``, e.g. one kept by
``lmlab import-hf``) when it has one, else lmlab's built-in template, which ``lmlab export-hf`` writes:

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

each message is ``<|role|>content<|end|>`` and a generation prompt opens ``<|assistant|>``. The assistant's
reply and its ``<|end|>`` sit inside ``{% generation %}`` markers, the Hugging Face convention that lets
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and so TRL's assistant-only loss) find the
same tokens lmlab learns; lmlab renders the markers as their content. The loss
mask comes from rendering the conversation message by message: the text a template adds for an
assistant message after its generation prompt (the reply and its end-of-turn marker) is supervised,
everything else (system/user turns and the assistant header) is context. Each piece is tokenized on
its own and the ids concatenated, so the mask is exact at token level (pieces meet at special tokens
in every common template, where BPE cannot merge across anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmlab.data.rows import read_rows
from lmlab.data.textio import read_text
from lmlab.data.tokenizer import CHAT_TOKENS, END_OF_TURN
from lmlab.errors import DataError

ROLES = ("system", "user", "assistant")

BUILTIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""lmlab's chat layout, with ``{% generation %}`` around what an assistant turn learns; ``lmlab export-hf``
writes it into exported tokenizers, so ``transformers``' ``apply_chat_template`` renders the same text."""

Message = dict[str, str]
LossOn = Literal["assistant", "all"]


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (Hugging Face convention: ``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``) and where it came from (``"builtin"``, a file path, ``"inline"``)."""

    source: str
    origin: str = "builtin"

    @classmethod
    def builtin(cls) -> ChatTemplate:
        return cls(BUILTIN_TEMPLATE, "builtin")

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tokenizer=None,
        markers: tuple[str, str] | None = None,
    ) -> str:
        """The template's text for ``messages`` (``tokenizer`` supplies ``bos_token``/``eos_token``); with
        ``markers`` each ``{% generation %}`` block's output is enclosed in them."""
        bos = eos = ""
        if tokenizer is not None:
            bos = "" if tokenizer.bos_id is None else tokenizer.id_to_token(tokenizer.bos_id) or ""
            eos = tokenizer.id_to_token(tokenizer.eos_id) or ""
        try:
            return _compiled(self.source, markers).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
        except Exception as err:  # jinja2 raises many types; all mean the template cannot render this input
            raise DataError(f"chat template ({self.origin}) failed to render: {err}") from None


_TEMPLATE_CACHE: dict[Any, Any] = {}


def _generation_markers(markers: tuple[str, str] | None = None):
    """A Jinja extension for Hugging Face's ``{% generation %}...{% endgeneration %}`` block, rendered as its
    body (lmlab finds the assistant tokens by rendering message by message, not from the markers), or enclosed
    in ``markers`` (to check where the markers are: ``lmlab.data.template_markers``)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationMarkers(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the "generation" name
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            if markers is None:
                return body
            opening, closing = (nodes.Output([nodes.TemplateData(m)]) for m in markers)
            return [opening, *body, closing]

    return GenerationMarkers


def _compiled(source: str, markers: tuple[str, str] | None = None):
    """Compile once per source, in a sandbox (templates come from model files), HF's whitespace options."""
    key = source if markers is None else (source, markers)
    if key not in _TEMPLATE_CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_markers(markers)]
        )
        env.globals["raise_exception"] = raise_exception
        try:
            _TEMPLATE_CACHE[key] = env.from_string(source)
        except TemplateError as err:
            raise DataError(f"chat template is not valid Jinja: {err}") from None
    return _TEMPLATE_CACHE[key]


def tokenizer_chat_template(tokenizer) -> str | None:
    """The chat template that came with the tokenizer (``TextTokenizer.chat_template``), if any."""
    return getattr(tokenizer, "chat_template", None)


def resolve_template(tokenizer, template: ChatTemplate | str | None = None) -> ChatTemplate:
    """Pick the template: an explicit one (a ``ChatTemplate``, ``"builtin"``, a path to a Jinja file or
    Jinja text), else the tokenizer's own, else the built-in one. The built-in template needs the
    tokenizer to have lmlab's chat tokens."""
    if isinstance(template, ChatTemplate):
        chosen = template
    elif template == "builtin":
        chosen = ChatTemplate.builtin()
    elif isinstance(template, str):
        if "{{" in template or "{%" in template:
            chosen = ChatTemplate(template, "inline")
        elif Path(template).is_file():
            chosen = ChatTemplate(read_text(template), template)
        else:
            raise DataError(f"chat template {template!r} is not 'builtin', an existing Jinja file or Jinja text")
    else:
        own = tokenizer_chat_template(tokenizer)
        origin = getattr(tokenizer, "template_origin", None) or f"{tokenizer.source} chat_template"
        chosen = ChatTemplate(own, origin) if own else ChatTemplate.builtin()
    if chosen.source == BUILTIN_TEMPLATE:
        missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(
                f"tokenizer {tokenizer.source} has no chat tokens {', '.join(missing)} and no chat_template; "
                "use a tokenizer trained by lmlab or set sft.chat_template"
            )
    return chosen


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` can render a chat: it has a template of its own, or lmlab's chat tokens (the built-in
    template's)."""
    return bool(tokenizer_chat_template(tokenizer)) or all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|end|>`` when the vocabulary has it, else EOS."""
    tid = tokenizer.token_to_id(END_OF_TURN)
    return tid if tid is not None else tokenizer.eos_id


# --------------------------------------------------------------------------- validation


def validate_messages(messages: Any, where: str = "conversation", *, need_assistant: bool = True) -> list[Message]:
    """Check the shape of a conversation; a ``DataError`` names ``where`` (e.g. ``file.jsonl:7``) and the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    return out


# --------------------------------------------------------------------------- rendering


def render_conversation(
    tokenizer,
    messages: Sequence[Message],
    template: ChatTemplate | str | None = None,
    *,
    loss_on: LossOn = "assistant",
    where: str = "conversation",
    supervise_from: int = 0,
) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and its target mask (``mask[j]`` True: token j is learned).

    With ``loss_on="assistant"`` the mask covers each assistant reply and its end-of-turn marker
    (every assistant turn of a multi-turn conversation from message ``supervise_from`` on; earlier
    messages, e.g. the prompt of a prompt/completion pair, are context only); with ``"all"`` every
    token but the first.
    A template whose output for a prefix of the conversation is not a prefix of its output for the
    whole conversation cannot give a mask and is a ``DataError``.
    """
    msgs = validate_messages(list(messages), where)
    chat = resolve_template(tokenizer, template)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = chat.render(msgs[:i], add_generation_prompt=True, tokenizer=tokenizer)
            _check_prefix(done, head, chat, where, i)
            pieces.append((head[len(done) :], False))
            done = head
        text = chat.render(msgs[: i + 1], tokenizer=tokenizer)
        _check_prefix(done, text, chat, where, i)
        pieces.append((text[len(done) :], m["role"] == "assistant" and i >= supervise_from))
        done = text
    ids: list[int] = []
    mask: list[bool] = []
    for text, supervised in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        mask += [supervised or loss_on == "all"] * len(piece)
    if mask:
        mask[0] = False  # the first token has no context to be predicted from
    return ids, mask


def _check_prefix(done: str, text: str, chat: ChatTemplate, where: str, index: int) -> None:
    if not text.startswith(done):
        raise DataError(
            f"{where}: chat template ({chat.origin}) is not prefix-stable at message {index} "
            "(rendering more messages changed earlier text), so assistant tokens cannot be located"
        )


def render_prompt(
    tokenizer,
    messages: Sequence[Message],
    template: ChatTemplate | str | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a prompt for generation: ``messages`` (no assistant turn needed) plus, by default,
    the opening of an assistant turn."""
    msgs = validate_messages(list(messages), "prompt", need_assistant=False)
    chat = resolve_template(tokenizer, template)
    return tokenizer.encode(chat.render(msgs, add_generation_prompt=add_generation_prompt, tokenizer=tokenizer))


def render_text_document(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A plain document as in pretraining: ``EOS + text + EOS``, every token after the first a target."""
    ids = [tokenizer.eos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return ids, [False] + [True] * (len(ids) - 1)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SFTRecord:
    """One training example: ``messages`` (a conversation) or ``text`` (a plain document), and its origin.

    ``n_context`` leading messages are never learned (the prompt of a prompt/completion record). ``refuse`` and
    ``category`` are a record's optional labels (its reply is a refusal; its kind), read by ``sft.refusal_tokens``
    (``lmlab.data.refusal_tokens``)."""

    where: str
    messages: tuple[Message, ...] = ()
    text: str | None = None
    n_context: int = 0
    refuse: bool | None = None
    category: str | None = None

    def encode(self, tokenizer, template: ChatTemplate | str | None = None, loss_on: LossOn = "assistant"):
        """``(ids, target_mask)`` of this record."""
        if self.text is not None:
            return render_text_document(tokenizer, self.text)
        return render_conversation(
            tokenizer, list(self.messages), template, loss_on=loss_on, where=self.where, supervise_from=self.n_context
        )


def parse_record(obj: Any, where: str) -> SFTRecord:
    """Turn one decoded JSON object into an ``SFTRecord`` (see the module docstring for the shapes), with its
    optional ``refuse`` (a boolean) and ``category`` (a string) labels."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    record = _parse_shape(obj, where)
    refuse, category = obj.get("refuse"), obj.get("category")
    if refuse is not None and not isinstance(refuse, bool):
        raise DataError(f"{where}: 'refuse' must be true or false, got {refuse!r}")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise DataError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    if refuse is None and category is None:
        return record
    return dataclasses.replace(record, refuse=refuse, category=category)


def _parse_shape(obj: dict, where: str) -> SFTRecord:
    if "messages" in obj:
        return SFTRecord(where, tuple(validate_messages(obj["messages"], where)))
    if "conversations" in obj:
        return SFTRecord(where, tuple(validate_messages(_sharegpt_messages(obj["conversations"], where), where)))
    if "instruction" in obj:
        return _alpaca_record(obj, where)
    if "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            raise DataError(f"{where}: a prompt/completion record needs both 'prompt' and 'completion'")
        messages: list[Any] = []
        if "system" in obj:
            messages.append({"role": "system", "content": obj["system"]})
        messages += _as_turns(obj["prompt"], "user", where, "prompt")
        n_context = len(messages)
        completion = _as_turns(obj["completion"], "assistant", where, "completion")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            raise DataError(f"{where}: the completion has no assistant turn (nothing to learn from)")
        messages += completion
        return SFTRecord(where, tuple(validate_messages(messages, where)), n_context=n_context)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return SFTRecord(where, text=obj["text"])
    raise DataError(
        f"{where}: unknown record; expected 'messages', 'conversations' (ShareGPT), 'prompt' + 'completion', "
        f"'instruction' + 'output' (Alpaca) or 'text' (keys: {', '.join(obj)})"
    )


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _sharegpt_messages(turns: Any, where: str) -> list[Message]:
    """ShareGPT's ``[{"from", "value"}]`` turns as ``{"role", "content"}`` messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns (ShareGPT)")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: ShareGPT turn {i} needs 'from' and 'value'")
        if turn["from"] not in _SHAREGPT_ROLES:
            raise DataError(
                f"{where}: ShareGPT turn {i} has unknown 'from' {turn['from']!r}; valid: {', '.join(_SHAREGPT_ROLES)}"
            )
        out.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def _alpaca_record(obj: dict, where: str) -> SFTRecord:
    """Alpaca's instruction (+ input) as the user turn, its output as the learned assistant turn."""
    if "output" not in obj:
        raise DataError(f"{where}: an Alpaca record needs 'output' besides 'instruction' (keys: {', '.join(obj)})")
    for key in ("instruction", "input", "output"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: Alpaca field '{key}' must be a string")
    user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    return SFTRecord(where, tuple(validate_messages(messages, where)), n_context=1)


def _as_turns(value: Any, role: str, where: str, key: str) -> list[Any]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: '{key}' must be a string or a list of messages")


def read_records(path: str | Path, columns: dict[str, str] | None = None) -> list[SFTRecord]:
    """All records of a dataset (``lmlab.data.rows``: JSONL, JSON, CSV, parquet, a ``save_to_disk`` folder or a
    ``datasets`` id), columns renamed per ``columns``; every error names the file and line or row."""
    records = [parse_record(obj, where) for where, obj in read_rows(path, columns=columns, what="SFT data file")]
    if not records:
        raise DataError(f"{path}: no records")
    return records
