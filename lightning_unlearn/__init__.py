"""lightning_unlearn: recommendation unlearning as a PyTorch Lightning plug-in."""

from importlib.metadata import PackageNotFoundError, version

from lightning_unlearn.data import Interactions, RecDataModule
from lightning_unlearn.models import MF, LightGCN, NeuMF, Recommender

try:
    __version__ = version("lightning-unlearn")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["MF", "Interactions", "LightGCN", "NeuMF", "RecDataModule", "Recommender", "__version__"]
