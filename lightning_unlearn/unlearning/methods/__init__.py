"""Unlearning methods: the :class:`Unlearner` contract, ``Retrain``, ``FineTune``, ``IFRU``, ``AltEraser`` and ``SCIF``.

The kit for second-order methods (what IFRU and AltEraser are built from, and a new method
builds on): :class:`Scope`, :class:`RestrictedParameters`, :class:`CurvatureCache` and the base
class :class:`SecondOrderUnlearner`.
"""

from lightning_unlearn.unlearning.methods.alteraser import AltEraser
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningError, UnlearningReport
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache
from lightning_unlearn.unlearning.methods.finetune import FineTune
from lightning_unlearn.unlearning.methods.ifru import IFRU
from lightning_unlearn.unlearning.methods.restricted import RestrictedParameters
from lightning_unlearn.unlearning.methods.retrain import Retrain
from lightning_unlearn.unlearning.methods.scif import SCIF
from lightning_unlearn.unlearning.methods.scope import Scope
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner

__all__ = [
    "IFRU", "SCIF", "AltEraser", "CurvatureCache", "FineTune", "RestrictedParameters", "Retrain", "Scope", "SecondOrderUnlearner",
    "UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner",
]
