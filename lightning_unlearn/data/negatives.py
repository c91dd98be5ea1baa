"""Negatives fixed per positive: a counter-based hash of ``(seed, user, item, slot)``.

Because a positive's negatives depend only on that positive (and the seed), deleting rows
removes well-defined terms from the training objective and leaves every other row's
negatives untouched, so a retrain on the remaining rows sees the same negatives.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions

__all__ = ["sample_negatives"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_negatives(users: Tensor, items: Tensor, positives: Interactions, num_negatives: int, seed: int, max_rounds: int = 256) -> Tensor:
    """``num_negatives`` items per ``(user, item)`` row that are not positives of that user.

    Args:
        users: ``(n,)`` user indices of the positive rows.
        items: ``(n,)`` item indices of the positive rows.
        positives: the table whose rows count as positives (candidates in it are redrawn).
        num_negatives: negatives per row (at least 1).
        seed: the seed of the hash.
        max_rounds: how many redraws a slot may need before giving up.

    Returns:
        ``(n, num_negatives)`` long tensor.

    Raises:
        ValueError: ``num_negatives < 1``, or a user has (nearly) every item as a positive.

    Example:
        >>> data = Interactions.from_raw([0, 0, 1], [0, 1, 2])
        >>> neg = sample_negatives(data.users, data.items, data, 2, seed=0)
        >>> neg.shape, bool(data.contains(data.users[:, None].expand_as(neg), neg).any())
        (torch.Size([3, 2]), False)
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}.")
    n = len(users)
    if n == 0:
        return torch.zeros(0, num_negatives, dtype=torch.long)
    base = _mix(_mix(_mix(np.full(n, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)) ^ users.numpy().astype(np.uint64)) ^ items.numpy().astype(np.uint64))
    slots = np.arange(num_negatives, dtype=np.uint64)
    out = np.empty((n, num_negatives), dtype=np.int64)
    todo = np.ones((n, num_negatives), dtype=bool)
    for attempt in range(max_rounds):
        r, c = np.nonzero(todo)
        if len(r) == 0:
            return torch.from_numpy(out)
        h = _mix(base[r] ^ (slots[c] + np.uint64(attempt * num_negatives)))
        cand = (h % np.uint64(positives.num_items)).astype(np.int64)
        bad = positives.contains(users[torch.from_numpy(r)], torch.from_numpy(cand)).numpy()
        out[r[~bad], c[~bad]] = cand[~bad]
        todo[r[~bad], c[~bad]] = False
    stuck = torch.unique(users[torch.from_numpy(np.nonzero(todo.any(1))[0])])
    raise ValueError(
        f"Could not draw negatives for {len(stuck)} user(s) (indices {stuck[:5].tolist()}...): they interact with "
        f"(almost) every one of the {positives.num_items} items. Drop such users (e.g. with k_core) or use fewer negatives."
    )
