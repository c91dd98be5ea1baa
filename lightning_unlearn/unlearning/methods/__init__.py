"""Unlearning methods: the :class:`Unlearner` contract, ``Retrain``, ``FineTune``, ``IFRU`` and ``AltEraser``."""

from lightning_unlearn.unlearning.methods.alteraser import AltEraser
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningError, UnlearningReport
from lightning_unlearn.unlearning.methods.finetune import FineTune
from lightning_unlearn.unlearning.methods.ifru import IFRU
from lightning_unlearn.unlearning.methods.retrain import Retrain

__all__ = ["IFRU", "AltEraser", "FineTune", "Retrain", "UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner"]
