"""Tests of per-positive negative sampling (lightning_unlearn/data/negatives.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.negatives import sample_negatives

MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Reference splitmix64 finaliser on Python ints (independent of the library's numpy code)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_negatives(user: int, item: int, positives: set[int], num_items: int, k: int, seed: int) -> list[int]:
    """The documented scheme: slot ``c`` at attempt ``a`` hashes ``(seed, user, item)`` with ``c + a * k``."""
    base = splitmix64(splitmix64(splitmix64(seed) ^ user) ^ item)
    out = []
    for slot in range(k):
        attempt = 0
        while (cand := splitmix64(base ^ (slot + attempt * k)) % num_items) in positives:
            attempt += 1
        out.append(cand)
    return out


def table(users: list[int], items: list[int], num_users: int, num_items: int) -> Interactions:
    return Interactions(torch.tensor(users), torch.tensor(items), np.arange(num_users), np.arange(num_items))


def random_positives(seed: int = 0, num_users: int = 30, num_items: int = 50, n: int = 400) -> Interactions:
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, num_users, n), rng.integers(0, num_items, n)], 1), axis=0)
    pairs = pairs[rng.permutation(len(pairs))]
    return Interactions(
        users=torch.as_tensor(pairs[:, 0]), items=torch.as_tensor(pairs[:, 1]),
        user_ids=np.arange(num_users), item_ids=np.arange(num_items),
    )


def sample(data: Interactions, k: int = 4, seed: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
    rows = torch.arange(len(data)) if rows is None else rows
    return sample_negatives(data.users[rows], data.items[rows], data, k, seed=seed)


@pytest.fixture(scope="module")
def data() -> Interactions:
    return random_positives()


def test_shape_dtype_range_and_never_a_positive(data):
    neg = sample(data, k=8)
    assert neg.shape == (len(data), 8) and neg.dtype == torch.long
    assert int(neg.min()) >= 0 and int(neg.max()) < data.num_items
    positives = set(zip(data.users.tolist(), data.items.tolist()))
    for user, row in zip(data.users.tolist(), neg.tolist()):
        assert not any((user, item) in positives for item in row)


def test_matches_reference_hash(data):
    neg = sample(data, k=3, seed=11)
    by_user: dict[int, set[int]] = {}
    for u, i in zip(data.users.tolist(), data.items.tolist()):
        by_user.setdefault(u, set()).add(i)
    for r in range(0, len(data), 7):
        u, i = int(data.users[r]), int(data.items[r])
        assert neg[r].tolist() == reference_negatives(u, i, by_user[u], data.num_items, 3, seed=11)


def test_deterministic_for_a_seed_and_different_across_seeds(data):
    assert torch.equal(sample(data, seed=5), sample(data, seed=5))
    a, b = sample(data, seed=5), sample(data, seed=6)
    assert (a != b).float().mean() > 0.5


def test_subset_of_rows_gets_the_same_negatives(data):
    """The key contract: a row's negatives depend only on (seed, user, item), not on the batch."""
    full = sample(data, k=5, seed=3)
    g = torch.Generator().manual_seed(0)
    for rows in (torch.randperm(len(data), generator=g)[:37], torch.tensor([len(data) - 1]), torch.arange(len(data)).flip(0)):
        assert torch.equal(sample(data, k=5, seed=3, rows=rows), full[rows])


def test_same_user_item_gets_same_negatives_and_items_differ():
    data = table([0, 0, 0, 1], [0, 0, 1, 0], num_users=2, num_items=1000)
    neg = sample(data, k=6, seed=9)
    assert torch.equal(neg[0], neg[1])  # duplicate row: identical negatives
    assert not torch.equal(neg[0], neg[2])  # other item of the same user
    assert not torch.equal(neg[0], neg[3])  # same item of another user


def test_user_with_all_items_but_one_gets_that_item():
    # user 0 has items 0..5 except 3; user 1 has a single item
    data = table([0, 0, 0, 0, 0, 1], [0, 1, 2, 4, 5, 2], num_users=2, num_items=6)
    neg = sample(data, k=10, seed=1)
    assert neg[:5].tolist() == [[3] * 10] * 5
    assert 2 not in neg[5].tolist() and set(neg[5].tolist()) <= {0, 1, 3, 4, 5}


def test_user_with_every_item_raises():
    data = table([0, 0, 0, 1], [0, 1, 2, 0], num_users=2, num_items=3)
    with pytest.raises(ValueError, match=r"Could not draw negatives for 1 user\(s\) \(indices \[0\]"):
        sample(data, k=1)
    # The other user alone is fine.
    assert sample(data, k=2, rows=torch.tensor([3])).shape == (1, 2)


@pytest.mark.parametrize("k", [0, -2])
def test_num_negatives_below_one_raises(data, k):
    with pytest.raises(ValueError, match=rf"num_negatives must be >= 1, got {k}"):
        sample(data, k=k)


def test_no_rows_gives_empty_result(data):
    empty = torch.zeros(0, dtype=torch.long)
    assert sample_negatives(empty, empty, data, 3, seed=0).shape == (0, 3)
