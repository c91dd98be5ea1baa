"""``FineTune``: warm start, then a first-order optimiser on the retained rows."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_unlearn.data.batches import EpochBatchSampler, TrainRows
from lightning_unlearn.models.base import OPTIMIZERS, Recommender
from lightning_unlearn.unlearning.methods.base import UnlearningContext, Unlearner

__all__ = ["FineTune"]


class FineTune(Unlearner):
    """Continue training the trained model on the retained rows only.

    Args:
        epochs: passes over the retained rows (at least 1).
        lr: learning rate.
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
        batch_size: rows per step.

    Raises:
        ValueError: on ``epochs < 1``, ``lr <= 0``, ``batch_size < 1`` or an unknown optimizer.

    Example:
        >>> FineTune(epochs=2).name
        'FineTune(epochs=2)'
    """

    hint = "a smaller learning rate"

    def __init__(self, epochs: int = 1, lr: float = 1e-3, optimizer: Literal["adamw", "adam", "sgd"] = "adamw", batch_size: int = 2048):
        if epochs < 1 or lr <= 0 or batch_size < 1:
            raise ValueError(f"FineTune needs epochs >= 1, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FineTune(optimizer=...) must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}.")
        self.epochs, self.lr, self.optimizer, self.batch_size = epochs, lr, optimizer, batch_size

    @property
    def name(self) -> str:
        return f"FineTune(epochs={self.epochs})"

    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        optimizer = OPTIMIZERS[self.optimizer](model.parameters(), lr=self.lr)
        sampler = EpochBatchSampler(retained, self.batch_size, seed=context.seed)
        losses = []
        for epoch in range(self.epochs):
            sampler.set_epoch(epoch)
            total = torch.zeros((), device=context.device)
            for rows in sampler:
                optimizer.zero_grad()
                loss = model.loss(retained[rows.to(context.device)]) + model.dense_penalty()
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(rows)
            losses.append((total / max(len(retained), 1)).item())
        return {"epochs": self.epochs, "steps": self.epochs * len(sampler), "loss_per_epoch": losses}
