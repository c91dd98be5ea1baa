"""SCIF: selective and collaborative influence function (Li et al., arXiv 2304.10199).

An influence-function step on a *selected* part of the model only: the embedding rows of the
users and items the deletion touches and of their *collaborative* neighbours (``k_hop`` hops
through retained interactions), with the coupled curvature of the retained objective on those
rows:

    delta = (H_S + damping I)^-1 g_S,    g = 1/n' * sum_{r in deleted} grad loss_r

``H_S`` keeps the user-item cross terms between the selected rows, so a neighbour that no
deleted row touches still moves, through the rows it shares with the touched ones (this is the
collaboration the method preserves; a block-diagonal curvature would leave it still). The
system is solved by conjugate gradient on curvature-vector products over the retained rows that
involve the selection, preconditioned by the per-user and per-item blocks the curvature cache
holds. Orphans (left without retained rows) are reset to a retrain's initialisation.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import conjugate_gradient
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache
from lightning_unlearn.unlearning.methods.restricted import RestrictedParameters
from lightning_unlearn.unlearning.methods.scope import Scope, is_graph
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner

__all__ = ["SCIF"]


class SCIF(SecondOrderUnlearner):
    """Influence-function unlearning on the touched users and items and their collaborative neighbours.

    Args:
        damping: added to the curvature's diagonal (> 0), as in :class:`~lightning_unlearn.unlearning.methods.ifru.IFRU`.
        k_hop: hops of collaborative neighbours added to the touched rows (``>= 0``; 1 in the paper's spirit).
        curvature: ``"gauss_newton"`` (positive semi-definite, the default) or ``"hessian"``.
        tol: relative residual at which CG stops.
        max_iter: CG iteration cap.
        include_dense: also update dense weights (NeuMF's MLP).

    Raises:
        ValueError: on a damping that is not a finite number > 0, or another option out of range.

    Example:
        >>> SCIF().name, SCIF(max_iter=10).name  # every option that differs from its default is named
        ('SCIF(k_hop=1)', 'SCIF(k_hop=1, max_iter=10)')
        >>> SCIF(k_hop=-1)
        Traceback (most recent call last):
        ...
        ValueError: SCIF(k_hop=...) must be an integer >= 0, got -1.
    """

    hint = "more damping (e.g. 10x), or more max_iter if CG did not converge"

    def __init__(self, damping: float = 1e-7, k_hop: int = 1, curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
                 tol: float = 1e-6, max_iter: int = 100, include_dense: bool = True):
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"SCIF(damping=...) must be a finite number > 0, got {damping!r}.")
        for name, value, low in (("k_hop", k_hop, 0), ("max_iter", max_iter, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SCIF({name}=...) must be an integer >= {low}, got {value!r}.")
        if curvature not in ("gauss_newton", "hessian"):
            raise ValueError(f"SCIF(curvature=...) must be one of ('gauss_newton', 'hessian'), got {curvature!r}.")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"SCIF(tol=...) must be a number in (0, 1), got {tol!r}.")
        super().__init__()
        self.damping, self.k_hop, self.curvature, self.tol, self.max_iter, self.include_dense = damping, k_hop, curvature, tol, max_iter, include_dense

    @property
    def name(self) -> str:
        defaults = inspect.signature(SCIF.__init__).parameters
        options = [f"{key}={getattr(self, key)!r}" for key in ("damping", "curvature", "tol", "max_iter", "include_dense")
                   if getattr(self, key) != defaults[key].default]
        return f"SCIF({', '.join([f'k_hop={self.k_hop}', *options])})"

    def step(self, model: Recommender, retained: TrainRows, deleted: TrainRows, cache: CurvatureCache | None,
             context: UnlearningContext) -> dict[str, Any]:
        """One preconditioned-CG influence step on the selection (see the module docstring)."""
        scope = Scope.of(model, retained, deleted, hops=self.k_hop)
        restricted = RestrictedParameters(model, scope, self.include_dense)
        rows = retained if is_graph(model) else scope.rows(retained, model)  # a graph couples every row
        n = max(len(retained), 1)
        diagnostics: dict[str, Any] = {**scope.diagnostics(), "rows_used": len(rows), "coordinates": restricted.numel, "damping": self.damping}
        if restricted.numel:  # the gradient is taken at the trained parameters, before the orphans are reset
            rhs = restricted.loss_gradient(deleted, n, context)
            if not torch.isfinite(rhs).all():
                raise FloatingPointError("the right-hand side (gradient) is not finite")
            preconditioner = None if cache is None else restricted.preconditioner(cache, n, self.damping)
            delta, result = conjugate_gradient(restricted.curvature_matvec(rows, n, context, self.curvature), rhs, damping=self.damping,
                                               tol=self.tol, max_iter=self.max_iter, preconditioner=preconditioner)
            restricted.step(delta)
            diagnostics.update({"step_norm": float(torch.linalg.vector_norm(delta)), **{f"solver/{k}": v for k, v in result.as_dict().items()}})
        scope.reset_orphans(model, context.seed)
        return diagnostics
