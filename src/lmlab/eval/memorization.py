"""Memorization (verbatim extraction) evaluation: ``lmlab eval memorization RUN_DIR --data FILE``.

The protocol of Carlini et al. 2023 (*Quantifying Memorization Across Neural Language Models*)
as used by the goldfish paper (Hans et al. 2024, docs/science.md §5): prompt the model with the first
``p`` tokens of a training document (after the EOS that starts documents in lmlab's data), decode
``n`` tokens greedily, and compare them with the document's true next ``n`` tokens:

- exact match: all ``n`` tokens equal (the document is "extractable");
- token match: the fraction of the ``n`` positions whose token is equal;
- RougeL: the F1 of the longest common subsequence (LCS) of the generated and true token ids,
  ``P = LCS/len(gen)``, ``R = LCS/len(ref)``, ``F = 2PR/(P + R)`` (Lin 2004); ``rouge_l_words`` is the
  same on the decoded texts split into words the way the ``rouge_score`` package does (lower-cased,
  non-alphanumerics as spaces), the form the goldfish reference code reports.

``p = 0`` is the reference protocol of docs/science.md §5: the prompt is everything but the last ``n``
tokens (documents are first cut to the model's context). Documents shorter than ``p + n`` tokens
(``n + 1`` with ``p = 0``) are skipped and counted. Data files: ``.jsonl`` (the
``text`` field, or a conversation's messages joined by newlines) or ``.txt`` (one document per
non-empty line).

Extraction beyond exact match (Extracting alignment data in open models, docs/PAPERS.md E55: string matching
undercounts regurgitated SFT data, embedding similarity finds it): each evaluated document also gets

- ``edit_similarity``: ``1 − Levenshtein(gen, ref) / max(len(gen), len(ref))`` on token ids (insertions,
  deletions and substitutions cost 1; 1 for two empty sequences);
- ``embedding_similarity``: the cosine of the model's own sentence embeddings of the generated and the true
  continuation, each the mean over its tokens of the final-layer hidden states (the output of the final norm
  ``model.norm``, read with a forward hook: what the LM head reads), each text embedded on its own after the
  tokenizer's document prefix; ``None`` for a model without a final ``norm`` module.

A document is a fuzzy match when ``edit_similarity >= fuzzy_threshold`` (0.9 by default), an embedding match when
``embedding_similarity >= embedding_threshold`` (0.95), and approximately extracted when it is an exact match or
either. The thresholds are lmlab's choices, not the paper's, and the embedding is the evaluated model's own
rather than a separate sentence-embedding model's: with ``n = 32`` new tokens, 0.9 allows three token edits.
``extra_over_exact`` = approximate − exact matches is how many more extractions approximate matching counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.data.textio import iter_lines, json_lines
from lmlab.errors import DataError
from lmlab.models.generation import generate

FUZZY_THRESHOLD = 0.9  # edit similarity; lmlab's choice
EMBEDDING_THRESHOLD = 0.95  # cosine of mean-pooled final hidden states; lmlab's choice


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)·len(b)) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(generated: Sequence[int], reference: Sequence[int]) -> float:
    """RougeL F1 between two token sequences (0 when either is empty or nothing is shared)."""
    lcs = lcs_length(generated, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(generated), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_match(generated: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference positions where the generated token is the same."""
    if not reference:
        return 0.0
    return sum(int(g == r) for g, r in zip(generated, reference)) / len(reference)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``
    (O(len(a)·len(b)) dynamic programme)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_similarity(generated_ids: Sequence[int], reference_ids: Sequence[int]) -> float:
    """``1 − edit_distance / max(len)``: 1 for equal sequences (two empty ones included), 0 when every
    position of the longer one must be edited."""
    longest = max(len(generated_ids), len(reference_ids))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(generated_ids, reference_ids) / longest


@torch.no_grad()
def mean_hidden_states(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], prefix: Sequence[int] = ()
) -> torch.Tensor:
    """The mean over each sequence's tokens of the final-normed hidden states [N, d] (fp32): ``model.norm``'s
    output, read with a forward hook, for ``prefix + sequence`` (the prefix is context, not pooled). Rows are
    right-padded, which causal attention keeps from the real positions."""
    if not sequences or any(not s for s in sequences):
        raise ValueError("mean_hidden_states needs at least one sequence and no empty one")
    device = next(model.parameters()).device
    width = len(prefix) + max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    pooled = torch.zeros(len(sequences), width)
    for i, s in enumerate(sequences):
        ids[i, : len(prefix) + len(s)] = torch.tensor([*prefix, *s])
        pooled[i, len(prefix) : len(prefix) + len(s)] = 1.0 / len(s)
    captured: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(ids.to(device))
    finally:
        handle.remove()
    hidden = captured[-1].float()  # [N, T, d]
    return torch.einsum("ntd,nt->nd", hidden, pooled.to(device))


