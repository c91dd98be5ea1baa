"""Unlearning methods: the :class:`Unlearner` contract, ``Retrain`` and ``FineTune``."""

from lightning_unlearn.unlearning.methods.base import UnlearningContext, UnlearningError, UnlearningReport, Unlearner
from lightning_unlearn.unlearning.methods.finetune import FineTune
from lightning_unlearn.unlearning.methods.retrain import Retrain

__all__ = ["FineTune", "Retrain", "UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner"]
