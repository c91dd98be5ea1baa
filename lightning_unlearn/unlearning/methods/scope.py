"""Which embedding rows an unlearning step moves, shared by the second-order methods.

A deletion touches the users and items that appear in the deleted rows' losses (their
positives and fixed negatives); a scope may grow by ``k`` hops through retained
interactions. Users or items left with no retained row are *orphans*: retraining leaves them
at their initialisation, so the methods reset them there instead of solving for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.lightgcn import normalized_adjacency

__all__ = ["expand", "graph_of", "is_graph", "orphans", "reset_to_initialisation", "rows_of_items", "rows_of_users", "rows_touching", "touched"]


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


def reset_to_initialisation(model: Recommender, users: Tensor, items: Tensor, seed: int) -> None:
    """Set the embedding rows of ``users`` and ``items`` to what a fresh model from ``seed`` has.

    The global RNG state is left as it was.
    """
    if not len(users) and not len(items):
        return
    state = torch.random.get_rng_state()
    pl.seed_everything(seed, verbose=False)
    fresh = model.fresh().to(model.device)
    torch.random.set_rng_state(state)
    groups, fresh_groups = model.parameter_groups(), fresh.parameter_groups()
    with torch.no_grad():
        for name, ids in (("user_embedding", users), ("item_embedding", items)):
            for table, init in zip(groups[name], fresh_groups[name]):
                table[ids.to(table.device)] = init[ids.to(init.device)].to(table)
