"""Tests of filters and splits (lightning_unlearn/data/splits.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.splits import compact, k_core, leave_last_out, random_holdout


def random_table(seed: int = 0, num_users: int = 40, num_items: int = 30, max_rows: int = 15) -> Interactions:
    """Every user gets 1..max_rows distinct items; row r has timestamp 1000 - r (so no ties)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(num_users):
        n = int(rng.integers(1, max_rows + 1))
        users += [u] * n
        items += rng.choice(num_items, n, replace=False).tolist()
    order = rng.permutation(len(users))  # interleave users
    users, items = np.array(users)[order], np.array(items)[order]
    return Interactions.from_raw(users + 500, items + 900, ratings=np.ones(len(users)), timestamps=1000 - np.arange(len(users)))


def row_ids(data: Interactions) -> Counter:
    """The rows as a multiset of ``(raw user, raw item, timestamp)`` (unique per row here)."""
    return Counter(zip(data.user_ids[data.users.numpy()].tolist(), data.item_ids[data.items.numpy()].tolist(), data.timestamps.tolist()))


def per_user(data: Interactions) -> list[int]:
    return torch.bincount(data.users, minlength=data.num_users).tolist()


def assert_partition(data: Interactions, kept: Interactions, held: Interactions) -> None:
    for part in (kept, held):
        assert part.user_ids is data.user_ids and part.item_ids is data.item_ids
    assert not (row_ids(kept) & row_ids(held))
    assert row_ids(kept) + row_ids(held) == row_ids(data)


# --------------------------------------------------------------------------- compact / k_core


def test_compact_drops_empty_ids_and_renumbers_keeping_raw_ids():
    data = Interactions.from_raw([10, 20, 30, 30], ["a", "b", "c", "d"], ratings=[1, 2, 3, 4], timestamps=[5, 6, 7, 8])
    small = compact(data.select(torch.tensor([3, 0])))  # rows (30, d) and (10, a)
    assert small.user_ids.tolist() == [10, 30]
    assert small.item_ids.tolist() == ["a", "d"]
    assert small.users.tolist() == [1, 0]
    assert small.items.tolist() == [1, 0]
    assert small.ratings.tolist() == [4.0, 1.0] and small.timestamps.tolist() == [8, 5]


def test_k_core_hand_case_is_the_maximal_core():
    # Users A, B, C with items x, y form a 2-core (each has 2 rows and each item 3).
    # D's only row is on z; E has rows on y and z, so removing D leaves z with one row,
    # which then strips E down to one row -- the cascade must remove D, E and z.
    rows = [("A", "x"), ("A", "y"), ("B", "x"), ("B", "y"), ("C", "x"), ("C", "y"), ("D", "z"), ("E", "y"), ("E", "z")]
    data = Interactions.from_raw([u for u, _ in rows], [i for _, i in rows], timestamps=range(len(rows)))
    core = k_core(data, 2)
    assert core.user_ids.tolist() == ["A", "B", "C"]
    assert core.item_ids.tolist() == ["x", "y"]
    assert core.timestamps.tolist() == [0, 1, 2, 3, 4, 5]
    assert core.users.tolist() == [0, 0, 1, 1, 2, 2]
    assert core.items.tolist() == [0, 1, 0, 1, 0, 1]
    # With k=3 items still have 3 rows but users only 2, so nothing survives.
    assert (len(k_core(data, 3)), k_core(data, 3).num_users, k_core(data, 3).num_items) == (0, 0, 0)


def brute_force_k_core(pairs: set[tuple[int, int]], k: int) -> set[tuple[int, int]]:
    while True:
        u_deg = Counter(u for u, _ in pairs)
        i_deg = Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if u_deg[u] >= k and i_deg[i] >= k}
        if kept == pairs:
            return kept
        pairs = kept


