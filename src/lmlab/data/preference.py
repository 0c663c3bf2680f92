"""Pairwise preference data: JSONL of ``prompt`` / ``chosen`` / ``rejected`` -> padded pair batches.

Each line is one pair, in any of TRL's three formats: an explicit ``prompt`` (text or a list of chat
messages ``{"role", "content"}``) with ``chosen`` and ``rejected`` answers (texts, or conversational: a list
holding one assistant message); an implicit prompt, where ``chosen`` and ``rejected`` are whole texts or
whole conversations and the prompt is their common beginning (``split_implicit_prompt``, TRL's convention). A text prompt is read as the start of a new
document (prefixed with EOS, the separator the model saw in pretraining, as ``write_samples`` does)
and each answer ends with EOS. A messages prompt is rendered with the fine-tuning chat template
(``lmlab.data.chat``) and each answer becomes the assistant turn; the template's assistant mask marks
the completion. Only completion tokens are scored: the prompt is masked (docs/science.md §7, "completion
log-ratio summed over completion tokens").

Truncation follows TRL's defaults: a prompt longer than ``align.max_prompt_len`` keeps its *last*
tokens, then a pair longer than ``align.max_len`` loses the end of its answer. A pair whose chosen and
rejected completions are token-identical carries no preference signal (its DPO gradient is zero, and
length-normalised losses see Δ = 0); it is counted and skipped, or refused, per ``align.identical_pairs``.

A batch of B pairs is ``input_ids`` [2B, T] with the chosen sequences in rows 0..B−1 and the rejected
ones in rows B..2B−1 (TRL's layout), ``completion_mask`` [2B, T] (True on scored tokens), and
``lengths`` [2B] (real tokens per row) and ``pair_index`` [B] (the pairs' positions in the file,
which key the cached reference log-probs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.data import chat
from lmlab.data.rows import read_rows, source_sha256
from lmlab.errors import DataError

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    """One tokenized pair: full sequences and the index where each completion starts."""

    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    prompt_ids: list[int]  # what generation conditions on (held-out prompts for KL / samples)
    prompt: Any = None  # the raw prompt (text or messages), for samples and judges
    line: int = 0

    @property
    def chosen_len(self) -> int:
        return len(self.chosen_ids) - self.chosen_start

    @property
    def rejected_len(self) -> int:
        return len(self.rejected_ids) - self.rejected_start


@dataclass
class PreferenceData:
    """The pairs of one file and what loading did to them."""

    path: Path
    pairs: list[PreferencePair]
    lines: int = 0
    identical: int = 0  # identical chosen/rejected pairs skipped
    truncated: int = 0  # pairs shortened to fit max_prompt_len / max_len
    empty: int = 0  # pairs dropped because truncation left an empty answer
    sha256: str = ""  # of the file's bytes: keys cached reference log-probs

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> dict[str, int]:
        return {
            "pairs": len(self.pairs),
            "lines": self.lines,
            "identical_skipped": self.identical,
            "truncated": self.truncated,
            "empty_dropped": self.empty,
        }


# --------------------------------------------------------------------------- tokenization


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair: the prompt is the longest common beginning of the
    two (messages of conversations; characters of texts). For texts the cut moves back to the start of the word
    where they differ, and the space before it stays with the answers (TRL keeps the space too, but cuts inside a
    word: "four" / "five" would become "our" / "ive" after a prompt ending in "f")."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n < min(len(chosen), len(rejected)):
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        if n > 0 and chosen[n - 1] == " ":
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _answer_text(value: Any, name: str, where: str) -> str:
    """An answer: a text, or (conversational) a list of exactly one assistant message."""
    if isinstance(value, list) and len(value) == 1 and _is_messages(value) and value[0]["role"] == "assistant":
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {name!r} must be a string or one assistant message, got "
            f"{type(value).__name__ if not isinstance(value, list) else f'{len(value)} messages'}"
        )
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render_text(tokenizer, prompt: str, answer: str) -> tuple[list[int], int, list[int]]:
    prompt_ids = tokenizer.encode_document(prompt)
    ids = prompt_ids + tokenizer.encode(answer) + [tokenizer.eos_id]
    return ids, len(prompt_ids), prompt_ids


def _render_messages(tokenizer, messages: list[dict], answer: str, template: str | None, where: str):
    conversation = [*messages, {"role": "assistant", "content": answer}]
    # Only the final answer is the completion: assistant turns inside a multi-turn prompt are prompt.
    ids, mask = chat.render_conversation(
        tokenizer, conversation, template=template, where=where, supervise_from=len(messages)
    )
    ids, mask = list(ids), [bool(m) for m in mask]
    if True not in mask:
        raise DataError(f"{where}: the chat template marked no assistant tokens for this answer")
    start = mask.index(True)
    end = len(mask) - mask[::-1].index(True)  # drop anything the template adds after the reply's end marker
    ids = ids[:end]
    prompt_ids = list(chat.render_prompt(tokenizer, messages, template=template))
    return ids, start, prompt_ids


def _truncate(ids: list[int], start: int, max_prompt_len: int, max_len: int) -> tuple[list[int], int, bool]:
    """Keep the prompt's last ``max_prompt_len`` tokens, then cut the answer so the whole fits ``max_len``."""
    cut = False
    if start > max_prompt_len:
        ids = ids[start - max_prompt_len :]
        start = max_prompt_len
        cut = True
    if len(ids) > max_len:
        ids = ids[:max_len]
        cut = True
    return ids, start, cut


