"""The training objective on a set of rows, and its gradient (chunked, on the model's device)."""

from __future__ import annotations

import torch

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.models.base import Recommender

__all__ = ["objective_gradient_norm"]


def objective_gradient_norm(model: Recommender, rows: TrainRows, chunk_size: int = 65536) -> float:
    """``||grad L(theta)||`` of ``L = 1/n * sum_r loss_r + dense_penalty`` over ``rows``.

    Newton-type unlearning assumes the model sits at a stationary point of this objective;
    this norm says how far it is (it is recorded in every comparison).

    Args:
        model: the recommender (its gradients are cleared afterwards).
        rows: the training rows of the objective (e.g. the retained rows).
        chunk_size: rows per backward pass.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> model = MF(2, 3, embedding_dim=2, l2=0.0)
        >>> rows = TrainRows(torch.tensor([0]), torch.tensor([1]), torch.tensor([[2]]))
        >>> objective_gradient_norm(model, rows) > 0
        True
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = max(len(rows), 1)
    device = params[0].device
    with torch.enable_grad():
        for start in range(0, len(rows), chunk_size):
            batch = rows[torch.arange(start, min(start + chunk_size, len(rows)), device=rows.users.device)]
            loss = model.loss({k: v.to(device) for k, v in batch.items()}, reduction="sum") / n
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc += g
        penalty = model.dense_penalty()
        if penalty.requires_grad:
            for acc, g in zip(total, torch.autograd.grad(penalty, params, allow_unused=True)):
                if g is not None:
                    acc += g
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in total)))


