"""The :class:`RecDataModule`: splits, fixed negatives and batches for the trainer."""

from __future__ import annotations

import hashlib
import json
import numbers
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_unlearn.data.batches import CurrentTrainRows, EpochBatchSampler, RankingBatches, TrainRows
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.negatives import sample_negatives
from lightning_unlearn.data.sources import DataSource
from lightning_unlearn.data.splits import k_core as k_core_filter
from lightning_unlearn.data.splits import leave_last_out, random_holdout
from lightning_unlearn.private_checkpoints import REMOVALS, keep_checkpoints_private

__all__ = ["DataFingerprintMismatch", "RecDataModule", "data_fingerprint", "removed_within", "source_fingerprint"]

_SPLITS = ("random", "leave_last_out", "given")
_VAL_FRACTION = 0.1  # what val_fraction=None carves when the source gives no validation split
_FINGERPRINT_TAG = b"lightning_unlearn/data/v1\x00"
_SOURCE_TAG = b"lightning_unlearn/data-source/v1\x00"
_STREAMS = {"val": 0, "test": 1}  # each split draws its own sampled candidates


class DataFingerprintMismatch(ValueError):
    """Saved datamodule state (a checkpoint's removals) was recorded on other data; nothing was changed."""


class RecDataModule(pl.LightningDataModule):
    """Train/validation/test interactions, with negatives fixed per positive row.

    The training objective is the finite sum over :attr:`train` rows, each row a positive
    ``(user, item)`` with ``num_negatives`` negatives fixed by ``seed`` (see
    :func:`~lightning_unlearn.data.negatives.sample_negatives`); batches are shuffled with a
    seed per epoch, so a fit is reproducible.

    Args:
        source: where the data comes from (a :class:`~lightning_unlearn.data.sources.DataSource`).
        split: ``"random"`` (per-user random holdout), ``"leave_last_out"`` (each user's latest
            row by timestamp), or ``"given"`` (the source's own train/test pair, and its own
            validation split when it has one, e.g. ``CSVSource(..., val_path=...)``).
        test_fraction: share of each user's rows held out for test (``split="random"``).
        val_fraction: share of each user's training rows carved out for validation (0 for none).
            ``None`` (the default) carves 0.1, or nothing when the source gives its own
            validation split, which is then the validation split as it is; setting it with such
            a source is an error, since the two would disagree about what to validate on.
        k_core: drop users and items with fewer rows, iteratively, before splitting.
        num_negatives: negatives per positive row.
        batch_size: training rows per batch.
        eval_batch_size: users per evaluation batch.
        eval_candidates: ``None`` (the default) ranks every item for every evaluated user (full
            ranking). An int ``N`` ranks each user's held-out items against ``N`` candidate items
            only: a sample without replacement of the items the user may be recommended in that
            split (not excluded, not a target, not deleted), all of them when it has fewer; fixed
            by ``seed`` and the split, so the same every epoch and for every batch size (see
            :func:`~lightning_unlearn.data.batches.sample_candidates`). Sampled metrics are not
            comparable with full-ranking ones, so they are logged as ``val/sampled/<metric>`` and
            ``test/sampled/<metric>``, with ``N`` as ``<split>/sampled/candidates`` (see
            ``docs/metrics.rst``). Not part of the data fingerprint: a model fitted with sampled
            validation may be tested with full ranking.
        seed: seeds the splits, the negatives, the shuffling and the sampled candidates.

    Raises:
        ValueError: on an unknown ``split``, a fraction outside ``[0, 1)``, a size below 1, an
            ``eval_candidates`` that is neither ``None`` nor an int >= 1, a source whose own test
            or validation split conflicts with ``split``, or (on loading) a ``val_fraction`` set
            with a source that gives its own validation split.

    Example:
        >>> from lightning_unlearn.data.sources import Synthetic
        >>> dm = RecDataModule(Synthetic(num_users=30, num_items=20), batch_size=16)
        >>> dm.num_users, dm.num_items
        (30, 20)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["negatives"].shape
        (['items', 'negatives', 'users'], torch.Size([16, 1]))

        Sampled evaluation: each test user's held-out items against 5 candidates.

        >>> sampled = RecDataModule(Synthetic(num_users=30, num_items=20), eval_candidates=5)
        >>> batch = next(iter(sampled.test_dataloader()))
        >>> batch["candidate_items"].shape[1], batch["num_candidates"].max().item()
        (5, 5)
    """

    def __init__(
        self,
        source: DataSource,
        split: Literal["random", "leave_last_out", "given"] = "random",
        test_fraction: float = 0.2,
        val_fraction: float | None = None,
        k_core: int = 0,
        num_negatives: int = 1,
        batch_size: int = 2048,
        eval_batch_size: int = 1024,
        eval_candidates: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if split not in _SPLITS:
            raise ValueError(f"RecDataModule(split=...) must be one of {_SPLITS}, got {split!r}.")
        for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"RecDataModule({name}=...) must be in [0, 1), got {value}.")
        for name, value, low in (("num_negatives", num_negatives, 1), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1), ("k_core", k_core, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"RecDataModule({name}=...) must be an integer >= {low}, got {value!r}.")
        if eval_candidates is not None and (
                isinstance(eval_candidates, bool) or not isinstance(eval_candidates, numbers.Integral) or eval_candidates < 1):
            raise ValueError(
                f"RecDataModule(eval_candidates=...) must be None (rank every item) or an int >= 1 (candidate items "
                f"per evaluated user), got {eval_candidates!r}."
            )
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.train: Interactions | None = None
        self.val: Interactions | None = None
        self.test: Interactions | None = None
        self.train_negatives: torch.Tensor | None = None
        self._removed = _Removed.empty()
        self._restored: dict | None = None
        self._fingerprint: str | None = None
        self._source: str | None = None  # of the data before its split: another split or seed of it has the same

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        keep_checkpoints_private(self.trainer)  # checkpoints holding removals (indices of deleted rows) are written 0600
        if self.train is not None:
            return
        hp = self.hparams
        name = type(self.source).__name__
        data, given_val, given_test = self.source.load_splits()
        if not len(data):
            raise ValueError(f"{name} gives no training interactions: the file is empty, or its rating threshold "
                             f"(threshold=...) drops every row.")
        if hp.split == "leave_last_out" and data.timestamps is None:
            raise ValueError(f"RecDataModule(split='leave_last_out') holds out each user's latest row, and {name} gives no "
                             f"timestamps: use split='random' (--data.split random), or a source with a timestamp column.")
        if (given_test is not None or given_val is not None) and hp.split != "given":
            own = "test" if given_test is not None else "validation"
            raise ValueError(f"{name} provides its own {own} split; use split='given' (got {hp.split!r}).")
        if hp.split == "given":
            if given_test is None:
                raise ValueError(f"split='given' needs a source with its own test split; {name} has none.")
            if hp.k_core:
                raise ValueError("k_core filtering would renumber a given train/test pair; set k_core=0 with split='given'.")
            if given_val is not None and hp.val_fraction is not None:
                raise ValueError(
                    f"{name} provides its own validation split, and RecDataModule(val_fraction={hp.val_fraction}) would "
                    f"carve another from the training rows: leave val_fraction unset (None) to validate on the given "
                    f"split, or give the source no validation file (e.g. CSVSource without val_path) to carve val_fraction."
                )
            train, test = data, given_test
        else:
            data = k_core_filter(data, hp.k_core) if hp.k_core else data
            if not len(data):
                raise ValueError(f"RecDataModule(k_core={hp.k_core}) leaves no interactions: no user and item of the data "
                                 f"has {hp.k_core} rows after the others are dropped. Use a smaller k_core.")
            train, test = random_holdout(data, hp.test_fraction, hp.seed) if hp.split == "random" else leave_last_out(data)
        val_fraction = _VAL_FRACTION if hp.val_fraction is None else hp.val_fraction
        if given_val is not None:
            val = given_val
        elif val_fraction > 0:
            train, val = random_holdout(train, val_fraction, hp.seed + 1)
        else:
            val = train.select(torch.zeros(len(train), dtype=torch.bool))
        negatives = sample_negatives(train.users, train.items, train, hp.num_negatives, hp.seed)
        fingerprint, self._source = data_fingerprint(train, val, test, negatives), source_fingerprint(train, val, test)
        if self._restored is not None:  # state loaded before the data: check it before taking anything
            self._check_fingerprint(self._restored, fingerprint)
        self.train, self.val, self.test, self.train_negatives = train, val, test, negatives
        self._fingerprint = fingerprint
        self._removed = _Removed.empty()
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self.load_state_dict(restored)

    @property
    def data_fingerprint(self) -> str:
        """SHA-256 of the data as loaded, before any removal: id maps, splits and fixed negatives.

        Saved with the removals in :meth:`state_dict`, so removals (and the model trained with
        them) are never applied to other data. See :func:`data_fingerprint`.
        """
        self.setup()
        return self._fingerprint

    # ------------------------------------------------------------------ deletions
    def train_rows(self) -> TrainRows:
        """The current training rows with their fixed negatives."""
        self.setup()
        return TrainRows(self.train.users, self.train.items, self.train_negatives)

    def remove(self, rows: torch.Tensor, users: torch.Tensor | None = None, items: torch.Tensor | None = None) -> TrainRows:
        """Remove training rows (and, for whole users/items, their rows in every split; a removed pair's copies too).

        The change is computed first and assigned at once, so a failure leaves the data as it
        was. Removed rows take their fixed negatives with them; every other row keeps its own.

        Args:
            rows: indices into :attr:`train` of the rows to remove.
            users: whole users to remove from every split (indices).
            items: whole items to remove from every split (indices).

        Returns:
            The removed training rows with their negatives.

        Raises:
            IndexError: if a row index is outside ``[0, len(train))`` (negative indices are
                refused), a boolean mask is not of the training split's length, or a user or
                item index is outside ``[0, num_users)`` / ``[0, num_items)``.
            TypeError: if ``rows`` is neither integer nor boolean, or ``users``/``items`` are not integers.
        """
        self.setup()
        rows = self.train.check_rows(rows)
        users = _indices(users, self.train.num_users, "users")
        items = _indices(items, self.train.num_items, "items")
        if rows.dtype == torch.bool:
            gone = rows.clone()
        else:
            gone = torch.zeros(len(self.train), dtype=torch.bool)
            gone[rows] = True
        gone |= _touches(self.train, users, items)
        removed = TrainRows(self.train.users[gone], self.train.items[gone], self.train_negatives[gone])
        keys = self.train.keys[gone]  # a pair the data holds twice may have a copy in another split: it goes too
        train = self.train.select(~gone)
        val, test = (t.select(~(_touches(t, users, items) | torch.isin(t.keys, keys))) for t in (self.val, self.test))
        record = self._removed.add(keys, users, items)
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
        """What was removed (as index keys, never raw ids) and the data's fingerprint, so a restored
        run removes it again from the same data; plain values and tensors (``weights_only`` loads it).
        ``source`` fingerprints the data before its split (:func:`source_fingerprint`): the deletion
        records tell another split of the same data, which holds what they deleted, from other data.

        With sampled evaluation it also holds ``eval_candidates``, so that a run restored with
        another number of candidates is warned that its metrics (under the same names) are not
        comparable with the saved ones.

        A Trainer's checkpoint that holds removals is written readable by its owner only (the
        Trainer that sets this datamodule up gets a :class:`~lightning_unlearn.private_checkpoints.PrivateCheckpointIO`)."""
        if self.train is None:
            return self._restored or {}
        sampled = {} if self.hparams.eval_candidates is None else {"eval_candidates": int(self.hparams.eval_candidates)}
        return {"fingerprint": self._fingerprint, "source": self._source, **self._removed.as_dict(), **sampled}

    def load_state_dict(self, state: dict) -> None:
        """Re-apply the removals recorded by :meth:`state_dict` to freshly loaded data.

        The model of the Trainer this datamodule is attached to gets the training graph without the removed
        rows (:meth:`~lightning_unlearn.models.base.Recommender.set_graph`): a Trainer restores this state
        after the model's ``setup`` built its graph from the data as loaded.

        Args:
            state: what :meth:`state_dict` returned (e.g. from a checkpoint).

        Raises:
            DataFingerprintMismatch: the state was recorded on other data (another file, split,
                seed or negatives); nothing was changed. Before :meth:`setup`, the check runs
                when the data is loaded.
        """
        if not state:
            return
        if self.train is None:
            self._restored = state
            return
        self._check_fingerprint(state, self._fingerprint)
        saved, mine = state.get("eval_candidates"), self.hparams.eval_candidates
        if saved is not None and mine is not None and int(saved) != int(mine):
            rank_zero_warn(
                f"The saved RecDataModule state was evaluated with eval_candidates={int(saved)}, this RecDataModule "
                f"with eval_candidates={mine}: the sampled metrics logged from now on (val/sampled/..., "
                f"test/sampled/...) have the names of the saved ones but are not comparable with them (a monitored "
                f"best score, early stopping). Use eval_candidates={int(saved)} to continue the same series."
            )
        keys = state["train_keys"]
        already = self._removed.train_keys
        keys = keys[~torch.isin(keys, already)]
        self.remove(torch.nonzero(torch.isin(self.train.keys, keys)).flatten(), state["users"], state["items"])
        # restored after the model's setup built its graph from the data as loaded
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if hasattr(model, "set_graph"):
            model.set_graph(self.train)

    def check_state_dict(self, state: dict | None) -> None:
        """Raise :class:`DataFingerprintMismatch` if ``state`` was recorded on other data (loads the data).

        Call it before changing anything else (e.g. the model's weights) that depends on the state.

        Example:
            >>> from lightning_unlearn.data.sources import Synthetic
            >>> dm = RecDataModule(Synthetic(seed=0))
            >>> other = RecDataModule(Synthetic(seed=1))
            >>> other.check_state_dict({"fingerprint": dm.data_fingerprint})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
              ...
            lightning_unlearn.data.datamodule.DataFingerprintMismatch: ...
        """
        if state:
            self._check_fingerprint(state, self.data_fingerprint)

    def _check_fingerprint(self, state: dict, mine: str) -> None:
        saved = state.get("fingerprint")
        if saved is None:
            rank_zero_warn(
                "The saved RecDataModule state has no data fingerprint (written by an older version of "
                "lightning_unlearn): its removals cannot be checked against the data loaded now."
            )
            return
        if saved != mine:
            hp = self.hparams
            settings = ", ".join(f"{k}={hp[k]!r}" for k in ("split", "test_fraction", "val_fraction", "k_core", "num_negatives", "seed"))
            raise DataFingerprintMismatch(
                f"The saved datamodule state (e.g. a checkpoint's) was recorded on other data: its data fingerprint is "
                f"{saved}, but this RecDataModule ({type(self.source).__name__}, {settings}) loads data with fingerprint "
                f"{mine}. Its removals are row keys of that data and would remove the wrong rows here, and a model "
                f"trained on it does not fit this data. Load it with the same data and datamodule settings it was saved "
                f"with (same source files, split, fractions, k_core, num_negatives and seed), or use a checkpoint "
                f"trained on this data."
            )

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

    def _ranking(self, split: Literal["val", "test"]) -> DataLoader:
        """Ranking batches of ``split`` that read the data as it is at every batch (deletions included)."""
        hp = self.hparams
        batches = RankingBatches(partial(getattr, self, split), partial(self._seen, split), hp.eval_batch_size,
                                 candidates=hp.eval_candidates, seed=hp.seed, stream=_STREAMS[split],
                                 blocked_items=self._removed_items)
        return DataLoader(batches, batch_size=None)

    def _seen(self, split: Literal["val", "test"]) -> list[Interactions]:
        """The tables whose items are excluded from ranking for ``split``: train (and val for test)."""
        return [self.train] if split == "val" else [self.train, self.val]

    def _removed_items(self) -> torch.Tensor:
        return self._removed.items

    @property
    def removed_keys(self) -> torch.Tensor:
        """Sorted keys ``user * num_items + item`` (indices) of the training rows removed so far."""
        return self._removed.train_keys

    def val_dataloader(self) -> DataLoader:
        """Ranking batches of the validation users (targets: validation rows; excluded: training rows).

        They read the splits at every batch, so users and items removed after the loader was
        made are no longer evaluated, nor ranked, nor candidates."""
        self.setup()
        return self._ranking("val")

    def test_dataloader(self) -> DataLoader:
        """Ranking batches of the test users (targets: test rows; excluded: training and validation rows)."""
        self.setup()
        return self._ranking("test")


