"""``{% generation %}`` markers for chat templates that lack them, so that an exported model's template gives
transformers' ``return_assistant_tokens_mask`` (and TRL's ``assistant_only_loss``) the tokens lmlab's SFT learns.

lmlab itself finds the assistant tokens by rendering a conversation message by message (``render_conversation``:
each assistant reply with what the template writes after it, up to the next message). A template without markers
usually writes every message with one loop body: ``{% for m in messages %}HEADER {{ m['content'] }} FOOTER
{% endfor %}``. ``add_generation_markers`` wraps the part from the content to the end of the body in
``{% generation %}`` for assistant messages only (``{% if m['role'] == 'assistant' %}…{% else %}…{% endif %}``),
then *checks* the result: on a set of sample conversations it must render exactly the original text, and its
marked characters must select exactly the tokens of lmlab's loss mask. A template that does not fit this shape, or
fails the check, is left as it is (``None``).
"""

from __future__ import annotations

import re

from lmlab.data.chat import ChatTemplate, render_conversation
from lmlab.errors import DataError

SAMPLES = [
    [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, and then red."},
    ],
]
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters marking generation blocks while checking
_FOR = re.compile(r"\{%-?\s*for\s+(\w+)\s+in\s+messages\s*-?%\}")
_BLOCK = re.compile(r"\{%-?\s*(for|endfor|if|endif|macro|endmacro|generation|endgeneration|raw|endraw)\b")
_HAS_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_markers(template: str) -> bool:
    return bool(_HAS_MARKERS.search(template))


def add_generation_markers(template: str, tokenizer) -> str | None:
    """``template`` with ``{% generation %}`` around each assistant reply (module docstring), or None when it
    cannot be marked so that the marks equal lmlab's loss mask."""
    candidate = _marked(template)
    if candidate is None:
        return None
    try:
        return candidate if _agrees(template, candidate, tokenizer) else None
    except DataError:
        return None


def _marked(template: str) -> str | None:
    loop = _FOR.search(template)
    if loop is None:
        return None
    var = loop.group(1)
    end = _matching_endfor(template, loop.end())
    if end is None:
        return None
    body_start, body_end = loop.end(), end.start()
    content = re.compile(r"\{\{-?\s*" + var + r"""(\[['"]content['"]\]|\.content)""")
    found = list(content.finditer(template, body_start, body_end))
    if not found:
        return None
    start = found[-1].start()
    tail = template[start:body_end]
    if not _balanced(tail):
        return None
    role = f"{var}['role'] == 'assistant'"
    wrapped = f"{{% if {role} %}}{{% generation %}}{tail}{{% endgeneration %}}{{% else %}}{tail}{{% endif %}}"
    return template[:start] + wrapped + template[body_end:]


def _matching_endfor(template: str, pos: int) -> re.Match | None:
    depth = 1
    for tag in _BLOCK.finditer(template, pos):
        kind = tag.group(1)
        if kind == "for":
            depth += 1
        elif kind == "endfor":
            depth -= 1
            if depth == 0:
                return tag
    return None


def _balanced(text: str) -> bool:
    """Every block opened in ``text`` is closed in it (so it can be repeated inside an if/else)."""
    stack: list[str] = []
    for tag in _BLOCK.finditer(text):
        kind = tag.group(1)
        if kind.startswith("end"):
            if not stack or stack.pop() != kind[3:]:
                return False
        else:
            stack.append(kind)
    return not stack


def _agrees(original: str, candidate: str, tokenizer) -> bool:
    """``candidate`` renders every sample as ``original`` does and marks exactly lmlab's loss-mask tokens."""
    plain, marked = ChatTemplate(original, "original"), ChatTemplate(candidate, "marked")
    for messages in SAMPLES:
        for opening in (False, True):
            if plain.render(messages, add_generation_prompt=opening, tokenizer=tokenizer) != marked.render(
                messages, add_generation_prompt=opening, tokenizer=tokenizer
            ):
                return False
        ids, mask = render_conversation(tokenizer, messages, plain)
        text, spans = _spans(marked.render(messages, tokenizer=tokenizer, markers=(_OPEN, _CLOSE)))
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        if encoding.ids != ids:
            return False  # lmlab encodes piece by piece; the check needs the same tokens either way
        hits = [any(a < e and s < b for a, b in spans) for s, e in encoding.offsets]
        if hits[1:] != mask[1:]:  # lmlab never learns the first token (nothing predicts it)
            return False
    return True


def _spans(rendered: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without the marker characters, and the character spans they enclosed."""
    text, spans, opened = [], [], None
    length = 0
    for ch in rendered:
        if ch == _OPEN:
            opened = length
        elif ch == _CLOSE and opened is not None:
            spans.append((opened, length))
            opened = None
        else:
            text.append(ch)
            length += 1
    return "".join(text), spans
