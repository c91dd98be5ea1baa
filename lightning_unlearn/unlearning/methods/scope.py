"""Which embedding rows an unlearning step moves: the :class:`Scope` of a deletion, and its pieces.

A deletion touches the users and items that appear in the deleted rows' losses (their
positives and fixed negatives); a scope may keep only the most affected of them (pruning) and
grow by ``k`` hops through retained interactions (collaborative neighbours). Users or items
left with no retained row are *orphans*: retraining leaves them at their initialisation, so the
methods reset them there instead of solving for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.lightgcn import LightGCN, normalized_adjacency

_INITIAL: dict = {}  # initialisation's last fresh model, under "key"

__all__ = ["Scope", "expand", "graph_of", "initialisation", "is_graph", "occurrences", "orphans", "prune", "reset_to_initialisation", "rows_of_items", "rows_of_users", "rows_touching", "touched"]


@dataclass
class Scope:
    """The embedding rows a request moves (``users``, ``items``) and those it resets (the orphans).

    Build it with :meth:`of` (touched, pruned, ``hops`` out; orphans apart) or :meth:`everything`.

    Args:
        users: users to solve for (sorted, unique; no orphans).
        items: items to solve for (sorted, unique; no orphans).
        orphan_users: users of the scope left without retained rows.
        orphan_items: items of the scope left without retained rows.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> retained = TrainRows(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([[3], [3]]))
        >>> deleted = TrainRows(torch.tensor([0]), torch.tensor([1]), torch.tensor([[3]]))
        >>> scope = Scope.of(MF(2, 4, embedding_dim=2), retained, deleted, hops=1)
        >>> scope.users.tolist(), scope.items.tolist(), scope.orphan_items.tolist()
        ([0], [2, 3], [1])
    """

    users: Tensor
    items: Tensor
    orphan_users: Tensor
    orphan_items: Tensor

    @classmethod
    def of(cls, model: Recommender, retained: TrainRows, deleted: TrainRows, hops: int = 0, keep_fraction: float = 1.0,
           counts: Mapping[str, Tensor] | None = None) -> Scope:
        """The rows ``deleted`` touches, the most affected ``keep_fraction`` of them (:func:`prune`), ``hops`` out.

        Args:
            model: the recommender (its sizes).
            retained: the rows that remain.
            deleted: the rows the request removes.
            hops: neighbours through retained interactions to add (:func:`expand`), ``>= 0``.
            keep_fraction: share of the touched users (items) kept, in ``(0, 1]``.
            counts: :func:`occurrences` of ``retained`` per side (``"users"``, ``"items"``), if
                known (a curvature cache keeps them): the orphans are read from them, not counted.
        """
        users, items = touched(deleted)
        users, items = prune(users, items, retained, deleted, model, keep_fraction)
        return cls.split(model, retained, *expand(users, items, retained, hops), counts=counts)

    @classmethod
    def everything(cls, model: Recommender, retained: TrainRows) -> Scope:
        """Every user and item (orphans apart)."""
        device = retained.users.device
        return cls.split(model, retained, torch.arange(model.num_users, device=device), torch.arange(model.num_items, device=device))

    @classmethod
    def split(cls, model: Recommender, retained: TrainRows, users: Tensor, items: Tensor,
              counts: Mapping[str, Tensor] | None = None) -> Scope:
        """``users`` and ``items``, the orphans among them set apart (read from ``counts``, :func:`occurrences` of ``retained``, if given)."""
        counts = counts or {side: occurrences(retained, side, model) for side in ("users", "items")}
        orphan_users, orphan_items = users[counts["users"][users] == 0], items[counts["items"][items] == 0]
        return cls(users[~torch.isin(users, orphan_users)], items[~torch.isin(items, orphan_items)], orphan_users, orphan_items)

    def rows(self, retained: TrainRows, model: Recommender) -> TrainRows:
        """The retained rows whose loss involves a user or item of the scope (no copy when that is all of them)."""
        return restrict(retained, rows_touching(retained, self.users, self.items, model.num_users, model.num_items))

    def reset_orphans(self, model: Recommender, seed: int) -> None:
        """Set the orphans to a retrain's initialisation from ``seed`` (:func:`reset_to_initialisation`)."""
        reset_to_initialisation(model, self.orphan_users, self.orphan_items, seed)

    def diagnostics(self) -> dict[str, int]:
        """How many users and items it moves and resets."""
        return {"kept_users": len(self.users), "kept_items": len(self.items), "reset_users": len(self.orphan_users),
                "reset_items": len(self.orphan_items)}


