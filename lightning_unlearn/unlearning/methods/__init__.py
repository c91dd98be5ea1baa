"""Unlearning methods: the :class:`Unlearner` contract, ``Retrain``, ``FineTune`` and ``IFRU``."""

from lightning_unlearn.unlearning.methods.base import UnlearningContext, UnlearningError, UnlearningReport, Unlearner
from lightning_unlearn.unlearning.methods.finetune import FineTune
from lightning_unlearn.unlearning.methods.ifru import IFRU
from lightning_unlearn.unlearning.methods.retrain import Retrain

__all__ = ["IFRU", "FineTune", "Retrain", "UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner"]
