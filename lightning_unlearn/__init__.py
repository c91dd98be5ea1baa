"""lightning_unlearn: recommendation unlearning as a PyTorch Lightning plug-in."""

import os
import sys
from importlib.metadata import PackageNotFoundError, version

if "torch" not in sys.modules:
    # Large CPU tensors on transparent huge pages: a request's block temporaries (hundreds of
    # MB, freed and allocated again) page-fault 512 times less. torch reads the variable once,
    # at its first allocation, so only a process that imports this package before torch gets
    # it; THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off (docs/install.rst).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lightning_unlearn.data import Interactions, RecDataModule
from lightning_unlearn.models import MF, LightGCN, NeuMF, Recommender

try:
    __version__ = version("lightning-unlearn")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["MF", "Interactions", "LightGCN", "NeuMF", "RecDataModule", "Recommender", "__version__"]
