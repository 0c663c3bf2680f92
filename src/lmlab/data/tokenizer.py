"""``TextTokenizer``: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

We train byte-level BPE (byte-level pre-tokenizer and decoder, so every string round-trips:
``decode(encode(x)) == x``) or load any local ``tokenizer.json`` (e.g. a Llama or GPT-2 one). With
``split_digits`` a ``Digits`` pre-tokenizer first makes every digit a pre-token of its own, so numbers
are always one token per digit, as in PaLM and Llama and as digit-position embeddings need (Abacus:
McLeish et al. 2024, arXiv 2405.17399; ``digit_token_ids`` gives their ids).
Encoding never adds BOS/EOS, pads or truncates (a file's padding and truncation settings are turned
off): the data pipeline places markers and cuts sequences explicitly, so what a model sees is
decided in one place. The marker a document or a bare prompt starts with is ``document_prefix``: what
the tokenizer's own post-processor puts in front of a text (Llama's BOS, nothing for Qwen's), or, for
a tokenizer without one (lmlab's BPE), lmlab's convention: the EOS token (in a token stream every
document follows the previous one's EOS). ``lmlab export-hf`` writes that convention into the exported
tokenizer's post-processor, so ``transformers`` and the tools built on it encode a text as lmlab does.

The special tokens are the ones declared in the files beside ``tokenizer.json`` (``tokenizer_config.json``,
``generation_config.json``; see ``lmlab.data.tokenizer_files``), which also give the chat template and the
tokens that end a generation (``stop_ids``). Only a tokenizer that comes with no such declaration has its
markers looked up by their usual names. ``hash`` identifies a tokenizer by the SHA-256 of its canonical JSON and is
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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmlab.data.tokenizer_files import GENERATION_CONFIG, TOKENIZER_CONFIG, Declared, read_declared
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
END_OF_TURN = "<|end|>"  # lmlab's chat turns end with it
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


def read_backend(path: Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json``; missing or malformed -> ``DataError``."""
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0][:200]})") from None


