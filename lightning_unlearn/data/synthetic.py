"""Synthetic data: planted low-rank structure for tiny tests whose answer is known, and power-law catalogs for benchmarks at scale."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions

__all__ = ["planted_low_rank", "power_law_catalog"]


def planted_low_rank(num_users: int = 60, num_items: int = 40, rank: int = 3, density: float = 0.2, seed: int = 0) -> Interactions:
    """Users prefer items whose hidden factors align with theirs.

    Every user gets ``max(2, round(density * num_items))`` items, drawn by Gumbel-top-k from the
    softmax of a rank-``rank`` affinity matrix, with increasing timestamps; raw ids are indices.

    Args:
        num_users: number of users (at least 1).
        num_items: number of items (at least 3).
        rank: rank of the planted affinity.
        density: share of items each user interacts with, in ``(0, 1)``.
        seed: the same seed gives the same data.

    Raises:
        ValueError: on sizes or a density outside the accepted ranges.

    Example:
        >>> data = planted_low_rank(10, 8, density=0.25, seed=0)
        >>> len(data), data.num_users, data.num_items
        (20, 10, 8)
    """
    if num_users < 1 or num_items < 3 or rank < 1:
        raise ValueError(f"planted_low_rank needs num_users >= 1, num_items >= 3, rank >= 1; got {num_users}, {num_items}, {rank}.")
    if not 0 < density < 1:
        raise ValueError(f"planted_low_rank needs 0 < density < 1, got {density}.")
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, rank, generator=g)
    items = torch.randn(num_items, rank, generator=g)
    affinity = 2.0 * users @ items.T / rank**0.5
    gumbel = -torch.log(-torch.log(torch.rand(num_users, num_items, generator=g).clamp_min(1e-12)))
    per_user = min(num_items - 1, max(2, round(density * num_items)))
    chosen = torch.topk(affinity + gumbel, per_user, dim=1).indices
    user_idx = torch.arange(num_users).repeat_interleave(per_user)
    item_idx = chosen.reshape(-1)
    return Interactions(
        users=user_idx,
        items=item_idx,
        user_ids=torch.arange(num_users).numpy(),
        item_ids=torch.arange(num_items).numpy(),
        ratings=torch.ones(len(user_idx)),
        timestamps=torch.arange(len(user_idx)),
    )


def power_law_catalog(num_users: int = 1000, num_items: int = 10_000, num_interactions: int = 100_000, exponent: float = 1.0,
                      seed: int = 0) -> Interactions:
    """A catalog whose item popularity (and user activity) follow a power law, as real catalogs do.

    Item ``i`` (in a random order) is drawn with probability proportional to ``(rank + 1) ** -exponent``,
    users likewise with half the exponent; ``num_interactions`` pairs are drawn in one vectorised
    pass and duplicates dropped, so slightly fewer remain. Every user gets at least two rows
    (drawn from the same popularity), so every user can be split into train and test. Timestamps
    are the draw order. 10^5 users x 10^6 items x 10^7 draws take a few seconds.

    Args:
        num_users: number of users (at least 1).
        num_items: number of items (at least 3).
        num_interactions: pairs to draw (at least ``2 * num_users``).
        exponent: the item popularity's power-law exponent (``> 0``; about 1 for real catalogs).
        seed: the same seed gives the same data.

    Raises:
        ValueError: on sizes or an exponent outside the accepted ranges.

    Example:
        >>> data = power_law_catalog(num_users=50, num_items=400, num_interactions=2000, seed=0)
        >>> pairs = data.users * data.num_items + data.items
        >>> data.num_users, len(data) <= 2000, len(torch.unique(pairs)) == len(data)  # no pair twice
        (50, True, True)
        >>> counts = torch.bincount(data.items, minlength=data.num_items).sort(descending=True).values
        >>> bool(counts[:40].sum() > counts[-200:].sum())  # the head of the catalog outweighs its tail
        True
    """
    if num_users < 1 or num_items < 3 or num_interactions < 2 * num_users:
        raise ValueError(f"power_law_catalog needs num_users >= 1, num_items >= 3 and num_interactions >= 2 * num_users; "
                         f"got {num_users}, {num_items}, {num_interactions}.")
    if not exponent > 0:
        raise ValueError(f"power_law_catalog needs exponent > 0, got {exponent}.")
    g = torch.Generator().manual_seed(seed)

    def popularity(size: int, power: float) -> Tensor:
        weights = torch.arange(1, size + 1, dtype=torch.float64) ** -power
        return weights[torch.randperm(size, generator=g)]

    item_weights = popularity(num_items, exponent)
    extra = num_interactions - 2 * num_users
    users = torch.cat([torch.arange(num_users).repeat(2), torch.multinomial(popularity(num_users, exponent / 2), extra, True, generator=g)])
    items = torch.multinomial(item_weights, num_interactions, True, generator=g)
    keys, first = torch.unique(users * num_items + items, return_inverse=True)
    order = torch.full((len(keys),), num_interactions, dtype=torch.long).scatter_reduce(0, first, torch.arange(num_interactions), "amin")
    order = order.sort().values  # the first draw of each pair, in draw order
    users, items = users[order], items[order]
    seen_users, seen_items = torch.unique(users), torch.unique(items)
    item_index = torch.full((num_items,), -1, dtype=torch.long)
    item_index[seen_items] = torch.arange(len(seen_items))
    return Interactions(users=users, items=item_index[items], user_ids=seen_users.numpy(), item_ids=seen_items.numpy(),
                        ratings=torch.ones(len(users)), timestamps=torch.arange(len(users)))
