import numpy as np
import pytest
import torch

from lmlab.data.sampler import WindowSampler, eval_batches
from lmlab.errors import DataError


class ArrayTokens:
    def __init__(self, n):
        self.a = np.arange(n, dtype=np.int64)

    def __len__(self):
        return len(self.a)

    def read(self, start, length):
        return self.a[start : start + length]


def test_windows_are_shifted_pairs_and_cover_epoch():
    s = WindowSampler(ArrayTokens(101), seq_len=10, seed=0)
    assert s.num_windows == 10
    starts = []
    for _ in range(5):
        x, y = s.next_batch(2)
        assert torch.equal(y, x + 1)
        starts += (x[:, 0] // 10).tolist()
    assert sorted(starts) == list(range(10))
    assert s.epoch == 1 and s.cursor == 0


def test_resume_continues_the_same_stream():
    a = WindowSampler(ArrayTokens(1000), seq_len=7, seed=3)
    ref = [a.next_batch(5)[0] for _ in range(60)]  # crosses several epochs
    b = WindowSampler(ArrayTokens(1000), seq_len=7, seed=3)
    got = [b.next_batch(5)[0] for _ in range(23)]
    c = WindowSampler(ArrayTokens(1000), seq_len=7, seed=3)
    c.load_state_dict(b.state_dict())
    got += [c.next_batch(5)[0] for _ in range(37)]
    assert all(torch.equal(r, g) for r, g in zip(ref, got))


def test_micro_batches_equal_one_batch_and_ranks_are_disjoint():
    one = WindowSampler(ArrayTokens(500), seq_len=5, seed=1).next_batch(8)[0]
    s = WindowSampler(ArrayTokens(500), seq_len=5, seed=1)
    assert torch.equal(torch.cat([s.next_batch(2)[0] for _ in range(4)]), one)
    r0 = WindowSampler(ArrayTokens(500), seq_len=5, seed=1, rank=0, world_size=2).next_batch(4)[0]
    r1 = WindowSampler(ArrayTokens(500), seq_len=5, seed=1, rank=1, world_size=2).next_batch(4)[0]
    assert torch.equal(torch.cat([r0, r1]), one)


def test_different_data_refuses_state():
    s = WindowSampler(ArrayTokens(100), seq_len=5, seed=0)
    with pytest.raises(DataError, match="does not fit this data"):
        WindowSampler(ArrayTokens(200), seq_len=5, seed=0).load_state_dict(s.state_dict())


def test_too_little_data():
    with pytest.raises(DataError, match="fewer than one sequence"):
        WindowSampler(ArrayTokens(5), seq_len=10, seed=0)


def test_eval_batches_fixed_budget():
    batches = list(eval_batches(ArrayTokens(1000), seq_len=10, batch_size=3, budget_tokens=70))
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (7, 10) and xs[0, 0] == 0 and xs[-1, 0] == 60