def data_fingerprint(train: Interactions, val: Interactions, test: Interactions, negatives: torch.Tensor) -> str:
    """SHA-256 of a datamodule's data: the id maps, the rows of each split in order, and the negatives.

    Layout: ``b"lightning_unlearn/data/v1\\0"``; each id map as its kind (``b"i"`` for integers,
    then little-endian int64 values; ``b"s"`` for strings, then their UTF-8 JSON list), prefixed
    by its length; then for train, validation and test the keys ``user * num_items + item`` and
    then the negatives, each as a length and little-endian int64 values. Raw ids enter only the
    hash, which is what the checkpoint stores.

    Example:
        >>> t = Interactions.from_raw([1, 2], [5, 5])
        >>> len(data_fingerprint(t, t.select(torch.tensor([], dtype=torch.long)), t, torch.zeros(2, 1, dtype=torch.long)))
        64
    """
    h = _id_maps_hashed(_FINGERPRINT_TAG, train)
    for section in (train.keys, val.keys, test.keys, negatives.reshape(-1)):
        h.update(struct.pack("<q", section.numel()) + section.cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def source_fingerprint(train: Interactions, val: Interactions, test: Interactions) -> str:
    """SHA-256 of the data before it was split: the id maps and the sorted keys of every row, whatever split holds them.

    Another split or seed of the same data has the same one (it holds the same users, and the same users a record deleted);
    another file, or the same file without some users, has another.

    Example:
        >>> t = Interactions.from_raw([1, 2, 2], [5, 5, 6])
        >>> a, b = t.select(torch.tensor([0, 1])), t.select(torch.tensor([2]))
        >>> source_fingerprint(a, b, b.select(torch.tensor([], dtype=torch.long))) == source_fingerprint(b, a, a.select(torch.tensor([], dtype=torch.long)))
        True
    """
    h = _id_maps_hashed(_SOURCE_TAG, train)
    keys = torch.sort(torch.cat([train.keys, val.keys, test.keys])).values
    h.update(struct.pack("<q", keys.numel()) + keys.cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _id_maps_hashed(tag: bytes, data: Interactions) -> Any:
    """A SHA-256 started with ``tag`` and ``data``'s user and item id maps (their kind, length and values)."""
    h = hashlib.sha256(tag)
    for ids in (data.user_ids, data.item_ids):
        if ids.dtype.kind in "iu":
            h.update(b"i" + struct.pack("<q", len(ids)) + np.asarray(ids).astype("<i8").tobytes())
        else:
            text = json.dumps([str(v) for v in ids.tolist()], ensure_ascii=False).encode("utf-8", "surrogatepass")
            h.update(b"s" + struct.pack("<qq", len(ids), len(text)) + text)
    return h


def _indices(values: Any, size: int, what: str) -> torch.Tensor:
    """``users``/``items`` of :meth:`RecDataModule.remove` as long indices in ``[0, size)``, or an error."""
    if values is None:
        return torch.zeros(0, dtype=torch.long)
    values = torch.as_tensor(values)
    if values.numel() == 0:
        return values.reshape(-1).long()
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise TypeError(f"remove({what}=...) takes integer indices, got a {values.dtype} tensor.")
    values = values.reshape(-1).long()
    if int(values.min()) < 0 or int(values.max()) >= size:
        raise IndexError(f"remove({what}=...) indices must be in [0, {size}), got {values[(values < 0) | (values >= size)][:5].tolist()}.")
    return values


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


def removed_within(inner: dict[str, torch.Tensor], outer: dict[str, torch.Tensor]) -> bool:
    """Whether every removal of the state ``inner`` (training rows, whole users and items, as
    :meth:`RecDataModule.state_dict` gives them) is one of ``outer``'s.

    Example:
        >>> removed = lambda *users: {"train_keys": torch.tensor([], dtype=torch.long), "users": torch.tensor(users),
        ...                           "items": torch.tensor([], dtype=torch.long)}
        >>> removed_within(removed(5), removed(5, 6)), removed_within(removed(5, 6), removed(5))
        (True, False)
    """
    return all(bool(torch.isin(inner[name], outer[name]).all()) for name in REMOVALS)