def touched(deleted: TrainRows) -> tuple[Tensor, Tensor]:
    """Users and items whose embedding rows appear in the deleted rows' losses (sorted, unique).

    Example:
        >>> rows = TrainRows(torch.tensor([2, 0]), torch.tensor([1, 1]), torch.tensor([[3], [4]]))
        >>> [t.tolist() for t in touched(rows)]
        [[0, 2], [1, 3, 4]]
    """
    return torch.unique(deleted.users), torch.unique(deleted.all_items())


def expand(users: Tensor, items: Tensor, retained: TrainRows, hops: int) -> tuple[Tensor, Tensor]:
    """Add neighbours through retained positives, ``hops`` times (vectorised).

    Example:
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([5, 5]), torch.tensor([[6], [6]]))
        >>> [t.tolist() for t in expand(torch.tensor([0]), torch.tensor([], dtype=torch.long), rows, 1)]
        [[0], [5]]
    """
    for _ in range(hops):
        new_items = retained.items[torch.isin(retained.users, users)]
        new_users = retained.users[torch.isin(retained.items, items)]
        users, items = torch.unique(torch.cat([users, new_users])), torch.unique(torch.cat([items, new_items]))
    return users, items


def prune(users: Tensor, items: Tensor, retained: TrainRows, deleted: TrainRows, model: Recommender,
          keep_fraction: float) -> tuple[Tensor, Tensor]:
    """Keep the ``keep_fraction`` most important of ``users`` and of ``items`` (IFRU's importance-based pruning).

    Importance is the share of a user's (item's) rows that the request deletes: deleted rows over
    degree. Ties keep the lower id; at least one of each side stays. ``1.0`` keeps all.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> retained = TrainRows(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([[3], [3], [3]]))
        >>> deleted = TrainRows(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([[3], [3]]))
        >>> [t.tolist() for t in prune(torch.tensor([0, 1]), torch.tensor([0]), retained, deleted, MF(2, 4), 0.5)]
        [[1], [0]]
    """
    if keep_fraction >= 1.0:
        return users, items
    kept = []
    for ids, deleted_ids, retained_ids, size in ((users, deleted.users, retained.users, model.num_users),
                                                 (items, deleted.items, retained.items, model.num_items)):
        removed = torch.bincount(deleted_ids, minlength=size).double()
        degree = removed + torch.bincount(retained_ids, minlength=size).double()
        importance = (removed / degree.clamp_min(1))[ids]
        count = max(1, round(keep_fraction * len(ids)))
        kept.append(ids[torch.argsort(importance, descending=True, stable=True)[:count]].sort().values)
    return kept[0], kept[1]


def orphans(ids: Tensor, remaining: Tensor, size: int | None = None) -> Tensor:
    """The ``ids`` absent from ``remaining``: retraining leaves them at their initialisation.

    One ``bincount`` over ``remaining`` (linear; ``isin`` would sort it). ``size`` (the number
    of users or items) saves a pass to find the largest id.

    Example:
        >>> orphans(torch.tensor([1, 2, 3]), torch.tensor([2, 2]), size=4).tolist()
        [1, 3]
    """
    if not len(ids):
        return ids
    size = size if size is not None else int(ids.max()) + 1
    return ids[torch.bincount(remaining, minlength=size)[ids] == 0]


def occurrences(rows: TrainRows, side: str, model: Recommender) -> Tensor:
    """How often each user (``side="users"``) or item (``"items"``, positives and negatives) occurs in ``rows``: its L2 terms.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> rows = TrainRows(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([[2], [0]]))
        >>> occurrences(rows, "items", MF(1, 3, embedding_dim=2)).tolist()
        [1, 1, 2]
    """
    if side == "users":
        return torch.bincount(rows.users, minlength=model.num_users)
    return torch.bincount(rows.all_items(), minlength=model.num_items)


