"""The data repository: interactions, readers, splits, negatives and the datamodule."""

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.data.download import DataNotFoundError, data_root
from lightning_unlearn.data.interactions import CSR, Interactions
from lightning_unlearn.data.negatives import sample_negatives
from lightning_unlearn.data.readers import read_adjacency, read_csv, read_movielens_1m, read_movielens_100k
from lightning_unlearn.data.sources import (
    AdjacencyLists,
    CSVSource,
    DataSource,
    MovieLens1M,
    MovieLens100K,
    PowerLawCatalog,
    Synthetic,
)
from lightning_unlearn.data.splits import compact, k_core, leave_last_out, random_holdout
from lightning_unlearn.data.synthetic import planted_low_rank

__all__ = [
    "CSR", "AdjacencyLists", "CSVSource", "DataNotFoundError", "DataSource", "Interactions", "MovieLens1M",
    "MovieLens100K", "PowerLawCatalog", "RecDataModule", "Synthetic", "compact", "data_root", "k_core", "leave_last_out",
    "planted_low_rank", "random_holdout", "read_adjacency", "read_csv", "read_movielens_1m",
    "read_movielens_100k", "sample_negatives",
]
