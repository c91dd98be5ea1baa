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

import math
import time
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import (
    BlockPreconditioner,
    conjugate_gradient,
    flatten,
    gauss_newton_matvec,
    hessian_matvec,
    unflatten,
)
from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import call_with
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import CachedCurvature, CurvatureBlocks
from lightning_unlearn.unlearning.methods.scope import (
    expand,
    graph_of,
    is_graph,
    orphans,
    reset_to_initialisation,
    restrict,
    rows_touching,
    touched,
)

__all__ = ["IFRU"]

_SOLVERS = ("auto", "cg", "block", "direct")
_CURVATURES = ("gauss_newton", "hessian")
_GRADIENTS = ("influence", "retained")


class IFRU(Unlearner):
    """Influence-function unlearning with importance-based pruning.

    Args:
        damping: added to the curvature's diagonal (> 0); larger is more conservative. The
            objective is a mean over rows, so a user's curvature block is of the order of its
            share of the rows (1e-4 for a typical MovieLens-100K user). Default 1e-7, chosen by
            a damping sweep.
        solver: ``"auto"`` (``"block"``, or ``"cg"`` for graph models, whose rows are coupled
            through the graph), ``"cg"`` (damped CG on curvature-vector products, block-Jacobi preconditioned),
            ``"block"`` (the block-diagonal approximation: per-user and per-item ``d x d``
            Gauss-Newton blocks, cached once per trained model and downdated by the deleted
            rows, solved in one batched Cholesky; the fastest; embeddings only) or ``"direct"``
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
        max_iter: CG iteration cap.
        direct_max: largest restricted problem the direct solver accepts.

    Measured speed and fidelity, and the damping sweep: :ref:`measured` (``docs/methods.rst``,
    section Measured).

    Raises:
        ValueError: on a non-positive or infinite damping, or an unknown option.

    Example:
        >>> IFRU(damping=1e-3).name
        'IFRU(k_hop=0)'
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
    ):
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"IFRU(damping=...) must be a finite number > 0, got {damping}: an undamped Newton step "
                             "over-corrects and an infinite one does nothing.")
        for name, value, allowed in (("solver", solver, _SOLVERS), ("curvature", curvature, _CURVATURES), ("gradient", gradient, _GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"IFRU({name}=...) must be one of {allowed}, got {value!r}.")
        if k_hop < 0 or not 0 < keep_fraction <= 1:
            raise ValueError(f"IFRU needs k_hop >= 0 and 0 < keep_fraction <= 1, got {k_hop}, {keep_fraction}.")
        self.damping, self.solver, self.curvature, self.gradient = damping, solver, curvature, gradient
        self.k_hop, self.keep_fraction, self.include_dense = k_hop, keep_fraction, include_dense
        self.tol, self.max_iter, self.direct_max = tol, max_iter, direct_max
        self._curvature = CachedCurvature()

    @property
    def name(self) -> str:
        options = [f"k_hop={self.k_hop}"] + ([f"solver={self.solver}"] if self.solver != "auto" else [])
        options += [f"gradient={self.gradient}"] if self.gradient != "influence" else []
        return f"IFRU({', '.join(options)})"

    def prepare(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None) -> float:
        """Build the curvature cache (and the block solver's factors) for ``model`` trained on ``rows``.

        Paid once per trained model (the callback and ``compare`` call it before the first
        request; :meth:`unlearn` does when they did not). Nothing to do, and 0 s, for a graph
        model, for ``solver="direct"`` (neither uses the cache) and when the cache holds
        ``model``'s parameters already.

        Args:
            model: the trained model.
            rows: every training row it was trained on.
            context: on several processes, each sums the curvature of its shard of the rows.

        Returns:
            The seconds it took.
        """
        if is_graph(model) or self.solver == "direct" or self._curvature.holds(model):
            return 0.0
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                nothing = rows.select(torch.zeros(len(rows), dtype=torch.bool, device=rows.users.device))
                self._curvature.retained(model, rows, nothing, context)
                if self.solver in ("auto", "block"):  # the block solver's requests start from these inverses
                    for side in ("users", "items"):
                        self._curvature.precondition(side, self.damping * len(rows))
        except Exception:
            self._curvature.clear()  # half built
            raise
        return time.perf_counter() - start

    # ------------------------------------------------------------------ the update
    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        try:
            return self._update(model, retained, deleted, context)
        except Exception:
            self._curvature.clear()  # a failed request is rolled back: the cache may hold its downdate
            raise

    def _update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        solver = ("cg" if is_graph(model) else "block") if self.solver == "auto" else self.solver
        if solver == "block" and is_graph(model):
            raise ValueError("solver='block' ignores the graph that couples LightGCN's rows; use solver='cg'")
        users, items = touched(deleted)
        users, items = self._prune(users, items, retained, deleted, model)
        users, items = expand(users, items, retained, self.k_hop)
        orphan_users = orphans(users, retained.users, model.num_users)
        orphan_items = orphans(items, retained.all_items(), model.num_items)
        users, items = users[~torch.isin(users, orphan_users)], items[~torch.isin(items, orphan_items)]

        restricted = _Restricted(model, users, items, self.include_dense)
        if solver == "block" or is_graph(model):
            rows = retained  # the block solver needs no rows here; a graph couples every row
        else:
            rows = restrict(retained, rows_touching(retained, users, items, model.num_users, model.num_items))
        n = max(len(retained), 1)
        diagnostics: dict[str, Any] = {
            "kept_users": len(users), "kept_items": len(items), "reset_users": len(orphan_users),
            "reset_items": len(orphan_items), "rows_used": len(rows), "coordinates": restricted.numel, "damping": self.damping,
            "solver": solver,
        }
        # Everything below is taken at the trained parameters; the orphans (users/items left
        # without rows) are reset only at the end, so the deleted rows' gradients and the cache's
        # downdate see the vectors they were trained with.
        if solver in ("block", "cg") and not is_graph(model):
            if not self._curvature.holds(model):  # unlearn() prepares first: only a direct call of update() gets here
                self.prepare(model, retained.concat(deleted), context)
            blocks, _ = self._curvature.retained(model, retained, deleted, context)
        if restricted.numel == 0:
            reset_to_initialisation(model, orphan_users, orphan_items, context.seed)
            self._curvature.adopt(model)  # orphans have no rows left: no cached block depends on them
            return diagnostics
        theta = restricted.values()
        if self.gradient == "influence" and is_graph(model):
            rhs = _influence_with_spillover(model, restricted, retained, deleted, n, context)
        elif self.gradient == "influence":
            rhs = context.sum(lambda shard: restricted.gradient(lambda: model.loss(shard[:], "sum") / n), deleted)
        else:
            data = context.sum(lambda shard: restricted.gradient(lambda: model.loss(shard[:], "sum") / n), rows)
            rhs = -(data + restricted.gradient(model.dense_penalty))
        if not torch.isfinite(rhs).all():
            raise FloatingPointError("the right-hand side (gradient) is not finite")
        if solver == "block":
            delta, solve = _block_step(restricted, rhs, self._curvature, users, items, n, self.damping, self.tol)
        elif solver == "direct":
            delta, solve = _direct_solve(self._matvec(model, restricted, rows, n, theta, context), rhs, self.damping, self.direct_max)
        else:
            preconditioner = None if is_graph(model) else restricted.block_preconditioner(blocks, users, items, n, self.damping)
            matvec = self._matvec(model, restricted, rows, n, theta, context)
            delta, result = conjugate_gradient(matvec, rhs, damping=self.damping, tol=self.tol, max_iter=self.max_iter,
                                               preconditioner=preconditioner)
            solve = result.as_dict()
        diagnostics["step_norm"] = float(torch.linalg.vector_norm(delta))
        diagnostics["parameter_norm"] = float(torch.linalg.vector_norm(flatten(theta)))
        restricted.add_(delta)
        reset_to_initialisation(model, orphan_users, orphan_items, context.seed)
        self._curvature.adopt(model)  # the step is small: later requests reuse these blocks as they are
        return {**diagnostics, **{f"solver/{k}": v for k, v in solve.items()}}


    def _prune(self, users: Tensor, items: Tensor, retained: TrainRows, deleted: TrainRows, model: Recommender) -> tuple[Tensor, Tensor]:
        if self.keep_fraction >= 1.0:
            return users, items
        kept = []
        for ids, deleted_ids, retained_ids, size in (
            (users, deleted.users, retained.users, model.num_users),
            (items, deleted.items, retained.items, model.num_items),
        ):
            removed = torch.bincount(deleted_ids, minlength=size).double()
            degree = removed + torch.bincount(retained_ids, minlength=size).double()
            importance = (removed / degree.clamp_min(1))[ids]
            count = max(1, round(self.keep_fraction * len(ids)))
            kept.append(ids[torch.argsort(importance, descending=True, stable=True)[:count]].sort().values)
        return kept[0], kept[1]

    def _matvec(self, model: Recommender, restricted: _Restricted, rows: TrainRows, n: int, theta: list[Tensor],
                context: UnlearningContext):
        """Curvature-vector products of the restricted objective: this rank's rows, summed over ranks."""
        batch = context.shard(rows)[:]
        if "dense" in restricted.groups:  # the dense weights' own penalty, counted once (not per rank)
            dense = hessian_matvec(lambda ps: restricted.call(ps, model.dense_penalty), theta)
        else:
            dense = torch.zeros_like
        if self.curvature == "hessian":
            data = hessian_matvec(lambda ps: restricted.call(ps, lambda: model.loss(batch, "sum") / n), theta)
        else:
            outputs = lambda ps: restricted.call(ps, lambda: model.row_scores(batch))  # noqa: E731
            gauss_newton = gauss_newton_matvec(outputs, lambda z: data_loss(z, model.loss_name).sum() / n, theta, mode="reverse")
            penalty = hessian_matvec(lambda ps: restricted.call(ps, lambda: _penalty(model, batch) / n), theta)
            data = lambda v: gauss_newton(v) + penalty(v)  # noqa: E731
        return lambda v: context.reduce(data(v)) + dense(v)


# ---------------------------------------------------------------------- which rows move


def _influence_with_spillover(model: Recommender, restricted: _Restricted, retained: TrainRows, deleted: TrainRows, n: int,
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
    old = context.sum(lambda rows: restricted.gradient(lambda: model.loss(rows[:], "sum") / n, {"adjacency": old_graph}),
                      deleted.concat(affected))
    new = context.sum(lambda rows: restricted.gradient(lambda: model.loss(rows[:], "sum") / n), affected)
    return old - new


# ---------------------------------------------------------------------- restricted parameters
class _Restricted:
    """The kept embedding rows (and optionally the dense weights) as one flat parameter vector."""

    def __init__(self, model: Recommender, users: Tensor, items: Tensor, include_dense: bool):
        self.model = model
        names = {id(p): name for name, p in model.named_parameters()}
        groups = model.parameter_groups()
        device = next(model.parameters()).device
        self.parts: list[tuple[str, Tensor, Tensor | None]] = []  # (name, full tensor, rows or None for whole)
        self.groups: list[str] = []
        for group, ids in (("user_embedding", users), ("item_embedding", items), ("dense", None)):
            if group == "dense" and not include_dense or ids is not None and not len(ids):
                continue
            for p in groups[group]:
                if p.requires_grad:  # frozen parameters are neither trained nor unlearned
                    self.parts.append((names[id(p)], p, None if ids is None else ids.to(device)))
                    self.groups.append(group)
        self.shapes = [p.shape if rows is None else (len(rows), *p.shape[1:]) for _, p, rows in self.parts]
        self.numel = sum(int(torch.Size(s).numel()) for s in self.shapes)

    def values(self) -> list[Tensor]:
        return [(p if rows is None else p[rows]).detach() for _, p, rows in self.parts]

    def call(self, values, closure, buffers: dict[str, Tensor] | None = None):
        """``closure()`` evaluated with the kept rows replaced by ``values`` (differentiable in them)
        and, optionally, some buffers replaced (e.g. LightGCN's ``adjacency``)."""
        replaced = {name: (v if rows is None else p.detach().index_copy(0, rows, v)) for (name, p, rows), v in zip(self.parts, values)}
        return call_with(self.model, {**replaced, **(buffers or {})}, closure)

    def gradient(self, closure, buffers: dict[str, Tensor] | None = None) -> Tensor:
        leaves = [v.clone().requires_grad_(True) for v in self.values()]
        with torch.enable_grad():
            value = self.call(leaves, closure, buffers)
            if not value.requires_grad:  # e.g. MF's dense penalty: a constant
                return flatten([torch.zeros_like(v) for v in leaves])
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return flatten([torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)])

    def group_layout(self, group: str) -> list[int] | None:
        """Widths of the trainable tables of ``group`` (e.g. NeuMF's GMF and MLP user tables), in part order."""
        widths = [p.shape[1] for g, (_, p, rows) in zip(self.groups, self.parts) if g == group]
        return widths or None

    def block_preconditioner(self, blocks: CurvatureBlocks, users: Tensor, items: Tensor, n: int, damping: float):
        """Block-Jacobi ``M^-1`` in this layout, when each embedding group is one table (else ``None``)."""
        if any(len(self.group_layout(g) or []) > 1 for g in ("user_embedding", "item_embedding")):
            return None
        chosen = []
        for group, ids, table in (("user_embedding", users, blocks.users), ("item_embedding", items, blocks.items)):
            if self.group_layout(group):
                chosen.append(table[ids.to(table.device)] / n)
        if not chosen or {c.shape[-1] for c in chosen} != {chosen[0].shape[-1]}:
            return None
        dense = sum(int(torch.Size(s).numel()) for g, s in zip(self.groups, self.shapes) if g == "dense")
        preconditioner = BlockPreconditioner(torch.cat(chosen), damping, num_other=dense)
        return lambda v: preconditioner(v.to(torch.float64)).to(v.dtype)

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        for (_, p, rows), step in zip(self.parts, unflatten(delta.to(self.parts[0][1].dtype), self.shapes)):
            if rows is None:
                p.add_(step)
            else:
                p.index_add_(0, rows, step)


# ---------------------------------------------------------------------- pieces of the loss
def _penalty(model: Recommender, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * model.l2 * model.embedding_penalty(batch["users"], item_slots(batch)).sum()


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


def _block_step(restricted: _Restricted, rhs: Tensor, cache: CachedCurvature, users: Tensor, items: Tensor, n: int,
                damping: float, tol: float) -> tuple[Tensor, dict[str, Any]]:
    """Solve the block-diagonal system for the kept user and item vectors; dense weights do not move."""
    parts = unflatten(rhs, restricted.shapes)
    steps = [torch.zeros_like(p) for p in parts]
    report = {"num_blocks": 0, "refactored_blocks": 0, "cg_iterations": 0, "damped_blocks": 0, "failed_blocks": 0, "max_damping": 0.0}
    for group, ids, side in (("user_embedding", users, "users"), ("item_embedding", items, "items")):
        index = [i for i, g in enumerate(restricted.groups) if g == group]
        if not index:
            continue
        rhs_group = torch.cat([parts[i].double() for i in index], dim=1)
        if rhs_group.shape[1] != getattr(cache.blocks, side).shape[-1]:
            raise ValueError("solver='block' needs every embedding table of a group trainable (or every one frozen).")
        # (B / n + damping I) x = g  <=>  (B + n damping I) x = n g: no scaled copy of the blocks
        # (the damping in the block diagnostics is therefore n times the method's damping)
        x, result, refactored, iterations = cache.solve(side, ids.to(rhs.device), rhs_group * n, damping * n, tol)
        for i, piece in zip(index, x.split([parts[i].shape[1] for i in index], dim=1)):
            steps[i] = piece.to(parts[i].dtype)
        for key, value in (("num_blocks", len(ids)), ("refactored_blocks", refactored), ("damped_blocks", result.damped_blocks),
                           ("failed_blocks", result.failed_blocks)):
            report[key] += value
        report["cg_iterations"] = max(report["cg_iterations"], iterations)
        report["max_damping"] = max(report["max_damping"], result.max_damping)
    return flatten(steps), report