@pytest.mark.parametrize("k", [2, 3, 5])
def test_k_core_every_user_and_item_has_k_rows(k):
    data = random_table(seed=k)
    core = k_core(data, k)
    assert 0 < len(core) < len(data)
    assert min(per_user(core)) >= k
    assert min(torch.bincount(core.items, minlength=core.num_items).tolist()) >= k
    # compacted: every index is used, raw ids preserved and sorted
    assert core.num_users == len(set(core.users.tolist()))
    assert core.num_items == len(set(core.items.tolist()))
    assert set(core.user_ids.tolist()) <= set(data.user_ids.tolist())
    assert core.user_ids.tolist() == sorted(core.user_ids.tolist())
    raw = lambda t: set(zip(t.user_ids[t.users.numpy()].tolist(), t.item_ids[t.items.numpy()].tolist()))  # noqa: E731
    assert raw(core) == brute_force_k_core(raw(data), k)


@pytest.mark.parametrize("k", [0, 1])
def test_k_core_trivial_k_keeps_every_row(k):
    data = random_table()
    core = k_core(data, k)
    assert row_ids(core) == row_ids(data)
    assert core.user_ids.tolist() == data.user_ids.tolist()


def test_k_core_negative_k_raises():
    with pytest.raises(ValueError, match=r"k >= 0, got k=-1"):
        k_core(random_table(), -1)


# --------------------------------------------------------------------------- random_holdout


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_random_holdout_counts_and_partition(fraction):
    data = random_table(seed=3)
    kept, held = random_holdout(data, fraction, seed=7)
    assert_partition(data, kept, held)
    n = per_user(data)
    assert per_user(held) == [min(round(fraction * c), c - 1) for c in n]
    assert per_user(kept) == [c - min(round(fraction * c), c - 1) for c in n]
    assert 1 in n  # users with one row are never held out entirely


def test_random_holdout_seeds():
    data = random_table(seed=4)
    a_kept, a_held = random_holdout(data, 0.3, seed=1)
    b_kept, b_held = random_holdout(data, 0.3, seed=1)
    c_kept, c_held = random_holdout(data, 0.3, seed=2)
    assert row_ids(a_held) == row_ids(b_held) and row_ids(a_kept) == row_ids(b_kept)
    assert a_held.timestamps.tolist() == b_held.timestamps.tolist()
    assert row_ids(a_held) != row_ids(c_held)
    assert per_user(a_held) == per_user(c_held)


def test_random_holdout_empty_table():
    empty = random_table().select(torch.zeros(0, dtype=torch.long))
    kept, held = random_holdout(empty, 0.5)
    assert len(kept) == len(held) == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_random_holdout_bad_fraction_raises(fraction):
    with pytest.raises(ValueError, match=rf"0 <= fraction < 1, got fraction={fraction}"):
        random_holdout(random_table(), fraction)


# --------------------------------------------------------------------------- leave_last_out


def test_leave_last_out_holds_out_each_users_latest_row():
    data = random_table(seed=5)
    kept, held = leave_last_out(data)
    assert_partition(data, kept, held)
    users, stamps = data.users.tolist(), data.timestamps.tolist()
    latest = {u: max(t for v, t in zip(users, stamps) if v == u) for u in set(users)}
    counts = per_user(data)
    expected_held = {(u, latest[u]) for u in latest if counts[u] > 1}
    assert set(zip(held.users.tolist(), held.timestamps.tolist())) == expected_held
    assert len(held) == len(expected_held)
    # users with a single row keep it in train
    singles = {u for u in latest if counts[u] == 1}
    assert singles and singles <= set(kept.users.tolist())


def test_leave_last_out_hand_case_with_n():
    data = Interactions.from_raw([0, 0, 0, 1, 1, 2], [1, 2, 3, 1, 2, 3], timestamps=[30, 10, 20, 5, 7, 1])
    kept, last = leave_last_out(data)
    assert last.timestamps.tolist() == [30, 7] and kept.timestamps.tolist() == [10, 20, 5, 1]
    kept, last = leave_last_out(data, n=2)
    assert last.timestamps.tolist() == [30, 20, 7]  # user 1 keeps one row, user 2 keeps its only row
    assert kept.timestamps.tolist() == [10, 5, 1]


def test_leave_last_out_without_timestamps_raises():
    with pytest.raises(ValueError, match="needs timestamps"):
        leave_last_out(Interactions.from_raw([0, 0], [1, 2]))


@pytest.mark.parametrize("n", [0, -1])
def test_leave_last_out_bad_n_raises(n):
    with pytest.raises(ValueError, match=rf"n >= 1, got n={n}"):
        leave_last_out(random_table(), n)
