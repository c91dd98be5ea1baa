"""Per-user and per-item Gauss-Newton curvature blocks of the training objective, from one vectorised pass.

For a row ``r`` with scores ``z = (z_pos, z_neg_1..k)`` of its user vector ``u`` and item vectors,
the Gauss-Newton curvature of its data term is ``J^T H_z J``; keeping only the blocks of one user's
(or one item's) vector gives ``d x d`` blocks that are summed over rows with ``scatter_outer``,
plus ``l2`` per occurrence of the row in the L2 term. Blocks are sums over rows (not divided by
``n``) so that they can be downdated by subtracting the deleted rows' contribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import (
    BlockSolveResult,
    factor_blocks,
    inverse_factored,
    pcg_blocks,
    scatter_outer,
    solve_factored,
    solve_low_rank,
)
from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import fingerprint, gather_rows
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.scope import is_graph, occurrences, restrict, rows_of_items, rows_of_users, touched

__all__ = ["CurvatureCache", "CurvatureBlocks", "FreshCurvature", "base_row_blocks", "cache_bytes", "curvature_blocks", "keep_inverses",
           "exact_hessian_blocks", "self_weights"]


@dataclass
class CurvatureBlocks:
    """Summed curvature blocks: ``users`` (num_users, Du, Du) and ``items`` (num_items, Di, Di)."""

    users: Tensor
    items: Tensor


def curvature_blocks(
    model: Recommender, rows: TrainRows, users: Tensor | None = None, items: Tensor | None = None, chunk_size: int = 16384
) -> CurvatureBlocks:
    """Gauss-Newton blocks of ``sum_r loss_r`` w.r.t. each user's and each item's vector.

    The vectors are those of ``model.representations()`` (for NeuMF the GMF and MLP rows
    concatenated); for graph models they are the propagated vectors, so the blocks ignore the
    coupling through the graph. Per-pair score gradients come from
    :meth:`Recommender.interact_jacobians` (closed form for dot-product models).

    Args:
        model: the recommender.
        rows: the training rows whose terms are summed.
        users: compute only these users' blocks (in this order); default: every user.
        items: compute only these items' blocks (in this order); default: every item.
        chunk_size: rows per vectorised pass.

    Returns:
        The summed blocks (float64), one per user and item asked for.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(2, 3, embedding_dim=2)
        >>> rows = TrainRows(torch.tensor([0]), torch.tensor([1]), torch.tensor([[2]]))
        >>> curvature_blocks(model, rows).users.shape
        torch.Size([2, 2, 2])
    """
    with torch.no_grad():
        vectors = tuple(t.detach() for t in model.representations())
    user_slot, user_ids = _slots(users, model.num_users, vectors[0].device)
    item_slot, item_ids = _slots(items, model.num_items, vectors[1].device)
    zeros = lambda n, d: torch.zeros(n, d, d, dtype=torch.float64, device=vectors[0].device)  # noqa: E731
    out = CurvatureBlocks(zeros(len(user_ids), vectors[0].shape[1]), zeros(len(item_ids), vectors[1].shape[1]))
    _add_curvature(model, vectors, rows, out, user_slot, item_slot, sign=1.0, chunk_size=chunk_size)
    return out


@torch.no_grad()
def _add_curvature(model: Recommender, vectors: tuple[Tensor, Tensor], rows: TrainRows, out: CurvatureBlocks,
                   user_slot: Tensor, item_slot: Tensor, sign: float, chunk_size: int = 16384) -> None:
    """``out += sign * blocks of rows`` in place, for the blocks whose slot is ``>= 0`` (float64).

    ``vectors`` are the model's (detached) user and item representations.
    """
    for side, jacobians, weights, ids in _terms(model, vectors, rows, chunk_size):
        blocks, slot = (out.users, user_slot) if side == "users" else (out.items, item_slot)
        _accumulate(blocks, jacobians, sign * weights, slot[ids])
        _add_diagonal(blocks, slot[ids], sign * model.l2)  # the L2 term: l2 I per occurrence of the user (item) in a row


@torch.no_grad()
def _terms(model: Recommender, vectors: tuple[Tensor, Tensor], rows: TrainRows, chunk_size: int = 16384,
           items: Tensor | None = None) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """The Gauss-Newton terms of ``rows``' data curvature, a chunk of rows at a time: ``(side, J, w, ids)``.

    ``sum w J J^T`` over the terms of one id is the data part of its block; ``ids`` (one per
    row for users, one per slot for items) are also its L2 occurrences. Users: ``J`` is
    ``(R, m, du)`` and ``w`` ``(R, m)`` (BPR: the ``k`` score differences; BCE: the ``1 + k``
    scores); items: ``J`` is ``(R (1 + k), di)`` and ``w`` ``(R (1 + k),)``. With ``items``, a
    ``(num_items,)`` bool mask, only the terms of those items' slots are yielded, and only their
    Jacobians computed (a row touching an item holds it in one of its ``1 + k`` slots).
    """
    user_vectors, item_vectors = vectors
    du, di = user_vectors.shape[1], item_vectors.shape[1]
    for start in range(0, len(rows), chunk_size):
        batch = rows[torch.arange(start, min(start + chunk_size, len(rows)), device=rows.users.device)]
        users = batch["users"]
        slots = item_slots(batch)  # (R, 1+k)
        u, v = gather_rows(user_vectors, users).unsqueeze(1).expand(-1, slots.shape[1], -1), gather_rows(item_vectors, slots)
        z = model.interact(u, v)
        if model.loss_name == "bpr":
            y = z[:, 1:] - z[:, :1]
            w = torch.sigmoid(y) * torch.sigmoid(-y)  # (R, k)
            item_weights = torch.cat([w.sum(1, keepdim=True), w], dim=1)
        else:
            w = item_weights = torch.sigmoid(z) * torch.sigmoid(-z)  # (R, 1+k)
        if items is not None:
            r, s = torch.nonzero(items[slots], as_tuple=True)
            yield "items", model.interact_jacobians(u[r, s], v[r, s])[1], item_weights[r, s], slots[r, s]
            continue
        ju, jv = model.interact_jacobians(u.reshape(-1, du), v.reshape(-1, di))
        ju = ju.reshape(*slots.shape, du)
        yield "users", ju[:, 1:] - ju[:, :1] if model.loss_name == "bpr" else ju, w, users
        yield "items", jv, item_weights.reshape(-1), slots.reshape(-1)


def _add_diagonal(out: Tensor, index: Tensor, value: float) -> None:
    """``out[b] += value * I`` once per occurrence of ``b`` in ``index`` (``-1``: skipped); one write per distinct block."""
    blocks, counts = torch.unique(index[index >= 0], return_counts=True)
    diagonal = torch.diagonal(out, dim1=1, dim2=2)  # a view: index_add_ writes through
    diagonal.index_add_(0, blocks, (counts.to(out.dtype) * value).unsqueeze(1).expand(-1, out.shape[-1]))


def _slots(ids: Tensor | None, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Position of every id among ``ids`` (``-1`` if absent), and ``ids`` (default: all)."""
    ids = torch.arange(size, device=device) if ids is None else ids.to(device)
    slot = torch.full((size,), -1, dtype=torch.long, device=device)
    slot[ids] = torch.arange(len(ids), device=device)
    return slot, ids


