"""Data sources a :class:`~lightning_unlearn.data.RecDataModule` can load (one class each, for the CLI)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from lightning_unlearn.data.download import find_file
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.readers import read_adjacency, read_csv, read_header, read_movielens_1m, read_movielens_100k
from lightning_unlearn.data.splits import compact
from lightning_unlearn.data.synthetic import planted_low_rank, power_law_catalog

__all__ = ["AdjacencyLists", "CSVSource", "DataSource", "MovieLens100K", "MovieLens1M", "PowerLawCatalog", "Synthetic"]

Loaded = tuple[Interactions, "Interactions | None"]
Splits = tuple[Interactions, "Interactions | None", "Interactions | None"]


class DataSource(ABC):
    """Where interactions come from. ``load()`` returns ``(interactions, given_test_or_None)``.

    A source whose files include a validation split too overrides :meth:`load_splits`, which is
    what :class:`~lightning_unlearn.data.datamodule.RecDataModule` reads.
    """

    def prepare(self) -> None:
        """Fetch files if needed (called once, on rank zero)."""

    @abstractmethod
    def load(self) -> Loaded:
        """Read the data."""

    def load_splits(self) -> Splits:
        """``(interactions, given_val_or_None, given_test_or_None)``, all with one id map.

        By default :meth:`load` with no given validation split.
        """
        data, test = self.load()
        return data, None, test


class _MovieLens(DataSource):
    archive: str
    relative: str
    _read: Callable[[Path], Interactions]

    def __init__(self, root: str | os.PathLike | None = None, min_rating: float | None = None, download: bool = False):
        """Args:
        root: the data root (else ``$LIGHTNING_UNLEARN_DATA``, else a cache directory).
        min_rating: keep only ratings at least this large (implicit positives); ``None`` keeps all.
        download: download the archive (checksum-verified) when the file is missing.
        """
        self.root, self.min_rating, self.download = root, min_rating, download

    def prepare(self) -> None:
        find_file(self.relative, self.root, self.archive, self.download)

    def load(self) -> Loaded:
        data = self._read(find_file(self.relative, self.root, self.archive, self.download))
        return (data if self.min_rating is None else compact(data.binarize(self.min_rating))), None


class MovieLens100K(_MovieLens):
    """MovieLens-100K from ``<root>/ml-100k/u.data``."""

    archive, relative = "ml-100k", "ml-100k/u.data"
    _read = staticmethod(read_movielens_100k)


class MovieLens1M(_MovieLens):
    """MovieLens-1M from ``<root>/ml-1m/ratings.dat``."""

    archive, relative = "ml-1m", "ml-1m/ratings.dat"
    _read = staticmethod(read_movielens_1m)


class AdjacencyLists(DataSource):
    """A given train/test pair of ``user item item ...`` files (LightGCN-family format).

    Args:
        train_file: path of the training lists, relative to the data root (or absolute).
        test_file: path of the test lists, or ``None``.
        root: the data root.
    """

    def __init__(self, train_file: str = "ml-1m/train.txt", test_file: str | None = "ml-1m/test.txt", root: str | None = None):
        self.train_file, self.test_file, self.root = train_file, test_file, root

    def load(self) -> Loaded:
        train = find_file(self.train_file, self.root)
        test = None if self.test_file is None else find_file(self.test_file, self.root)
        return read_adjacency(train, test)


class CSVSource(DataSource):
    """Any CSV/TSV of interactions; see :func:`~lightning_unlearn.data.readers.read_csv`.

    One file is split by the datamodule (``split="random"`` or ``"leave_last_out"``). With
    ``test_path`` the files are a given train/test pair (use ``split="given"``), and with
    ``val_path`` too a given train/validation/test triple, whose validation file
    :class:`~lightning_unlearn.data.datamodule.RecDataModule` validates on instead of carving
    ``val_fraction`` from the training rows. Each file is read with the same ``columns``,
    ``sep``, ``header`` and ``threshold``, and all share one id map (an id only in the test or
    validation file gets its own index too), as if the files were one. A bad line is refused
    with its file and line number.

    Args:
        path: the file (the training file when ``test_path`` is given), relative to the data
            root (or absolute).
        columns: field -> column name or position.
        sep: field separator.
        header: whether the first line names the columns (of every file).
        threshold: rating threshold for implicit positives (applied to every file).
        root: the data root.
        test_path: a given test file (keyword only).
        val_path: a given validation file (keyword only; needs ``test_path``). Read with the
            same id map by :meth:`load_splits`, which ``RecDataModule(split="given")`` uses as
            its validation split (leave its ``val_fraction`` unset); :meth:`load`, which
            returns only ``(train, test)``, refuses it rather than drop the file.

    Raises:
        ValueError: ``val_path`` without ``test_path``.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "train.csv"), "w").write("user,item\\nu1,a\\nu2,b\\n")
        >>> _ = open(os.path.join(d, "test.csv"), "w").write("user,item\\nu1,c\\n")
        >>> CSVSource("train.csv", root=d, test_path="test.csv").load()
        (Interactions(rows=2, users=2, items=3), Interactions(rows=1, users=2, items=3))

        A given validation file too, as the datamodule's validation split:

        >>> from lightning_unlearn.data import RecDataModule
        >>> _ = open(os.path.join(d, "val.csv"), "w").write("user,item\\nu2,c\\n")
        >>> dm = RecDataModule(CSVSource("train.csv", root=d, test_path="test.csv", val_path="val.csv"), split="given")
        >>> dm.setup()
        >>> dm.val, dm.val.user_ids[dm.val.users.numpy()].tolist(), dm.val.item_ids[dm.val.items.numpy()].tolist()
        (Interactions(rows=1, users=2, items=3), ['u2'], ['c'])
    """

    def __init__(
        self,
        path: str,
        columns: Mapping[str, str | int] | None = None,
        sep: str = ",",
        header: bool = True,
        threshold: float | None = None,
        root: str | None = None,
        *,
        test_path: str | None = None,
        val_path: str | None = None,
    ):
        if val_path is not None and test_path is None:
            raise ValueError("CSVSource(val_path=...) needs test_path too: a given validation file comes with a given test file.")
        self.path, self.columns, self.sep, self.header, self.threshold, self.root = path, columns, sep, header, threshold, root
        self.test_path, self.val_path = test_path, val_path

    def load(self) -> Loaded:
        if self.val_path is not None:
            raise ValueError(
                f"CSVSource(val_path={self.val_path!r}).load() returns only (train, test) and would drop the "
                "validation file; read the three files with CSVSource.load_splits() (as RecDataModule does)."
            )
        train, _, test = self.load_splits()
        return train, test

    def load_splits(self) -> Splits:
        """``(train, val, test)`` with one shared id map; ``val``/``test`` are ``None`` when not given.

        Raises:
            ValueError: a file has a bad line or lacks a column (names the file and line), or
                (with ``header``) its header differs from the training file's.
            FileNotFoundError: a file is missing (a
                :class:`~lightning_unlearn.data.download.DataNotFoundError` naming the path).
        """
        paths = [None if p is None else find_file(p, self.root) for p in (self.path, self.val_path, self.test_path)]
        by_position = self.columns is None or all(isinstance(c, int) for c in self.columns.values())
        if self.header and by_position:  # a column found by its position must mean the same in every file
            first = read_header(paths[0], self.sep)
            for path in paths[1:]:
                if path is not None and read_header(path, self.sep) != first:
                    raise ValueError(f"{path}: its header {read_header(path, self.sep)} differs from the training file "
                                     f"{paths[0]}'s {first}; the files of one data set need the same columns in the same order.")
        tables = [None if p is None else read_csv(p, self.columns, self.sep, self.header, self.threshold) for p in paths]
        given = [t for t in tables if t is not None]
        shared = iter(_shared_ids(given) if len(given) > 1 else given)
        return tuple(None if t is None else next(shared) for t in tables)  # type: ignore[return-value]


def _shared_ids(tables: list[Interactions]) -> list[Interactions]:
    """The tables again, with one id map over all of them (as if their files were one)."""
    def raw(ids: np.ndarray, index: torch.Tensor) -> np.ndarray:
        return ids[index.numpy()]

    def column(parts: list[np.ndarray]) -> np.ndarray:
        if len({p.dtype.kind for p in parts}) > 1:  # integer ids in one file, strings in another: all strings
            parts = [p.astype(str) for p in parts]
        return np.concatenate(parts)

    users = column([raw(t.user_ids, t.users) for t in tables])
    items = column([raw(t.item_ids, t.items) for t in tables])
    ratings = None if any(t.ratings is None for t in tables) else torch.cat([t.ratings for t in tables]).numpy()
    stamps = None if any(t.timestamps is None for t in tables) else torch.cat([t.timestamps for t in tables]).numpy()
    both = Interactions.from_raw(users, items, ratings, stamps)
    part = torch.repeat_interleave(torch.arange(len(tables)), torch.tensor([len(t) for t in tables]))
    return [both.select(part == n) for n in range(len(tables))]


class Synthetic(DataSource):
    """Planted low-rank data from :func:`~lightning_unlearn.data.synthetic.planted_low_rank`."""

    def __init__(self, num_users: int = 60, num_items: int = 40, rank: int = 3, density: float = 0.2, seed: int = 0):
        self.kwargs = dict(num_users=num_users, num_items=num_items, rank=rank, density=density, seed=seed)

    def load(self) -> Loaded:
        return planted_low_rank(**self.kwargs), None


class PowerLawCatalog(DataSource):
    """A large catalog with power-law popularity, from :func:`~lightning_unlearn.data.synthetic.power_law_catalog`.

    For scale: the shape of a real catalog (a few items and users hold most rows) without a
    download. Its items are drawn regardless of the user, so a model learns popularity only.
    Items never drawn are left out, so fewer than ``num_items`` remain (the flatter the
    ``exponent``, the more).

    Args:
        num_users: number of users.
        num_items: number of items.
        num_interactions: pairs drawn (duplicates are dropped).
        exponent: the item popularity's power-law exponent.
        seed: the same seed gives the same data.

    Example:
        >>> data, test = PowerLawCatalog(num_users=20, num_items=100, num_interactions=200).load()
        >>> data.num_users, data.num_items <= 100, len(data) <= 200, test
        (20, True, True, None)
    """

    def __init__(self, num_users: int = 10_000, num_items: int = 100_000, num_interactions: int = 1_000_000,
                 exponent: float = 1.0, seed: int = 0):
        self.kwargs = dict(num_users=num_users, num_items=num_items, num_interactions=num_interactions, exponent=exponent, seed=seed)

    def load(self) -> Loaded:
        return power_law_catalog(**self.kwargs), None
