"""Best-fit packing, the over-long policy, collation and the packed == unpacked loss identity."""

from __future__ import annotations

import torch

from lmlab.config import ModelConfig
from lmlab.data.packing import RowBatches, build_rows, collate, iterate_batches, pack_best_fit
from lmlab.models.decoder import Decoder
from lmlab.objectives.lm import IGNORE_INDEX


def _examples(lengths, seed=0, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        mask = [False] + [(t + i) % 3 != 0 for t in range(1, n)]  # a few context tokens in every example
        out.append((ids, mask))
    return out


def test_best_fit_decreasing_fills_rows_tightly():
    examples = _examples([7, 5, 4, 3, 3, 2])
    rows = pack_best_fit(examples, 10)
    # sorted 7,5,4,3,3,2: 7 -> r0 (3 free); 5 -> r1 (5 free); 4 -> r1 (1 free); 3 -> r0 (0 free); 3 -> r2; 2 -> r2
    assert [len(r) for r in rows] == [10, 9, 5]
    assert [r.n_docs for r in rows] == [2, 2, 2]
    assert sum(len(r) for r in rows) == 24


def test_labels_are_shifted_masked_and_never_cross_examples():
    (ids, mask), (ids2, mask2) = _examples([4, 3])
    rows = pack_best_fit([(ids, mask), (ids2, mask2)], 8)
    row = rows[0]
    assert row.input_ids == ids + ids2
    expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(3)] + [IGNORE_INDEX]
    expected += [ids2[t + 1] if mask2[t + 1] else IGNORE_INDEX for t in range(2)] + [IGNORE_INDEX]
    assert row.labels == expected
    assert row.doc_ids == [0, 0, 0, 0, 1, 1, 1]


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    examples = _examples([12, 5, 9])
    rows, stats = build_rows(examples, 8, overlong="truncate")
    assert (stats.truncated, stats.dropped_overlong, stats.examples) == (2, 0, 3)
    assert max(len(r) for r in rows) <= 8 and sum(r.n_docs for r in rows) == 3
    rows, stats = build_rows(examples, 8, overlong="drop")
    assert (stats.truncated, stats.dropped_overlong) == (0, 2)
    assert sum(r.n_docs for r in rows) == 1
    no_target = [([1, 2, 3], [False, False, False])]
    _, stats = build_rows(no_target, 8)
    assert stats.dropped_no_target == 1


def test_collate_pads_with_own_doc_and_resets_positions():
    rows = pack_best_fit(_examples([3, 2]), 8)
    batch = collate(rows, pad_id=0, pad_to=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert (batch["labels"][0, 5:] == IGNORE_INDEX).all()


def test_packed_per_example_loss_equals_unpacked_loss():
    """The acceptance test of issue 3: isolation by doc_ids + position resets is exact."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Decoder(cfg).eval()
    examples = _examples([9, 6, 5, 4, 3, 11, 2], seed=1)
    rows = pack_best_fit(examples, 16)
    assert len(rows) < len(examples)  # really packed
    batch = collate(rows, pad_id=0, pad_to=16)
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
        logp = torch.log_softmax(logits.double(), -1)
        packed = {}
        for b, row in enumerate(rows):
            for d in range(row.n_docs):
                sel = (batch["doc_ids"][b] == d) & (batch["labels"][b] != IGNORE_INDEX)
                y = batch["labels"][b][sel]
                tokens = tuple(batch["input_ids"][b][batch["doc_ids"][b] == d].tolist())
                packed[tokens] = float(-logp[b][sel].gather(-1, y[:, None]).sum())
        for ids, mask in examples:
            alone = collate(pack_best_fit([(ids, mask)], 16), pad_id=0, with_docs=False)
            lp = torch.log_softmax(model(alone["input_ids"]).double(), -1)[0]
            sel = alone["labels"][0] != IGNORE_INDEX
            expected = float(-lp[sel].gather(-1, alone["labels"][0][sel][:, None]).sum())
            n_targets = int(sel.sum())
            assert abs(packed[tuple(ids)] / n_targets - expected / n_targets) < 1e-5  # per-example mean loss


def test_row_batches_are_deterministic_and_resumable():
    rows = pack_best_fit(_examples([3, 4, 5, 6, 2]), 6)
    a = RowBatches(rows, pad_id=0, seed=3, pad_to=6)
    first = [a.next_batch(2)["input_ids"] for _ in range(3)]
    state = a.state_dict()
    later = a.next_batch(2)["input_ids"]
    b = RowBatches(rows, pad_id=0, seed=3, pad_to=6)
    assert all(torch.equal(x, b.next_batch(2)["input_ids"]) for x in first)
    c = RowBatches(rows, pad_id=0, seed=3, pad_to=6)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch(2)["input_ids"], later)
    extras = {"tag": torch.arange(len(rows))[:, None].expand(len(rows), 6)}
    d = RowBatches(rows, pad_id=0, seed=3, pad_to=6, extras=extras)
    idx_batch = d.next_batch(len(rows))
    assert sorted(idx_batch["tag"][:, 0].tolist()) == list(range(len(rows)))
    assert sum(x["input_ids"].shape[0] for x in iterate_batches(rows, 2, 0)) == len(rows)
