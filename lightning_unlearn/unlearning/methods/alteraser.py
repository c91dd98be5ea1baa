"""AltEraser: warm-started alternating block-Newton unlearning (Liu et al., arXiv 2208.06875).

Starting from the trained model, minimise the training objective on the retained rows,

    L(theta) = 1/n * sum_{r in retained} loss_r(theta) + dense_penalty(theta),

by alternating small second-order sub-problems. With the item vectors and the dense weights
fixed, ``L`` separates by user (every row has one user): each user in scope takes one damped
Newton step on its embedding row (all its tables concatenated, e.g. NeuMF's GMF and MLP rows)
with its ``d x d`` curvature block and its exact gradient over its retained rows. Then the same
for the items, then the dense weights. All users (items) of a step are one batched operation:
per-row gradients scattered into ``(n, d)``, blocks from :func:`curvature_blocks` (or cached and
downdated by :class:`CurvatureCache`), one batched :func:`~lightning_unlearn.linalg.solve_blocks`
(blocks that are not positive definite get more damping, counted), and a per-block backtracking
line search on each sub-problem's own loss. No Python loop runs over users or items.

Separable exactly for non-graph models (MF, NeuMF). With BPR, one row holds a positive and
negative items, so the item objective is not separable: each item's step is judged on its own
terms with the other items held where they were (block-Jacobi); BCE items separate exactly.
For graph models (LightGCN) the base embeddings are coupled through the propagation; the
gradient is exact (through the propagation, over every retained row), the blocks are the
propagated vectors' blocks scaled by the square of each node's self-weight in the propagation
(the path from a base row to its own propagated vector; paths through neighbours are dropped),
and the line search is one step length per side on the whole objective.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import (
    BlockSolveResult,
    conjugate_gradient,
    gauss_newton_matvec,
    hessian_matvec,
    pcg_blocks,
    solve_blocks,
    unflatten,
)
from lightning_unlearn.losses import data_loss
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import call_with
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import (
    CurvatureCache,
    base_row_blocks,
    curvature_blocks,
    exact_hessian_blocks,
    keep_inverses,
)
from lightning_unlearn.unlearning.methods.scope import Scope, graph_of, is_graph, restrict, rows_touching
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner
from lightning_unlearn.unlearning.methods.subproblems import SIDES, Anchor, Engine, RowScores, Side

__all__ = ["AltEraser"]

_OBJECTIVES = ("retained", "anchored")
_SCOPES = ("affected", "affected+k-hop", "all")
_CURVATURES = ("gauss_newton", "hessian")
_TUNING = ("damping", "refactor_tolerance", "line_search", "max_backtracks", "dense_steps", "dense_cg_iters", "dense_sample", "chunk_size", "cache_budget_gb")
_ARMIJO = 1e-4  # sufficient-decrease constant of the line search
_MAX_TRIES = 16  # factorisations per block: damping may grow 10^15-fold before a block counts as failed
_KEPT_ITERATIONS = 10  # CG iterations from a kept inverse (graph models) before a block is factorised


class AltEraser(SecondOrderUnlearner):
    """Alternating per-user / per-item block-Newton steps on the retained objective, from the trained model.

    Args:
        objective: ``"anchored"`` (the default: minimise ``L(theta) - <g_0, theta>``, ``g_0``
            the trained model's gradient over every row it was trained on, cached once: the
            trained model counts as a stationary point, so the rounds remove the deleted rows'
            effect and do not go on training a model that was stopped early; its first step is
            the influence-function step) or ``"retained"`` (the paper: minimise ``L`` on the
            retained rows). Identical for a model trained to a stationary point; from an
            early-stopped model, retained rounds go on training it and drift away from Retrain.
        rounds: at most this many rounds (users, then items, then dense weights), ``>= 1``.
            Default 1: anchored rounds past the first over-forget.
        tol: stop after a round whose relative decrease of the objective,
            ``(L_before - L_after) / |L_after|``, is below ``tol`` (with ``0``, only once a round
            no longer decreases it).
        scope: which embedding rows move: ``"affected"`` (the users and items of the deleted
            rows, negatives included), ``"affected+k-hop"`` (plus their neighbours through
            retained interactions, ``k_hop`` hops out) or ``"all"``.
        k_hop: hops for ``scope="affected+k-hop"`` (``>= 1``).
        curvature: ``"gauss_newton"`` (positive semi-definite blocks; exact for MF, whose
            scores are linear in each side) or ``"hessian"`` (exact per-row Hessian blocks from
            ``torch.func``; memory grows as ``rows x d^2``, meant for small problems).
        blocks: ``"cached"`` (Gauss-Newton blocks of every user and item computed once per
            trained model, reported as precomputation, and downdated by each request's deleted
            rows; later rounds reuse them, so the step is a damped chord-Newton step whose fixed
            point is still the exact stationary point because the gradient is exact),
            ``"fresh"`` (rebuilt at the current parameters for every step, from the rows that
            touch the step's blocks: the paper's Newton, with no cache) or ``"auto"`` (a cache
            within ``cache_budget_gb``: every block while they fit, else those of the users and
            items with the most rows, the others computed when a step needs them).
        damping: added to each block of the mean objective (``> 0``), i.e. ``n * damping`` to the
            summed blocks; blocks that are not positive definite get more, and are counted.
        refactor_tolerance: with cached blocks, each block's Cholesky factor (computed once per
            trained model) is reused while the block's trace has moved by at most this share
            since; the others are refactored. The gradient stays exact, so a reused factor only
            changes how fast the rounds converge, not where. ``0`` refactors every block.
        line_search: backtrack each sub-problem's step (halving) until its own loss decreases
            enough (Armijo); blocks that never do keep their row (counted as ``rejected``).
        max_backtracks: halvings tried before a block's step is rejected.
        dense_steps: damped Gauss-Newton-CG steps on the dense weights per round (NeuMF's MLP);
            ``0`` keeps them fixed. The curvature products use ``dense_sample`` rows. The first
            step of a request on the trained model (``objective="anchored"``) passes over no
            more rows than that: its gradient is the cached one minus the deleted rows', plus
            its change over a ``dense_sample`` of the retained rows that touch the moved users
            and items (all of them when fewer; scaled to their number), and its line search
            judges the objective on the curvature's sample. Later steps take the exact gradient
            and line search over every retained row.
        dense_cg_iters: CG iterations per dense step.
        dense_sample: rows (drawn with the context's seed) for the dense curvature, and for the
            first step's gradient change and line search.
        chunk_size: rows per vectorised pass (8192 keeps each pass's temporaries small enough
            to be reused by the allocator).
        cache_budget_gb: the most the cache of ``blocks="auto"`` holds, in GiB.

    Measured speed and fidelity (objective and rounds, chunk size): :ref:`measured`
    (``docs/methods.rst``, section Measured).

    Raises:
        ValueError: on an argument outside the accepted values (the message names it).

    Example:
        >>> AltEraser(rounds=2).name
        'AltEraser(rounds=2)'
        >>> AltEraser(dense_steps=0).name  # every option that differs from its default is named
        'AltEraser(rounds=1, dense_steps=0)'
        >>> AltEraser(scope="everything")
        Traceback (most recent call last):
        ...
        ValueError: AltEraser(scope=...) must be one of ('affected', 'affected+k-hop', 'all'), got 'everything'.
    """

    hint = "more damping (e.g. 10x), fewer rounds, or blocks='fresh'"
    safe_deleted_fraction = 0.03  # measured over streams of requests: docs/methods.rst, the retrain policy

    def __init__(
        self,
        objective: Literal["retained", "anchored"] = "anchored",
        rounds: int = 1,
        tol: float = 1e-4,
        scope: Literal["affected", "affected+k-hop", "all"] = "affected",
        k_hop: int = 1,
        curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
        blocks: Literal["auto", "cached", "fresh"] = "auto",
        damping: float = 1e-7,
        refactor_tolerance: float = 0.05,
        line_search: bool = True,
        max_backtracks: int = 10,
        dense_steps: int = 1,
        dense_cg_iters: int = 10,
        dense_sample: int = 65536,
        chunk_size: int = 8192,
        cache_budget_gb: float = 4.0,
    ):
        for name, value, allowed in (("objective", objective, _OBJECTIVES), ("scope", scope, _SCOPES), ("curvature", curvature, _CURVATURES)):
            if value not in allowed:
                raise ValueError(f"AltEraser({name}=...) must be one of {allowed}, got {value!r}.")
        for name, value, low in (("rounds", rounds, 1), ("k_hop", k_hop, 1), ("max_backtracks", max_backtracks, 0),
                                 ("dense_steps", dense_steps, 0), ("dense_cg_iters", dense_cg_iters, 1),
                                 ("dense_sample", dense_sample, 1), ("chunk_size", chunk_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AltEraser({name}=...) must be an integer >= {low}, got {value!r}.")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"AltEraser(damping=...) must be a finite number > 0, got {damping!r}.")
        if not (isinstance(refactor_tolerance, (int, float)) and 0 <= refactor_tolerance < 1):
            raise ValueError(f"AltEraser(refactor_tolerance=...) must be a number in [0, 1), got {refactor_tolerance!r}.")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"AltEraser(tol=...) must be a finite number >= 0, got {tol!r}.")
        if blocks != "fresh" and curvature != "gauss_newton":
            raise ValueError(f"AltEraser(blocks={blocks!r}) caches Gauss-Newton blocks; with curvature={curvature!r} use blocks='fresh'.")
        self.objective, self.rounds, self.tol, self.scope, self.k_hop = objective, rounds, float(tol), scope, k_hop
        self.curvature, self.damping, self.refactor_tolerance = curvature, float(damping), float(refactor_tolerance)
        self.line_search, self.max_backtracks = line_search, max_backtracks
        self.dense_steps, self.dense_cg_iters, self.dense_sample = dense_steps, dense_cg_iters, dense_sample
        self.chunk_size = chunk_size
        super().__init__(blocks, cache_budget_gb)
        self._anchor: Anchor | None = None

    @property
    def name(self) -> str:
        options = ([f"objective={self.objective}"] if self.objective != "anchored" else []) + [f"rounds={self.rounds}"]
        options += [f"tol={self.tol:g}"] if self.rounds > 1 and self.tol != 1e-4 else []  # with one round tol is moot
        options += [f"scope={self.scope}" if self.scope != "affected+k-hop" else f"scope=affected+{self.k_hop}-hop"] if self.scope != "affected" else []
        options += [f"blocks={self.blocks}"] if self.blocks != "auto" else []
        options += [f"curvature={self.curvature}"] if self.curvature != "gauss_newton" else []
        defaults = inspect.signature(AltEraser.__init__).parameters
        options += [f"{key}={getattr(self, key)!r}" for key in _TUNING if getattr(self, key) != defaults[key].default]
        return f"AltEraser({', '.join(options)})"

    def uses_cache(self, model: Recommender) -> bool:
        """With a kept cache (``blocks``), every model with a trainable embedding side reads the cached blocks."""
        return self.keeps_cache(model) and any(side.trainable for side in self._sides(model))

    def prepared_for(self, model: Recommender) -> bool:
        """Whether the cache (when used) and the anchored objective's gradient are there for ``model``'s parameters."""
        return super().prepared_for(model) and not self._wants_anchor(model, fresh_cache=False)

    def _wants_anchor(self, model: Recommender, fresh_cache: bool) -> bool:
        # anchored: the linear term, once per trained model; retained: the first request's free gradient, with the cache
        wanted = self.objective == "anchored" or (fresh_cache and not is_graph(model))
        return wanted and not (self._anchor is not None and self._anchor.matches(model))

    def prepare(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None) -> float:
        """Cache, for ``model`` trained on ``rows``, the curvature blocks and the gradient over every row.

        Paid once per trained model (the callback and ``compare`` call it before the first
        request; :meth:`unlearn` does when they did not); builds what is missing for ``model``
        (0 s when everything is cached for its parameters). The cached gradient is the
        ``objective="anchored"`` linear term, and makes the first request's first steps free of
        passes over the retained rows (non-graph models). A graph model's gradient is taken on
        the graph of ``rows``, so the model may hold the graph after the deletion already.

        Args:
            model: the trained model.
            rows: every training row it was trained on.
            context: device, reduce and sharding (default: one process).

        Returns:
            The seconds it took.
        """
        context = context or UnlearningContext()
        fresh_anchor = self._wants_anchor(model, fresh_cache=not super().prepared_for(model))
        seconds = super().prepare(model, rows, context)
        if not fresh_anchor:
            return seconds
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                graph = graph_of(model, rows) if is_graph(model) and self.objective == "anchored" else None
                engine = Engine(model, rows, len(rows), context, self.chunk_size, is_graph(model))
                sides = [side for side in self._sides(model) if side.trainable]
                self._anchor = engine.anchor(sides, engine.local, self._dense(model) if self.objective == "anchored" else [], graph)
        except Exception:
            self.clear()
            raise
        return seconds + time.perf_counter() - start

    def after_build(self, model: Recommender, rows: TrainRows) -> None:
        """Factor every block once (non-graph models, ``refactor_tolerance > 0``); requests refactor few.

        On a graph model, keep the inverses of the damped base rows' blocks instead: each
        request's blocks are solved by CG started from them, exactly (:func:`_solve_from_kept`).
        """
        if is_graph(model):
            keep_inverses(self.cache, model, self.damping * len(rows))
        elif self.refactor_tolerance > 0:
            for side in self._sides(model):
                if side.trainable:
                    self.cache.refactor(side.key, self.cache.held(side.key), self.damping * len(rows), self.refactor_tolerance)

    def clear(self) -> None:
        super().clear()
        self._anchor = None

    @staticmethod
    def _sides(model: Recommender) -> list[Side]:
        return [Side(model, name) for name in SIDES]

    def _dense(self, model: Recommender) -> list[Tensor]:
        return [p for p in model.parameter_groups()["dense"] if p.requires_grad] if self.dense_steps else []

    # ------------------------------------------------------------------ the update
    def step(self, model: Recommender, retained: TrainRows, deleted: TrainRows, cache: CurvatureCache | None,
             context: UnlearningContext) -> dict[str, Any]:
        """Rounds of per-user, per-item and dense steps on the retained objective (see the class docstring)."""
        graph = is_graph(model)
        sides = {side.name: side for side in self._sides(model)}
        n = max(len(retained), 1)
        engine = Engine(model, retained, n, context, self.chunk_size, graph)
        anchor = self._anchor if self._anchor is not None and self._anchor.matches(model) else None
        first = anchor is not None and anchor.fresh and not graph  # at the trained model: its gradient is the cached one
        known_scores = anchor.scores if first else None  # the trained model's: every row's scores until a step moves one
        if anchor is not None:
            anchor.fresh, anchor.scores = False, None
            engine.linear = anchor.grads if self.objective == "anchored" else {}
        counts = None if cache is None else {side: cache.occurrences(side) for side in ("users", "items")}
        scope = Scope.everything(model, retained) if self.scope == "all" else \
            Scope.of(model, retained, deleted, hops=self.k_hop if self.scope == "affected+k-hop" else 0, counts=counts)
        users, items = scope.users, scope.items
        ids = {"user_embedding": users if sides["user_embedding"].trainable else users[:0],
               "item_embedding": items if sides["item_embedding"].trainable else items[:0]}
        start_grads: dict[str, Tensor] = {}
        dense = self._dense(model)
        deleted_dense = None
        if first:  # the retained gradient and value at the trained model: every row's minus the deleted rows'
            start_grads, deleted_value = engine.deleted_part(context.shard(deleted), ids, sides)
            for name in start_grads:
                start_grads[name] = (anchor.grads[name][ids[name]] if self.objective == "retained" else 0) - start_grads[name]
            engine.value = anchor.value - deleted_value
            if dense and anchor.dense is not None:
                deleted_dense = context.reduce(engine.dense_gradient(dense, context.shard(deleted)))
        scope.reset_orphans(model, context.seed)
        local = engine.local  # this process's share of the retained rows; every sum over rows is reduced
        if graph or self.scope == "all":
            rows = local
        else:
            rows = restrict(local, rows_touching(local, ids["user_embedding"], ids["item_embedding"], model.num_users, model.num_items))
        start = _DenseStart.take(engine, dense, deleted_dense, rows, self.dense_sample) if deleted_dense is not None else None
        if not first:
            engine.value = engine.sum_losses(local)
        history = [engine.objective()]
        if not math.isfinite(history[0]):
            raise FloatingPointError("the retained objective is not finite at the trained model")
        totals = _Totals()
        stopped = "rounds"
        for round_ in range(self.rounds):
            moved: dict[str, tuple[Tensor, Tensor]] = {}
            for name in SIDES:
                if len(ids[name]):
                    # a graph couples every row; otherwise this side's sub-problems hold the rows that involve its ids
                    side_rows = rows if engine.graph else restrict(rows, sides[name].rows_of(rows, ids[name]))
                    known, scores = (start_grads.get(name), known_scores) if round_ == 0 else (None, None)
                    if known is not None and moved:  # the users moved: only their rows' terms changed since the cached gradient
                        known, scores = engine.moved_gradient(sides[name], ids[name], side_rows, known, scores,
                                                              *((sides[other], *move) for other, move in moved.items()))
                    move = self._side_step(engine, sides[name], ids[name], side_rows, cache, totals, known,
                                           scores if known is not None else None)
                    if move is not None:
                        moved[name] = move
            for _ in range(self.dense_steps if dense else 0):
                self._dense_step(engine, dense, totals, anchor if self.objective == "anchored" else None, start)
                start = None  # the dense weights moved: every retained row's gradient changed
            history.append(engine.objective())
            if not math.isfinite(history[-1]):
                raise FloatingPointError(f"the objective became {history[-1]} after round {len(history) - 1}")
            if (history[-2] - history[-1]) < self.tol * abs(history[-1]):
                stopped = "tol"
                break
        # exact gradients drive the steps: the cache's blocks, kept for the result by the base, only slow later requests down
        if self.objective == "anchored" and anchor is not None:
            anchor.adopt(model)  # the linear term belongs to the trained model and stays
        else:
            self._anchor = None  # the cached gradient was the trained model's
        return {
            "objective_kind": self.objective, "rounds": len(history) - 1, "stopped": stopped,
            "objective": history, "kept_users": len(ids["user_embedding"]), "kept_items": len(ids["item_embedding"]),
            "reset_users": len(scope.orphan_users), "reset_items": len(scope.orphan_items), "rows_used": len(rows),
            "blocks": "fresh" if cache is None else "cached", "curvature": self.curvature, "damping": self.damping, **totals.as_dict(),
        }

    # ------------------------------------------------------------------ one side: users or items
    def _side_step(self, engine: Engine, side: Side, ids: Tensor, rows: TrainRows, cache: CurvatureCache | None, totals: _Totals,
                   grad: Tensor | None, known: RowScores | None = None) -> tuple[Tensor, Tensor] | None:
        """One batched damped Newton step for every block of a side; the rows that moved and their values before (``None``: none moved).

        ``rows`` are those of the side's sub-problems (every row on a graph model). ``grad`` is the
        exact gradient when known already (from the cached one); else it is computed. ``known``
        holds the rows' scores at the current parameters, when still valid.
        """
        values = side.gather(ids)
        scores = known.of(rows) if known is not None else None
        if grad is None:
            grad, scores = engine.gradient(side, ids, rows)
            if side.name in engine.linear:
                grad = grad - engine.linear[side.name][ids]
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"the {side.label} gradient is not finite")
        if cache is not None and not engine.graph:  # cached factors, refactored where the block moved
            shift = engine.n * self.damping
            step, solved, refactored = cache.solve_factored(side.key, ids, -grad, shift, self.refactor_tolerance)
            failed = solved.failed_mask
            totals.refactored += refactored
            # a reused factor carries the shift it was computed with (within the tolerance): not an escalation
            escalated = solved.block_damping > shift * (1 + self.refactor_tolerance) * (1 + 1e-9)
            used = torch.where(escalated, solved.block_damping, torch.full_like(solved.block_damping, shift))
            solved = BlockSolveResult.from_damping(used, solved.failed_mask, shift)
        else:
            blocks = self._blocks(engine, side, ids, rows, cache)
            step, solved, refactored = _solve_from_kept(blocks, -grad, engine.n * self.damping, cache, side.key, ids)
            failed = solved.failed_mask
            totals.refactored += refactored
        totals.add_solve(solved)
        if failed.any():
            raise FloatingPointError(f"{int(failed.sum())} {side.label} curvature blocks could not be factored (non-finite, or not "
                                     f"positive definite even with damping {solved.max_damping:.3g})")
        slope = (grad * step).sum(1)  # directional derivative of each sub-problem (< 0: a descent direction)
        if engine.graph:
            alpha = self._global_search(engine, side, ids, values, step, slope)
        else:
            alpha = self._block_search(engine, side, ids, rows, values, step, slope, scores)
        totals.backtracked += int(((alpha > 0) & (alpha < 1)).sum())
        totals.rejected += int((alpha == 0).sum())
        side.set_(ids, values + alpha.unsqueeze(1) * step)
        engine.offset += engine.linear_change(side, ids, alpha.unsqueeze(1) * step)
        moved = alpha > 0
        return (ids[moved], values[moved]) if bool(moved.any()) else None

    def _blocks(self, engine: Engine, side: Side, ids: Tensor, rows: TrainRows, cache: CurvatureCache | None) -> Tensor:
        """The ``(len(ids), d, d)`` summed curvature blocks of this side's sub-problems."""
        model = engine.model
        if cache is not None:
            blocks = cache.block(side.key, ids)
        else:
            if self.curvature == "hessian":
                fresh = exact_hessian_blocks(model, rows, **{side.key: ids}, chunk_size=max(1, self.chunk_size // 64))
            else:
                fresh = curvature_blocks(model, rows, **{side.key: ids, side.other_key: ids[:0]}, chunk_size=self.chunk_size)
            blocks = engine.context.reduce(fresh.users if side.name == "user_embedding" else fresh.items)
        if not engine.graph:
            return blocks
        return base_row_blocks(model, side.key, ids, blocks, engine.counts(side, ids, engine.local), engine.self_weights)

    def _block_search(self, engine, side, ids, rows, values, step, slope, scores) -> Tensor:
        """Per-block backtracking: halve each block's step until its own loss decreases enough (batched over blocks).

        Every evaluation also gives the scores of the rows it touched at the trial point, so the
        exact change of the objective at the accepted steps is known without another pass.
        """
        alpha = torch.ones(len(ids), dtype=step.dtype, device=step.device)
        pending = torch.ones(len(ids), dtype=torch.bool, device=step.device)
        final = None
        for attempt in range(self.max_backtracks + 1):
            new = values + alpha.unsqueeze(1) * step
            change, scores, trial, involved = engine.block_change(side, ids, rows, values, new, pending, scores)
            ok = (change <= _ARMIJO * alpha * slope) | (not self.line_search)
            accepted = pending & ok
            final = scores.clone() if final is None else final
            engine.keep_scores(side, ids, rows, final, trial, involved, accepted)
            pending &= ~ok
            if not pending.any():
                break
            alpha = torch.where(pending, alpha * 0.5, alpha)
        alpha = torch.where(pending, torch.zeros_like(alpha), alpha)
        engine.value += engine.exact_change(side, ids, rows, values, values + alpha.unsqueeze(1) * step, scores, final)
        return alpha

    def _global_search(self, engine, side, ids, values, step, slope) -> Tensor:
        """One step length for every block of a side (graph models: the blocks are coupled), on the whole objective."""
        before, expected = engine.value, float(slope.sum())
        alpha = 1.0
        for _ in range(self.max_backtracks + 1 if self.line_search else 1):
            side.set_(ids, values + alpha * step)
            value = engine.sum_losses(engine.local) - engine.offset - engine.linear_change(side, ids, alpha * step)
            if not self.line_search or value - before <= _ARMIJO * alpha * expected:
                engine.value = value
                return torch.full((len(ids),), alpha, dtype=step.dtype, device=step.device)
            alpha *= 0.5
        side.set_(ids, values)
        return torch.zeros(len(ids), dtype=step.dtype, device=step.device)

    # ------------------------------------------------------------------ the dense weights
    def _dense_step(self, engine: Engine, params: list[Tensor], totals: _Totals, anchor: Anchor | None,
                    start: _DenseStart | None) -> None:
        model, n = engine.model, engine.n
        theta = [p.detach().clone() for p in params]
        if start is not None:  # anchored, at the trained model's dense weights: no pass over every retained row
            data, penalty_grad = start.data_gradient(engine, params, anchor.dense[0]), anchor.dense[1]
            totals.sampled_dense_steps += 1
        else:
            data, penalty_grad = engine.dense_parts(params, engine.local)
        grad = data / n + penalty_grad
        linear = torch.zeros_like(grad)  # sum-scale linear term of the anchored objective
        if anchor is not None and anchor.dense is not None:
            linear = anchor.dense[0] + n * anchor.dense[1]
            grad = grad - linear / n
        if not torch.isfinite(grad).all():
            raise FloatingPointError("the dense gradient is not finite")
        sample = engine.sample(self.dense_sample)
        names = {id(p): name for name, p in model.named_parameters()}
        keys = [names[id(p)] for p in params]
        batch = sample[:]
        data = lambda z: data_loss(z, model.loss_name).sum() / len(sample)  # noqa: E731  the sample stands for all rows
        scores = lambda ps: call_with(model, dict(zip(keys, ps)), lambda: model.row_scores(batch))  # noqa: E731
        gauss_newton = gauss_newton_matvec(scores, data, theta, mode="reverse")
        penalty = hessian_matvec(lambda ps: call_with(model, dict(zip(keys, ps)), model.dense_penalty), theta)
        matvec = lambda v: gauss_newton(v) + penalty(v)  # noqa: E731
        step, result = conjugate_gradient(matvec, -grad, damping=self.damping, max_iter=self.dense_cg_iters, tol=1e-6)
        totals.dense_cg_iterations += result.iterations
        slope = float(grad @ step)
        before = engine.objective()
        base = engine.data_losses(sample) if start is not None else 0.0  # the sample stands for every retained row
        alpha = 1.0
        for _ in range(self.max_backtracks + 1 if self.line_search else 1):
            _assign(params, [t + alpha * s for t, s in zip(theta, unflatten(step.to(theta[0].dtype), [t.shape for t in theta]))])
            shift = float(linear @ (alpha * step))
            if start is not None:
                value = engine.value + n / len(sample) * (engine.data_losses(sample) - base) - shift
            else:
                value = engine.sum_losses(engine.local) - engine.offset - shift
            if not self.line_search or value / n + float(model.dense_penalty().detach()) - before <= _ARMIJO * alpha * slope:
                engine.value, engine.offset = value, engine.offset + shift
                return
            alpha *= 0.5
        _assign(params, theta)
        totals.rejected += 1


@dataclass
class _DenseStart:
    """What the first dense step at the trained model needs, taken before the side steps move rows.

    With the anchored objective the retained rows' dense data gradient at the trained model is
    the cached one over every row minus the deleted rows'. The side steps change it only through
    the retained rows that touch the moved users and items: that change is summed over a sample
    of them (all of them when fewer than ``size``) and scaled to their number.
    """

    deleted: Tensor  # the deleted rows' dense data gradient at the trained model, summed over processes
    sample: TrainRows  # this process's sample of the retained rows that touch the moved rows
    scale: float  # touched rows per sampled row
    before: Tensor  # the sample's dense data gradient before the side steps

    @classmethod
    def take(cls, engine: Engine, params: list[Tensor], deleted: Tensor, touched: TrainRows, size: int) -> _DenseStart:
        sample = engine.sample(size, touched)
        return cls(deleted, sample, len(touched) / max(len(sample), 1), engine.dense_gradient(params, sample))

    def data_gradient(self, engine: Engine, params: list[Tensor], every_row: Tensor) -> Tensor:
        """The retained rows' dense data gradient now, from ``every_row``'s at the trained model."""
        change = engine.context.reduce(self.scale * (engine.dense_gradient(params, self.sample) - self.before))
        return every_row - self.deleted + change


def _assign(params: list[Tensor], values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


@dataclass
class _Totals:
    """What the steps needed, summed over rounds and sides."""

    num_blocks: int = 0
    damped_blocks: int = 0
    max_damping: float = 0.0
    backtracked: int = 0
    rejected: int = 0
    refactored: int = 0
    dense_cg_iterations: int = 0
    sampled_dense_steps: int = 0

    def add_solve(self, result: BlockSolveResult) -> None:
        self.num_blocks += result.num_blocks
        self.damped_blocks += result.damped_blocks
        self.max_damping = max(self.max_damping, result.max_damping)

    def as_dict(self) -> dict[str, Any]:
        return {"solved_blocks": self.num_blocks, "refactored_blocks": self.refactored, "damped_blocks": self.damped_blocks,
                "max_damping": self.max_damping,
                "backtracked_blocks": self.backtracked, "rejected_blocks": self.rejected,
                "dense_cg_iterations": self.dense_cg_iterations, "sampled_dense_steps": self.sampled_dense_steps}


def _solve_from_kept(blocks: Tensor, rhs: Tensor, shift: float, cache: CurvatureCache | None, side: str,
                     ids: Tensor) -> tuple[Tensor, BlockSolveResult, int]:
    """:func:`solve_blocks` of ``(blocks + shift I) x = rhs``, by CG from the inverses ``cache`` kept where it has them.

    The kept inverses are of the blocks at the trained model (:func:`keep_inverses`); a
    request's blocks differ from them by the deletion's terms and the graph's renormalisation,
    so each block's CG reaches ``sqrt(eps)`` in a few batched products. Blocks without an
    inverse, or whose CG does not converge, are factorised. Returns ``(x, result, factorised)``.
    """
    x = torch.zeros_like(rhs)
    damping = torch.full((len(ids),), float(shift), dtype=torch.float64, device=rhs.device)
    failed = torch.zeros(len(ids), dtype=torch.bool, device=rhs.device)
    redo = torch.arange(len(ids), device=rhs.device)
    if cache is not None:
        kept, have = cache.kept_inverses(side, ids)
        at = torch.nonzero(have).squeeze(1)
        if len(at):
            every = len(at) == len(ids)  # usually: then no copy of the blocks (220 MB for 6,751 of d = 64)
            solved, converged, _ = pcg_blocks(blocks if every else blocks[at], kept, rhs if every else rhs[at], shift=shift,
                                              max_iter=_KEPT_ITERATIONS)
            x[at[converged]] = solved[converged]
            redo = torch.cat([torch.nonzero(~have).squeeze(1), at[~converged]])
    if len(redo):
        x[redo], result = solve_blocks(blocks[redo], rhs[redo], damping=shift, max_tries=_MAX_TRIES)
        damping[redo], failed[redo] = result.block_damping, result.failed_mask
    return x, BlockSolveResult.from_damping(damping, failed, shift), len(redo)
