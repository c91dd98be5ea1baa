"""Batches for the trainer: shuffled training rows and full-ranking evaluation chunks."""

from __future__ import annotations

from typing import Callable, Sized

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lightning_unlearn.data.interactions import Interactions

__all__ = ["CurrentTrainRows", "EpochBatchSampler", "RankingBatches", "TrainRows"]


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


class RankingBatches(Dataset):
    """Chunks of users for full-ranking evaluation.

    Each item is a dict with ``users`` (B,), and the coordinates ``(row in batch, item)`` of
    the ``target`` items and of the items to ``exclude`` from ranking (seen in training).

    Args:
        targets: the held-out rows; only users that have some are evaluated.
        exclude: tables whose items are masked for their users (e.g. train, or train + val).
        batch_size: users per chunk.
    """

    def __init__(self, targets: Interactions, exclude: list[Interactions], batch_size: int):
        self.targets, self.exclude = targets, exclude
        users = torch.nonzero(targets.by_user.lengths() > 0).flatten()
        self.chunks = users.split(batch_size) if len(users) else ()

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        users = self.chunks[k]
        t_rows, t_pos = self.targets.by_user.gather(users)
        parts = [(table.by_user.gather(users), table.by_user.cols) for table in self.exclude]
        return {
            "users": users,
            "target_rows": t_rows,
            "target_items": self.targets.by_user.cols[t_pos],
            "exclude_rows": torch.cat([seg for (seg, _), _ in parts]),
            "exclude_items": torch.cat([cols[pos] for (_, pos), cols in parts]),
        }