@torch.no_grad()
def embedding_similarity(
    model: torch.nn.Module, generated_ids: Sequence[int], reference_ids: Sequence[int], prefix: Sequence[int] = ()
) -> float:
    """Cosine similarity of the model's own embeddings (``mean_hidden_states``) of two token sequences; 1 for
    equal sequences, 0 when exactly one is empty."""
    if list(generated_ids) == list(reference_ids):
        return 1.0
    if not generated_ids or not reference_ids:
        return 0.0
    a, b = mean_hidden_states(model, [generated_ids, reference_ids], prefix)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def words(text: str) -> list[str]:
    """``rouge_score``'s default tokenization: lower-case, runs of non-alphanumerics are separators."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a ``.jsonl`` or ``.txt`` file (errors name ``file:line``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"memorization data file not found: {p}")
    if p.suffix != ".jsonl":
        docs = [line for _, line in iter_lines(p) if line.strip()]
        if not docs:
            raise DataError(f"{p}: no documents")
        return docs
    docs: list[str] = []
    for lineno, obj in json_lines(iter_lines(p), p):
        if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
            docs.append(obj[text_field])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            docs.append("\n".join(str(m.get("content", "")) for m in obj["messages"] if isinstance(m, dict)))
        else:
            raise DataError(f"{p}:{lineno}: expected an object with a '{text_field}' string or 'messages'")
    if not docs:
        raise DataError(f"{p}: no documents")
    return docs


@torch.no_grad()
def memorization_eval(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    *,
    prefix_tokens: int = 32,
    new_tokens: int = 32,
    batch_size: int = 32,
    fuzzy_threshold: float = FUZZY_THRESHOLD,
    embedding_threshold: float = EMBEDDING_THRESHOLD,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary, per_document)`` of greedy extraction; see the module docstring for the metrics."""
    if prefix_tokens < 0 or new_tokens < 1:
        raise DataError("memorization needs --prefix-tokens >= 0 (0: all but the last n) and --new-tokens >= 1")
    if not (0 <= fuzzy_threshold <= 1 and 0 <= embedding_threshold <= 1):
        raise DataError("memorization needs --fuzzy-threshold and --embedding-threshold in [0, 1]")
    embeds = isinstance(getattr(model, "norm", None), torch.nn.Module)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and prefix_tokens + new_tokens + 1 > max_len:
        raise DataError(
            f"prefix {prefix_tokens} + new {new_tokens} tokens (+1 EOS) exceed the model's max_seq_len={max_len}"
        )
    start = tokenizer.document_prefix
    usable: list[tuple[int, list[int], list[int]]] = []
    rows: list[dict[str, Any]] = []
    for i, doc in enumerate(documents):
        ids = tokenizer.encode(doc)
        if prefix_tokens == 0 and max_len is not None:
            ids = ids[: max_len - len(start)]
        p = prefix_tokens or len(ids) - new_tokens
        if p < 1 or len(ids) < p + new_tokens:
            rows.append({"doc": i, "skipped": True, "tokens": len(ids)})
            continue
        usable.append((i, start + ids[:p], ids[p : p + new_tokens]))
    results: dict[int, dict[str, Any]] = {}
    for b in range(0, len(usable), batch_size):
        chunk = usable[b : b + batch_size]
        outs = generate(model, [c[1] for c in chunk], max_new_tokens=new_tokens, temperature=0.0, eos_id=None)
        cosines = [None] * len(chunk)
        if embeds:
            pooled = mean_hidden_states(model, [*outs, *(c[2] for c in chunk)], start)  # [2·chunk, d]
            cosines = torch.nn.functional.cosine_similarity(pooled[: len(chunk)], pooled[len(chunk) :]).tolist()
        for (i, prompt, ref), gen, cosine in zip(chunk, outs, cosines):
            gen_text, ref_text = tokenizer.decode(gen), tokenizer.decode(ref)
            edit = normalized_edit_similarity(gen, ref)
            if cosine is not None and gen == ref:
                cosine = 1.0  # not 1 − rounding
            fuzzy = edit >= fuzzy_threshold
            embedded = cosine is not None and cosine >= embedding_threshold
            results[i] = {
                "doc": i,
                "skipped": False,
                "prefix_tokens": len(prompt) - len(start),
                "exact_match": gen == ref,
                "token_match": token_match(gen, ref),
                "rouge_l": rouge_l(gen, ref),
                "rouge_l_words": rouge_l(words(gen_text), words(ref_text)),
                "edit_similarity": edit,
                "embedding_similarity": cosine,
                "fuzzy_match": fuzzy,
                "embedding_match": embedded,
                "approximate_match": gen == ref or fuzzy or embedded,
                "generated": gen_text,
                "reference": ref_text,
            }
    per_doc = sorted(rows + list(results.values()), key=lambda r: r["doc"])
    n = len(results)
    rs = list(results.values())
    approximate = sum(r["approximate_match"] for r in rs)
    exact = sum(r["exact_match"] for r in rs)
    summary = {
        "documents": len(documents),
        "evaluated": n,
        "skipped_short": len(documents) - n,
        "prefix_tokens": prefix_tokens,
        "new_tokens": new_tokens,
        "exact_match_rate": sum(r["exact_match"] for r in results.values()) / n if n else None,
        "exact_matches": sum(r["exact_match"] for r in results.values()),
        "token_match": sum(r["token_match"] for r in results.values()) / n if n else None,
        "rouge_l": sum(r["rouge_l"] for r in results.values()) / n if n else None,
        "rouge_l_words": sum(r["rouge_l_words"] for r in results.values()) / n if n else None,
        "fuzzy_threshold": fuzzy_threshold,
        "embedding_threshold": embedding_threshold,
        "edit_similarity": sum(r["edit_similarity"] for r in rs) / n if n else None,
        "embedding_similarity": sum(r["embedding_similarity"] for r in rs) / n if n and embeds else None,
        "fuzzy_matches": sum(r["fuzzy_match"] for r in rs),
        "embedding_matches": sum(r["embedding_match"] for r in rs) if embeds else None,
        "approximate_matches": approximate,
        "extra_over_exact": approximate - exact,
    }
    return summary, per_doc


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
