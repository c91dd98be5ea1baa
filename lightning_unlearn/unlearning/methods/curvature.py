"""Per-user and per-item Gauss-Newton curvature blocks of the training objective, from one vectorised pass.

For a row ``r`` with scores ``z = (z_pos, z_neg_1..k)`` of its user vector ``u`` and item vectors,
the Gauss-Newton curvature of its data term is ``J^T H_z J``; keeping only the blocks of one user's
(or one item's) vector gives ``d x d`` blocks that are summed over rows with ``scatter_outer``,
plus ``l2`` per occurrence of the row in the L2 term. Blocks are sums over rows (not divided by
``n``) so that they can be downdated by subtracting the deleted rows' contribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import scatter_outer
from lightning_unlearn.models.base import Recommender

__all__ = ["CachedCurvature", "CurvatureBlocks", "curvature_blocks"]


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
        user_vectors, item_vectors = (t.detach() for t in model.representations())
        du, di = user_vectors.shape[1], item_vectors.shape[1]
        user_slot, user_ids = _slots(users, model.num_users, user_vectors.device)
        item_slot, item_ids = _slots(items, model.num_items, item_vectors.device)
        users_out = torch.zeros(len(user_ids), du, du, dtype=torch.float64, device=user_vectors.device)
        items_out = torch.zeros(len(item_ids), di, di, dtype=torch.float64, device=item_vectors.device)
        for start in range(0, len(rows), chunk_size):
            batch = rows[torch.arange(start, min(start + chunk_size, len(rows)), device=rows.users.device)]
            users = batch["users"]
            slots = torch.cat([batch["items"].unsqueeze(1), batch["negatives"]], dim=1)  # (R, 1+k)
            u, v = user_vectors[users].unsqueeze(1).expand(-1, slots.shape[1], -1), item_vectors[slots]
            z = model.interact(u, v)
            ju, jv = model.interact_jacobians(u.reshape(-1, du), v.reshape(-1, di))
            ju, jv = ju.reshape(*slots.shape, du), jv.reshape(*slots.shape, di)
            if model.loss_name == "bpr":
                y = z[:, 1:] - z[:, :1]
                w = torch.sigmoid(y) * torch.sigmoid(-y)  # (R, k)
                _accumulate(users_out, ju[:, 1:] - ju[:, :1], w, user_slot[users])
                item_weights = torch.cat([w.sum(1, keepdim=True), w], dim=1)
            else:
                item_weights = torch.sigmoid(z) * torch.sigmoid(-z)  # (R, 1+k)
                _accumulate(users_out, ju, item_weights, user_slot[users])
            _accumulate(items_out, jv.reshape(-1, di), item_weights.reshape(-1), item_slot[slots.reshape(-1)])
    eye_u = torch.eye(du, dtype=torch.float64, device=users_out.device)
    eye_i = torch.eye(di, dtype=torch.float64, device=items_out.device)
    user_count = torch.bincount(rows.users, minlength=model.num_users)[user_ids].to(users_out)
    item_count = torch.bincount(rows.all_items(), minlength=model.num_items)[item_ids].to(items_out)
    users_out += model.l2 * user_count[:, None, None] * eye_u
    items_out += model.l2 * item_count[:, None, None] * eye_i
    return CurvatureBlocks(users_out, items_out)


def _slots(ids: Tensor | None, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Position of every id among ``ids`` (``-1`` if absent), and ``ids`` (default: all)."""
    ids = torch.arange(size, device=device) if ids is None else ids.to(device)
    slot = torch.full((size,), -1, dtype=torch.long, device=device)
    slot[ids] = torch.arange(len(ids), device=device)
    return slot, ids


def _accumulate(out: Tensor, jacobians: Tensor, weights: Tensor, index: Tensor) -> None:
    """``out[b] += sum w J J^T`` over the rows whose block is asked for (``index >= 0``), in float64."""
    keep = index >= 0
    if keep.any():
        out += scatter_outer(jacobians[keep], weights[keep], index[keep], out.shape[0]).double()


class CachedCurvature:
    """Curvature blocks of the retained rows, computed once per trained model and downdated per request.

    The first request pays for the blocks over every training row (reported as precomputation);
    each request subtracts its deleted rows' contribution in place, so the cache always holds
    the blocks of the data as it now is. A method whose step is small calls :meth:`adopt` to
    keep the blocks for the updated model; any other change of the parameters invalidates them.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model, cache = MF(2, 3, embedding_dim=2), CachedCurvature()
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([[2], [0]]))
        >>> kept, gone = rows.select(torch.tensor([True, False])), rows.select(torch.tensor([False, True]))
        >>> blocks, seconds = cache.retained(model, kept, gone)
        >>> torch.allclose(blocks.users, curvature_blocks(model, kept).users)
        True
    """

    def __init__(self) -> None:
        self._entry: tuple[Tensor, CurvatureBlocks] | None = None  # (fingerprint of the model, blocks)

    def retained(self, model: Recommender, retained: TrainRows, deleted: TrainRows) -> tuple[CurvatureBlocks, float]:
        """The blocks over ``retained``, and the seconds spent building the cache (0 when it was warm).

        Args:
            model: the model the blocks are taken at.
            retained: the rows that remain.
            deleted: the rows this request removes (subtracted from the cache).
        """
        precompute = 0.0
        if self._entry is None or not torch.equal(self._entry[0], _fingerprint(model)):
            start = time.perf_counter()
            self._entry = (_fingerprint(model), curvature_blocks(model, retained.concat(deleted)))
            precompute = time.perf_counter() - start
        blocks = self._entry[1]
        users, items = torch.unique(deleted.users), torch.unique(deleted.all_items())
        removed = curvature_blocks(model, deleted, users=users, items=items)
        blocks.users[users] -= removed.users
        blocks.items[items] -= removed.items
        return blocks, precompute

    def adopt(self, model: Recommender) -> None:
        """Keep the cached blocks for ``model``'s current parameters (after a small step)."""
        if self._entry is not None:
            self._entry = (_fingerprint(model), self._entry[1])

    def clear(self) -> None:
        """Drop the cache (e.g. after a failed request whose downdate must not persist)."""
        self._entry = None


def _fingerprint(model: Recommender) -> Tensor:
    """A cheap checksum of every parameter: the cached blocks belong to this exact model."""
    with torch.no_grad():
        return torch.stack([p.double().sum() for p in model.parameters()] + [p.double().square().sum() for p in model.parameters()]).cpu()
