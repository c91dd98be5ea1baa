"""Recommenders: the :class:`Recommender` contract and MF, LightGCN, NeuMF."""

from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.lightgcn import LightGCN, normalized_adjacency
from lightning_unlearn.models.mf import MF
from lightning_unlearn.models.neumf import NeuMF

__all__ = ["MF", "LightGCN", "NeuMF", "Recommender", "normalized_adjacency"]
