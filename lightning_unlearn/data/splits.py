"""Filters and train/test splits of an :class:`Interactions` table (seeded, vectorised)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions

__all__ = ["compact", "k_core", "leave_last_out", "random_holdout"]


def compact(data: Interactions) -> Interactions:
    """Drop users and items that have no rows, renumbering the rest contiguously.

    Example:
        >>> data = Interactions.from_raw([1, 1, 2], [5, 6, 5]).select(torch.tensor([0, 1]))
        >>> compact(data).num_users
        1
    """
    user_keep = torch.bincount(data.users, minlength=data.num_users) > 0
    item_keep = torch.bincount(data.items, minlength=data.num_items) > 0
    user_map = torch.cumsum(user_keep, 0) - 1
    item_map = torch.cumsum(item_keep, 0) - 1
    return Interactions(
        users=user_map[data.users],
        items=item_map[data.items],
        user_ids=data.user_ids[user_keep.numpy()],
        item_ids=data.item_ids[item_keep.numpy()],
        ratings=data.ratings,
        timestamps=data.timestamps,
    )


def k_core(data: Interactions, k: int) -> Interactions:
    """Iteratively drop users and items with fewer than ``k`` rows until none are left.

    Args:
        data: the table to filter.
        k: minimum number of rows per user and per item (``k <= 1`` only drops ids with no rows).

    Raises:
        ValueError: if ``k`` is negative.

    Example:
        >>> data = Interactions.from_raw([1, 1, 2, 2, 3], [7, 8, 7, 8, 9])
        >>> k_core(data, 2).num_users, k_core(data, 2).num_items
        (2, 2)
    """
    if k < 0:
        raise ValueError(f"k_core needs k >= 0, got k={k}.")
    keep = torch.ones(len(data), dtype=torch.bool)
    while True:
        u_deg = torch.bincount(data.users[keep], minlength=data.num_users)
        i_deg = torch.bincount(data.items[keep], minlength=data.num_items)
        new_keep = keep & (u_deg[data.users] >= k) & (i_deg[data.items] >= k)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return compact(data.select(keep))


def _rank_within_user(users: Tensor, order_key: Tensor) -> tuple[Tensor, Tensor]:
    """Rank of each row among its user's rows by ascending ``order_key`` (ties by row order)."""
    by_key = torch.argsort(order_key, stable=True)
    order = by_key[torch.argsort(users[by_key], stable=True)]
    counts = torch.bincount(users)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(users)
    rank[order] = torch.arange(len(users)) - starts[users[order]]
    return rank, counts[users]


def random_holdout(data: Interactions, fraction: float, seed: int = 0) -> tuple[Interactions, Interactions]:
    """Hold out ``round(fraction * n_u)`` random rows of every user ``u`` (never all of them).

    Args:
        data: the table to split.
        fraction: share of each user's rows that goes to the held-out part, in ``[0, 1)``.
        seed: seed of the random choice; the same seed gives the same split.

    Returns:
        ``(kept, held_out)``.

    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1)``.

    Example:
        >>> data = Interactions.from_raw([0] * 10, list(range(10)))
        >>> kept, held = random_holdout(data, 0.2, seed=0)
        >>> len(kept), len(held)
        (8, 2)
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"random_holdout needs 0 <= fraction < 1, got fraction={fraction}.")
    if len(data) == 0:
        return data, data
    g = torch.Generator().manual_seed(seed)
    rank, n = _rank_within_user(data.users, torch.rand(len(data), generator=g))
    n_out = torch.minimum(torch.round(n.double() * fraction).long(), n - 1)
    held = rank < n_out
    return data.select(~held), data.select(held)


def leave_last_out(data: Interactions, n: int = 1) -> tuple[Interactions, Interactions]:
    """Hold out each user's ``n`` latest rows by timestamp (a user keeps at least one row).

    Raises:
        ValueError: if the table has no timestamps or ``n < 1``.

    Example:
        >>> data = Interactions.from_raw([0, 0, 0], [1, 2, 3], timestamps=[30, 10, 20])
        >>> kept, last = leave_last_out(data)
        >>> data.item_ids[last.items.numpy()].tolist()
        [1]
    """
    if data.timestamps is None:
        raise ValueError("leave_last_out needs timestamps, but this table has none; use random_holdout.")
    if n < 1:
        raise ValueError(f"leave_last_out needs n >= 1, got n={n}.")
    if len(data) == 0:
        return data, data
    rank, count = _rank_within_user(data.users, -data.timestamps)
    held = rank < torch.clamp(count - 1, max=n)
    return data.select(~held), data.select(held)