def rows_of_users(rows: TrainRows, users: Tensor, num_users: int | None = None) -> Tensor:
    """Boolean mask of the rows of ``users`` (a table lookup: ``isin`` sorts every row)."""
    return _member(users, num_users, rows.users.device, lambda: rows.users)[rows.users]


def rows_of_items(rows: TrainRows, items: Tensor, num_items: int | None = None) -> Tensor:
    """Boolean mask of the rows whose loss involves one of ``items``, as positive or negative."""
    member = _member(items, num_items, rows.items.device, rows.all_items)
    return member[rows.items] | member[rows.negatives].any(1)


def rows_touching(rows: TrainRows, users: Tensor, items: Tensor, num_users: int | None = None,
                  num_items: int | None = None) -> Tensor:
    """Boolean mask of the rows whose loss involves one of ``users`` or ``items`` (negatives included).

    ``num_users``/``num_items`` size the lookup tables (default: the largest id seen, plus one).
    """
    return rows_of_users(rows, users, num_users) | rows_of_items(rows, items, num_items)


def restrict(rows: TrainRows, mask: Tensor) -> TrainRows:
    """``rows.select(mask)``, or ``rows`` itself when the mask keeps every row (no copy).

    Deleting users touches nearly every item, so a scope's mask often keeps every row.

    Example:
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([[4], [5]]))
        >>> restrict(rows, torch.tensor([True, True])) is rows, len(restrict(rows, torch.tensor([True, False])))
        (True, 1)
    """
    return rows if bool(mask.all()) else rows.select(mask)


def _member(ids: Tensor, size: int | None, device: torch.device, present: Callable[[], Tensor]) -> Tensor:
    """Lookup table on ``device``: ``True`` at ``ids``; sized ``size``, or past the largest of ``ids`` and ``present()``."""
    if size is None:
        seen = present()
        size = 1 + max(int(ids.max()) if len(ids) else -1, int(seen.max()) if len(seen) else -1)
    member = torch.zeros(size, dtype=torch.bool, device=device)
    member[ids.to(device)] = True
    return member


def is_graph(model: Recommender) -> bool:
    """Whether the model propagates over an interaction graph (its rows are coupled)."""
    return getattr(model, "adjacency", None) is not None


def graph_of(model: Recommender, rows: TrainRows) -> Tensor:
    """The normalised adjacency of the graph ``rows`` make (LightGCN's normalisation), like the model's own.

    Args:
        model: a graph model (its ``adjacency`` gives the device and dtype).
        rows: the training rows whose (user, positive item) pairs are the edges.

    Example:
        >>> from lightning_unlearn.models import LightGCN
        >>> model = LightGCN(2, 2, embedding_dim=2)
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([[0], [1]]))
        >>> model.set_graph(Interactions.from_raw([0, 1], [1, 0]))
        >>> torch.equal(graph_of(model, rows).to_dense(), model.adjacency.to_dense())
        True
    """
    ids = lambda size: np.arange(size)  # noqa: E731  graph building needs only the indices
    table = Interactions(rows.users.cpu(), rows.items.cpu(), user_ids=ids(model.num_users), item_ids=ids(model.num_items))
    return normalized_adjacency(table).to(device=model.adjacency.device, dtype=model.adjacency.dtype)


