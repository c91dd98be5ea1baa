"""Data sources a :class:`~lightning_unlearn.data.RecDataModule` can load (one class each, for the CLI)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Mapping

from lightning_unlearn.data.download import find_file
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.readers import read_adjacency, read_csv, read_movielens_1m, read_movielens_100k
from lightning_unlearn.data.splits import compact
from lightning_unlearn.data.synthetic import planted_low_rank

__all__ = ["AdjacencyLists", "CSVSource", "DataSource", "MovieLens100K", "MovieLens1M", "Synthetic"]

Loaded = tuple[Interactions, "Interactions | None"]


class DataSource(ABC):
    """Where interactions come from. ``load()`` returns ``(interactions, given_test_or_None)``."""

    def prepare(self) -> None:
        """Fetch files if needed (called once, on rank zero)."""

    @abstractmethod
    def load(self) -> Loaded:
        """Read the data."""


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

    Args:
        path: the file, relative to the data root (or absolute).
        columns: field -> column name or position.
        sep: field separator.
        header: whether the first line names the columns.
        threshold: rating threshold for implicit positives.
        root: the data root.
    """

    def __init__(
        self,
        path: str,
        columns: Mapping[str, str | int] | None = None,
        sep: str = ",",
        header: bool = True,
        threshold: float | None = None,
        root: str | None = None,
    ):
        self.path, self.columns, self.sep, self.header, self.threshold, self.root = path, columns, sep, header, threshold, root

    def load(self) -> Loaded:
        return read_csv(find_file(self.path, self.root), self.columns, self.sep, self.header, self.threshold), None


class Synthetic(DataSource):
    """Planted low-rank data from :func:`~lightning_unlearn.data.synthetic.planted_low_rank`."""

    def __init__(self, num_users: int = 60, num_items: int = 40, rank: int = 3, density: float = 0.2, seed: int = 0):
        self.kwargs = dict(num_users=num_users, num_items=num_items, rank=rank, density=density, seed=seed)

    def load(self) -> Loaded:
        return planted_low_rank(**self.kwargs), None


