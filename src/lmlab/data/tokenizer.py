"""``TextTokenizer``: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

We train byte-level BPE (byte-level pre-tokenizer and decoder, so every string round-trips:
``decode(encode(x)) == x``) or load any local ``tokenizer.json`` (e.g. a Llama or GPT-2 one). With
``split_digits`` a ``Digits`` pre-tokenizer first makes every digit a pre-token of its own, so numbers
are always one token per digit, as in PaLM and Llama and as digit-position embeddings need (Abacus:
McLeish et al. 2024, arXiv 2405.17399; ``digit_token_ids`` gives their ids).
Encoding never adds BOS/EOS, pads or truncates (a file's padding and truncation settings are turned
off): the data pipeline places markers and cuts sequences explicitly, so what a model sees is
decided in one place. ``hash`` identifies a tokenizer by the SHA-256 of its canonical JSON and is
stored in every shard manifest, so shards can never be read with the wrong vocabulary.

Texts longer than ``LONG_TEXT_CHARS`` are encoded in pieces cut at whitespace (``split_long_text``)
when the tokenizer is *whitespace-separable*: no normalizer, the GPT-2 byte-level pre-tokenizer
without ``add_prefix_space`` (its regex never puts a non-space and a following space in one
pre-token, and BPE never merges across pre-tokens), optionally after ``Digits`` splits (a digit is
never whitespace, so they cannot span a cut either), no truncation or padding, and no added token
that holds or strips whitespace. The ids are then exactly those of the whole text, while the Rust
tokenizer's time and memory, which grow faster than linearly on one giant string, stay linear.
Other tokenizers encode the whole text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import ConfigError, DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
REFUSAL_TOKENS = ("[refuse]", "[respond]")
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *CHAT_TOKENS, *REFUSAL_TOKENS, *RESERVED_TOKENS)

# Names under which foreign tokenizers keep their document markers, most specific first.
BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>", "<|im_start|>", "<|endoftext|>")
EOS_NAMES = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>", "<|im_end|>")
PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
DIGITS = "0123456789"

LONG_TEXT_CHARS = 64 * 1024
_PIECES_PER_CALL = 64
# A cut: before a space, tab or line break that follows a non-space (Python's \S excludes every
# character the tokenizer's regex calls whitespace, so no pre-token can span the cut).
_CUT = re.compile(r"(?<=\S)(?=[ \t\r\n])")


def split_long_text(text: str, max_chars: int = LONG_TEXT_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters where it can be (see ``_CUT``);
    a stretch without a cut point stays whole. ``"".join(pieces) == text``."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _CUT.search(text, start + max_chars // 2 + 1, start + max_chars)
        cut = cut or _CUT.search(text, start + max_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def whitespace_separable(tokenizer: Tokenizer) -> bool:
    """True when encoding the pieces of ``split_long_text`` gives the ids of the whole text (module docstring)."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if steps and all(step.get("type") == "Digits" for step in steps[:-1]):
        pre = steps[-1]  # the split_digits layout: Digits, then the byte-level pre-tokenizer
    plain_added = all(
        not any(ch.isspace() for ch in t["content"]) and not t.get("lstrip") and not t.get("rstrip")
        for t in spec.get("added_tokens") or []
    )
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)  # it would put a space before a piece that starts with "\n"
        and spec.get("truncation") is None
        and spec.get("padding") is None
        and plain_added
    )


