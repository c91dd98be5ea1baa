"""Batches for the trainer: shuffled training rows, and ranking chunks for evaluation (full or sampled)."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sized

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lightning_unlearn.data.interactions import Interactions, sorted_isin

__all__ = ["CurrentTrainRows", "EpochBatchSampler", "RankingBatches", "TrainRows", "sample_candidates"]

class TrainRows(Dataset):
    """Training rows with their fixed negatives: the terms of the training objective.

    Indexed by a whole batch at once (an index tensor, a mask or a slice), giving the batch
    dict that :meth:`Recommender.loss <lightning_unlearn.models.Recommender.loss>` takes.

    Example:
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([[4], [5]]))
        >>> rows[:]["items"].tolist(), len(rows.select(torch.tensor([1])))
        ([2, 3], 1)
    """

    def __init__(self, users: Tensor, items: Tensor, negatives: Tensor):
        self.users, self.items, self.negatives = users, items, negatives

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, rows: Tensor | slice) -> dict[str, Tensor]:
        return {"users": self.users[rows], "items": self.items[rows], "negatives": self.negatives[rows]}

    def select(self, rows: Tensor) -> TrainRows:
        """The rows at ``rows`` (indices or a boolean mask)."""
        return TrainRows(self.users[rows], self.items[rows], self.negatives[rows])

    def all_items(self) -> Tensor:
        """Every item the rows' losses touch: positives, then negatives (flattened)."""
        return torch.cat([self.items, self.negatives.reshape(-1)])

    def concat(self, other: TrainRows) -> TrainRows:
        """These rows followed by ``other``'s."""
        return TrainRows(*(torch.cat([a, b]) for a, b in zip((self.users, self.items, self.negatives),
                                                               (other.users, other.items, other.negatives))))

    def to(self, device: torch.device | str) -> TrainRows:
        """The same rows on ``device``."""
        return TrainRows(self.users.to(device), self.items.to(device), self.negatives.to(device))


class CurrentTrainRows(Dataset):
    """The training rows a datamodule holds *now*: deletions between epochs take effect at once.

    Args:
        rows: a callable returning the current :class:`TrainRows`.
    """

    def __init__(self, rows: Callable[[], TrainRows]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows())

    def __getitem__(self, index: Tensor) -> dict[str, Tensor]:
        return self.rows()[index]


class EpochBatchSampler(Sampler):
    """Yields index batches of a fresh permutation each epoch, seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so a run restarted at epoch ``e``
    sees exactly the batches an uninterrupted run saw. The number of rows is read from
    ``rows`` at every epoch, so rows deleted between epochs are never served again.

    Args:
        rows: the dataset (anything with ``len``) whose indices are shuffled.
        batch_size: indices per batch.
        seed: seeds the permutation of each epoch.
        shuffle: ``False`` keeps the order.

    Example:
        >>> sampler = EpochBatchSampler(range(5), batch_size=2, seed=0)
        >>> [len(b) for b in sampler]
        [2, 2, 1]
    """

    def __init__(self, rows: Sized, batch_size: int, seed: int, shuffle: bool = True):
        self.rows, self.batch_size, self.seed, self.shuffle, self.epoch = rows, batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.rows), generator=g)
        else:
            order = torch.arange(len(self.rows))
        return iter(order.split(self.batch_size))


def _now(value: Any) -> Any:
    """A table (or tensor) given as itself or as a callable returning it."""
    return value() if callable(value) else value


