"""Restricted parameters: the embedding rows of a scope (and optionally the dense weights) as one flat vector.

A second-order step solves ``(H_S + damping I) delta = g_S`` over the coordinates ``S`` a
deletion's :class:`~lightning_unlearn.unlearning.methods.scope.Scope` moves.
:class:`RestrictedParameters` gives what such a step needs on those coordinates only: the
gradient of any closure (:meth:`~RestrictedParameters.gradient`), the curvature-vector
products of the retained objective (:meth:`~RestrictedParameters.curvature_matvec`), a
block-Jacobi preconditioner and the block-diagonal solve from the per-user and per-item blocks
of a :class:`~lightning_unlearn.unlearning.methods.curvature.CurvatureCache` or of a
:class:`~lightning_unlearn.unlearning.methods.curvature.FreshCurvature`, and the step itself
(:meth:`~RestrictedParameters.step`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import BlockPreconditioner, flatten, gauss_newton_matvec, hessian_matvec, symmetric_matvec, unflatten
from lightning_unlearn.losses import data_loss, data_loss_curvature, item_slots
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import call_with
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache, FreshCurvature, base_row_blocks, self_weights
from lightning_unlearn.unlearning.methods.scope import Scope, is_graph
from lightning_unlearn.unlearning.methods.subproblems import Engine, Side

__all__ = ["RestrictedParameters"]

_CHUNK = 65536  # rows per pass of the dot-product paths


class RestrictedParameters:
    """The scope's embedding rows (and optionally the dense weights) of a model, as one flat parameter vector.

    Frozen tables are left out (they are neither trained nor unlearned). The flat layout is the
    trainable user tables' rows of ``scope.users``, then the item tables' rows of
    ``scope.items``, then the dense weights.

    Args:
        model: the recommender (changed only by :meth:`step`).
        scope: the users and items to move.
        include_dense: also restrict to the dense weights (NeuMF's MLP), whole.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(3, 4, embedding_dim=2)
        >>> scope = Scope(torch.tensor([1]), torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
        >>> restricted = RestrictedParameters(model, scope)
        >>> restricted.numel, restricted.groups
        (6, ['user_embedding', 'item_embedding'])
        >>> restricted.step(torch.ones(6))
        >>> bool((model.user_embedding.weight[0] == model.user_embedding.weight[0]).all())
        True
    """

    def __init__(self, model: Recommender, scope: Scope, include_dense: bool = True):
        self.model, self.scope = model, scope
        names = {id(p): name for name, p in model.named_parameters()}
        groups = model.parameter_groups()
        device = next(model.parameters()).device
        self.parts: list[tuple[str, Tensor, Tensor | None]] = []  # (name, full tensor, rows or None for whole)
        self.groups: list[str] = []
        for group, ids in (("user_embedding", scope.users), ("item_embedding", scope.items), ("dense", None)):
            if group == "dense" and not include_dense or ids is not None and not len(ids):
                continue
            for p in groups[group]:
                if p.requires_grad:
                    self.parts.append((names[id(p)], p, None if ids is None else ids.to(device)))
                    self.groups.append(group)
        self.shapes = [p.shape if rows is None else (len(rows), *p.shape[1:]) for _, p, rows in self.parts]
        self.numel = sum(int(torch.Size(s).numel()) for s in self.shapes)

    def values(self) -> list[Tensor]:
        """The current values of the restricted parameters, one tensor per part (detached)."""
        return [(p if rows is None else p[rows]).detach() for _, p, rows in self.parts]

    def call(self, values: list[Tensor], closure: Callable[[], Tensor], buffers: dict[str, Tensor] | None = None) -> Tensor:
        """``closure()`` with the restricted parameters replaced by ``values`` (differentiable in them).

        ``buffers`` replaces buffers too (e.g. LightGCN's ``adjacency``: the graph before a deletion).
        """
        replaced = {name: (v if rows is None else p.detach().index_copy(0, rows, v)) for (name, p, rows), v in zip(self.parts, values)}
        return call_with(self.model, {**replaced, **(buffers or {})}, closure)

    def gradient(self, closure: Callable[[], Tensor], buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The flat gradient of the scalar ``closure()`` w.r.t. the restricted parameters (zeros where it does not depend on them)."""
        leaves = [v.clone().requires_grad_(True) for v in self.values()]
        with torch.enable_grad():
            value = self.call(leaves, closure, buffers)
            if not value.requires_grad:  # e.g. MF's dense penalty: a constant
                return flatten([torch.zeros_like(v) for v in leaves])
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return flatten([torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)])

    def loss_gradient(self, rows: TrainRows, n: int, context: UnlearningContext, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The gradient of ``sum_{rows} loss_r / n``: each process's shard, summed over processes.

        ``buffers`` replaces buffers, as in :meth:`call`. Dot-product models (MF, LightGCN) take
        :meth:`Engine.gradients` (a matrix product per chunk of users on a small catalog, pulled
        back through the propagation once); others differentiate ``model.loss``.
        """
        engine = self._dot_engine(rows, n, context)
        if engine is None:
            return context.sum(lambda shard: self.gradient(lambda: self.model.loss(shard[:], "sum") / n, buffers), rows)
        sides = [Side(self.model, group) for group in self.groups]
        compute = lambda: engine.gradients(sides, [ids for _, _, ids in self.parts], engine.local)[0]  # noqa: E731
        grads = call_with(self.model, buffers, compute) if buffers else compute()
        return flatten([g.to(p.dtype) / n for g, (_, p, _) in zip(grads, self.parts)])

    def _dot_engine(self, rows: TrainRows, n: int, context: UnlearningContext) -> Engine | None:
        """An :class:`Engine` on ``rows`` when the scores are dot products and each group is one table without dense weights."""
        if not self.parts or "dense" in self.groups or len(set(self.groups)) != len(self.groups):
            return None
        engine = Engine(self.model, rows, n, context, _CHUNK, graph=is_graph(self.model))
        return engine if engine.dot else None

    def curvature_matvec(self, rows: TrainRows, n: int, context: UnlearningContext,
                         curvature: Literal["gauss_newton", "hessian"] = "gauss_newton") -> Callable[[Tensor], Tensor]:
        """``v -> H v``, ``H`` the curvature of ``sum_{rows} loss_r / n + dense_penalty`` on these coordinates.

        Args:
            rows: the rows of the objective (this process takes its shard; products are summed over processes).
            n: the divisor of the data term (the number of retained rows).
            context: sharding and reduce.
            curvature: ``"gauss_newton"`` (positive semi-definite; the L2 term exactly) or ``"hessian"``.
        """
        model, theta = self.model, self.values()
        engine = self._dot_engine(rows, n, context)
        if engine is not None:
            return _DotProductCurvature(self, engine, n, exact=curvature == "hessian")
        batch = context.shard(rows)[:]
        if "dense" in self.groups:  # the dense weights' own penalty, counted once (not per rank)
            dense = hessian_matvec(lambda ps: self.call(ps, model.dense_penalty), theta)
        else:
            dense = torch.zeros_like
        if curvature == "hessian":
            data = hessian_matvec(lambda ps: self.call(ps, lambda: model.loss(batch, "sum") / n), theta)
        else:
            outputs = lambda ps: self.call(ps, lambda: model.row_scores(batch))  # noqa: E731
            gauss_newton = gauss_newton_matvec(outputs, lambda z: data_loss(z, model.loss_name).sum() / n, theta, mode="reverse")
            penalty = hessian_matvec(lambda ps: self.call(ps, lambda: _penalty(model, batch) / n), theta)
            data = lambda v: gauss_newton(v) + penalty(v)  # noqa: E731
        return lambda v: context.reduce(data(v)) + dense(v)

    def group_layout(self, group: str) -> list[int] | None:
        """Widths of the trainable tables of ``group`` (e.g. NeuMF's GMF and MLP user tables), in part order."""
        widths = [p.shape[1] for g, (_, p, rows) in zip(self.groups, self.parts) if g == group]
        return widths or None

    def preconditioner(self, curvature: CurvatureCache | FreshCurvature, n: int, damping: float) -> Callable[[Tensor], Tensor] | None:
        """Block-Jacobi ``M^-1`` of ``B / n + damping I`` in this layout (identity on the dense weights).

        ``B`` are the per-user and per-item blocks of ``curvature``. On a graph model, whose
        blocks are those of the propagated vectors, they are the base rows' blocks made from them
        (:func:`~lightning_unlearn.unlearning.methods.curvature.base_row_blocks`, with the L2
        counts ``curvature`` keeps of its rows, the retained rows), and the inverses a cache kept for the trained
        model (:meth:`~lightning_unlearn.unlearning.methods.curvature.CurvatureCache.precondition`)
        are used where it has them: a preconditioner need not follow the deletion. ``None``
        when a group spans several tables or the sides' widths differ.
        """
        if any(len(self.group_layout(g) or []) > 1 for g in ("user_embedding", "item_embedding")):
            return None
        sides = [(ids, side, self.group_layout(group)[0]) for group, ids, side in
                 (("user_embedding", self.scope.users, "users"), ("item_embedding", self.scope.items, "items")) if self.group_layout(group)]
        if not sides or len({width for _, _, width in sides}) > 1:
            return None
        if is_graph(self.model):
            weights = self_weights(self.model)
            inverses = torch.cat([self._base_row_inverses(curvature, side, ids, width, n, damping, weights) for ids, side, width in sides])
            return lambda v: symmetric_matvec(inverses, v.view(len(inverses), -1).to(inverses.dtype)).reshape(-1).to(v.dtype)
        dense = sum(int(torch.Size(s).numel()) for g, s in zip(self.groups, self.shapes) if g == "dense")
        preconditioner = BlockPreconditioner(torch.cat([curvature.block(side, ids) / n for ids, side, _ in sides]), damping, num_other=dense)
        return lambda v: preconditioner(v.to(torch.float64)).to(v.dtype)

    def _base_row_inverses(self, curvature: CurvatureCache | FreshCurvature, side: str, ids: Tensor, width: int, n: int, damping: float,
                           weights: Tensor) -> Tensor:
        """A graph model's float32 ``(B' / n + damping I)^-1`` for ``ids``, ``B'`` their base rows' blocks: kept where the cache has them."""
        out = torch.empty(len(ids), width, width, dtype=torch.float32, device=ids.device)
        have = torch.zeros_like(ids, dtype=torch.bool)
        if isinstance(curvature, CurvatureCache):
            kept, have = curvature.kept_inverses(side, ids)
            out[have] = kept * n  # (B' + n damping I)^-1, kept (keep_inverses) at the trained model's n
        missing = ids[~have]
        if len(missing):
            blocks = base_row_blocks(self.model, side, missing, curvature.block(side, missing), curvature.occurrences(side)[missing], weights)
            out[~have] = BlockPreconditioner(blocks / n, damping).inverses.to(out.dtype)
        return out

    def block_solve(self, rhs: Tensor, curvature: CurvatureCache | FreshCurvature, n: int, damping: float,
                    tol: float) -> tuple[Tensor, dict[str, Any]]:
        """Solve the block-diagonal system ``(B_i / n + damping I) x_i = rhs_i`` with ``curvature``'s blocks; dense weights do not move.

        Args:
            rhs: the flat right-hand side.
            curvature: the retained rows' blocks, cached or computed now.
            n: the divisor of the data term.
            damping: added to each block of the mean objective.
            tol: relative residual of each block's CG (:meth:`~lightning_unlearn.unlearning.methods.curvature.CurvatureCache.solve`).

        Returns:
            The flat step and what the solve needed (blocks, refactorised, CG iterations, damped, failed).

        Raises:
            ValueError: a group is partly frozen (the blocks span its tables concatenated).
        """
        parts = unflatten(rhs, self.shapes)
        steps = [torch.zeros_like(p) for p in parts]
        report = {"num_blocks": 0, "refactored_blocks": 0, "cg_iterations": 0, "damped_blocks": 0, "failed_blocks": 0, "max_damping": 0.0}
        for group, ids, side in (("user_embedding", self.scope.users, "users"), ("item_embedding", self.scope.items, "items")):
            index = [i for i, g in enumerate(self.groups) if g == group]
            if not index:
                continue
            rhs_group = torch.cat([parts[i].double() for i in index], dim=1)
            if rhs_group.shape[1] != sum(p.shape[1] for p in self.model.parameter_groups()[group]):
                raise ValueError("solver='block' needs every embedding table of a group trainable (or every one frozen).")
            # (B / n + damping I) x = g  <=>  (B + n damping I) x = n g: no scaled copy of the blocks
            # (the damping in the block diagnostics is therefore n times the method's damping)
            x, result, refactored, iterations = curvature.solve(side, ids.to(rhs.device), rhs_group * n, damping * n, tol)
            for i, piece in zip(index, x.split([parts[i].shape[1] for i in index], dim=1)):
                steps[i] = piece.to(parts[i].dtype)
            for key, value in (("num_blocks", len(ids)), ("refactored_blocks", refactored), ("damped_blocks", result.damped_blocks),
                               ("failed_blocks", result.failed_blocks)):
                report[key] += value
            report["cg_iterations"] = max(report["cg_iterations"], iterations)
            report["max_damping"] = max(report["max_damping"], result.max_damping)
        return flatten(steps), report

    @torch.no_grad()
    def step(self, delta: Tensor) -> None:
        """Add the flat ``delta`` to the restricted parameters, in place."""
        for (_, p, rows), change in zip(self.parts, unflatten(delta.to(self.parts[0][1].dtype), self.shapes)):
            if rows is None:
                p.add_(change)
            else:
                p.index_add_(0, rows, change)


class _DotProductCurvature:
    """The curvature product ``H v / n`` of a dot-product model (MF, LightGCN), Gauss-Newton or exact.

    The generic product differentiates twice through every row's gathered vectors. Here the
    scores are dot products, so a Gauss-Newton product is: the vectors' tangent ``J_E v``
    (through the propagation of a graph model, by autograd on the small tables), the rows' score
    tangents and their pullback from :meth:`Engine.score` and :meth:`Engine.score_pullback` (one
    matrix product per chunk of users on a small catalog), ``H_z`` elementwise on the scores,
    the pullback ``J_E^T`` to the tables, and ``l2 * counts * v``. The exact Hessian adds the
    scores' own second derivative: ``z = <u, i>`` is bilinear, so that term is the pullback of
    the loss's score gradient ``g_z`` with the tangents ``J_E v`` in place of the vectors (the
    representations are linear in the tables, as MF's and LightGCN's are). Scores and vectors
    are taken once, at construction.
    """

    def __init__(self, restricted: RestrictedParameters, engine: Engine, n: int, exact: bool = False):
        model = restricted.model
        self.restricted, self.engine, self.n = restricted, engine, n
        self.leaves = [p.detach().clone().requires_grad_(True) for _, p, _ in restricted.parts]
        with torch.enable_grad():
            self.vectors = call_with(model, {name: leaf for (name, _, _), leaf in zip(restricted.parts, self.leaves)}, model.representations)
            self.live = [i for i, v in enumerate(self.vectors) if v.requires_grad]  # (a frozen side's vectors are constants)
            # J_E v by the double-vjp trick: J_E^T u is linear in u, and its vjp with v is J_E v
            self.dual = [torch.zeros_like(self.vectors[i], requires_grad=True) for i in self.live]
            pulled = torch.autograd.grad([self.vectors[i] for i in self.live], self.leaves, self.dual, create_graph=True,
                                         retain_graph=True, allow_unused=True)
        self.reached = [k for k, g in enumerate(pulled) if g is not None]  # the leaves the live vectors depend on
        self.pulled = [pulled[k] for k in self.reached]
        self.plain = tuple(v.detach() for v in self.vectors)
        self.batches = [batch for _, batch in engine.chunks(engine.local)]
        self.layouts = [engine.layout(batch, model.num_items) for batch in self.batches]  # the same rows in every product
        with torch.no_grad():
            scores = [engine.score(*self.plain, batch, layout) for batch, layout in zip(self.batches, self.layouts)]
        self.curvatures = [data_loss_curvature(z, model.loss_name) for z in scores]
        self.slopes = [_score_gradient(z, model.loss_name) for z in scores] if exact else None
        self.penalty = [model.l2 * engine.counts(Side(model, group), ids, engine.local).to(self.plain[0].dtype).unsqueeze(1) / n
                        for group, (_, _, ids) in zip(restricted.groups, restricted.parts)]

    def __call__(self, v: Tensor) -> Tensor:
        parts = unflatten(v, self.restricted.shapes)
        tangents = [torch.zeros_like(leaf).index_copy_(0, ids, part.to(leaf.dtype))
                    for leaf, (_, _, ids), part in zip(self.leaves, self.restricted.parts, parts)]
        with torch.enable_grad():
            live_moves = torch.autograd.grad(self.pulled, self.dual, [tangents[k] for k in self.reached], retain_graph=True,
                                             allow_unused=True)
        moved = [torch.zeros_like(p) for p in self.plain]
        for i, m in zip(self.live, live_moves):
            if m is not None:
                moved[i] = m
        cotangents = (torch.zeros_like(self.plain[0]), torch.zeros_like(self.plain[1]))
        # the scores' tangent, <du, i> + <u, di>, as one product of the tables side by side
        users, items = torch.cat([moved[0], self.plain[0]], dim=1), torch.cat([self.plain[1], moved[1]], dim=1)
        for k, (batch, layout, curvature) in enumerate(zip(self.batches, self.layouts, self.curvatures)):
            self.engine.score_pullback(*self.plain, batch, curvature(self.engine.score(users, items, batch, layout)), cotangents, layout)
            if self.slopes is not None:
                self.engine.score_pullback(*moved, batch, self.slopes[k], cotangents, layout)
        with torch.enable_grad():
            grads = torch.autograd.grad([self.vectors[i] for i in self.live], self.leaves, [cotangents[i] for i in self.live],
                                        retain_graph=True, allow_unused=True)
        out = []
        for grad, leaf, (_, _, ids), part, penalty in zip(grads, self.leaves, self.restricted.parts, parts, self.penalty):
            data = torch.zeros(len(ids), leaf.shape[1], dtype=leaf.dtype, device=leaf.device) if grad is None else grad[ids]
            out.append(self.engine.context.reduce(data / self.n) + penalty * part.to(leaf.dtype))
        return flatten(out).to(v.dtype)


def _score_gradient(z: Tensor, loss: str) -> Tensor:
    """``d data_loss / dz`` for each row's scores ``(R, 1 + k)``."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(data_loss(z, loss).sum(), z)[0]


def _penalty(model: Recommender, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * model.l2 * model.embedding_penalty(batch["users"], item_slots(batch)).sum()
