"""Tests of the interaction table (lightning_unlearn/data/interactions.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_unlearn.data.interactions import CSR, Interactions


def random_table(seed: int = 0, n: int = 200, num_users: int = 17, num_items: int = 23) -> Interactions:
    """A random table whose maps include users/items without rows (ids are 100 + index)."""
    g = torch.Generator().manual_seed(seed)
    return Interactions(
        users=torch.randint(0, num_users, (n,), generator=g),
        items=torch.randint(0, num_items, (n,), generator=g),
        user_ids=np.arange(num_users) + 100,
        item_ids=np.arange(num_items) + 100,
        ratings=torch.rand(n, generator=g) * 5,
        timestamps=torch.arange(n) * 10,
    )


def rows_of(data: Interactions) -> list[tuple]:
    """The table as a list of ``(user, item, rating, timestamp)`` tuples, in row order."""
    ratings = data.ratings.tolist() if data.ratings is not None else [None] * len(data)
    stamps = data.timestamps.tolist() if data.timestamps is not None else [None] * len(data)
    return list(zip(data.users.tolist(), data.items.tolist(), ratings, stamps))


def brute_force_csr(keys: list[int], other: list[int], size: int) -> tuple[list[int], list[list[int]]]:
    """Segment lengths and sorted row indices per key, built with plain Python loops."""
    segments = [[r for r, k in enumerate(keys) if k == key] for key in range(size)]
    return [len(s) for s in segments], segments


def assert_same_maps(a: Interactions, b: Interactions) -> None:
    assert a.user_ids is b.user_ids or np.array_equal(a.user_ids, b.user_ids)
    assert a.item_ids is b.item_ids or np.array_equal(a.item_ids, b.item_ids)


# --------------------------------------------------------------------------- from_raw


def test_from_raw_int_ids_map_to_sorted_contiguous_indices():
    data = Interactions.from_raw([30, 10, 30, 20], [7, 5, 9, 7], ratings=[1, 2, 3, 4], timestamps=[40, 30, 20, 10])
    assert data.user_ids.tolist() == [10, 20, 30]
    assert data.item_ids.tolist() == [5, 7, 9]
    assert data.users.tolist() == [2, 0, 2, 1]
    assert data.items.tolist() == [1, 0, 2, 1]
    assert data.users.dtype == data.items.dtype == data.timestamps.dtype == torch.long
    assert data.ratings.dtype == torch.float32
    assert data.ratings.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert data.timestamps.tolist() == [40, 30, 20, 10]
    assert (len(data), data.num_users, data.num_items) == (4, 3, 3)
    assert repr(data) == "Interactions(rows=4, users=3, items=3)"


def test_from_raw_string_ids_map_to_sorted_contiguous_indices():
    data = Interactions.from_raw(["bob", "amy", "bob", "cat"], ["z", "x", "y", "x"])
    assert data.user_ids.tolist() == ["amy", "bob", "cat"]
    assert data.item_ids.tolist() == ["x", "y", "z"]
    assert data.users.tolist() == [1, 0, 1, 2]
    assert data.items.tolist() == [2, 0, 1, 0]
    assert data.ratings is None and data.timestamps is None
    # Round trip: raw ids of each row are recovered through the maps.
    assert data.user_ids[data.users.numpy()].tolist() == ["bob", "amy", "bob", "cat"]
    assert data.item_ids[data.items.numpy()].tolist() == ["z", "x", "y", "x"]


def test_from_raw_empty_table():
    data = Interactions.from_raw(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert (len(data), data.num_users, data.num_items) == (0, 0, 0)
    assert data.by_user.indptr.tolist() == [0]
    assert data.contains(torch.tensor([0]), torch.tensor([0])).tolist() == [False]


def test_keys_are_user_times_num_items_plus_item():
    data = Interactions.from_raw([1, 2, 2], [10, 20, 30])
    assert data.keys.tolist() == [0 * 3 + 0, 1 * 3 + 1, 1 * 3 + 2]


# --------------------------------------------------------------------------- id lookups


def test_user_and_item_index_of_int_ids_with_unknowns():
    data = Interactions.from_raw([5, 3, 9], [40, 10, 20])
    assert data.user_index([9, 3, 4, 5, 100, -1]).tolist() == [2, 0, -1, 1, -1, -1]
    assert data.item_index(np.array([10, 20, 40, 30, 0])).tolist() == [0, 1, 2, -1, -1]
    assert data.user_index([]).tolist() == []
    assert data.user_index([9]).dtype == torch.long


def test_user_and_item_index_of_string_ids_with_unknowns():
    data = Interactions.from_raw(["b", "a", "d"], ["x", "yy", "x"])
    assert data.user_index(["d", "a", "c", "b", "zz", ""]).tolist() == [2, 0, -1, 1, -1, -1]
    assert data.item_index(["yy", "y", "x", "xx"]).tolist() == [1, -1, 0, -1]


def test_int_looked_up_among_string_ids_is_unknown():
    data = Interactions.from_raw(["a", "b"], ["x", "y"])
    assert data.user_index([1, 0]).tolist() == [-1, -1]


def test_string_looked_up_among_int_ids_is_unknown():
    data = Interactions.from_raw([1, 2, 3], [10, 20, 30])
    assert data.user_index(["abc"]).tolist() == [-1]


def test_lookup_in_empty_maps_is_unknown():
    data = Interactions.from_raw(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert data.user_index([1, 2]).tolist() == [-1, -1]
    assert data.item_index(np.array([0])).tolist() == [-1]


# --------------------------------------------------------------------------- CSR views


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_by_user_and_by_item_match_brute_force(seed):
    data = random_table(seed)
    users, items = data.users.tolist(), data.items.tolist()
    for csr, keys, other, size in (
        (data.by_user, users, items, data.num_users),
        (data.by_item, items, users, data.num_items),
    ):
        lengths, segments = brute_force_csr(keys, other, size)
        assert isinstance(csr, CSR)
        assert csr.indptr.tolist() == [0, *np.cumsum(lengths).tolist()]
        assert csr.lengths().tolist() == lengths
        for key in range(size):
            lo, hi = csr.indptr[key], csr.indptr[key + 1]
            assert sorted(csr.rows[lo:hi].tolist()) == segments[key]
        # cols is the other side of exactly those rows.
        assert csr.cols.tolist() == [other[r] for r in csr.rows.tolist()]
        assert sorted(csr.rows.tolist()) == list(range(len(data)))


def test_csr_views_are_cached():
    data = random_table()
    assert data.by_user is data.by_user
    assert data.by_item is data.by_item


def test_by_user_on_hand_case():
    data = Interactions.from_raw([2, 0, 2, 2], [1, 1, 0, 2])  # users 0, 2 -> indices 0, 1
    csr = data.by_user
    assert csr.indptr.tolist() == [0, 1, 4]
    assert csr.rows.tolist() == [1, 0, 2, 3]
    assert csr.cols.tolist() == [1, 1, 0, 2]


@pytest.mark.parametrize(
    "keys",
    [[0, 3, 5], [5, 5, 0], [16, 0, 16, 2], [3], [], list(range(17))],
)
def test_csr_gather_matches_brute_force(keys):
    full = random_table(n=60)
    data = full.select((full.users != 3) & (full.users != 16))  # users 3 and 16 have no rows
    csr = data.by_user
    assert csr.lengths()[[3, 16]].tolist() == [0, 0]
    expected_segment, expected_position = [], []
    for seg, key in enumerate(keys):
        for pos in range(int(csr.indptr[key]), int(csr.indptr[key + 1])):
            expected_segment.append(seg)
            expected_position.append(pos)
    segment, position = csr.gather(torch.tensor(keys, dtype=torch.long))
    assert segment.tolist() == expected_segment
    assert position.tolist() == expected_position
    # The gathered rows really belong to the requested keys.
    assert data.users[csr.rows[position]].tolist() == [keys[s] for s in expected_segment]


# --------------------------------------------------------------------------- contains


def test_contains_matches_brute_force():
    data = random_table(n=80)
    present = set(zip(data.users.tolist(), data.items.tolist()))
    u, i = torch.meshgrid(torch.arange(data.num_users), torch.arange(data.num_items), indexing="ij")
    got = data.contains(u.reshape(-1), i.reshape(-1))
    expected = [(a, b) in present for a, b in zip(u.reshape(-1).tolist(), i.reshape(-1).tolist())]
    assert got.tolist() == expected
    assert 0 < sum(expected) < len(expected)


def test_contains_keeps_the_query_shape():
    data = Interactions.from_raw([0, 0, 1], [0, 2, 1])
    users = torch.tensor([[0, 0, 0], [1, 1, 1]])
    items = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert data.contains(users, items).tolist() == [[True, False, True], [False, True, False]]


# --------------------------------------------------------------------------- subsets


def test_select_with_index_tensor_keeps_rows_in_order_and_maps():
    data = random_table(n=30)
    picked = data.select(torch.tensor([5, 0, 5, 29]))
    original = rows_of(data)
    assert rows_of(picked) == [original[5], original[0], original[5], original[29]]
    assert picked.user_ids is data.user_ids and picked.item_ids is data.item_ids
    assert (picked.num_users, picked.num_items) == (data.num_users, data.num_items)


def test_select_with_bool_mask():
    data = random_table(n=30)
    mask = data.timestamps % 20 == 0  # even rows
    picked = data.select(mask)
    assert rows_of(picked) == rows_of(data)[::2]
    assert_same_maps(picked, data)


def test_select_without_optional_columns():
    data = Interactions.from_raw([1, 2, 3], [4, 5, 6])
    picked = data.select(torch.tensor([2]))
    assert picked.ratings is None and picked.timestamps is None
    assert picked.users.tolist() == [2] and picked.items.tolist() == [2]


@pytest.mark.parametrize(
    "rows",
    [torch.tensor([3, 0, 7, 3]), torch.arange(40) % 3 == 1, torch.tensor([], dtype=torch.long)],
    ids=["indices-with-duplicate", "mask", "empty"],
)
def test_without_partitions_the_rows(rows):
    data = random_table(n=40)
    kept, removed = data.without(rows)
    removed_idx = sorted(set(torch.arange(40)[rows].tolist()))
    kept_idx = [r for r in range(40) if r not in removed_idx]
    original = rows_of(data)
    assert rows_of(removed) == [original[r] for r in removed_idx]
    assert rows_of(kept) == [original[r] for r in kept_idx]
    assert len(kept) + len(removed) == len(data)
    assert_same_maps(kept, data)
    assert_same_maps(removed, data)


def test_binarize_keeps_rows_at_or_above_threshold_with_same_maps():
    data = Interactions.from_raw([1, 1, 2, 3], [5, 6, 5, 7], ratings=[4, 3.5, 5, 1], timestamps=[1, 2, 3, 4])
    positive = data.binarize(4)
    assert positive.timestamps.tolist() == [1, 3]
    assert positive.ratings.tolist() == [4.0, 5.0]
    assert (positive.num_users, positive.num_items) == (3, 3)  # maps are kept, not compacted
    assert_same_maps(positive, data)


def test_binarize_without_ratings_raises():
    with pytest.raises(ValueError, match="needs ratings"):
        Interactions.from_raw([1], [2]).binarize(1.0)


# --------------------------------------------------------------------------- validation


def make(users, items, num_users=3, num_items=3, **columns) -> Interactions:
    return Interactions(users=users, items=items, user_ids=np.arange(num_users), item_ids=np.arange(num_items), **columns)


LONG = torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(users=LONG, items=torch.tensor([0, 1])), r"column `items` has 2 rows, expected 3"),
        (dict(users=LONG, items=LONG, ratings=torch.ones(4)), r"column `ratings` has 4 rows, expected 3"),
        (dict(users=LONG, items=LONG, timestamps=torch.arange(2)), r"column `timestamps` has 2 rows, expected 3"),
        (dict(users=LONG.int(), items=LONG), r"`users` must be a torch.long tensor, got torch.int32"),
        (dict(users=LONG, items=LONG.float()), r"`items` must be a torch.long tensor, got torch.float32"),
        (dict(users=torch.tensor([0, 1, 3]), items=LONG), r"`users` has indices outside \[0, 3\)"),
        (dict(users=torch.tensor([0, -1, 2]), items=LONG), r"`users` has indices outside \[0, 3\)"),
        (dict(users=LONG, items=LONG, num_items=2), r"`items` has indices outside \[0, 2\)"),
    ],
    ids=["items-length", "ratings-length", "timestamps-length", "users-int32", "items-float", "user-too-big",
         "user-negative", "item-too-big"],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_constructor_accepts_valid_columns_and_empty_tables():
    assert len(make(LONG, LONG, ratings=torch.ones(3), timestamps=torch.arange(3))) == 3
    empty = torch.zeros(0, dtype=torch.long)
    assert len(make(empty, empty, num_users=0, num_items=0)) == 0


def test_table_is_frozen():
    data = Interactions.from_raw([1], [2])
    with pytest.raises(AttributeError):
        data.users = torch.tensor([0])


def test_non_integral_number_among_int_ids_is_unknown():
    data = Interactions.from_raw([1, 2, 3], [10, 20, 30])
    assert data.user_index([2.7, 2.0]).tolist() == [-1, 1]
    assert data.user_index(["2", " 3", "x", "2.0", "-"]).tolist() == [1, 2, -1, -1, -1]
