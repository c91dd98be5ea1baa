"""A synthetic data set with planted low-rank structure, for tiny tests whose answer is known."""

from __future__ import annotations

import torch

from lightning_unlearn.data.interactions import Interactions

__all__ = ["planted_low_rank"]


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