class TextTokenizer:
    """A tokenizer plus the ids of its document markers.

    ``bos_id``/``eos_id``/``pad_id`` are the tokens passed (``bos``/``eos``/``pad``, as declared by a
    ``tokenizer_config.json``); with ``guess_missing`` (a tokenizer that comes with no declaration) the others
    are found by common names (``BOS_NAMES``...). EOS is required (shards end every document with it);
    ``bos_id`` and ``pad_id`` are ``None`` when there is no such token.
    ``stop_ids``: EOS, the ``extra_stop_ids`` (an instruct model's end-of-turn tokens) and lmlab's ``<|end|>``
    when the vocabulary has it. ``chat_template``: the template that came with the tokenizer, if any.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
        template_origin: str | None = None,
        guess_missing: bool = True,
        source: str = "<memory>",
    ):
        # A tokenizer.json saved with padding or truncation on would pad or cut every document we encode.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.source = source
        self._guess = guess_missing
        self.bos_id = self._find(bos, BOS_NAMES, "bos", required=False)
        self.eos_id = self._find(eos, EOS_NAMES, "eos")
        self.pad_id = self._find(pad, PAD_NAMES, "pad", required=False)
        vocab = self.vocab_size
        bad = [i for i in extra_stop_ids if not 0 <= i < vocab]
        if bad:
            raise DataError(f"tokenizer {source}: stop token ids {bad} are outside its vocabulary of {vocab}")
        end = tokenizer.token_to_id(END_OF_TURN)
        stops = [self.eos_id, *extra_stop_ids, *([end] if end is not None else [])]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))
        self.chat_template = chat_template or None
        self.template_origin = (template_origin or source) if self.chat_template else None
        self._hash: str | None = None
        self._separable: bool | None = None
        self._prefix: list[int] | None = None

    def _find(self, explicit: str | None, names: Sequence[str], role: str, required: bool = True) -> int | None:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise DataError(f"tokenizer {self.source} has no {role} token {explicit!r}")
            return tid
        for name in names if self._guess else ():
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        if required and not self._guess:
            raise DataError(f"tokenizer {self.source} declares no {role} token")
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
        tok = read_backend(p)
        declared = read_declared(p.parent)
        try:
            return cls(
                tok,
                bos=bos or declared.bos,
                eos=eos or declared.eos,
                pad=pad or declared.pad,
                extra_stop_ids=declared.stop_ids,
                chat_template=declared.chat_template,
                template_origin=declared.template_origin,
                guess_missing=not (declared.bos or declared.eos or declared.pad),
                source=str(p),
            )
        except DataError as err:
            if declared == Declared():
                raise
            raise DataError(f"{err} (declared in {p.parent / TOKENIZER_CONFIG} or {GENERATION_CONFIG})") from None

    def with_chat_template(self, template: str | None, origin: str | None = None) -> TextTokenizer:
        """The same tokenizer with another chat template (``None``: none of its own)."""
        return TextTokenizer(
            self._tok,
            bos=self._token(self.bos_id),
            eos=self._token(self.eos_id),
            pad=self._token(self.pad_id),
            extra_stop_ids=self.stop_ids[1:],
            chat_template=template,
            template_origin=origin,
            guess_missing=False,
            source=self.source,
        )

    def _token(self, tid: int | None) -> str | None:
        return None if tid is None else self._tok.id_to_token(tid)

    def special_tokens_config(self) -> dict[str, str]:
        """The ``tokenizer_config.json`` entries of the declared special tokens and the chat template."""
        config = {
            f"{role}_token": self._token(tid)
            for role, tid in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
            if tid is not None
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def stop_config(self) -> dict[str, int | list[int]]:
        """``generation_config.json``'s ``eos_token_id``: every stop token (one id when there is one)."""
        return {"eos_token_id": list(self.stop_ids) if len(self.stop_ids) > 1 else self.eos_id}

    def companion_files(self) -> dict[str, str]:
        """``tokenizer_config.json`` and ``generation_config.json`` in Hugging Face's format: what a run directory
        keeps beside ``tokenizer.json``, so ``load`` of the run's tokenizer gets back the same markers and template."""
        return {
            TOKENIZER_CONFIG: json.dumps(self.special_tokens_config(), indent=1),
            GENERATION_CONFIG: json.dumps(self.stop_config(), indent=1),
        }

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

    @property
    def document_prefix(self) -> list[int]:
        """The ids every document and bare prompt starts with: those the tokenizer's post-processor puts in
        front of a text (Llama's BOS; nothing for Qwen's), or ``[eos_id]`` for a tokenizer with no
        post-processor, lmlab's own (module docstring)."""
        if self._prefix is None:
            if self._tok.post_processor is None:
                self._prefix = [self.eos_id]
            else:
                bare = self.encode("a")
                full = self._tok.encode("a", add_special_tokens=True).ids
                start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
                self._prefix = full[:start]
        return list(self._prefix)

    def encode_document(self, text: str) -> list[int]:
        """``document_prefix`` + the ids of ``text``: a document or a bare prompt as the model reads it."""
        return self.document_prefix + self.encode(text)

    def json_with_prefix(self) -> str:
        """``tokenizer.json`` whose post-processor puts ``document_prefix`` in front of every text, for export:
        lmlab's convention written as a template processor (``EOS $A``) when the tokenizer has no
        post-processor, else the tokenizer's own JSON (``add_special_tokens=False`` gives the bare ids)."""
        if self._tok.post_processor is not None:
            return self.to_json()
        eos = self._token(self.eos_id)
        exported = Tokenizer.from_str(self.to_json())
        exported.post_processor = processors.TemplateProcessing(
            single=f"{eos} $A", pair=f"{eos} $A $B:1", special_tokens=[(eos, self.eos_id)]
        )
        return exported.to_str()

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
