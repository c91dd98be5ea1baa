"""Unlearning: deletion requests, methods, the callback, and the comparison harness."""

from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.journal import Journal
from lightning_unlearn.unlearning.methods import (
    IFRU,
    SCIF,
    AltEraser,
    FineTune,
    Retrain,
    Unlearner,
    UnlearningContext,
    UnlearningError,
    UnlearningReport,
)
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest, ResolvedDeletion

__all__ = [
    "IFRU", "AltEraser", "DeletionRequest", "DeletionSpec", "FineTune", "FitRecipe", "InvalidDeletionRequest", "Journal", "ResolvedDeletion",
    "Retrain", "SCIF", "UnlearningCallback", "UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner",
]
