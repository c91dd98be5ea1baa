"""The training loss of a :class:`~lightning_unlearn.models.base.Recommender`, piece by piece.

A training row holds one user, one positive item and ``k`` negatives. Its scores are an
``(..., 1 + k)`` tensor (the positive first); :func:`data_loss` turns them into the row's data
term (BPR or BCE), and :func:`row_losses` adds the L2 term, as ``Recommender.loss`` does. The
unlearning methods differentiate these pieces separately (Gauss-Newton curvature, per-block
loss changes), so they live here, once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from lightning_unlearn.models.base import Recommender

__all__ = ["data_loss", "item_slots", "row_losses", "row_scores"]


def item_slots(batch: dict[str, Tensor]) -> Tensor:
    """``(R, 1 + k)``: each row's positive item, then its negatives.

    Args:
        batch: ``items`` ``(R,)`` and ``negatives`` ``(R, k)`` index tensors.

    Example:
        >>> item_slots({"items": torch.tensor([4]), "negatives": torch.tensor([[1, 2]])})
        tensor([[4, 1, 2]])
    """
    return torch.cat([batch["items"].unsqueeze(1), batch["negatives"]], dim=1)


def data_loss(z: Tensor, loss: str) -> Tensor:
    """The data term of each row from its scores ``(..., 1 + k)`` (positive first) -> ``(...)``.

    Args:
        z: scores, the positive's first along the last dimension.
        loss: ``"bpr"`` (``sum_k softplus(z_k - z_0)``) or ``"bce"``
            (``softplus(-z_0) + sum_k softplus(z_k)``).

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> torch.allclose(data_loss(z, "bpr"), F.softplus(torch.tensor([-2.0])))
        True
    """
    if loss == "bpr":
        return F.softplus(z[..., 1:] - z[..., :1]).sum(-1)
    return F.softplus(-z[..., 0]) + F.softplus(z[..., 1:]).sum(-1)


def row_scores(model: Recommender, batch: dict[str, Tensor], representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``(R, 1 + k)`` scores of each row's positive and negatives (the input of :func:`data_loss`).

    Args:
        model: the recommender.
        batch: ``users``, ``items`` and ``negatives``.
        representations: ``model.representations()`` (default: computed here).

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(3, 4, embedding_dim=2)
        >>> batch = {"users": torch.tensor([0, 2]), "items": torch.tensor([1, 3]), "negatives": torch.tensor([[2], [0]])}
        >>> torch.allclose(row_scores(model, batch)[:, 0], model.score(batch["users"], batch["items"]))
        True
    """
    user_vectors, item_vectors = representations or model.representations()
    return model.interact(user_vectors[batch["users"]].unsqueeze(1), item_vectors[item_slots(batch)])


def row_losses(model: Recommender, batch: dict[str, Tensor], representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``Recommender.loss(batch, "none")`` from given representations (computed once for many batches).

    Args:
        model: the recommender.
        batch: ``users``, ``items`` and ``negatives``.
        representations: ``model.representations()`` (default: computed here).

    Returns:
        ``(B,)`` per-row losses: the data term plus ``l2/2`` times the embedding penalty.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(3, 4, embedding_dim=2)
        >>> batch = {"users": torch.tensor([0, 2]), "items": torch.tensor([1, 3]), "negatives": torch.tensor([[2], [0]])}
        >>> torch.allclose(row_losses(model, batch), model.loss(batch, "none"))
        True
    """
    z = row_scores(model, batch, representations)
    return data_loss(z, model.loss_name) + 0.5 * model.l2 * model.embedding_penalty(batch["users"], item_slots(batch))
