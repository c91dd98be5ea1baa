"""IFRU: influence-function recommendation unlearning (Zhang et al., arXiv 2307.02147).

One damped Newton correction restricted to the embedding rows the deletion touches:

    delta = (H_S + damping I)^-1 g_S,    g = 1/n' * sum_{r in deleted} grad loss_r   ("influence")
                                         g = -grad L_retained                       ("retained")

where ``H_S`` is the curvature (Gauss-Newton by default) of the retained objective
``L' = 1/n' sum_{r in retained} loss_r + dense_penalty`` restricted to the kept rows ``S``
and computed only on the retained rows that touch them. Users (items) left without any
retained row are reset to the initialisation a retrain from the original's seed gives them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import conjugate_gradient, flatten
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache, FreshCurvature, keep_inverses
from lightning_unlearn.unlearning.methods.restricted import RestrictedParameters
from lightning_unlearn.unlearning.methods.scope import Scope, graph_of, is_graph
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner

__all__ = ["IFRU"]

_SOLVERS = ("auto", "cg", "block", "direct")
_CURVATURES = ("gauss_newton", "hessian")
_GRADIENTS = ("influence", "retained")
_TUNING = ("damping", "keep_fraction", "include_dense", "tol", "max_iter")  # named when not the default


class IFRU(SecondOrderUnlearner):
    """Influence-function unlearning with importance-based pruning.

    Args:
        damping: added to the curvature's diagonal (> 0); larger is more conservative. The
            objective is a mean over rows, so a user's curvature block is of the order of its
            share of the rows (1e-4 for a typical MovieLens-100K user). Default 1e-7, chosen by
            a damping sweep.
        solver: ``"auto"`` (``"block"``), ``"block"`` (the block-diagonal approximation: per-user and
            per-item ``d x d`` Gauss-Newton blocks, cached once per trained model and downdated by
            the deleted rows, solved in one batched Cholesky; the fastest; embeddings only. On a
            graph model, whose rows are coupled through the propagation: conjugate gradient on
            exact curvature-vector products through the propagation, over the rows that touch
            the scope, preconditioned by the base rows' blocks taken through the propagation),
            ``"cg"`` (damped CG on curvature-vector products, block-Jacobi preconditioned; on a
            graph model over every row and unpreconditioned, to measure against) or ``"direct"``
            (dense solve; only for small restricted problems, at most ``direct_max`` coordinates).
        curvature: ``"gauss_newton"`` (positive semi-definite, the default) or ``"hessian"``
            (exact; CG stops on negative curvature and reports it).
        gradient: ``"influence"`` (the paper: gradient of the deleted rows) or ``"retained"``
            (a Newton step on the retained objective; also corrects a model stopped early).
        k_hop: also update the neighbours (through retained interactions) of the touched rows,
            this many hops out.
        keep_fraction: keep only this share of the touched users/items, the most important
            first (importance = deleted rows / degree); 1.0 keeps all.
        include_dense: also update dense weights (NeuMF's MLP).
        tol: relative-residual tolerance of CG (and of the block solver's per-block CG, which
            starts from the inverses kept at the last factorisation).
        max_iter: CG iteration cap (on a graph model: the most curvature-vector products).
        direct_max: largest restricted problem the direct solver accepts.
        blocks: where the block solver's (and CG's preconditioner's) per-user and per-item blocks
            come from: ``"cached"`` (every block, built once per trained model and downdated per
            request; fastest per request, memory ``(users + items) x d^2``), ``"fresh"``
            (computed per request for the scope only, from the rows that touch it: no
            precomputation, memory and time that follow the deletion, not the catalog) or
            ``"auto"`` (a cache within ``cache_budget_gb``: every block while they fit, else
            those of the users and items with the most rows, the others computed when needed).
        cache_budget_gb: the most the cache of ``blocks="auto"`` holds, in GiB.

    Measured speed and fidelity, and the damping sweep: :ref:`measured` (``docs/methods.rst``,
    section Measured).

    Raises:
        ValueError: on a non-positive or infinite damping, or an unknown option.

    Example:
        >>> IFRU(damping=1e-3).name  # every option that differs from its default is named
        'IFRU(k_hop=0, damping=0.001)'
    """

    hint = "more damping (e.g. 10x), or gradient='influence' if the model was not trained to a stationary point"
    safe_deleted_fraction = 0.03  # measured over streams of requests: docs/methods.rst, the retrain policy

    def __init__(
        self,
        damping: float = 1e-7,
        solver: Literal["auto", "cg", "block", "direct"] = "auto",
        curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
        gradient: Literal["influence", "retained"] = "influence",
        k_hop: int = 0,
        keep_fraction: float = 1.0,
        include_dense: bool = True,
        tol: float = 1e-6,
        max_iter: int = 100,
        direct_max: int = 4096,
        blocks: Literal["auto", "cached", "fresh"] = "auto",
        cache_budget_gb: float = 4.0,
    ):
        if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"IFRU(damping=...) must be a finite number > 0, got {damping!r}: an undamped Newton step "
                             "over-corrects and an infinite one does nothing.")
        for name, value, low in (("k_hop", k_hop, 0), ("max_iter", max_iter, 1), ("direct_max", direct_max, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"IFRU({name}=...) must be an integer >= {low}, got {value!r}.")
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0 < tol < 1):
            raise ValueError(f"IFRU(tol=...) must be a number in (0, 1), got {tol!r}: the solve stops at this relative residual.")
        if not isinstance(include_dense, bool):
            raise ValueError(f"IFRU(include_dense=...) must be True or False, got {include_dense!r}.")
        for name, value, allowed in (("solver", solver, _SOLVERS), ("curvature", curvature, _CURVATURES), ("gradient", gradient, _GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"IFRU({name}=...) must be one of {allowed}, got {value!r}.")
        if not (isinstance(keep_fraction, (int, float)) and 0 < keep_fraction <= 1):
            raise ValueError(f"IFRU(keep_fraction=...) must be a number in (0, 1], got {keep_fraction!r}.")
        self.damping, self.solver, self.curvature, self.gradient = damping, solver, curvature, gradient
        self.k_hop, self.keep_fraction, self.include_dense = k_hop, keep_fraction, include_dense
        self.tol, self.max_iter, self.direct_max = tol, max_iter, direct_max
        super().__init__(blocks, cache_budget_gb)

    @property
    def name(self) -> str:
        options = [f"k_hop={self.k_hop}"] + ([f"solver={self.solver}"] if self.solver != "auto" else [])
        options += [f"curvature={self.curvature}"] if self.curvature != "gauss_newton" else []
        options += [f"gradient={self.gradient}"] if self.gradient != "influence" else []
        options += [f"blocks={self.blocks}"] if self.blocks != "auto" else []
        options += [f"cache_budget_gb={self.cache_budget_gb:g}"] if self.cache_budget_gb != 4.0 else []
        defaults = inspect.signature(IFRU.__init__).parameters
        options += [f"{key}={getattr(self, key)!r}" for key in _TUNING if getattr(self, key) != defaults[key].default]
        return f"IFRU({', '.join(options)})"

    def uses_cache(self, model: Recommender) -> bool:
        """The block and CG solvers read the cached blocks (CG, and the graph solve, as its preconditioner).

        ``"direct"`` does not, nor ``"cg"`` on a graph model (unpreconditioned, to measure against).
        On a graph model the blocks are those of the propagated vectors at the trained model, used
        as a preconditioner only: as the graph and the model change they go stale, which costs
        iterations, never accuracy.
        """
        return self.solver != "direct" and not (is_graph(model) and self.solver == "cg") and self.keeps_cache(model)

    def after_build(self, model: Recommender, rows: TrainRows) -> None:
        """The inverses of every damped block, computed here once: the block solver's requests start from them.

        On a graph model they are those of the base rows' blocks, the preconditioner of its solve.
        """
        if self.solver in ("auto", "block"):
            keep_inverses(self.cache, model, self.damping * len(rows))

    def step(self, model: Recommender, retained: TrainRows, deleted: TrainRows, cache: CurvatureCache | None,
             context: UnlearningContext) -> dict[str, Any]:
        """One damped Newton correction on the scope's rows (see the class docstring)."""
        solver, graph = "block" if self.solver == "auto" else self.solver, is_graph(model)
        counts = None if cache is None else {side: cache.occurrences(side) for side in ("users", "items")}
        scope = Scope.of(model, retained, deleted, hops=self.k_hop, keep_fraction=self.keep_fraction, counts=counts)
        restricted = RestrictedParameters(model, scope, self.include_dense)
        # The block solver on MF/NeuMF needs no rows here; on a graph model it takes the rows that
        # touch the scope, as CG and "direct" do on MF/NeuMF. On a graph model those two take every row.
        whole_graph = graph and solver != "block"
        rows = retained if whole_graph or (solver == "block" and not graph) else scope.rows(retained, model)
        n = max(len(retained), 1)
        diagnostics: dict[str, Any] = {**scope.diagnostics(), "rows_used": len(rows), "coordinates": restricted.numel,
                                       "damping": self.damping, "solver": solver, "blocks": "fresh" if cache is None else "cached"}
        # Everything below is taken at the trained parameters; the orphans (users/items left
        # without rows) are reset only at the end, so the deleted rows' gradients see the
        # vectors they were trained with. No cached block depends on an orphan (no rows left).
        if restricted.numel == 0:
            scope.reset_orphans(model, context.seed)
            return diagnostics
        if self.gradient == "influence" and graph:
            rhs = _influence_with_spillover(model, restricted, retained, deleted, n, context)
        elif self.gradient == "influence":
            rhs = restricted.loss_gradient(deleted, n, context)
        else:
            rhs = -(restricted.loss_gradient(rows, n, context) + restricted.gradient(model.dense_penalty))
        if not torch.isfinite(rhs).all():
            raise FloatingPointError("the right-hand side (gradient) is not finite")
        # graph models: the preconditioner's blocks (none for "cg", every row through the whole graph)
        curvature = cache if cache is not None else None if graph and solver == "cg" else FreshCurvature(model, retained, context)
        if solver == "block" and not graph:
            delta, solve = restricted.block_solve(rhs, curvature, n, self.damping, self.tol)
        elif solver == "direct":
            delta, solve = _direct_solve(restricted.curvature_matvec(rows, n, context, self.curvature), rhs, self.damping, self.direct_max)
        else:
            preconditioner = None if curvature is None else restricted.preconditioner(curvature, n, self.damping)
            # CG's vectors in float64 (the products in the model's dtype): in float32 its recursion
            # drifts from the true residual near 1e-6, the default tol
            matvec = restricted.curvature_matvec(rows, n, context, self.curvature)
            delta, result = conjugate_gradient(lambda v: matvec(v.to(rhs.dtype)).double(), rhs.double(), damping=self.damping,
                                               tol=self.tol, max_iter=self.max_iter, preconditioner=preconditioner)
            solve = result.as_dict()
        diagnostics["step_norm"] = float(torch.linalg.vector_norm(delta))
        diagnostics["parameter_norm"] = float(torch.linalg.vector_norm(flatten(restricted.values())))
        restricted.step(delta)
        scope.reset_orphans(model, context.seed)
        return {**diagnostics, **{f"solver/{k}": v for k, v in solve.items()}}


# ---------------------------------------------------------------------- the spillover through the graph


def _influence_with_spillover(model: Recommender, restricted: RestrictedParameters, retained: TrainRows, deleted: TrainRows, n: int,
                              context: UnlearningContext) -> Tensor:
    """Direct influence of the deleted rows plus the spillover through the graph (the paper's eq. for graph models).

    Deleting edges renormalises the graph, which changes the loss of rows that remain. With the
    old graph ``A`` and the new one ``A'``, the right-hand side is the gradient of
    ``[sum_{deleted} loss(A) + sum_{affected} (loss(A) - loss(A'))] / n`` where the affected rows
    are the retained rows of users and items whose degree changed.
    """
    old_graph = graph_of(model, retained.concat(deleted))
    changed_users, changed_items = torch.unique(deleted.users), torch.unique(deleted.items)
    affected = retained.select(torch.isin(retained.users, changed_users) | torch.isin(retained.items, changed_items))
    old = restricted.loss_gradient(deleted.concat(affected), n, context, {"adjacency": old_graph})
    return old - restricted.loss_gradient(affected, n, context)


def _direct_solve(matvec, rhs: Tensor, damping: float, limit: int) -> tuple[Tensor, dict[str, Any]]:
    if len(rhs) > limit:
        raise ValueError(f"the restricted problem has {len(rhs)} coordinates, more than direct_max={limit}; use solver='cg'.")
    eye = torch.eye(len(rhs), dtype=rhs.dtype, device=rhs.device)
    matrix = torch.stack([matvec(column) for column in eye], dim=1)
    matrix = 0.5 * (matrix + matrix.T) + damping * eye
    delta = torch.linalg.solve(matrix, rhs)
    residual = torch.linalg.vector_norm(matrix @ delta - rhs) / torch.linalg.vector_norm(rhs).clamp_min(1e-30)
    converged = bool(residual <= math.sqrt(torch.finfo(rhs.dtype).eps))
    return delta, {"iterations": 1, "relative_residual": float(residual), "converged": converged}
