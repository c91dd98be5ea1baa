"""The training loss as tensor maths: a row's item slots and its data term (BPR or BCE).

A training row holds one user, one positive item and ``k`` negatives. Its scores are an
``(..., 1 + k)`` tensor (the positive first, from
:meth:`~lightning_unlearn.models.base.Recommender.row_scores`); :func:`data_loss` turns them
into the row's data term, and ``Recommender.loss`` adds the L2 term. The unlearning methods
differentiate these pieces separately (Gauss-Newton curvature, per-block loss changes), so they
live here, once, below the models: this module imports nothing from the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["data_loss", "data_loss_curvature", "item_slots"]


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


def data_loss_curvature(z: Tensor, loss: str):
    """``dz -> H dz``, ``H`` the Hessian of each row's data term in its scores at ``z`` (closed form, elementwise).

    Args:
        z: scores ``(..., 1 + k)``, the positive's first.
        loss: ``"bpr"`` or ``"bce"``, as :func:`data_loss`.

    Returns:
        A function of a tangent ``dz`` shaped like ``z``; the second derivatives are taken once.

    Example:
        >>> z, dz = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, -2.0]])
        >>> want = torch.autograd.functional.hvp(lambda s: data_loss(s, "bpr").sum(), z, dz)[1]
        >>> torch.allclose(data_loss_curvature(z, "bpr")(dz), want)
        True
    """
    if loss == "bpr":
        p = torch.sigmoid(z[..., 1:] - z[..., :1])
        h = p * (1 - p)

        def product(dz: Tensor) -> Tensor:
            w = h * (dz[..., 1:] - dz[..., :1])
            return torch.cat([-w.sum(-1, keepdim=True), w], dim=-1)

        return product
    p = torch.sigmoid(z)
    h = p * (1 - p)  # softplus(-z) and softplus(z) have the same second derivative
    return lambda dz: h * dz
