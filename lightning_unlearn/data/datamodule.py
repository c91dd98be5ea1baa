"""The :class:`RecDataModule`: splits, fixed negatives and batches for the trainer."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_unlearn.data.batches import CurrentTrainRows, EpochBatchSampler, RankingBatches, TrainRows
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.negatives import sample_negatives
from lightning_unlearn.data.sources import DataSource
from lightning_unlearn.data.splits import k_core as k_core_filter
from lightning_unlearn.data.splits import leave_last_out, random_holdout

__all__ = ["RecDataModule"]

_SPLITS = ("random", "leave_last_out", "given")


class RecDataModule(pl.LightningDataModule):
    """Train/validation/test interactions, with negatives fixed per positive row.

    The training objective is the finite sum over :attr:`train` rows, each row a positive
    ``(user, item)`` with ``num_negatives`` negatives fixed by ``seed`` (see
    :func:`~lightning_unlearn.data.negatives.sample_negatives`); batches are shuffled with a
    seed per epoch, so a fit is reproducible.

    Args:
        source: where the data comes from (a :class:`~lightning_unlearn.data.sources.DataSource`).
        split: ``"random"`` (per-user random holdout), ``"leave_last_out"`` (each user's latest
            row by timestamp), or ``"given"`` (the source's own train/test pair).
        test_fraction: share of each user's rows held out for test (``split="random"``).
        val_fraction: share of each user's training rows carved out for validation (0 for none).
        k_core: drop users and items with fewer rows, iteratively, before splitting.
        num_negatives: negatives per positive row.
        batch_size: training rows per batch.
        eval_batch_size: users per full-ranking evaluation batch.
        seed: seeds the splits, the negatives and the shuffling.

    Raises:
        ValueError: on an unknown ``split``, a fraction outside ``[0, 1)``, a size below 1, or a
            source whose own test split conflicts with ``split``.

    Example:
        >>> from lightning_unlearn.data.sources import Synthetic
        >>> dm = RecDataModule(Synthetic(num_users=30, num_items=20), batch_size=16)
        >>> dm.num_users, dm.num_items
        (30, 20)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["negatives"].shape
        (['items', 'negatives', 'users'], torch.Size([16, 1]))
    """

    def __init__(
        self,
        source: DataSource,
        split: Literal["random", "leave_last_out", "given"] = "random",
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        k_core: int = 0,
        num_negatives: int = 1,
        batch_size: int = 2048,
        eval_batch_size: int = 1024,
        seed: int = 0,
    ):
        super().__init__()
        if split not in _SPLITS:
            raise ValueError(f"RecDataModule(split=...) must be one of {_SPLITS}, got {split!r}.")
        for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"RecDataModule({name}=...) must be in [0, 1), got {value}.")
        for name, value in (("num_negatives", num_negatives), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"RecDataModule({name}=...) must be >= 1, got {value}.")
        if k_core < 0:
            raise ValueError(f"RecDataModule(k_core=...) must be >= 0, got {k_core}.")
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.train: Interactions | None = None
        self.val: Interactions | None = None
        self.test: Interactions | None = None
        self.train_negatives: torch.Tensor | None = None
        self._removed = _Removed.empty()
        self._restored: dict | None = None

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        hp = self.hparams
        data, given_test = self.source.load()
        if given_test is not None and hp.split != "given":
            raise ValueError(f"{type(self.source).__name__} provides its own test split; use split='given' (got {hp.split!r}).")
        if hp.split == "given":
            if given_test is None:
                raise ValueError(f"split='given' needs a source with its own test split; {type(self.source).__name__} has none.")
            if hp.k_core:
                raise ValueError("k_core filtering would renumber a given train/test pair; set k_core=0 with split='given'.")
            train, test = data, given_test
        else:
            data = k_core_filter(data, hp.k_core) if hp.k_core else data
            train, test = random_holdout(data, hp.test_fraction, hp.seed) if hp.split == "random" else leave_last_out(data)
        if hp.val_fraction > 0:
            train, val = random_holdout(train, hp.val_fraction, hp.seed + 1)
        else:
            val = train.select(torch.zeros(len(train), dtype=torch.bool))
        self.train, self.val, self.test = train, val, test
        self.train_negatives = sample_negatives(train.users, train.items, train, hp.num_negatives, hp.seed)
        self._removed = _Removed.empty()
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self.load_state_dict(restored)

    # ------------------------------------------------------------------ deletions
    def train_rows(self) -> TrainRows:
        """The current training rows with their fixed negatives."""
        self.setup()
        return TrainRows(self.train.users, self.train.items, self.train_negatives)

    def remove(self, rows: torch.Tensor, users: torch.Tensor | None = None, items: torch.Tensor | None = None) -> TrainRows:
        """Remove training rows (and, for whole users/items, their rows in every split).

        The change is computed first and assigned at once, so a failure leaves the data as it
        was. Removed rows take their fixed negatives with them; every other row keeps its own.

        Args:
            rows: indices into :attr:`train` of the rows to remove.
            users: whole users to remove from every split (indices).
            items: whole items to remove from every split (indices).

        Returns:
            The removed training rows with their negatives.

        Raises:
            IndexError: if a row index is outside the training split.
        """
        self.setup()
        empty = torch.zeros(0, dtype=torch.long)
        users = empty if users is None else users.long()
        items = empty if items is None else items.long()
        rows = rows.long()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self.train)):
            raise IndexError(f"row indices must be in [0, {len(self.train)}) of the training split.")
        gone = torch.zeros(len(self.train), dtype=torch.bool)
        gone[rows] = True
        gone |= _touches(self.train, users, items)
        removed = TrainRows(self.train.users[gone], self.train.items[gone], self.train_negatives[gone])
        train, val, test = self.train.select(~gone), *(t.select(~_touches(t, users, items)) for t in (self.val, self.test))
        record = self._removed.add(self.train.keys[gone], users, items)
        self.train, self.val, self.test = train, val, test
        self.train_negatives = self.train_negatives[~gone]
        self._removed = record
        return removed

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo every :meth:`remove` made inside the block if the block raises.

        Example:
            >>> from lightning_unlearn.data.sources import Synthetic
            >>> dm = RecDataModule(Synthetic())
            >>> dm.setup()
            >>> before = len(dm.train)
            >>> try:
            ...     with dm.transaction():
            ...         _ = dm.remove(torch.tensor([0]))
            ...         raise RuntimeError("method failed")
            ... except RuntimeError:
            ...     pass
            >>> len(dm.train) == before
            True
        """
        self.setup()
        saved = (self.train, self.val, self.test, self.train_negatives, self._removed)
        try:
            yield
        except BaseException:
            self.train, self.val, self.test, self.train_negatives, self._removed = saved
            raise

    def state_dict(self) -> dict:
        """What was removed (as index keys, never raw ids), so a restored run removes it again."""
        return self._removed.as_dict() if self.train is not None else (self._restored or {})

    def load_state_dict(self, state: dict) -> None:
        """Re-apply the removals recorded by :meth:`state_dict` to freshly loaded data."""
        if not state:
            return
        if self.train is None:
            self._restored = state
            return
        keys = state["train_keys"]
        already = self._removed.train_keys
        keys = keys[~torch.isin(keys, already)]
        self.remove(torch.nonzero(torch.isin(self.train.keys, keys)).flatten(), state["users"], state["items"])

    @property
    def num_users(self) -> int:
        """Number of users (loads the data on first use, for ``link_arguments``)."""
        self.setup()
        return self.train.num_users

    @property
    def num_items(self) -> int:
        """Number of items (loads the data on first use, for ``link_arguments``)."""
        self.setup()
        return self.train.num_items

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self.setup()
        rows = CurrentTrainRows(self.train_rows)
        sampler = EpochBatchSampler(rows, self.hparams.batch_size, self.hparams.seed)
        return DataLoader(rows, sampler=sampler, batch_size=None)

    def _ranking(self, targets: Interactions, exclude: list[Interactions]) -> DataLoader:
        return DataLoader(RankingBatches(targets, exclude, self.hparams.eval_batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._ranking(self.val, [self.train])

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._ranking(self.test, [self.train, self.val])


def _touches(table: Interactions, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` whose user is in ``users`` or whose item is in ``items``."""
    return torch.isin(table.users, users) | torch.isin(table.items, items)


@dataclass(frozen=True)
class _Removed:
    """Everything removed so far: keys ``user * num_items + item`` of training rows, whole users and items."""

    train_keys: torch.Tensor
    users: torch.Tensor
    items: torch.Tensor

    @classmethod
    def empty(cls) -> _Removed:
        return cls(*(torch.zeros(0, dtype=torch.long) for _ in range(3)))

    def add(self, keys: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> _Removed:
        cat = lambda a, b: torch.unique(torch.cat([a, b]))  # noqa: E731
        return _Removed(cat(self.train_keys, keys), cat(self.users, users), cat(self.items, items))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"train_keys": self.train_keys, "users": self.users, "items": self.items}
