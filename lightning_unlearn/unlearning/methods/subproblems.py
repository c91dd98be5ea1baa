"""AltEraser's sub-problems: the retained objective seen one block of rows at a time.

A :class:`Side` is one side's embedding tables seen as one concatenated table; the
:class:`Engine` evaluates, on subsets of the retained rows (in chunks), the objective, exact
gradients w.r.t. chosen rows of a side (through the propagation for graph models), and the
change of each block's own loss when its rows move (the line search), keeping the scores of
accepted moves so that the next step needs no fresh pass. :class:`Anchor` holds the gradient,
value and row scores at the trained model, paid once (:class:`RowScores` finds a row's score again).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import flatten
from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import call_with, fingerprint, gather_rows
from lightning_unlearn.unlearning.methods.base import UnlearningContext
from lightning_unlearn.unlearning.methods.curvature import self_weights
from lightning_unlearn.unlearning.methods.scope import occurrences, restrict, rows_of_items, rows_of_users

__all__ = ["SIDES", "Anchor", "Engine", "Layout", "RowScores", "Side", "slot_changes"]

SIDES = ("user_embedding", "item_embedding")
_MATMUL_ADVANTAGE = 16  # one matmul of a chunk's users x every item wins over gathering up to here: ML-1M chunks (about 4) stay on it


class Side:
    """The trainable embedding tables of one side, seen as one concatenated ``(rows, d)`` table."""

    def __init__(self, model: Recommender, name: str):
        self.model, self.name = model, name
        self.label, self.index = ("user", 0) if name == "user_embedding" else ("item", 1)
        self.key, self.other_key = ("users", "items") if name == "user_embedding" else ("items", "users")
        self.size = model.num_users if name == "user_embedding" else model.num_items
        self.tables = model.parameter_groups()[name]
        trainable = [t.requires_grad for t in self.tables]
        if any(trainable) and not all(trainable):
            raise ValueError(f"AltEraser needs every {self.label} embedding table trainable, or every one frozen "
                             "(the curvature blocks cover the tables concatenated).")
        self.trainable = bool(self.tables) and all(trainable)
        self.widths = [t.shape[1] for t in self.tables]

    def gather(self, ids: Tensor) -> Tensor:
        """``(len(ids), d)`` float64 rows, the tables concatenated."""
        return torch.cat([t.detach()[ids] for t in self.tables], dim=1).double()

    @torch.no_grad()
    def set_(self, ids: Tensor, values: Tensor) -> None:
        for table, piece in zip(self.tables, values.split(self.widths, dim=1)):
            table[ids] = piece.to(table.dtype)

    def rows_of(self, rows: TrainRows, ids: Tensor) -> Tensor:
        """Mask of the rows whose loss involves one of ``ids`` (this side)."""
        return (rows_of_users if self.name == "user_embedding" else rows_of_items)(rows, ids, self.size)

def _index_of(ids: Tensor, size: int) -> Tensor:
    """``(size,)``: the position of each id in ``ids``, ``-1`` for the others."""
    where = torch.full((size,), -1, dtype=torch.long, device=ids.device)
    where[ids] = torch.arange(len(ids), device=ids.device)
    return where


class Engine:
    """Losses, gradients and per-block loss changes of the retained objective on row subsets (chunked).

    ``value`` tracks ``sum_{retained} loss_r`` at the current parameters: steps add their exact change.
    """

    def __init__(self, model: Recommender, retained: TrainRows, n: int, context: UnlearningContext, chunk_size: int, graph: bool):
        self.model, self.retained, self.n, self.context, self.chunk_size, self.graph = model, retained, n, context, chunk_size, graph
        self.dot = _scores_are_dot_products(model)
        local = context.shard(retained)
        if self.dot and len(local) and not bool((local.users[1:] >= local.users[:-1]).all()):
            local = local.select(torch.argsort(local.users, stable=True))  # by user: each chunk scores few users
        self.local = local
        self.value = float("nan")  # sum_r loss_r at the current parameters, minus the anchored linear term
        self.linear: dict[str, Tensor] = {}  # objective="anchored": the trained model's gradient tables (sum-scale)
        self.offset = 0.0  # <linear, theta - theta_start>, summed over every step so far

    @functools.cached_property
    def self_weights(self) -> Tensor:
        """Graph models: :func:`~lightning_unlearn.unlearning.methods.curvature.self_weights`, computed once."""
        return self_weights(self.model)

    def score(self, user_vectors: Tensor, item_vectors: Tensor, batch: dict[str, Tensor], layout: Layout | None = None) -> Tensor:
        """``(R, 1 + k)`` scores of a batch's positives and negatives from the given vector tables.

        For dot-product models (MF, LightGCN) over a small catalog the chunk's users are scored
        against every item with one matrix product and the rows' scores picked from it: with
        rows sorted by user a chunk holds few users, and this is several times cheaper than
        gathering ``R x (1 + k)`` item vectors. When that product would cost more than
        ``_MATMUL_ADVANTAGE`` times the gather (large catalogs), and for other models, the
        gathered pairs are scored with ``interact``: the cost then follows the rows, not the catalog.
        ``layout`` is :meth:`layout` of the batch, when kept from an earlier call.
        """
        layout = self.layout(batch, item_vectors.shape[0]) if layout is None else layout
        if layout.flat is None:
            return self.model.row_scores(batch, (user_vectors, item_vectors))
        return layout.pick(user_vectors[layout.users] @ item_vectors.T)

    def score_pullback(self, user_vectors: Tensor, item_vectors: Tensor, batch: dict[str, Tensor], weights: Tensor,
                       out: tuple[Tensor, Tensor], layout: Layout | None = None) -> None:
        """Add ``sum_r <weights_r, dz_r/d vectors>`` to ``out`` (user and item tables), for dot-product models.

        The transpose of :meth:`score`'s linear map in each vector table, on the same two paths: on
        the one-matmul path the weights are scattered into the chunk's ``(users, items)`` matrix and
        pulled back with two matrix products, else each row's pairs are pulled back and added.
        """
        layout = self.layout(batch, item_vectors.shape[0]) if layout is None else layout
        if layout.flat is None:
            users, slots = batch["users"], item_slots(batch)
            out[0].index_add_(0, users, (weights.unsqueeze(-1) * gather_rows(item_vectors, slots)).sum(1))
            out[1].index_add_(0, slots.reshape(-1), (weights.unsqueeze(-1) * user_vectors[users].unsqueeze(1)).reshape(-1, item_vectors.shape[1]))
            return
        dense = torch.zeros(len(layout.users) * item_vectors.shape[0], dtype=weights.dtype, device=weights.device)
        dense = dense.scatter_add_(0, layout.flat.reshape(-1), weights.reshape(-1)).view(len(layout.users), -1)
        out[0].index_add_(0, layout.users, dense @ item_vectors)
        out[1].addmm_(dense.T, user_vectors[layout.users])

    def layout(self, batch: dict[str, Tensor], num_items: int) -> Layout:
        """Which path :meth:`score` takes for this batch, and where its slots sit in the chunk's score matrix on the one-matmul path."""
        if self.dot:
            users, inverse = torch.unique_consecutive(batch["users"], return_inverse=True)
            slots = item_slots(batch)
            if len(users) * num_items <= _MATMUL_ADVANTAGE * slots.numel():
                return Layout(users, inverse.unsqueeze(1) * num_items + slots)
        return Layout(batch["users"], None)

    def chunks(self, rows: TrainRows):
        for start in range(0, len(rows), self.chunk_size):
            index = torch.arange(start, min(start + self.chunk_size, len(rows)), device=rows.users.device)
            yield index, rows[index]

    @torch.no_grad()
    def sum_losses(self, rows: TrainRows) -> float:
        """``sum_r loss_r`` over ``rows`` (this process's share), summed over processes."""
        model = self.model
        user_vectors, item_vectors = model.representations()
        total = 0.5 * model.l2 * self.penalty(rows)
        for _, batch in self.chunks(rows):
            total += data_loss(self.score(user_vectors, item_vectors, batch), model.loss_name).double().sum()
        return float(self.context.reduce(total))

    @torch.no_grad()
    def penalty(self, rows: TrainRows) -> Tensor:
        """``sum_r embedding_penalty(r)`` over ``rows`` (this process's), float64.

        When the rows' slots outnumber the ids, it is taken as each id's occurrences times its
        rows' squared norms (equal by the model contract, which checks ``embedding_penalty``
        against the tables): a pass over the tables instead of a gather per row and slot.
        """
        model = self.model
        if len(rows) * (1 + rows.negatives.shape[1]) < model.num_users + model.num_items:
            return sum((model.embedding_penalty(batch["users"], item_slots(batch)).double().sum() for _, batch in self.chunks(rows)),
                       torch.zeros((), dtype=torch.float64, device=rows.users.device))
        groups, total = model.parameter_groups(), torch.zeros((), dtype=torch.float64, device=rows.users.device)
        for side, group in (("users", "user_embedding"), ("items", "item_embedding")):
            norms = sum(torch.linalg.vector_norm(t.detach(), dim=1).double().square() for t in groups[group])
            total += occurrences(rows, side, model).double() @ norms
        return total

    def objective(self) -> float:
        """The mean objective ``value / n + dense_penalty`` at the current parameters."""
        with torch.no_grad():
            return self.value / self.n + float(self.model.dense_penalty())

    def gradient(self, side: Side, ids: Tensor, rows: TrainRows) -> tuple[Tensor, Tensor]:
        """Exact ``d/d side[ids] sum_{rows} loss_r`` as ``(len(ids), d)`` float64, and the rows' scores ``(R, 1 + k)``."""
        grads, scores = self.gradients([side], [ids], rows)
        return grads[0], scores

    def gradients(self, sides: list[Side], ids: list[Tensor], rows: TrainRows) -> tuple[list[Tensor], Tensor]:
        """:meth:`gradient` for several sides from one pass over ``rows``.

        The data term is differentiated w.r.t. the representations, chunk by chunk, and the
        result pulled back to the tables once (through the propagation for graph models); the
        L2 term is ``l2 * count * row`` (one count per occurrence in a row).
        """
        model = self.model
        with torch.enable_grad():
            representations = model.representations()
            # the representations the sides' tables reach: their own, or both through a graph
            needed = [i for i in (0, 1) if (self.graph or i in {s.index for s in sides}) and representations[i].requires_grad]
            user_vectors, item_vectors = (v.detach() for v in representations)
            # MF's vectors are its tables: their gradients are summed for the ids asked for only, never over a whole table
            own = not self.graph and all(len(s.tables) == 1 and representations[s.index] is s.tables[0] for s in sides)
            wanted: list[Tensor | None] = [None, None]  # per representation, when own: the distinct ids asked for
            if own:
                for side, chosen in zip(sides, ids):
                    wanted[side.index] = torch.unique(chosen)
            cotangents = [torch.zeros_like(t) if w is None else t.new_zeros(len(w), t.shape[1])
                          for t, w in zip((user_vectors, item_vectors), wanted)]
            positions = [None if w is None else _index_of(w, len(t)) for t, w in zip((user_vectors, item_vectors), wanted)]

            def add(i: int, index: Tensor, values: Tensor) -> None:
                if positions[i] is not None:
                    at = positions[i][index]
                    keep = at >= 0
                    index, values = at[keep], values[keep]
                cotangents[i].index_add_(0, index, values)

            scores = []
            for _, batch in self.chunks(rows):
                # leaves of this chunk only: the vectors its rows gather (a dense gradient of the whole
                # item table per chunk would cost the catalog, not the rows), or, on the one-matmul path, the table
                layout = self.layout(batch, item_vectors.shape[0])
                users, slots = layout.users, item_slots(batch)
                u = user_vectors[users].requires_grad_(0 in needed)
                v = (item_vectors if layout.flat is not None else gather_rows(item_vectors, slots)).detach().requires_grad_(1 in needed)
                z = layout.pick(u @ v.T) if layout.flat is not None else model.interact(u.unsqueeze(1), v)
                if needed:
                    data_loss(z, model.loss_name).sum().backward()
                    if u.grad is not None:
                        add(0, users, u.grad)
                    if v.grad is not None:
                        if layout.flat is None:
                            add(1, slots.reshape(-1), v.grad.reshape(-1, v.shape[-1]))
                        else:
                            cotangents[1] += v.grad if wanted[1] is None else v.grad[wanted[1]]
                scores.append(z.detach())
            tables = [t for side in sides for t in side.tables]
            if own:
                grads = [cotangents[s.index] if s.index in needed else None for s in sides]
            elif needed:
                grads = torch.autograd.grad([representations[i] for i in needed], tables, [cotangents[i] for i in needed], allow_unused=True)
            else:
                grads = [None] * len(tables)
        out, offset = [], 0
        for side, chosen in zip(sides, ids):
            mine = grads[offset:offset + len(side.tables)]
            offset += len(side.tables)
            if own:  # one table, its gradient by the distinct ids asked for
                data = torch.zeros(len(chosen), side.widths[0], dtype=torch.float64, device=chosen.device) if mine[0] is None \
                    else mine[0][torch.searchsorted(wanted[side.index], chosen)].double()
            else:
                data = torch.cat([(torch.zeros_like(t) if g is None else g)[chosen] for g, t in zip(mine, side.tables)], dim=1).double()
            # counts() is already summed over processes: only the data term is reduced here
            out.append(self.context.reduce(data) + model.l2 * self.counts(side, chosen, rows).unsqueeze(1) * side.gather(chosen))
        z = torch.cat(scores) if scores else torch.zeros(0, 1 + rows.negatives.shape[1], device=rows.users.device)
        return out, z

    def counts(self, side: Side, ids: Tensor, rows: TrainRows) -> Tensor:
        """How often each of ``ids`` occurs in ``rows`` (this process's), summed over processes, in float64."""
        return self.context.reduce(occurrences(rows, side.key, self.model)[ids].double())

    def anchor(self, sides: list[Side], rows: TrainRows, dense: list[Tensor], graph: Tensor | None) -> Anchor:
        """The gradient (every row of every side, and the dense weights) and value of ``sum_{rows} loss_r`` now.

        ``graph`` replaces a graph model's adjacency (the graph before a deletion).
        """
        model = self.model

        def compute():
            everyone = [torch.arange(s.size, device=rows.users.device) for s in sides]
            grads, scores = self.gradients(sides, everyone, rows)
            dense_parts = self.dense_parts(dense, rows) if dense else None
            return grads, self._value_from_scores(sides, rows, scores), dense_parts, scores

        grads, value, dense_parts, scores = call_with(model, {"adjacency": graph}, compute) if graph is not None else compute()
        # a graph model's scores move with the graph a deletion changes: they would never be reused
        known = None if self.graph else RowScores(rows, scores, model.num_items)
        return Anchor({s.name: g for s, g in zip(sides, grads)}, value, dense_parts, fingerprint(model), scores=known)

    def moved_gradient(self, side: Side, ids: Tensor, rows: TrainRows, grad: Tensor, scores: RowScores | None,
                       *moves: tuple[Side, Tensor, Tensor]) -> tuple[Tensor | None, RowScores | None]:
        """``grad``, the gradient w.r.t. ``side[ids]`` over ``rows`` (those that involve ``ids``) before ``moves``, brought up to date.

        A move ``(other, moved, before)`` changed the rows ``moved`` of the other side from
        ``before``: only the terms of the rows of ``rows`` that involve them changed. Their
        gradient is taken at the moved values and at ``before``, and the difference added (the L2
        term of ``side``'s rows is the same in both): a pass over the moved users' rows instead of
        every row that touches ``ids``. ``scores`` (of the rows before the moves), when given, get
        the moved rows' new scores from the same pass (``None`` if one is not among them).

        Returns ``(None, None)`` when those rows are at least half of the rows that involve ``ids``:
        two passes over them would cost more than the one pass over those rows that computes the
        gradient (and the scores) afresh.
        """
        touching = [restrict(rows, other.rows_of(rows, moved)) for other, moved, _ in moves]
        # counted over every process's shard: each takes the same branch (its passes are reduced)
        moved_rows, all_rows = self.context.reduce(torch.tensor([sum(len(t) for t in touching), len(rows)],
                                                                dtype=torch.float64, device=rows.users.device)).tolist()
        if 2 * moved_rows >= all_rows:
            return None, None
        for (other, moved, before), touched in zip(moves, touching):
            after = other.gather(moved)
            new, new_scores = self.gradient(side, ids, touched)
            other.set_(moved, before)
            try:
                old, _ = self.gradient(side, ids, touched)
            finally:
                other.set_(moved, after)
            grad = grad + (new - old)
            scores = None if scores is None else scores.replaced(touched, new_scores)
        return grad, scores

    def deleted_part(self, deleted: TrainRows, ids: dict[str, Tensor], sides: dict[str, Side]) -> tuple[dict[str, Tensor], float]:
        """The deleted rows' gradient w.r.t. the rows ``ids`` of each trainable side, and their summed loss."""
        names = [name for name in SIDES if len(ids[name]) and sides[name].trainable]
        grads, scores = self.gradients([sides[name] for name in names], [ids[name] for name in names], deleted)
        return dict(zip(names, grads)), self._value_from_scores([], deleted, scores)

    def linear_change(self, side: Side, ids: Tensor, delta: Tensor) -> float:
        """``<linear, delta>`` for a move ``delta`` of the rows ``ids`` (0 unless anchored)."""
        if side.name not in self.linear:
            return 0.0
        return float((self.linear[side.name][ids] * delta).sum())

    def _value_from_scores(self, sides: list[Side], rows: TrainRows, scores: Tensor) -> float:
        with torch.no_grad():
            total = data_loss(scores, self.model.loss_name).double().sum()
        return float(self.context.reduce(total + 0.5 * self.model.l2 * self.penalty(rows)))

    def _positions(self, side: Side, ids: Tensor, mask: Tensor) -> Tensor:
        size = self.model.num_users if side.name == "user_embedding" else self.model.num_items
        position = torch.full((size,), -1, dtype=torch.long, device=ids.device)
        position[ids[mask]] = torch.nonzero(mask).flatten()
        return position

    @torch.no_grad()
    def block_change(self, side: Side, ids: Tensor, rows: TrainRows, old: Tensor, new: Tensor, pending: Tensor,
                     scores: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For each block, its sub-problem's loss at ``new`` minus at ``old`` (summed, other blocks held at ``old``).

        Only the ``pending`` blocks are evaluated (the others get 0), on the rows that involve them.
        For items, each (row, slot) is evaluated with only that slot's item moved, so a BPR row's
        positive and negatives are judged separately (block-Jacobi; exact for BCE, whose terms
        hold one score each).

        Returns:
            ``(change, scores, trial, involved)``: the per-block change, the scores of every row at
            ``old`` (``scores`` itself, or computed in the same pass when ``None``), and the scores at
            the trial point of the rows ``involved`` (an index into ``rows``).
        """
        model = self.model
        position = self._positions(side, ids, pending)
        change = torch.zeros(len(ids), dtype=torch.float64, device=ids.device)
        user_vectors, item_vectors = (v.detach() for v in model.representations())
        trial_table = (user_vectors if side.name == "user_embedding" else item_vectors).clone()  # pending rows at ``new``
        trial_table[ids[pending]] = new[pending].to(trial_table.dtype)
        trial_vectors = (trial_table, item_vectors) if side.name == "user_embedding" else (user_vectors, trial_table)
        if scores is None:
            involved = torch.arange(len(rows), device=ids.device)
            old_scores = torch.empty(len(rows), 1 + rows.negatives.shape[1], dtype=user_vectors.dtype, device=ids.device)
        else:
            where = position[rows.users] if side.name == "user_embedding" else position[item_slots(rows[:])]
            involved, old_scores = torch.nonzero(where.view(len(rows), -1).ge(0).any(1)).flatten(), scores
        trials = []
        for start in range(0, len(involved), self.chunk_size):
            at = involved[start:start + self.chunk_size]
            batch = rows[at]
            if scores is None:
                old_scores[at] = self.score(user_vectors, item_vectors, batch)
            z_old, z_new = old_scores[at], self.score(*trial_vectors, batch)
            if side.name == "user_embedding":
                where = position[batch["users"]]
                keep = where >= 0
                delta = data_loss(z_new, model.loss_name) - data_loss(z_old, model.loss_name)
                change.index_add_(0, where[keep], delta[keep].double())
            else:
                where = position[item_slots(batch)]  # (R, 1 + k), -1 where the slot's item is not pending
                moved = where >= 0
                z_new = torch.where(moved, z_new, z_old)
                delta = slot_changes(z_old, z_new, model.loss_name)
                change.index_add_(0, where[moved], delta[moved].double())
            trials.append(z_new)
        change = self.context.reduce(change)  # the data term over every process's rows; counts() is summed already
        change += 0.5 * model.l2 * self.counts(side, ids, rows) * (new.square().sum(1) - old.square().sum(1))
        if side.name in self.linear:
            change -= (self.linear[side.name][ids] * (new - old)).sum(1)
        trial = torch.cat(trials) if trials else old_scores[:0]
        return torch.where(pending, change, torch.zeros_like(change)), old_scores, trial, involved

    @torch.no_grad()
    def keep_scores(self, side: Side, ids: Tensor, rows: TrainRows, final: Tensor, trial: Tensor, involved: Tensor, accepted: Tensor) -> None:
        """Copy into ``final`` the trial scores of the ``accepted`` blocks (a score depends on one user and one item)."""
        if not accepted.any() or not len(involved):
            return
        position = self._positions(side, ids, accepted)
        if side.name == "user_embedding":
            take = (position[rows.users[involved]] >= 0).unsqueeze(1)
        else:
            take = torch.cat([position[rows.items[involved]].unsqueeze(1), position[rows.negatives[involved]]], dim=1) >= 0
        final.index_copy_(0, involved, torch.where(take, trial, final[involved]))

    @torch.no_grad()
    def exact_change(self, side: Side, ids: Tensor, rows: TrainRows, old: Tensor, new: Tensor, scores: Tensor, final: Tensor) -> float:
        """``sum_r loss_r(new) - loss_r(old)`` from the rows' scores before and after (exact: no Jacobi split)."""
        data = (data_loss(final, self.model.loss_name).double() - data_loss(scores, self.model.loss_name).double()).sum()
        penalty = 0.5 * self.model.l2 * (self.counts(side, ids, rows) * (new.square().sum(1) - old.square().sum(1))).sum()
        return float(self.context.reduce(data) + penalty) - self.linear_change(side, ids, new - old)

    def dense_parts(self, params: list[Tensor], rows: TrainRows) -> tuple[Tensor, Tensor]:
        """The dense weights' gradient of ``sum_{rows}`` data terms (summed over processes) and of ``dense_penalty`` (flat)."""
        with torch.enable_grad():
            penalty = torch.autograd.grad(self.model.dense_penalty(), params, allow_unused=True)
        return self.context.reduce(self.dense_gradient(params, rows)), \
            flatten([torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() for p, g in zip(params, penalty)])

    def dense_gradient(self, params: list[Tensor], rows: TrainRows) -> Tensor:
        """The dense weights' gradient of ``sum_{rows}`` data terms, flat float64, of this process's ``rows`` only."""
        model = self.model
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with torch.enable_grad():
            user_vectors, item_vectors = (v.detach() for v in model.representations())
            for _, batch in self.chunks(rows):
                z = model.row_scores(batch, (user_vectors, item_vectors))
                for acc, g in zip(total, torch.autograd.grad(data_loss(z, model.loss_name).sum(), params, allow_unused=True)):
                    if g is not None:
                        acc += g.double()
        return flatten(total)

    @torch.no_grad()
    def data_losses(self, rows: TrainRows) -> float:
        """``sum_r`` data term over ``rows``, of this process only (no L2: for changes of the dense weights)."""
        user_vectors, item_vectors = self.model.representations()
        return sum((float(data_loss(self.score(user_vectors, item_vectors, batch), self.model.loss_name).double().sum())
                    for _, batch in self.chunks(rows)), 0.0)

    def sample(self, size: int, rows: TrainRows | None = None) -> TrainRows:
        """A fixed random subset of ``rows`` (default: the retained rows), seeded by the context."""
        rows = self.retained if rows is None else rows
        if size >= len(rows):
            return rows
        g = torch.Generator().manual_seed(self.context.seed)
        return rows.select(torch.randperm(len(rows), generator=g)[:size].to(rows.users.device))


@dataclass(frozen=True)
class Layout:
    """How :meth:`Engine.score` scores a batch: ``flat`` is ``None`` on the gather path; on the
    one-matmul path, ``users`` are the chunk's distinct users and ``flat`` the ``(R, 1 + k)``
    positions of the rows' slots in the flattened ``(users, items)`` score matrix."""

    users: Tensor
    flat: Tensor | None

    def pick(self, matrix: Tensor) -> Tensor:
        """The rows' ``(R, 1 + k)`` entries of the chunk's ``(users, items)`` score matrix (an ``index_select``: its backward is a scatter-add)."""
        return matrix.reshape(-1).index_select(0, self.flat.reshape(-1)).view(self.flat.shape)


def _scores_are_dot_products(model: Recommender) -> bool:
    """Whether ``model.interact`` is the dot product of the two vectors (checked on random probes)."""
    with torch.no_grad():
        user_vectors, item_vectors = model.representations()
        if user_vectors.shape[1] != item_vectors.shape[1]:
            return False
        g = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(4, user_vectors.shape[1], generator=g).to(user_vectors)
        v = torch.randn(4, 3, item_vectors.shape[1], generator=g).to(item_vectors)
        expected = (u.unsqueeze(1) * v).sum(-1)
        return bool(torch.allclose(model.interact(u.unsqueeze(1), v), expected, rtol=1e-5, atol=1e-6))


def slot_changes(z_old: Tensor, z_new: Tensor, loss: str) -> Tensor:
    """``(R, 1 + k)``: how each row's data term changes when only slot ``s`` moves from ``z_old`` to ``z_new``.

    Equals :func:`~lightning_unlearn.losses.data_loss` with that one score replaced, minus ``data_loss(z_old)``, without forming
    the ``(R, 1 + k, 1 + k)`` tensor of one-slot-moved scores (and without the cancellation of
    the terms that did not move).
    """
    if loss == "bpr":  # sum_k softplus(n_k - p): the positive enters every term, a negative one
        positive = (F.softplus(z_old[:, 1:] - z_new[:, :1]) - F.softplus(z_old[:, 1:] - z_old[:, :1])).sum(1, keepdim=True)
        negatives = F.softplus(z_new[:, 1:] - z_old[:, :1]) - F.softplus(z_old[:, 1:] - z_old[:, :1])
        return torch.cat([positive, negatives], dim=1)
    sign = torch.ones_like(z_old[:1])  # softplus(-p) + sum_k softplus(n_k): one term per slot
    sign[:, 0] = -1.0
    return F.softplus(sign * z_new) - F.softplus(sign * z_old)


@dataclass
class Anchor:
    """The exact gradient and value of ``sum_r loss_r`` over every training row at the trained model.

    Paid once, with the cached curvature. Minus the deleted rows' part it is the retained
    gradient at the trained model (a request's first steps need no pass over the retained
    rows); with ``objective="anchored"`` it is the linear term, kept across requests. The rows'
    scores from the same pass start the first request's line search (dropped once it has run).
    """

    grads: dict[str, Tensor]  # side -> (rows of the side, d) float64
    value: float
    dense: tuple[Tensor, Tensor] | None  # (data-term gradient summed over rows, dense_penalty gradient), flat
    fingerprint: Tensor
    fresh: bool = True  # no request has used it yet: the model is still the one it was taken at
    scores: RowScores | None = None  # every row's scores at the trained model (non-graph models), for the first request's line search

    def matches(self, model: Recommender) -> bool:
        return torch.equal(self.fingerprint, fingerprint(model))

    def adopt(self, model: Recommender) -> None:
        self.fingerprint = fingerprint(model)


class RowScores:
    """Scores of training rows at fixed parameters, found again by row (user, positive item and negatives).

    The trained model's scores of every row come with :class:`Anchor`'s pass; until a step moves
    a parameter they are the retained rows' scores too, so the first request's line search needs
    no pass to score its rows at the start. Rows are matched by ``user * num_items + item`` (one
    sort, one ``searchsorted``) and their negatives compared; a row not found as it was scored
    makes :meth:`of` return ``None``, and the caller scores the rows itself.

    Args:
        rows: the rows scored.
        scores: ``(len(rows), 1 + k)`` their scores (positive, then negatives).
        num_items: the model's number of items.

    Example:
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([[1], [2]]))
        >>> known = RowScores(rows, torch.tensor([[0.5, -1.0], [2.0, 0.0]]), num_items=3)
        >>> known.of(rows.select(torch.tensor([1])))
        tensor([[2., 0.]])
        >>> known.of(TrainRows(torch.tensor([1]), torch.tensor([0]), torch.tensor([[1]]))) is None  # other negatives
        True
    """

    def __init__(self, rows: TrainRows, scores: Tensor, num_items: int):
        self.num_items, self.negatives, self.scores = num_items, rows.negatives, scores
        self.keys, self.order = torch.sort(rows.users * num_items + rows.items)

    def of(self, rows: TrainRows) -> Tensor | None:
        """The ``(len(rows), 1 + k)`` scores of ``rows`` if every one is among the rows scored, else ``None``."""
        if not len(rows):
            return self.scores.new_zeros(0, 1 + rows.negatives.shape[1])
        found = self._find(rows)
        return None if found is None else self.scores[found]

    def replaced(self, rows: TrainRows, scores: Tensor) -> RowScores | None:
        """A copy in which ``rows`` have ``scores`` (``None`` if one of ``rows`` is not among the rows scored)."""
        found = self._find(rows)
        if found is None:
            return None
        out = copy.copy(self)
        out.scores = self.scores.index_copy(0, found, scores.to(self.scores.dtype))
        return out

    def _find(self, rows: TrainRows) -> Tensor | None:
        """Where each of ``rows`` is among the rows scored (``None`` if one is not)."""
        if not len(rows):
            return torch.zeros(0, dtype=torch.long, device=self.scores.device)
        if not len(self.keys) or rows.negatives.shape[1:] != self.negatives.shape[1:]:
            return None
        keys = rows.users * self.num_items + rows.items
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        found = self.order[at]
        same = (self.keys[at] == keys) & (self.negatives[found] == rows.negatives).all(1)
        return found if bool(same.all()) else None