class RankingBatches(Dataset):
    """Chunks of users for evaluation: full ranking, or ranking against sampled candidates.

    Each item is a dict with ``users`` (B,), and the coordinates ``(row in batch, item)`` of
    the ``target`` items and of the items to ``exclude`` from ranking (seen in training). With
    ``candidates=N`` it also holds ``candidate_items`` (B, N), the items each user's targets are
    ranked against (see :func:`sample_candidates`: int32, ``-1`` past the row's
    ``num_candidates``), and ``num_candidates`` (B,).

    The tables may be given as callables returning them, read at every batch: a loader made
    before a deletion (Lightning keeps its validation loader for the whole fit) then serves the
    data as it is now. The users are those with targets when the loader is made, less those that
    have none by the time their batch is read.

    Args:
        targets: the held-out rows; only users that have some are evaluated.
        exclude: tables whose items are masked for their users (e.g. train, or train + val).
        batch_size: users per chunk.
        candidates: ``None`` (full ranking: no candidates in the batch) or candidates per user.
        seed, stream: seed the candidates (one stream per split).
        blocked_items: items that are never candidates (e.g. deleted items); in full ranking the
            batch carries them as ``blocked_items``, columns excluded for every user.
    """

    def __init__(self, targets: Interactions | Callable[[], Interactions],
                 exclude: list[Interactions] | Callable[[], list[Interactions]], batch_size: int,
                 candidates: int | None = None, seed: int = 0, stream: int = 0,
                 blocked_items: Tensor | Callable[[], Tensor] | None = None):
        self.targets, self.exclude, self.blocked_items = targets, exclude, blocked_items
        self.candidates, self.seed, self.stream = candidates, seed, stream
        users = torch.nonzero(_now(targets).by_user.lengths() > 0).flatten()
        self.chunks = users.split(batch_size) if len(users) else ()

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        targets, exclude = _now(self.targets), _now(self.exclude)
        users = self.chunks[k]
        users = users[targets.by_user.lengths()[users] > 0]  # a user deleted since the loader was made
        t_rows, t_pos = targets.by_user.gather(users)
        parts = [(table.by_user.gather(users), table.by_user.cols) for table in exclude]
        batch = {
            "users": users,
            "target_rows": t_rows,
            "target_items": targets.by_user.cols[t_pos],
            "exclude_rows": torch.cat([seg for (seg, _), _ in parts]),
            "exclude_items": torch.cat([cols[pos] for (_, pos), cols in parts]),
        }
        blocked = _now(self.blocked_items) if self.blocked_items is not None else None
        if self.candidates is None and blocked is not None and len(blocked):  # full ranking: excluded for every user
            batch["blocked_items"] = blocked.long()
        if self.candidates is not None:
            batch["candidate_items"], batch["num_candidates"] = sample_candidates(
                users, torch.cat([batch["target_rows"], batch["exclude_rows"]]),
                torch.cat([batch["target_items"], batch["exclude_items"]]), targets.num_items, self.candidates,
                self.seed, self.stream, _now(self.blocked_items))
        return batch


# ---------------------------------------------------------------------- sampled candidates
_M31 = (1 << 31) - 1
_DENSE_FACTOR = 4  # a user with at most 4 N eligible items (or under half the catalog eligible) is enumerated
_MAX_DRAWS = 64  # draws per candidate before a user is enumerated instead (never reached in practice)
_CELLS = 1 << 18  # draws (or enumerated items) at once: 2 MB per int64 temporary; few ops, so robust on a busy machine


