"""The teacher of knowledge distillation, for the recipes that distil (pretrain, sft): loading and the
top-k cache.

A teacher is any lmlab run directory (trained by lmlab, or a Hugging Face model imported with
``lmlab import-hf``), loaded frozen by ``lmlab.train.pretrained.load_frozen``. Distillation compares
next-token distributions position by position, so the teacher must use the student's tokenizer (same
SHA-256 hash, ``TextTokenizer.hash``) and the same model vocabulary size. It runs in eval mode under
``torch.no_grad`` with frozen parameters.

With ``objective.distill.topk_cache = K`` the teacher runs once over the fixed SFT rows and its K
largest log-probs per position (values and vocabulary ids) are stored on disk; training then uses
``topk_distillation_loss`` (docs/science.md, Appendix C; ``lmlab.objectives.distill``) and the teacher
is not loaded again. The cache file is keyed by the teacher checkpoint, K and the rows' content.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lmlab.data.packing import Row, collate
from lmlab.errors import ConfigError
from lmlab.objectives.lm_objective import model_inputs
from lmlab.safe_io import write_bytes_atomic
from lmlab.train.pretrained import load_frozen


class Teacher:
    """A frozen model whose ``__call__(batch)`` returns logits [B, T, V] without building a graph."""

    def __init__(self, model: nn.Module, source: str, checkpoint: Path | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.source = source
        self.checkpoint = checkpoint

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], **model_inputs(batch))


def load_teacher(path: str | Path, student_tokenizer, student_vocab: int, device: torch.device | str) -> Teacher:
    """The teacher run at ``path`` (latest checkpoint), refused unless it shares the student's tokenizer
    and model vocabulary (``ModelMismatchError``)."""
    loaded = load_frozen(
        path,
        device,
        role="teacher",
        tokenizer=student_tokenizer,
        against="student",
        vocab_size=student_vocab,
        key="objective.distill.teacher",
    )
    return Teacher(loaded.model, str(path), loaded.checkpoint)


def _rows_digest(rows: Sequence[Row]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.input_ids, row.doc_ids]).encode())
    return h.hexdigest()


def topk_cache_key(teacher: Teacher, rows: Sequence[Row], k: int, pad_to: int) -> str:
    """Identity of a cache: the teacher's checkpoint (path and step), K, the row length and the rows."""
    ckpt = str(teacher.checkpoint.resolve()) if teacher.checkpoint is not None else teacher.source
    blob = json.dumps({"teacher": ckpt, "k": k, "pad_to": pad_to, "rows": _rows_digest(rows)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def compute_topk(
    teacher: Teacher, rows: Sequence[Row], k: int, *, pad_id: int, pad_to: int, batch_size: int, device
) -> dict[str, torch.Tensor]:
    """The teacher's top-``k`` log-probs [N, pad_to, k] (float32) and their ids [N, pad_to, k] (int32) per row."""
    values, indices = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id, pad_to=pad_to)
        batch = {name: t.to(device) for name, t in batch.items()}
        logprobs = torch.log_softmax(teacher(batch).float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    return {"teacher_topk_logprobs": torch.cat(values), "teacher_topk_indices": torch.cat(indices)}


def cached_topk(
    teacher: Teacher,
    rows: Sequence[Row],
    k: int,
    path: Path,
    *,
    pad_id: int,
    pad_to: int,
    batch_size: int,
    device,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the top-k cache at ``path`` when its key matches, else compute and save it.

    Returns the tables (keys ``teacher_topk_logprobs`` / ``teacher_topk_indices``, the batch keys the
    loss function reads) and whether they came from disk.
    """
    vocab = getattr(getattr(teacher.model, "cfg", None), "vocab_size", None)
    if vocab is not None and k > vocab:
        raise ConfigError(f"objective.distill.topk_cache={k} exceeds the teacher's vocabulary ({vocab})")
    key = topk_cache_key(teacher, rows, k, pad_to)
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return {n: stored[n] for n in ("teacher_topk_logprobs", "teacher_topk_indices")}, True
    tables = compute_topk(teacher, rows, k, pad_id=pad_id, pad_to=pad_to, batch_size=batch_size, device=device)
    buffer = io.BytesIO()
    torch.save({"key": key, **tables}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return tables, False
