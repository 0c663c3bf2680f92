"""``TextTokenizer``: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

We train byte-level BPE (byte-level pre-tokenizer and decoder, so every string round-trips:
``decode(encode(x)) == x``) or load any local ``tokenizer.json`` (e.g. a Llama or GPT-2 one).
Encoding never adds BOS/EOS: the data pipeline places them explicitly, so what a model sees is
decided in one place. ``hash`` identifies a tokenizer by the SHA-256 of its canonical JSON and is
stored in every shard manifest, so shards can never be read with the wrong vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
REFUSAL_TOKENS = ("[refuse]", "[respond]")
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *CHAT_TOKENS, *REFUSAL_TOKENS, *RESERVED_TOKENS)

# Names under which foreign tokenizers keep their document markers, most specific first.
BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>", "<|im_start|>", "<|endoftext|>")
EOS_NAMES = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>", "<|im_end|>")
PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


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
        self._tok = tokenizer
        self.source = source
        self.bos_id = self._find(bos, BOS_NAMES, "bos", required=False)
        self.eos_id = self._find(eos, EOS_NAMES, "eos")
        self.pad_id = self._find(pad, PAD_NAMES, "pad", required=False)
        self._hash: str | None = None

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
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """Train a byte-level BPE with ``SPECIAL_TOKENS`` (ids 0..len-1) on ``texts``.

        The 256 byte symbols are always in the vocabulary, so any text encodes; ``vocab_size`` must
        leave room for them and the special tokens.
        """
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise DataError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
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
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

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