def retained_graph(model: Recommender, retained: TrainRows, deleted: TrainRows) -> Tensor | None:
    """Give a graph model still holding the graph of ``retained`` and ``deleted`` rows the graph of ``retained`` alone.

    An unlearned graph model must not propagate over the deleted edges, and the methods take
    the model's graph as the one after the deletion (the callback and ``compare`` give it; a
    caller of :meth:`~lightning_unlearn.unlearning.methods.base.Unlearner.unlearn` may not have).

    Args:
        model: the model (nothing is done for one without a graph, one whose graph has the
            retained rows' edges, or one that builds its graph otherwise than LightGCN does:
            its edges cannot be counted).
        retained: the rows that remain.
        deleted: the rows to forget.

    Returns:
        The graph the model held before, when it was replaced (to restore it), else ``None``.

    Raises:
        ValueError: LightGCN's graph is neither the retained rows' nor that of all the rows:
            another deletion's or another data's (nothing is changed).

    Example:
        >>> from lightning_unlearn.models import LightGCN
        >>> model = LightGCN(2, 2, embedding_dim=2)
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([[0], [1]]))
        >>> model.set_graph(Interactions.from_raw([0, 1], [1, 0]))  # both rows' edges
        >>> retained_graph(model, rows.select(torch.tensor([True, False])), rows.select(torch.tensor([False, True]))) is not None
        True
        >>> model.adjacency.values().numel()  # one edge left, both ways
        2
    """
    if not (is_graph(model) and _normalised_like_lightgcn(model)):  # another graph's edges cannot be read this way
        return None
    held = _graph_edges(model)
    kept = torch.unique(retained.users * model.num_items + retained.items).to(held.device)
    if torch.equal(held, kept):
        return None
    every = torch.unique(torch.cat([retained.users, deleted.users]) * model.num_items + torch.cat([retained.items, deleted.items]))
    if not torch.equal(held, every.to(held.device)):
        raise ValueError(f"the model's graph ({len(held)} edges) is neither the retained rows' ({len(kept)} edges) nor that of all "
                         f"the rows ({len(every)}): it is another deletion's or another data's. Give the model the retained rows' "
                         "graph (model.set_graph(datamodule.train) once the datamodule has removed the deleted rows).")
    before, model.adjacency = model.adjacency, graph_of(model, retained)
    return before


def _graph_edges(model: Recommender) -> Tensor:
    """The (user, item) edges of LightGCN's graph as sorted ``user * num_items + item`` keys (its CSR rows of users)."""
    crow, col = model.adjacency.crow_indices(), model.adjacency.col_indices()
    row = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())
    users = row < model.num_users  # the user rows; the item rows hold the same edges the other way
    return row[users] * model.num_items + (col[users] - model.num_users)


def _normalised_like_lightgcn(model: Recommender) -> bool:
    """Whether ``model``'s graph is LightGCN's own (its ``set_graph``, sparse CSR, one entry per edge each way)."""
    return isinstance(model, LightGCN) and type(model).set_graph is LightGCN.set_graph and model.adjacency.layout == torch.sparse_csr


def initialisation(model: Recommender, seed: int) -> Recommender:
    """The fresh model a retrain of ``model`` from ``seed`` starts from (``pl.seed_everything(seed)``, then ``model.fresh()``).

    The last one drawn is kept, under ``(model's class and hyper-parameters, seed, device)``:
    drawing a whole model's initialisation for a few rows would cost every request a pass over
    the catalog, so a method's ``prepare`` draws it ahead. Every random number generator is
    left as it was (the tables are drawn from torch's, seeded as ``seed_everything`` seeds it).

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(3, 4, embedding_dim=2)
        >>> initialisation(model, seed=0) is initialisation(model, seed=0), initialisation(model, seed=0) is model
        (True, False)
    """
    key = (type(model), repr(sorted(dict(model.hparams).items())), seed, str(model.device))
    if _INITIAL.get("key") != key:
        _INITIAL.clear()
        with torch.random.fork_rng(devices=[]):  # the fresh model is drawn on the CPU, then moved
            torch.manual_seed(seed)
            _INITIAL.update(key=key, model=model.fresh().to(model.device))
    return _INITIAL["model"]


def reset_to_initialisation(model: Recommender, users: Tensor, items: Tensor, seed: int) -> None:
    """Set the embedding rows of ``users`` and ``items`` to what a fresh model from ``seed`` has (:func:`initialisation`)."""
    if not len(users) and not len(items):
        return
    groups, fresh_groups = model.parameter_groups(), initialisation(model, seed).parameter_groups()
    with torch.no_grad():
        for name, ids in (("user_embedding", users), ("item_embedding", items)):
            for table, init in zip(groups[name], fresh_groups[name]):
                table[ids.to(table.device)] = init[ids.to(init.device)].to(table)