class TextTokenizer:
    """A tokenizer plus the ids of its document markers.

    ``bos_id``/``eos_id``/``pad_id`` are found by common names (``BOS_NAMES``...) unless passed
    explicitly. EOS is required (shards end every document with it); ``bos_id`` and ``pad_id`` are
    ``None`` when the vocabulary has no such token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        source: str = "<memory>",
    ):
        # A tokenizer.json saved with padding or truncation on would pad or cut every document we encode.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.source = source
        self.bos_id = self._find(bos, BOS_NAMES, "bos", required=False)
        self.eos_id = self._find(eos, EOS_NAMES, "eos")
        self.pad_id = self._find(pad, PAD_NAMES, "pad", required=False)
        self._hash: str | None = None
        self._separable: bool | None = None

    def _find(self, explicit: str | None, names: Sequence[str], role: str, required: bool = True) -> int | None:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise DataError(f"tokenizer {self.source} has no {role} token {explicit!r}")
            return tid
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        if required:
            raise DataError(
                f"tokenizer {self.source} has no {role} token (looked for {', '.join(names)}); pass it explicitly"
            )
        return None

    # ------------------------------------------------------------------ construction

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, split_digits: bool = False
    ) -> TextTokenizer:
        """Train a byte-level BPE with ``SPECIAL_TOKENS`` (ids 0..len-1) on ``texts``.

        The 256 byte symbols are always in the vocabulary, so any text encodes; ``vocab_size`` must
        leave room for them and the special tokens. ``split_digits``: every digit is its own token.
        """
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise DataError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor}")
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split_digits:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, source="<trained>")

    @classmethod
    def load(
        cls, path: str | Path, *, bos: str | None = None, eos: str | None = None, pad: str | None = None
    ) -> TextTokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one); missing/malformed -> ``DataError``."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p}")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{p}: not a valid tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        return cls(tok, bos=bos, eos=eos, pad=pad, source=str(p))

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path, or a directory that gets ``tokenizer.json``)."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    # ------------------------------------------------------------------ use

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            return self.encode_batch([text])[0]
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], max_chars: int | None = None) -> list[list[int]]:
        """Ids of each text; texts longer than ``max_chars`` (default ``LONG_TEXT_CHARS``) are encoded in
        pieces when that is exact."""
        texts = list(texts)
        max_chars = max_chars or LONG_TEXT_CHARS
        if not self.separable or all(len(t) <= max_chars for t in texts):
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        short = [i for i, t in enumerate(texts) if len(t) <= max_chars]
        out: list[list[int]] = [[] for _ in texts]
        for i, e in zip(short, self._tok.encode_batch([texts[i] for i in short], add_special_tokens=False)):
            out[i] = e.ids
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                out[i] = self._encode_long(text, max_chars)
        return out

    def _encode_long(self, text: str, max_chars: int) -> list[int]:
        """Ids of one long text from its pieces, a few at a time (the ``Encoding`` objects of a whole
        document's pieces, with their offsets and token strings, would take several times its ids' memory)."""
        pieces = split_long_text(text, max_chars)
        ids: list[int] = []
        for k in range(0, len(pieces), _PIECES_PER_CALL):
            for e in self._tok.encode_batch(pieces[k : k + _PIECES_PER_CALL], add_special_tokens=False):
                ids += e.ids
        return ids

    @property
    def separable(self) -> bool:
        """Whether long texts may be encoded in pieces (``whitespace_separable``)."""
        if self._separable is None:
            self._separable = whitespace_separable(self._tok)
        return self._separable

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def to_json(self) -> str:
        return self._tok.to_str()

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, compact): equal for equal tokenizers across save/load."""
        if self._hash is None:
            canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
            self._hash = hashlib.sha256(canonical.encode()).hexdigest()
        return self._hash

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:8]}, source={self.source})"


def digit_token_ids(tokenizer: TextTokenizer) -> dict[int, int]:
    """The id of each single-digit token ``"0"``..``"9"`` mapped to its digit value, for digit-position
    embeddings (Abacus). Every digit must be one token and a run of digits one token per digit (a tokenizer
    trained with ``tokenizer.split_digits: true``); otherwise ``ConfigError``."""
    ids: dict[int, int] = {}
    for value, digit in enumerate(DIGITS):
        encoded = tokenizer.encode(digit)
        if len(encoded) != 1 or tokenizer.decode(encoded) != digit:  # an unknown-token fallback is no digit token
            raise ConfigError(
                f"tokenizer {tokenizer.source} has no single token for the digit {digit!r} (it encodes to "
                f"{encoded}); digit embeddings need one: train one with tokenizer.split_digits: true"
            )
        ids[encoded[0]] = value
    if len(ids) != len(DIGITS) or tokenizer.encode(DIGITS) != list(ids):
        raise ConfigError(
            f"tokenizer {tokenizer.source} does not encode {DIGITS!r} one token per digit; digit embeddings "
            "need that: train one with tokenizer.split_digits: true"
        )
    return ids