def load_preference_file(
    path: str | Path,
    tokenizer,
    *,
    max_prompt_len: int = 128,
    max_len: int = 256,
    identical_pairs: str = "skip",
    chat_template: str | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> PreferenceData:
    """Read and tokenize a preference dataset (any source ``lmlab.data.rows`` reads; ``columns`` renames its
    columns, e.g. ``{"question": "prompt"}``); a pair's ``line`` is its position in the dataset.

    Raises ``DataError`` naming the file and line for malformed JSON, a missing or empty field, a
    field of the wrong type, or (with ``identical_pairs="error"``) identical chosen and rejected
    answers; a file with no usable pair is also a ``DataError``.
    """
    p = Path(path)
    if identical_pairs not in ("skip", "error"):
        raise ValueError(f"identical_pairs must be 'skip' or 'error', got {identical_pairs!r}")
    rows = read_rows(p, columns=columns, what="preference file")
    data = PreferenceData(path=p, pairs=[], sha256=source_sha256(p))
    for number, (where, record) in enumerate(rows, 1):
        data.lines += 1
        record = _with_prompt(record, where)
        missing = [k for k in REQUIRED_FIELDS if k not in record or record[k] in (None, "", [])]
        if missing:
            raise DataError(f"{where}: missing field {', '.join(repr(m) for m in missing)} (need {REQUIRED_FIELDS})")
        prompt = record["prompt"]
        chosen, rejected = (_answer_text(record[k], k, where) for k in ("chosen", "rejected"))
        if isinstance(prompt, str):
            c_ids, c_start, prompt_ids = _render_text(tokenizer, prompt, chosen)
            r_ids, r_start, _ = _render_text(tokenizer, prompt, rejected)
        elif _is_messages(prompt):
            c_ids, c_start, prompt_ids = _render_messages(tokenizer, prompt, chosen, chat_template, where)
            r_ids, r_start, _ = _render_messages(tokenizer, prompt, rejected, chat_template, where)
        else:
            raise DataError(f"{where}: field 'prompt' must be text or a list of {{role, content}} messages")
        if c_ids[c_start:] == r_ids[r_start:]:
            if identical_pairs == "error":
                raise DataError(
                    f"{where}: chosen and rejected are identical (align.identical_pairs=error; set it to skip to drop them)"
                )
            data.identical += 1
            continue
        c_ids, c_start, c_cut = _truncate(c_ids, c_start, max_prompt_len, max_len)
        r_ids, r_start, r_cut = _truncate(r_ids, r_start, max_prompt_len, max_len)
        if len(c_ids) <= c_start or len(r_ids) <= r_start:
            data.empty += 1
            continue
        data.truncated += int(c_cut or r_cut)
        if len(prompt_ids) > max_prompt_len:
            prompt_ids = prompt_ids[-max_prompt_len:]
        data.pairs.append(PreferencePair(c_ids, c_start, r_ids, r_start, prompt_ids, prompt, number))
        if limit is not None and len(data.pairs) >= limit:
            break
    if not data.pairs:
        raise DataError(f"{p}: no usable preference pairs ({data.lines} lines, {data.identical} identical skipped)")
    return data


def _with_prompt(record: dict, where: str) -> dict:
    """An implicit-prompt record (no ``prompt``) with its prompt split off; others as they are."""
    if "prompt" in record or not all(isinstance(record.get(k), (str, list)) for k in ("chosen", "rejected")):
        return record
    prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    if not prompt:
        raise DataError(
            f"{where}: missing field 'prompt', and chosen and rejected share no beginning to read it from "
            "(TRL's implicit-prompt format)"
        )
    return {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------- batches


def collate_pairs(
    pairs: Sequence[PreferencePair], pad_id: int, indices: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``completion_mask`` [2B, T] (chosen rows first), the rows' real
    ``lengths`` [2B] and ``pair_index`` [B]."""
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    starts = [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, start : len(seq)] = True
    index = torch.tensor(list(indices) if indices is not None else range(len(pairs)), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return {"input_ids": input_ids, "completion_mask": mask, "pair_index": index, "lengths": lengths}


class PreferenceBatches:
    """The loop's ``BatchSource`` over a ``PreferenceData``: shuffled epochs, deterministic and resumable.

    With ``reference`` (a [N, 2] tensor of the reference model's summed log-probs of each pair's chosen
    and rejected completion) every batch carries ``ref_chosen_logps`` / ``ref_rejected_logps`` [B]. With
    several ranks, each global micro-batch of ``batch_size · world_size`` pairs is drawn in the order one
    process would draw it and rank r keeps the r-th contiguous slice.
    """

    def __init__(
        self,
        data: PreferenceData,
        pad_id: int,
        seed: int,
        reference: torch.Tensor | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if reference is not None and reference.shape != (len(data), 2):
            raise ValueError(f"reference log-probs must be [{len(data)}, 2], got {list(reference.shape)}")
        self.data = data
        self.pad_id = pad_id
        self.seed = seed
        self.reference = reference
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=gen).tolist()

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        chosen: list[int] = []
        wanted = batch_size * self.world_size
        while len(chosen) < wanted:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.position : self.position + wanted - len(chosen)]
            chosen += take
            self.position += len(take)
        chosen = chosen[self.rank * batch_size : (self.rank + 1) * batch_size]
        batch = collate_pairs([self.data.pairs[i] for i in chosen], self.pad_id, chosen)
        if self.reference is not None:
            ref = self.reference[batch["pair_index"]]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0].clone(), ref[:, 1].clone()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


def iterate_batches(data: PreferenceData, pad_id: int, batch_size: int):
    """Fixed-order batches over all pairs (evaluation and reference precomputation)."""
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        yield collate_pairs([data.pairs[i] for i in idx], pad_id, idx)


def pad_id_of(tokenizer) -> int:
    """The padding id for batches: the tokenizer's pad token, else EOS (padding is masked either way)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