def _accumulate(out: Tensor, jacobians: Tensor, weights: Tensor, index: Tensor) -> None:
    """``out[b] += sum w J J^T`` over the rows whose block is asked for (``index >= 0``), in place.

    Accumulated in float64; a float32 ``out`` (a cache under a memory budget) receives each
    block's float64 sum, rounded once. Those sums are formed for a few blocks at a time (16 MiB,
    a buffer the allocator reuses): one intermediate for every touched block (300 MB for a
    request's 9,000 items at d = 64) spent most of a downdate on zeroing fresh pages.
    """
    keep = index >= 0
    if not keep.any():
        return
    jacobians, weights, index = jacobians[keep].double(), weights[keep].double(), index[keep]
    if out.dtype == torch.float64:
        scatter_outer(jacobians, weights, index, out.shape[0], out=out)
        return
    held, local = torch.unique(index, return_inverse=True)
    order = torch.argsort(local, stable=True)
    jacobians, weights, local = jacobians[order], weights[order], local[order]
    for part in _chunks(torch.arange(len(held), device=local.device), out, chunk_bytes=_PIECE_BYTES):
        lo, hi = torch.searchsorted(local, torch.stack([part[0], part[-1] + 1])).tolist()  # the piece's rows, sorted by block
        sums = scatter_outer(jacobians[lo:hi], weights[lo:hi], local[lo:hi] - part[0], len(part))
        out.index_add_(0, held[part], sums.to(out.dtype))


_PIECE_BYTES = 1 << 24  # float64 blocks a request forms, copies out of a cache or factors at a time
# blocks (as if float64) a cached solve reads together (pcg_blocks, solve_factored): a piece's blocks and inverses stay in a
# 32 MiB L3 cache across its iterations (6,751 blocks at d = 96, 2 iterations: 0.09-0.11 s in pieces of 8 MiB, 0.13 s of
# 16 MiB, 0.16 s of 2 MiB)
_PCG_PIECE_BYTES = 1 << 23


def _widths(model: Recommender) -> dict[str, int]:
    groups = model.parameter_groups()
    return {side: sum(t.shape[1] for t in groups[group]) for side, group in (("users", "user_embedding"), ("items", "item_embedding"))}


def cache_bytes(model: Recommender) -> int:
    """Bytes a :class:`CurvatureCache` of every block of ``model`` holds: float64 blocks of every user and item, and as much again for factors.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> cache_bytes(MF(6040, 3706, embedding_dim=64)) / 2**30 < 1  # MovieLens-1M, d = 64
        True
    """
    width = _widths(model)
    return 2 * 8 * (model.num_users * width["users"] ** 2 + model.num_items * width["items"] ** 2)


def _busiest(counts: dict[str, Tensor], width: dict[str, int], budget: float) -> dict[str, Tensor]:
    """Per side, the ids whose blocks a ``budget`` holds: the most occurrences per byte first, users and items ranked together.

    A request touches a block about as often as its id occurs in the rows (each deleted row
    touches its user and its items), and a block not held is computed from as many rows: the
    busiest blocks, whichever side, save the most per byte kept. A block costs its float32
    storage, factor and inverse (a cache shared by IFRU and AltEraser holds both).
    """
    sides = list(counts)
    per_block = torch.cat([torch.full_like(counts[side], 12 * width[side] ** 2, dtype=torch.float64) for side in sides])
    score = torch.cat([counts[side] for side in sides]).double() / per_block
    order = torch.argsort(score, descending=True, stable=True)
    taken = order[torch.cumsum(per_block[order], 0) <= budget]
    start, held = 0, {}
    for side in sides:
        end = start + len(counts[side])
        held[side] = torch.sort(taken[(taken >= start) & (taken < end)] - start).values
        start = end
    return held