def _mix31(x: Tensor) -> Tensor:
    """A bijective hash of int64 values in ``[0, 2**31)`` (xor-shift-multiply; products stay below ``2**62``)."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M31
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & _M31
    return x ^ (x >> 15)


def _stream_keys(seed: int, stream: int) -> list[int]:
    """Four 31-bit keys of ``(seed, stream)``: two for the draws, two for the keys of enumerated users."""
    digest = hashlib.sha256(f"lightning_unlearn/candidates/{int(seed)}/{int(stream)}".encode()).digest()
    return [int.from_bytes(digest[4 * k:4 * k + 4], "little") & _M31 for k in range(4)]


def _hash62(keys: tuple[int, int], users: Tensor, counters: Tensor) -> Tensor:
    """A 62-bit hash of ``(keys, user, counter)``: ``users`` (R, 1) and ``counters`` (R, C) or (C,) broadcast."""
    hi = _mix31(_mix31(users ^ keys[0]) ^ counters)
    lo = _mix31(_mix31(users ^ keys[1]) ^ counters)
    return (hi << 31) | lo


def sample_candidates(
    users: Tensor, forbidden_rows: Tensor, forbidden_items: Tensor, num_items: int, count: int, seed: int,
    stream: int = 0, blocked_items: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Up to ``count`` candidate items per user, drawn without replacement from the items it may be recommended.

    A user's *eligible* items are all items except its forbidden ones (its exclusions and
    targets, as ``(row, item)`` coordinates) and the ``blocked_items``. Each user gets
    ``min(count, eligible)`` distinct eligible items, a uniform sample without replacement; a
    user with fewer than ``count`` eligible items gets all of them. The sample depends only on
    ``(seed, stream, user)`` and the user's eligible items, never on which other users share the
    batch, so it is the same for every batch size and every epoch: a counter-based hash of
    ``(seed, stream, user, j)`` gives the user's ``j``-th uniform draw over all items, and the
    candidates are the first ``count`` distinct eligible draws. A user with at most
    ``4 * count`` eligible items, or fewer than half of the catalog, is enumerated instead: its
    candidates are the eligible items with the ``count`` smallest hashes of
    ``(seed, stream, user, item)``. Either way, removing an item (or adding an exclusion)
    replaces that item only, and other users' candidates do not change.

    Cost: about ``1.1 * count`` hashed draws per user (up to twice that when half of the catalog
    is forbidden), each row of draws sorted (to find repeats) and looked up among the batch's
    forbidden coordinates, in blocks of 262,144 draws (about 20 MB of working memory); an
    enumerated user costs its eligible items. About 60 to 90 ms for 1,024 users, 1,000 candidates
    and 10^6 items on two CPU cores. The result is ``B * count`` int32: 4 MB for 1,024 users and 1,000
    candidates (nothing is kept between batches: the same draws are recomputed every epoch).

    Args:
        users: ``(B,)`` user indices (they seed the draws).
        forbidden_rows, forbidden_items: coordinates ``(row in users, item)`` of the items each
            user may not get (duplicates allowed).
        num_items: the catalog size.
        count: candidates per user (>= 1).
        seed, stream: seed the draws; each split uses its own stream.
        blocked_items: items no user may get (e.g. deleted items).

    Returns:
        ``(candidates, counts)``: ``(B, count)`` item indices, int32 (int64 for catalogs of
        ``2**31`` items or more), ``-1`` past each row's number of candidates; and those numbers,
        ``(B,)`` int64.

    Example:
        >>> cands, n = sample_candidates(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]),
        ...                              num_items=4, count=5, seed=0)
        >>> n.tolist(), sorted(cands[0, :3].tolist()), sorted(cands[1, :3].tolist()), cands[:, 3:].unique().tolist()
        ([3, 3], [1, 2, 3], [0, 1, 3], [-1])
    """
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"sample_candidates(count=...) must be an int >= 1, got {count!r}.")
    count = int(count)
    device = users.device
    rows_n = len(users)
    dtype = torch.int32 if num_items <= _M31 else torch.int64
    out = torch.full((rows_n, count), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(rows_n, dtype=torch.int64, device=device)
    if rows_n == 0:
        return out.to(dtype), counts
    users = users.long()
    forbidden = torch.unique(forbidden_rows.long() * num_items + forbidden_items.long())
    blocked = torch.zeros(0, dtype=torch.long, device=device) if blocked_items is None else torch.unique(blocked_items.long().to(device))
    overlap = torch.bincount(forbidden[sorted_isin(blocked, forbidden % num_items)] // num_items, minlength=rows_n)
    eligible = num_items - torch.bincount(forbidden // num_items, minlength=rows_n) - len(blocked) + overlap
    keys = _stream_keys(seed, stream)
    enumerate_rows = (eligible <= _DENSE_FACTOR * count) | (2 * eligible < num_items)
    sparse = torch.nonzero(~enumerate_rows).flatten()
    leftover = _draw(sparse, users, eligible, forbidden, blocked, num_items, count, keys[:2], out, counts)
    dense = torch.sort(torch.cat([torch.nonzero(enumerate_rows).flatten(), leftover])).values
    _enumerate(dense, users, eligible, forbidden, blocked, num_items, count, keys[2:], out, counts)
    return out.to(dtype), counts


def _draw(rows: Tensor, users: Tensor, eligible: Tensor, forbidden: Tensor, blocked: Tensor, num_items: int, count: int,
          keys: list[int], out: Tensor, counts: Tensor) -> Tensor:
    """Fill ``rows`` of ``out`` with their first ``count`` distinct eligible draws; returns the rows that found too few."""
    if not len(rows):
        return rows
    cap = _MAX_DRAWS * count + 1024
    # Expected draws for `count` distinct eligible items: -num_items * log(1 - count / eligible); 10% + 64 more.
    need = -num_items * torch.log1p(-count / eligible[rows].double())
    draws = min(cap, math.ceil(1.1 * float(need.max())) + 64)
    left = []
    while len(rows):
        still = []
        for chunk in rows.split(max(1, _CELLS // draws)):
            j = torch.arange(draws, device=rows.device)
            items = _hash62(keys, users[chunk].unsqueeze(1), j) % num_items
            ordered, order = torch.sort(items, dim=1, stable=True)  # the first draw of an item comes first
            keep = torch.ones_like(ordered, dtype=torch.bool)
            keep[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # a repeat
            keep &= ~sorted_isin(forbidden, chunk.unsqueeze(1) * num_items + ordered)  # sorted queries: cache-friendly
            if len(blocked):
                keep &= ~sorted_isin(blocked, ordered)
            valid = torch.empty_like(keep).scatter_(1, order, keep)
            rank = valid.cumsum(1)
            done = rank[:, -1] >= count
            r, c = torch.nonzero(valid & (rank <= count) & done.unsqueeze(1), as_tuple=True)
            out[chunk[r], rank[r, c] - 1] = items[r, c]
            counts[chunk[done]] = count
            still.append(chunk[~done])
        rows = torch.cat(still)
        if draws == cap:
            left.append(rows)
            break
        draws = min(cap, 2 * draws)  # the draws are a fixed sequence per user: more of it finds the same first ones
    return torch.cat(left) if left else rows


def _enumerate(rows: Tensor, users: Tensor, eligible: Tensor, forbidden: Tensor, blocked: Tensor, num_items: int,
               count: int, keys: list[int], out: Tensor, counts: Tensor) -> None:
    """Fill ``rows`` of ``out`` with their eligible items of the ``count`` smallest hashes (all of them if fewer)."""
    if not len(rows):
        return
    sizes = eligible[rows]
    bounds = torch.cumsum(sizes, 0)
    starts = [0]  # groups of rows with about _CELLS eligible items in all (at least one row each)
    while starts[-1] < len(rows):
        base = int(bounds[starts[-1] - 1]) if starts[-1] else 0
        starts.append(max(starts[-1] + 1, int(torch.searchsorted(bounds, base + _CELLS, right=True))))
    for a, b in zip(starts[:-1], starts[1:]):
        _enumerate_group(rows[a:b], users, sizes[a:b], forbidden, blocked, num_items, count, keys, out, counts)


def _enumerate_group(rows: Tensor, users: Tensor, sizes: Tensor, forbidden: Tensor, blocked: Tensor, num_items: int,
                     count: int, keys: list[int], out: Tensor, counts: Tensor) -> None:
    device = rows.device
    mine = forbidden[sorted_isin(rows, forbidden // num_items)]  # rows are sorted
    cells = torch.searchsorted(rows, mine // num_items) * num_items + mine % num_items
    cells = torch.unique(torch.cat([cells, (torch.arange(len(rows), device=device).unsqueeze(1) * num_items + blocked).flatten()]))
    # The r-th eligible item of a row is r + #{k : f_k - k <= r}, over the row's sorted forbidden items f_k.
    row_of = cells // num_items
    n_cells = torch.bincount(row_of, minlength=len(rows))
    first = torch.cumsum(n_cells, 0) - n_cells
    shifted = row_of * num_items + (cells % num_items) - (torch.arange(len(cells), device=device) - first[row_of])
    row = torch.repeat_interleave(torch.arange(len(rows), device=device), sizes)
    offsets = torch.cumsum(sizes, 0) - sizes
    r = torch.arange(len(row), device=device) - offsets[row]
    items = r + torch.searchsorted(shifted, row * num_items + r, right=True) - first[row]
    hashed = _hash62(keys, users[rows][row], items)
    order = torch.argsort(hashed, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by row, then by hash
    position = torch.arange(len(order), device=device) - offsets[row[order]]
    take = order[position < count]
    out[rows[row[take]], position[position < count]] = items[take]
    counts[rows] = sizes.clamp_max(count)