@dataclass
class _Table:
    """One side's held blocks: ``blocks[s]`` is the block of id ``ids[s]``, and ``slot[i]`` the slot of id ``i`` (-1: not held)."""

    blocks: Tensor  # (capacity, d, d): float64 when every block is held, float32 under a budget
    slot: Tensor  # (n,) long
    ids: Tensor  # (capacity,) long
    used: Tensor  # (capacity,) long: when each slot was last read (a counter of lookups)

    @classmethod
    def of(cls, ids: Tensor, size: int, width: int, dtype: torch.dtype) -> _Table:
        slot = torch.full((size,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        blocks = torch.zeros(len(ids), width, width, dtype=dtype, device=ids.device)
        return cls(blocks, slot, ids.clone(), torch.zeros(len(ids), dtype=torch.long, device=ids.device))


class CurvatureCache:
    """Curvature blocks of the retained rows: built once per trained model, downdated per request, bounded by a memory budget.

    :meth:`build` pays for the blocks over every training row (the method reports it as
    precomputation); :meth:`downdate` subtracts a request's deleted rows' contribution in place,
    so the cache always holds the blocks of the data as it now is. :meth:`solve` and
    :meth:`solve_factored` solve with the blocks, reusing the factorisations of earlier requests. A
    method whose step is small calls :meth:`adopt` to keep the blocks for the updated model; any
    other change of the parameters invalidates them (:meth:`holds` compares the model's
    :func:`~lightning_unlearn.models.functional.fingerprint`).

    With ``budget_bytes`` smaller than :func:`cache_bytes`, the cache holds as many blocks as fit
    (float32 storage of blocks, factors and inverses, float64 accumulation and solves; all three count against the budget),
    starting with the users and items that occur in most rows, ranked together. A block it does not hold is computed when
    asked for, from the retained rows that touch it (as :class:`FreshCurvature` does), and takes
    the slot of the least recently used one (:meth:`solve` and :meth:`solve_factored` take none:
    they solve such a block from its rows). Without a budget, or when everything fits, every block is held in float64.

    Args:
        budget_bytes: the most the blocks, their factors and inverses may take (``None``: no bound).

    Raises:
        ValueError: on a budget that is not a number > 0.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model, cache = MF(2, 3, embedding_dim=2), CurvatureCache()
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([[2], [0]]))
        >>> kept, gone = rows.select(torch.tensor([True, False])), rows.select(torch.tensor([False, True]))
        >>> cache.build(model, rows)
        >>> cache.downdate(model, kept, gone)
        >>> ids = torch.arange(3)
        >>> torch.allclose(cache.block("items", ids), curvature_blocks(model, kept).items), cache.holds(model)
        (True, True)
    """

    def __init__(self, budget_bytes: float | None = None) -> None:
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float))
                                         or not budget_bytes > 0):
            raise ValueError(f"CurvatureCache(budget_bytes=...) must be a number > 0 or None, got {budget_bytes!r}.")
        self.budget_bytes = budget_bytes
        self.clear()

    def fits(self, model: Recommender) -> bool:
        """Whether every block of ``model`` fits in the budget (then every one is held, in float64).

        Example:
            >>> from lightning_unlearn.models import MF
            >>> CurvatureCache(budget_bytes=2**20).fits(MF(1000, 100_000, embedding_dim=8))
            False
        """
        return self.budget_bytes is None or cache_bytes(model) <= self.budget_bytes

    def build(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None) -> None:
        """Compute the blocks of ``model`` over ``rows`` (every row it was trained on), replacing the cache.

        Under a budget, the blocks held are those of the users and items with the most rows (ranked together, per byte).

        Args:
            model: the trained model the blocks are taken at.
            rows: the rows whose terms are summed.
            context: on several processes, each computes its shard of the rows and the blocks
                are summed over processes, so every process holds the same cache.
        """
        context = context or UnlearningContext()
        self.clear()
        width, device = _widths(model), rows.users.device
        counts = {side: occurrences(rows, side, model) for side in ("users", "items")}
        self._counts = counts
        if self.fits(model):
            ids, dtype = {side: torch.arange(len(count), device=device) for side, count in counts.items()}, torch.float64
        else:
            ids, dtype = _busiest(counts, width, self.budget_bytes), torch.float32
        tables = {side: _Table.of(ids[side], len(counts[side]), width[side], dtype) for side in counts}
        with torch.no_grad():
            vectors = tuple(t.detach() for t in model.representations())
        held = CurvatureBlocks(tables["users"].blocks, tables["items"].blocks)
        _add_curvature(model, vectors, context.shard(rows), held, tables["users"].slot, tables["items"].slot, sign=1.0)
        for table in tables.values():
            table.blocks = context.reduce(table.blocks)
        self._tables, self._fingerprint = tables, fingerprint(model)

    def downdate(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext | None = None) -> None:
        """Subtract the ``deleted`` rows' blocks in place: the cache now holds the blocks of the ``retained`` rows.

        Blocks asked for later and not held are computed from ``retained`` (at the parameters
        of ``model`` then).

        Args:
            model: the model the cache holds (:meth:`build` it first).
            retained: the rows that remain (users left without any have their block zeroed).
            deleted: the rows this request removes.
            context: on several processes, each subtracts the sum over every process's shard.

        Raises:
            RuntimeError: the cache does not hold ``model``'s parameters, or (:class:`RowsMismatch`) ``retained`` and
                ``deleted`` do not add up to the rows it holds (nothing is changed).
        """
        if not self.holds(model):
            raise RuntimeError("the curvature cache does not hold this model's parameters: build(model, rows) first.")
        held_rows = int(self._counts["users"].sum())  # one user per row
        if len(retained) + len(deleted) != held_rows:
            raise RowsMismatch(f"the curvature cache holds the blocks of {held_rows} rows, but retained ({len(retained)}) and "
                               f"deleted ({len(deleted)}) rows add up to {len(retained) + len(deleted)}: build(model, rows) "
                               "on the rows the model was trained on.")
        context = context or UnlearningContext()
        users, items = self._tables["users"], self._tables["items"]
        if self._undo is not None:
            self._record_touched(deleted)
        # out of place: a rollback hands back the counts as they were at mark()
        self._counts = {side: self._counts[side].index_add(0, ids, torch.ones_like(ids), alpha=-1)
                        for side, ids in (("users", deleted.users), ("items", deleted.all_items()))}
        self._source, self.hits, self.misses = FreshCurvature(model, retained, context, self._counts), 0, 0
        if context.world_size == 1:  # subtract in place, no copies
            # users left without rows (a deleted user) have an empty block: zero it rather than subtract every row
            user_slot = users.slot.clone()
            gone = torch.unique(deleted.users)
            gone = user_slot[gone[self._counts["users"][gone] == 0]]
            users.blocks[gone[gone >= 0]] = 0.0
            user_slot[users.ids[gone[gone >= 0]]] = -1
            with torch.no_grad():
                vectors = tuple(t.detach() for t in model.representations())
            _add_curvature(model, vectors, deleted, CurvatureBlocks(users.blocks, items.blocks), user_slot, items.slot, sign=-1.0)
            return
        for table, ids in zip((users, items), touched(deleted)):
            held = ids[table.slot[ids] >= 0]
            removed = curvature_blocks(model, context.shard(deleted), **{"users" if table is users else "items": held},
                                       **{"items" if table is users else "users": held[:0]})
            removed = context.reduce(removed.users if table is users else removed.items)
            table.blocks[table.slot[held]] -= removed.to(table.blocks.dtype)

    @property
    def blocks(self) -> CurvatureBlocks:
        """The held blocks, by slot: by id when every block is held (no budget, or within it); :meth:`build` them first."""
        if self._fingerprint is None:
            raise RuntimeError("the curvature cache is empty: build(model, rows) first.")
        return CurvatureBlocks(self._tables["users"].blocks, self._tables["items"].blocks)

    def occurrences(self, side: str) -> Tensor:
        """How often each id of ``side`` (``"users"`` or ``"items"``) occurs in the rows the blocks sum over (after the downdates).

        Kept with the blocks and downdated with them, so a request needs no pass over every row
        to find its orphans or its blocks' L2 terms.
        """
        if self._fingerprint is None:
            raise RuntimeError("the curvature cache is empty: build(model, rows) first.")
        return self._counts[side]

    def held(self, side: str) -> Tensor:
        """The ids of the blocks of ``side`` (``"users"`` or ``"items"``) the cache holds, in slot order."""
        return self._tables[side].ids

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now: blocks, and the factors and inverses kept for them."""
        stores = [*self._tables.values(), *self._factored.values(), *self._inverses.values()]
        return sum(t.nbytes for store in stores for t in vars(store).values() if isinstance(t, Tensor))

    def block(self, side: str, ids: Tensor) -> Tensor:
        """The float64 ``(len(ids), d, d)`` blocks ``ids`` (distinct) of ``side`` (``"users"`` or ``"items"``)."""
        slots, extra = self._lookup(side, ids)
        table = self._tables[side].blocks
        if extra is None:
            return table[slots].double()
        held = slots >= 0
        out = torch.empty(len(ids), *table.shape[1:], dtype=torch.float64, device=table.device)
        out[held], out[~held] = table[slots[held]].double(), extra
        return out

    def holds(self, model: Recommender) -> bool:
        """Whether the cache was built (or adopted) for ``model``'s current parameters."""
        return self._fingerprint is not None and torch.equal(self._fingerprint, fingerprint(model))

    def solve_factored(self, side: str, ids: Tensor, rhs: Tensor, shift: float, tolerance: float) -> tuple[Tensor, BlockSolveResult, int]:
        """Solve ``(B_i + shift I) x_i = rhs_i`` for the blocks ``ids`` (distinct) of ``side`` with Cholesky factors kept from earlier requests.

        A factor is reused while its block's trace and the shift have moved by at most
        ``tolerance`` (relative) since it was computed; the others are refactored (batched, with
        :func:`~lightning_unlearn.linalg.factor_blocks`' escalation). Deleting a few of a block's
        rows changes it by a few percent, so most blocks of a request reuse their factors; the
        step then solves with a slightly stale curvature (relative error about ``tolerance``).
        ``tolerance=0`` refactors every block asked for (exact; under a budget the factors are kept
        in float32, like the blocks). After a :meth:`downdate`, blocks not held are solved from the
        retained rows that touch them and take no slot, as in :meth:`solve`.

        The held blocks' factors are read a few MiB at a time, each piece solved while it is in
        cache and in the factors' dtype: copying every factor out in float64 first (250 MB for the
        30,000 blocks of ``d = 32`` a whole-users request touches at 10^6 items) cost more than
        the solves.

        Args:
            side: ``"users"`` or ``"items"``.
            ids: the blocks to solve (distinct).
            rhs: ``(len(ids), d)`` float64 right-hand sides.
            shift: the damping added to the diagonal.
            tolerance: ``>= 0``, the relative drift a reused factor may have.

        Returns:
            ``(x, result, refactored)``: the solutions (0 for failed blocks), their damping and
            failures, and how many blocks were factored now.
        """
        ids = ids.to(self._tables[side].slot.device)
        here, away = self._held_or_away(side, ids)
        slots, store, refactored = self._refresh_factors(side, ids[here], shift, tolerance)
        x = torch.zeros_like(rhs)
        damping = torch.empty(len(ids), dtype=torch.float64, device=rhs.device)
        failed = torch.empty(len(ids), dtype=torch.bool, device=rhs.device)
        for part in _chunks(torch.arange(len(here), device=here.device), store.factors, chunk_bytes=_PCG_PIECE_BYTES):
            where, at = slots[part], here[part]
            # in the factors' dtype: a float32 factor (under a budget) is no more exact solved in float64, only slower
            solved, failed[at] = solve_factored(store.factors[where], rhs[at].to(store.factors.dtype), store.failed[where])
            x[at] = solved.to(x.dtype)
            damping[at] = store.damping[where]
        refactored += self._solve_away(side, ids, rhs, shift, away, x, damping, failed)
        return x, BlockSolveResult.from_damping(damping, failed, shift), refactored

    def refactor(self, side: str, ids: Tensor, shift: float, tolerance: float) -> int:
        """Refactor the held blocks ``ids`` of ``side`` whose factors :meth:`solve_factored` would not reuse; how many were.

        What a method calls once after :meth:`build`, so that its requests find the factors.

        Args:
            side: ``"users"`` or ``"items"``.
            ids: held blocks of ``side`` (distinct), e.g. :meth:`held`.
            shift: the damping added to the diagonal.
            tolerance: ``>= 0``, the relative drift a reused factor may have.
        """
        return self._refresh_factors(side, ids, shift, tolerance)[2]

    def _held_or_away(self, side: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Positions in ``ids`` of the blocks to solve in the cache and of those to solve from their rows (not held, after a :meth:`downdate`)."""
        table = self._tables[side]
        away = table.slot[ids.to(table.slot.device)] < 0
        if self._source is None:  # nothing to solve them from: the lookup of the held ones names what is missing
            away = torch.zeros_like(away)
        return torch.nonzero(~away).squeeze(1), torch.nonzero(away).squeeze(1)

    def _solve_away(self, side: str, ids: Tensor, rhs: Tensor, shift: float, away: Tensor, x: Tensor, damping: Tensor,
                    failed: Tensor) -> int:
        """Solve the blocks at positions ``away`` of ``ids`` (not held) from their rows into ``x``, ``damping`` and ``failed``; how many were solved."""
        if not len(away):
            return 0
        x[away], result, solved, _ = self._source.solve(side, ids[away], rhs[away], shift)
        damping[away], failed[away] = result.block_damping, result.failed_mask
        self.misses += len(away)
        return solved

    def _refresh_factors(self, side: str, ids: Tensor, shift: float, tolerance: float) -> tuple[Tensor, _Factored, int]:
        """The slots of ``ids`` (held: see :meth:`_lookup`), after refactoring those whose factors drifted.

        Returns ``(slots, store, refactored)``: ``store`` holds the factors by slot.
        """
        slots, _ = self._lookup(side, ids)
        blocks = self._tables[side].blocks
        store = self._factored.get(side)
        if store is None:
            store = self._factored[side] = _Factored.empty(blocks)
        at = slots[slots >= 0]
        trace = torch.diagonal(blocks, dim1=1, dim2=2)[at].sum(1).double()
        if tolerance > 0:
            fresh = ((trace - store.trace[at]).abs() <= tolerance * store.trace[at]) & ~store.failed[at]
            fresh &= (store.shift[at] - shift).abs() <= tolerance * shift
        else:
            fresh = torch.zeros_like(trace, dtype=torch.bool)
        stale = torch.nonzero(~fresh).squeeze(1)
        for part in _chunks(stale, blocks, chunk_bytes=_PIECE_BYTES):
            where = at[part]
            self._record_store(store, where)
            factors, result = factor_blocks(blocks[where].double(), damping=shift)
            store.factors[where], store.damping[where], store.failed[where] = factors.to(blocks.dtype), result.block_damping, result.failed_mask
            store.trace[where], store.shift[where] = trace[part], shift
        return slots, store, len(stale)

    def solve(self, side: str, ids: Tensor, rhs: Tensor, shift: float, tol: float | None = None,
              max_iter: int = 10) -> tuple[Tensor, BlockSolveResult, int, int]:
        """Solve ``(B_i + shift I) x_i = rhs_i`` for the blocks ``ids`` (distinct) of ``side``, exactly, reusing old work.

        Each held block's inverse is kept from the last time it was factorised (see
        :meth:`precondition`); since then the block lost a few rows' rank-one terms, so CG
        preconditioned with the old inverse (:func:`~lightning_unlearn.linalg.pcg_blocks`)
        reaches the current block's solution in a few batched matrix-vector products. Blocks
        whose CG does not converge are factorised afresh (with
        :func:`~lightning_unlearn.linalg.factor_blocks`' escalation) and their inverses renewed.
        After a :meth:`downdate`, blocks not held are solved from the retained rows that touch
        them (:meth:`FreshCurvature.solve`: from the rows themselves where they are few, formed
        and factorised otherwise) and take no slot (such a block is seldom asked for again).
        Unlike :meth:`solve_factored` with a tolerance, nothing stale enters the solution.

        Args:
            side: ``"users"`` or ``"items"``.
            ids: the blocks to solve.
            rhs: ``(len(ids), d)`` float64 right-hand sides.
            shift: ``>= 0``, the damping added to the diagonal.
            tol: the relative residual each block's CG must reach (default ``sqrt(eps)``).
            max_iter: CG iterations before a block is factorised afresh.

        Returns:
            ``(x, result, refactored, iterations)``: the solutions (0 for failed blocks), the
            damping each block needed, how many blocks were solved afresh (factorised now, or
            from their rows), and the CG iterations run.

        Raises:
            RuntimeError: a block is not held and the cache was not downdated (no rows to compute it from).
        """
        x = torch.zeros_like(rhs)
        damping = torch.full((len(ids),), float(shift), dtype=torch.float64, device=rhs.device)
        failed = torch.zeros(len(ids), dtype=torch.bool, device=rhs.device)
        ids = ids.to(self._tables[side].slot.device)
        here, away = self._held_or_away(side, ids)
        refactored, iterations = 0, 0
        if len(here):
            x[here], damping[here], failed[here], refactored, iterations = self._solve_held(side, ids[here], rhs[here], shift, tol,
                                                                                           max_iter)
        refactored += self._solve_away(side, ids, rhs, shift, away, x, damping, failed)
        return x, BlockSolveResult.from_damping(damping, failed, shift), refactored, iterations

    def _solve_held(self, side: str, ids: Tensor, rhs: Tensor, shift: float, tol: float | None,
                    max_iter: int) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """:meth:`solve` of held blocks: ``(x, damping, failed, refactored, iterations)``."""
        slots, _ = self._lookup(side, ids)  # every one is held (or the lookup raises: nothing to compute it from)
        blocks = self._tables[side].blocks
        store = self._inverses.get(side)
        if store is None:
            store = self._inverses[side] = _Inverses.empty(blocks)
        x = torch.zeros_like(rhs)
        damping = torch.full((len(ids),), float(shift), dtype=torch.float64, device=rhs.device)
        failed = torch.zeros(len(ids), dtype=torch.bool, device=rhs.device)
        kept = store.valid[slots]
        cached, redo = torch.nonzero(kept).squeeze(1), torch.nonzero(~kept).squeeze(1)
        iterations, renew = 0, cached[:0]
        if len(cached):
            solved, converged, iterations = _pcg_cached(blocks, store.inverse, slots[cached], rhs[cached], shift, tol, max_iter)
            x[cached[converged]] = solved[converged]
            renew = cached[~converged]
            redo = torch.cat([redo, renew])
        first = len(redo) - len(renew)  # blocks without an inverse keep none: one computed on demand is seldom asked for again
        for part in _chunks(torch.arange(len(redo), device=redo.device), blocks, chunk_bytes=_PIECE_BYTES):
            at = redo[part]
            factors, result = factor_blocks(blocks[slots[at]].double(), damping=shift)
            x[at], failed[at] = solve_factored(factors, rhs[at], result.failed_mask)
            damping[at] = result.block_damping
            again = part >= first
            self._record_store(store, slots[at[again]])
            store.keep(slots[at[again]], factors[again], failed[at[again]])
        return x, damping, failed, len(redo), iterations

    def preconditioned(self, side: str, shift: float) -> bool:
        """Whether :meth:`precondition` has kept inverses for ``side`` (``"users"`` or ``"items"``) damped by ``shift``.

        Inverses kept for another shift (another method's damping, on a shared cache) would
        precondition :meth:`solve` poorly: its CG would stop unconverged and refactor every block.
        """
        store = self._inverses.get(side)
        return store is not None and math.isclose(store.shift, shift, rel_tol=1e-12)

    def precondition(self, side: str, shift: float, transform: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        """Factorise every held block of ``side`` (damped by ``shift``) and keep the inverses :meth:`solve` starts from.

        ``transform(ids, blocks)``, if given, is what is factorised instead of the blocks of
        ``ids`` (a graph model's base-row blocks, :func:`base_row_blocks`): those inverses are
        for :meth:`kept_inverses`, a preconditioner, not for :meth:`solve`.
        """
        table = self._tables[side]
        store = self._inverses[side] = _Inverses.empty(table.blocks, shift)
        for at in _chunks(torch.arange(len(table.blocks), device=table.blocks.device), table.blocks):
            blocks = table.blocks[at].double()
            factors, result = factor_blocks(blocks if transform is None else transform(table.ids[at], blocks), damping=shift)
            store.keep(at, factors, result.failed_mask)

    def kept_inverses(self, side: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The float32 inverses :meth:`precondition` kept for ``ids`` that have one, and the mask of those ids.

        An id has none when its block is not held, was replaced since, or did not factor.
        """
        table, store = self._tables[side], self._inverses.get(side)
        slots = table.slot[ids.to(table.slot.device)]
        have = slots >= 0
        if store is None:
            return table.blocks.new_empty(0, *table.blocks.shape[1:], dtype=torch.float32), torch.zeros_like(have)
        have &= store.valid[slots.clamp_min(0)]
        return store.inverse[slots[have]], have

    def mark(self) -> None:
        """Record every later change of the held blocks, so that :meth:`rollback` returns the cache to this state.

        ``compare`` marks the cache built for the trained model, lets a method take its request
        (downdate, blocks computed into evicted slots, adopt), rolls back, and hands the same
        cache to the next method: one build for every method. The log holds the changed blocks
        as they were (those the deletion touches, and those evicted).
        """
        self._undo = []
        # the stores as objects (a request may add or replace one), the LRU clock and every slot's last read
        self._marked = (self._fingerprint, self._counts, dict(self._factored), dict(self._inverses), self._reads,
                        {side: table.used.clone() for side, table in self._tables.items()})
        self._saved = {side: torch.zeros(len(table.ids), dtype=torch.bool, device=table.ids.device) for side, table in self._tables.items()}

    def save(self, rows: TrainRows) -> None:
        """Since :meth:`mark`: record now the blocks ``rows`` touch, so that a request's :meth:`downdate` by them records nothing.

        ``compare`` calls it before it times a request: copying the touched blocks for
        :meth:`rollback` is the comparison's cost, not the method's.

        Raises:
            RuntimeError: the cache was not marked (or was cleared since).
        """
        if self._undo is None:
            raise RuntimeError("the curvature cache was not marked: mark() it before saving blocks for rollback().")
        self._record_touched(rows)

    @property
    def marked(self) -> bool:
        """Whether changes are being recorded for :meth:`rollback` (since :meth:`mark`, until :meth:`clear`)."""
        return self._undo is not None

    def rollback(self) -> None:
        """Undo the changes since :meth:`mark`: the blocks, and the parameters they are taken at, are as they were then.

        Raises:
            RuntimeError: the cache was not marked (or was cleared since).
        """
        if self._undo is None:
            raise RuntimeError("the curvature cache was not marked: mark() it before the changes to undo.")
        for record in reversed(self._undo):
            if isinstance(record[0], _Factored | _Inverses):  # factors or inverses as they were before a request renewed them
                store, slots, fields = record
                for name, values in fields.items():
                    getattr(store, name)[slots] = values
                continue
            side, slots, blocks, ids, replaced = record
            table = self._tables[side]
            if replaced:  # the slots held other blocks: give them back their ids, and drop what was computed from the new ones
                table.slot[table.ids[slots]] = -1
                table.ids[slots], table.slot[ids] = ids, slots
                for store in (self._factored.get(side), self._inverses.get(side)):
                    if store is not None:
                        store.forget(slots)
            table.blocks[slots] = blocks
        self._fingerprint, self._counts, factored, inverses, self._reads, used = self._marked
        self._factored, self._inverses, self._undo = dict(factored), dict(inverses), []
        for side, table in self._tables.items():
            table.used.copy_(used[side])
        self._source = None  # the rows it computed from are the rolled-back request's
        for saved in self._saved.values():
            saved.zero_()

    def _record_touched(self, rows: TrainRows) -> None:
        """Record the held blocks ``rows`` touch, those not recorded since :meth:`mark` (rollback restores a slot's first record last)."""
        for side, ids in zip(("users", "items"), touched(rows)):
            slots = self._tables[side].slot[ids]
            slots = slots[slots >= 0]
            slots = slots[~self._saved[side][slots]]
            if len(slots):
                self._saved[side][slots] = True
                self._record(side, slots, replaced=False)

    def _record_store(self, store: _Factored | _Inverses | None, slots: Tensor) -> None:
        """Since :meth:`mark`: record ``store``'s entries at ``slots`` before they change (a refactored block, a renewed inverse)."""
        if self._undo is not None and store is not None and len(slots):
            self._undo.append((store, slots.clone(), {name: getattr(store, name)[slots].clone() for name in store.FIELDS}))

    def _record(self, side: str, slots: Tensor, replaced: bool) -> None:
        table = self._tables[side]
        self._undo.append((side, slots, table.blocks[slots].clone(), table.ids[slots].clone(), replaced))

    def adopt(self, model: Recommender) -> None:
        """Keep the cached blocks for ``model``'s current parameters (after a small step)."""
        if self._fingerprint is not None:
            self._fingerprint = fingerprint(model)

    def clear(self) -> None:
        """Drop the cache (e.g. after a failed request whose downdate must not persist)."""
        self._fingerprint: Tensor | None = None  # of the model the blocks were taken at
        self._counts: dict[str, Tensor] = {}  # per side: occurrences of every id in the rows held (their L2 terms), downdated
        self._tables: dict[str, _Table] = {}
        self._source: FreshCurvature | None = None  # what blocks not held are computed from: the retained rows
        self._factored: dict[str, _Factored] = {}  # per side: Cholesky factors of damped blocks, reused while fresh
        self._inverses: dict[str, _Inverses] = {}  # per side: inverses of damped blocks as they were, CG preconditioners
        self._reads, self.hits, self.misses = 0, 0, 0  # lookups so far; blocks read from the cache and computed, this request
        self._undo: list | None = None  # since mark(): (side, slots, blocks, ids, replaced) as they were, per change
        self._marked: tuple | None = None  # at mark(): the fingerprint, counts, stores, LRU clock and last reads
        self._saved: dict[str, Tensor] = {}  # per side, since mark(): the slots whose blocks are recorded as they were then

    def _lookup(self, side: str, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """The slots of ``ids``, after computing the blocks not held and taking the least recently used slots for them.

        Returns ``(slots, extra)``: ids that found no slot (more were asked for than the cache
        holds) have slot ``-1``, and ``extra`` holds their float64 blocks, in order (``None``
        when every id has a slot).
        """
        table = self._tables[side]
        self._reads += 1
        ids = ids.to(table.slot.device)
        slots = table.slot[ids]
        hit = slots >= 0
        table.used[slots[hit]] = self._reads
        missing = torch.nonzero(~hit).squeeze(1)
        self.hits, self.misses = self.hits + len(ids) - len(missing), self.misses + len(missing)
        if not len(missing):
            return slots, None
        if self._source is None:
            raise RuntimeError(f"{len(missing)} {side} blocks are not held and there are no rows to compute them from: "
                               "downdate(model, retained, deleted) first.")
        k = min(len(missing), len(table.ids) - (len(ids) - len(missing)))  # the slots this lookup did not read
        if k > 0:
            victims = torch.topk(table.used, k, largest=False).indices
            if self._undo is not None:  # the stores first: rollback gives the blocks back, then their factors and inverses
                for store in (self._factored.get(side), self._inverses.get(side)):
                    self._record_store(store, victims)
                self._record(side, victims, replaced=True)
            table.slot[table.ids[victims]] = -1
            new = ids[missing[:k]]
            table.ids[victims], table.slot[new], table.used[victims] = new, victims, self._reads
            for part in _chunks(torch.arange(k, device=victims.device), table.blocks, chunk_bytes=_PIECE_BYTES):
                table.blocks[victims[part]] = self._source.block(side, new[part]).to(table.blocks.dtype)  # a few MiB at a time
            slots[missing[:k]] = victims
            for store in (self._factored.get(side), self._inverses.get(side)):
                if store is not None:
                    store.forget(victims)
        return slots, (self._source.block(side, ids[missing[k:]]) if k < len(missing) else None)


def self_weights(model: Recommender) -> Tensor:
    """LightGCN's ``diag(sum_l A^l) / (L + 1)``: the weight of a node's base row in its own propagated vector.

    Users first, then items. The graph is bipartite, so odd powers have a zero diagonal;
    ``diag(A^2)`` is the row sums of the squared entries. Even powers beyond 2 (four or more
    layers) are left out.

    Example:
        >>> from lightning_unlearn.data import Interactions
        >>> from lightning_unlearn.models import LightGCN
        >>> model = LightGCN(2, 2, embedding_dim=2, num_layers=2)
        >>> model.set_graph(Interactions.from_raw([0, 0, 1], [0, 1, 1]))
        >>> [round(w, 4) for w in self_weights(model).tolist()]  # (1 + sum_j A_ij^2) / 3
        [0.5833, 0.5, 0.5, 0.5833]
    """
    adjacency = model.adjacency
    layers = int(getattr(model, "num_layers", 0))
    weight = torch.ones(adjacency.shape[0], dtype=torch.float64, device=adjacency.device)
    if layers >= 2:
        coo = adjacency.to_sparse_coo().coalesce()
        weight = weight.index_add(0, coo.indices()[0], coo.values().double().square())
    return weight / (layers + 1)


def base_row_blocks(model: Recommender, side: str, ids: Tensor, blocks: Tensor, counts: Tensor, weights: Tensor | None = None) -> Tensor:
    """A graph model's curvature blocks of its base embedding rows, from those of its propagated vectors.

    A base row reaches its own propagated vector with weight ``c`` (:func:`self_weights`), so its
    data curvature is about ``c^2`` times the propagated vector's (the coupling through the
    graph left out); the L2 term, ``l2`` per occurrence of the row, sits on the base row itself.

    Args:
        model: the graph model.
        side: ``"users"`` or ``"items"``.
        ids: the ids of ``blocks``.
        blocks: ``(len(ids), d, d)`` blocks of the propagated vectors (:func:`curvature_blocks`).
        counts: how often each id occurs in the rows summed (its L2 terms).
        weights: :func:`self_weights` of ``model``, if already computed.

    Example:
        >>> from lightning_unlearn.data import Interactions
        >>> from lightning_unlearn.models import LightGCN
        >>> model = LightGCN(2, 2, embedding_dim=1, num_layers=0, l2=0.5)  # no propagation: c = 1
        >>> model.set_graph(Interactions.from_raw([0, 1], [0, 1]))
        >>> base_row_blocks(model, "users", torch.tensor([1]), torch.full((1, 1, 1), 3.0, dtype=torch.float64), torch.tensor([2.0])).item()
        3.0
    """
    weights = self_weights(model) if weights is None else weights
    offset = 0 if side == "users" else model.num_users
    c = weights[ids.to(weights.device) + offset].to(device=blocks.device, dtype=blocks.dtype)
    # c^2 (B - l2 n I) + l2 n I: one scaled copy, the penalty's share added on its diagonal
    out = blocks * c.square().view(-1, 1, 1)
    out.diagonal(dim1=1, dim2=2).add_((model.l2 * (1 - c.square()) * counts.to(blocks)).unsqueeze(1))
    return out


def keep_inverses(cache: CurvatureCache, model: Recommender, shift: float) -> None:
    """:meth:`CurvatureCache.precondition` both sides of ``cache`` at ``shift``, unless a method sharing it did.

    On a graph model the inverses are those of the base rows' blocks (:func:`base_row_blocks`,
    with the L2 counts the cache keeps: :meth:`CurvatureCache.occurrences`).
    """
    weights = self_weights(model) if is_graph(model) else None
    for side in ("users", "items"):
        if cache.preconditioned(side, shift):
            continue
        counts = cache.occurrences(side)
        transform = None if weights is None else lambda ids, blocks, side=side, counts=counts: base_row_blocks(
            model, side, ids, blocks, counts[ids], weights)
        cache.precondition(side, shift, transform)


class FreshCurvature:
    """Curvature blocks computed when asked for, at the model's current parameters, from the rows that touch them.

    What a method uses instead of a :class:`CurvatureCache` when the blocks of every user and
    item would not fit in memory (or are not worth keeping): each request pays for the blocks of
    its scope only, from the rows that involve them, so its cost and memory follow the deletion's
    neighbourhood, not the catalog. It offers the cache's :meth:`block` and :meth:`solve` (a fresh
    batched Cholesky of each block; nothing is kept between requests).

    Args:
        model: the model the blocks are taken at (read when a block is asked for).
        rows: the rows whose terms are summed (the retained rows).
        context: on several processes, each sums its shard of the rows and the blocks are summed.
        counts: :meth:`occurrences` of ``rows`` per side, if known (a :class:`CurvatureCache` keeps
            them); counted over ``rows`` when first needed otherwise.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(3, 4, embedding_dim=2)
        >>> rows = TrainRows(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([[2], [0], [1]]))
        >>> fresh, ids = FreshCurvature(model, rows), torch.tensor([2, 0])
        >>> torch.allclose(fresh.block("items", ids), curvature_blocks(model, rows).items[ids])
        True
    """

    def __init__(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None,
                 counts: dict[str, Tensor] | None = None):
        self.model, self.rows, self.context = model, rows, context or UnlearningContext()
        # per side: occurrences of every id in rows (its L2 terms), counted when first needed
        self._counts: dict[str, Tensor] = dict(counts or {})

    def occurrences(self, side: str) -> Tensor:
        """How often each id of ``side`` (``"users"`` or ``"items"``) occurs in the rows (:func:`~lightning_unlearn.unlearning.methods.scope.occurrences`)."""
        if side not in self._counts:
            self._counts[side] = occurrences(self.rows, side, self.model)
        return self._counts[side]

    def _touching(self, side: str, ids: Tensor) -> TrainRows:
        """The rows whose loss involves one of ``ids`` of ``side``."""
        model, rows = self.model, self.rows
        mask = rows_of_users(rows, ids, model.num_users) if side == "users" else rows_of_items(rows, ids, model.num_items)
        return restrict(rows, mask)

    def block(self, side: str, ids: Tensor) -> Tensor:
        """The ``(len(ids), d, d)`` blocks ``ids`` of ``side`` (``"users"`` or ``"items"``), from the rows that involve them."""
        ids = ids.to(self.rows.users.device)
        other = "items" if side == "users" else "users"
        blocks = curvature_blocks(self.model, self.context.shard(self._touching(side, ids)), **{side: ids, other: ids[:0]})
        return self.context.reduce(getattr(blocks, side))

    def few_rows(self, side: str, ids: Tensor) -> Tensor:
        """Which blocks ``ids`` of ``side`` have a data part of rank at most half their width: :meth:`solve` takes them from their rows.

        The rank is bounded by the block's Gauss-Newton terms: one per occurrence of an item,
        ``k`` (BPR) or ``1 + k`` (BCE) per row of a user. On several processes no block is taken
        from its rows (its terms are spread over the processes' shards): every one is formed.

        Example:
            >>> from lightning_unlearn.models import MF
            >>> rows = TrainRows(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([[0], [0], [1]]))
            >>> FreshCurvature(MF(2, 3, embedding_dim=4), rows).few_rows("items", torch.tensor([0, 2])).tolist()  # 2 terms each, <= 4 / 2
            [True, True]
        """
        if self.context.world_size > 1:
            return torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        counts = self.occurrences(side)
        per_row = 1 if side == "items" else self.rows.negatives.shape[1] + (self.model.loss_name != "bpr")
        return 2 * per_row * counts[ids.to(counts.device)].to(ids.device) <= _widths(self.model)[side]

    def solve(self, side: str, ids: Tensor, rhs: Tensor, shift: float, tol: float | None = None,
              max_iter: int = 10) -> tuple[Tensor, BlockSolveResult, int, int]:
        """Solve ``(B_i + shift I) x_i = rhs_i`` for the blocks ``ids`` of ``side``, as :meth:`CurvatureCache.solve` does, directly.

        A block of few rows (:meth:`few_rows`: most of a sparse catalog's) is a scaled identity,
        ``shift`` plus its L2 terms, and a term of low rank: it is solved from the rows that
        touch it with :func:`~lightning_unlearn.linalg.solve_low_rank`, without forming it. The
        other blocks are formed and factorised (with
        :func:`~lightning_unlearn.linalg.factor_blocks`' escalation, as are blocks the small
        factorisation could not solve). ``tol`` and ``max_iter`` are accepted for the cache's
        signature.

        Returns:
            ``(x, result, solved, 0)``: the solutions (0 for failed blocks), the damping each
            needed, how many blocks were solved afresh (all), and no CG iterations.
        """
        x = torch.zeros_like(rhs)
        damping = torch.full((len(ids),), float(shift), dtype=torch.float64, device=rhs.device)
        failed = torch.zeros(len(ids), dtype=torch.bool, device=rhs.device)
        few = self.few_rows(side, ids)
        if bool(few.any()) and not shift > 0:  # the scaled identity, shift plus the L2 terms, must be positive definite
            few &= self.model.l2 * self.occurrences(side)[ids] > 0
        formed = torch.nonzero(~few).squeeze(1)
        if bool(few.any()):
            low = torch.nonzero(few).squeeze(1)
            x[low], bad = self._solve_from_rows(side, ids[low], rhs[low], shift)
            formed = torch.cat([formed, low[bad]])
        if len(formed):
            factors, result = factor_blocks(self.block(side, ids[formed]), damping=shift)
            x[formed], failed[formed] = solve_factored(factors, rhs[formed], result.failed_mask)
            damping[formed] = result.block_damping
        return x, BlockSolveResult.from_damping(damping, failed, shift), len(ids), 0

    def _solve_from_rows(self, side: str, ids: Tensor, rhs: Tensor, shift: float) -> tuple[Tensor, Tensor]:
        """:func:`~lightning_unlearn.linalg.solve_low_rank` on the Gauss-Newton terms of the rows touching ``ids``."""
        model, device = self.model, self.rows.users.device
        slot, ids = _slots(ids, model.num_users if side == "users" else model.num_items, device)
        with torch.no_grad():
            vectors = tuple(t.detach() for t in model.representations())
        parts = [(rhs.new_zeros(0, rhs.shape[1]), rhs.new_zeros(0), slot[:0])]  # blocks without rows: shift I
        wanted = slot >= 0 if side == "items" else None  # an item's terms: only its own slots of the rows touching it
        for name, jacobians, weights, where in _terms(model, vectors, self._touching(side, ids), items=wanted):
            if name == side:  # every term is a wanted id's; a user's row has several (its J is (R, m, d)), an item's slot one
                index = slot[where].repeat_interleave(weights.numel() // max(len(where), 1))
                parts.append((jacobians.reshape(len(index), -1), weights.reshape(-1), index))
        jacobians, weights, index = (torch.cat(column) for column in zip(*parts))
        alpha = shift + model.l2 * self.occurrences(side)[ids].double()
        return solve_low_rank(jacobians, weights, index, alpha.to(rhs.device), rhs)


def _chunks(slots: Tensor, blocks: Tensor, chunk_bytes: int = 2**27) -> tuple[Tensor, ...]:
    """``slots`` in pieces whose ``blocks``, in float64, take about ``chunk_bytes`` (none when ``slots`` is empty)."""
    return slots.split(max(1, chunk_bytes // (8 * blocks.shape[-1] ** 2))) if len(slots) else ()


def _pcg_cached(blocks: Tensor, inverses: Tensor, ids: Tensor, rhs: Tensor, shift: float, tol: float | None,
                max_iter: int) -> tuple[Tensor, Tensor, int]:
    """:func:`pcg_blocks` on the blocks ``ids`` (distinct) of a cache, read in place where they are most of it.

    A request that touches most items (deleting users touches nearly all) would otherwise copy
    most of the cache just to read it; the blocks it does not touch get a zero right-hand side
    and are solved by 0 before the first iteration. Fewer blocks are copied and solved a few
    MiB at a time (each block's CG is independent of the others'): one copy of them all (240 MB
    for 7,400 blocks at d = 64) spent as long on zeroing fresh pages as the solve itself.
    """
    if 4 * len(ids) < 3 * len(blocks):  # float32 blocks (under a budget) stay float32: half the bytes to read per product
        x, converged, iterations = torch.empty_like(rhs), torch.empty(len(ids), dtype=torch.bool, device=rhs.device), 0
        for part in _chunks(torch.arange(len(ids), device=ids.device), blocks, chunk_bytes=_PCG_PIECE_BYTES):
            at = ids[part]
            x[part], converged[part], used = pcg_blocks(blocks[at], inverses[at], rhs[part], shift=shift, tol=tol, max_iter=max_iter)
            iterations = max(iterations, used)
        return x, converged, iterations
    full = rhs.new_zeros(len(blocks), rhs.shape[1])
    full[ids] = rhs
    x, converged, iterations = pcg_blocks(blocks, inverses, full, shift=shift, tol=tol, max_iter=max_iter)
    return x[ids], converged[ids], iterations


class RowsMismatch(RuntimeError):
    """The rows given do not add up to the rows the cache holds (e.g. rows deleted already): nothing was changed."""


@dataclass
class _Factored:
    """Cached factors of one side's damped blocks and what they were computed from."""

    FIELDS: ClassVar[tuple[str, ...]] = ("factors", "trace", "shift", "damping", "failed")  # per slot
    factors: Tensor  # (n, d, d) lower Cholesky factors of blocks + damping I, in the blocks' dtype (float32 under a budget)
    trace: Tensor  # (n,) trace of each block when factored (nan: never)
    shift: Tensor  # (n,) shift asked for
    damping: Tensor  # (n,) damping used (>= shift where escalated)
    failed: Tensor  # (n,) bool

    @classmethod
    def empty(cls, blocks: Tensor) -> _Factored:
        n = blocks.shape[0]
        nan = torch.full((n,), float("nan"), dtype=torch.float64, device=blocks.device)
        factors = torch.zeros_like(blocks)
        return cls(factors, nan, nan.clone(), nan.clone(), torch.zeros(n, dtype=torch.bool, device=blocks.device))

    def forget(self, slots: Tensor) -> None:
        """The blocks in ``slots`` were replaced: their factors are refactored when next asked for."""
        self.trace[slots], self.failed[slots] = float("nan"), False


@dataclass
class _Inverses:
    """Kept inverses of one side's damped blocks (as they were when factorised) and which are usable."""

    FIELDS: ClassVar[tuple[str, ...]] = ("inverse", "valid")  # per slot
    inverse: Tensor  # (n, d, d) float32: a preconditioner needs no more, and reading it costs half
    valid: Tensor  # (n,) bool
    shift: float  # the damping of the blocks inverted by precondition (nan: none)

    @classmethod
    def empty(cls, blocks: Tensor, shift: float = float("nan")) -> _Inverses:
        return cls(torch.empty_like(blocks, dtype=torch.float32), torch.zeros(blocks.shape[0], dtype=torch.bool, device=blocks.device),
                   shift)

    def keep(self, ids: Tensor, factors: Tensor, failed: Tensor) -> None:
        """Store the inverses of the factored blocks ``ids`` (lower Cholesky ``factors``), except failed ones."""
        ok = ~failed
        self.inverse[ids[ok]] = inverse_factored(factors[ok]).to(self.inverse.dtype)
        self.valid[ids] = ok

    def forget(self, slots: Tensor) -> None:
        """The blocks in ``slots`` were replaced: their inverses no longer apply."""
        self.valid[slots] = False


def exact_hessian_blocks(
    model: Recommender, rows: TrainRows, users: Tensor | None = None, items: Tensor | None = None, chunk_size: int = 512
):
    """Exact Hessian blocks of ``sum_r loss_r`` w.r.t. each user's and each item's vector (``torch.func``).

    Like :func:`~lightning_unlearn.unlearning.methods.curvature.curvature_blocks`, but with the
    second derivatives of the scores kept (they vanish for MF, where both agree). A row's block
    for an item is the Hessian w.r.t. that slot's vector with the row's other slots fixed.
    Vectors are those of ``model.representations()``; costs ``rows x (1 + k)^2 x d^2`` memory
    per chunk, so it suits small problems and tests.

    Args:
        model: the recommender.
        rows: the rows whose terms are summed.
        users: the users whose blocks are wanted (default: none).
        items: the items whose blocks are wanted (default: none).
        chunk_size: rows per vectorised pass.

    Returns:
        :class:`~lightning_unlearn.unlearning.methods.curvature.CurvatureBlocks` (float64).

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(2, 3, embedding_dim=2)
        >>> rows = TrainRows(torch.tensor([0]), torch.tensor([1]), torch.tensor([[2]]))
        >>> blocks = exact_hessian_blocks(model, rows, users=torch.tensor([0, 1]), items=torch.tensor([2]))
        >>> torch.allclose(blocks.users, curvature_blocks(model, rows, items=torch.tensor([2])).users)
        True
    """
    with torch.no_grad():
        user_vectors, item_vectors = (v.detach() for v in model.representations())
    device = user_vectors.device
    users = torch.zeros(0, dtype=torch.long, device=device) if users is None else users.to(device)
    items = torch.zeros(0, dtype=torch.long, device=device) if items is None else items.to(device)
    du, di = user_vectors.shape[1], item_vectors.shape[1]
    out_users = torch.zeros(len(users), du, du, dtype=torch.float64, device=device)
    out_items = torch.zeros(len(items), di, di, dtype=torch.float64, device=device)
    user_pos = torch.full((model.num_users,), -1, dtype=torch.long, device=device)
    user_pos[users] = torch.arange(len(users), device=device)
    item_pos = torch.full((model.num_items,), -1, dtype=torch.long, device=device)
    item_pos[items] = torch.arange(len(items), device=device)

    def row_data(u: Tensor, v: Tensor) -> Tensor:  # one row: u (d,), v (1 + k, d)
        return data_loss(model.interact(u.unsqueeze(0), v), model.loss_name)

    by_user = torch.func.vmap(torch.func.hessian(row_data, argnums=0))
    by_items = torch.func.vmap(torch.func.hessian(row_data, argnums=1))
    for start in range(0, len(rows), chunk_size):
        batch = rows[torch.arange(start, min(start + chunk_size, len(rows)), device=rows.users.device)]
        slots = item_slots(batch)
        u, v = user_vectors[batch["users"]], item_vectors[slots]
        where = user_pos[batch["users"]]
        if (where >= 0).any():
            keep = where >= 0
            out_users.index_add_(0, where[keep], by_user(u[keep], v[keep]).double())
        where = item_pos[slots]
        if (where >= 0).any():
            keep = (where >= 0).any(1)
            h = by_items(u[keep], v[keep])  # (R, 1 + k, d, 1 + k, d)
            diagonal = torch.diagonal(h, dim1=1, dim2=3).permute(0, 3, 1, 2)  # (R, 1 + k, d, d)
            moved = where[keep] >= 0
            out_items.index_add_(0, where[keep][moved], diagonal[moved].double())
    eye_u, eye_i = torch.eye(du, dtype=torch.float64, device=device), torch.eye(di, dtype=torch.float64, device=device)
    out_users += model.l2 * occurrences(rows, "users", model)[users].double().view(-1, 1, 1) * eye_u
    out_items += model.l2 * occurrences(rows, "items", model)[items].double().view(-1, 1, 1) * eye_i
    return CurvatureBlocks(out_users, out_items)
