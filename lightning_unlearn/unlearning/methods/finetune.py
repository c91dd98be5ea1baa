"""``FineTune``: warm start, then a first-order optimiser on the retained rows."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lightning_unlearn.data.batches import EpochBatchSampler, TrainRows
from lightning_unlearn.models.base import OPTIMIZERS, Recommender
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext
from lightning_unlearn.unlearning.methods.scope import orphans, reset_to_initialisation, touched

__all__ = ["FineTune"]


class FineTune(Unlearner):
    """Continue training the trained model on the retained rows only.

    Users and items the deleted rows leave without any retained row (a deleted user, say) get no
    gradient, so fine-tuning would keep what they learned: they are reset to the initialisation
    a retrain from the same seed gives them, as every method resets them.

    A learning rate too large for the model makes the loss diverge or overflow: when an epoch's
    mean loss is not finite, or above ``100 x`` the first batch's loss ``+ 1`` (far worse than
    where fine-tuning started), the update stops with an error that names the epoch, the losses
    and the learning rate, and :meth:`unlearn` restores the model (it never keeps NaN parameters).

    Args:
        epochs: passes over the retained rows (an integer, at least 1).
        lr: learning rate (finite, > 0).
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
        batch_size: rows per step (an integer, at least 1).

    Raises:
        ValueError: on ``epochs < 1``, ``lr`` not finite and positive, ``batch_size < 1``, a
            non-integer ``epochs``/``batch_size`` or an unknown optimizer.

    Example:
        >>> FineTune(epochs=2).name
        'FineTune(epochs=2)'
    """

    hint = "a smaller learning rate"

    def __init__(self, epochs: int = 1, lr: float = 1e-3, optimizer: Literal["adamw", "adam", "sgd"] = "adamw", batch_size: int = 2048):
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (epochs, batch_size))
        finite_lr = isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
        if not (integers and finite_lr) or epochs < 1 or lr <= 0 or batch_size < 1:
            raise ValueError(
                f"FineTune needs integers epochs >= 1 and batch_size >= 1 and a finite lr > 0; "
                f"got epochs={epochs!r}, lr={lr!r}, batch_size={batch_size!r}."
            )
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FineTune(optimizer=...) must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}.")
        self.epochs, self.lr, self.optimizer, self.batch_size = epochs, lr, optimizer, batch_size

    @property
    def name(self) -> str:
        return f"FineTune(epochs={self.epochs})"

    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        dtype = next(model.parameters()).dtype
        if self.lr > torch.finfo(dtype).max:
            raise ValueError(f"lr={self.lr} does not fit the model's {dtype} (largest {torch.finfo(dtype).max:.3g})")
        optimizer = OPTIMIZERS[self.optimizer](model.parameters(), lr=self.lr)
        sampler = EpochBatchSampler(retained, self.batch_size, seed=context.seed)
        losses: list[float] = []
        first: torch.Tensor | None = None  # the first batch's loss, before any step: where we started
        for epoch in range(self.epochs if len(retained) else 0):  # no row left: nothing to train on, every touched row is reset
            sampler.set_epoch(epoch)
            total = torch.zeros((), device=context.device)
            batches = tqdm(sampler, desc=f"FineTune epoch {epoch}", leave=False, disable=not context.progress, dynamic_ncols=True)
            for rows in batches:
                optimizer.zero_grad()
                loss = model.loss(retained[rows.to(context.device)]) + model.dense_penalty()
                loss.backward()
                optimizer.step()
                first = loss.detach() if first is None else first
                total += loss.detach() * len(rows)
            losses.append((total / max(len(retained), 1)).item())  # one sync per epoch, not per step
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"the retained loss became {losses[-1]} in epoch {epoch} with lr={self.lr} "
                    f"({self.optimizer}): the learning rate is too large for this model"
                )
            start = float(first) if first is not None else 0.0
            if losses[-1] > 100 * start + 1.0:
                raise FloatingPointError(
                    f"fine-tuning diverged: the retained loss rose from {start:.4g} (first batch) to "
                    f"{losses[-1]:.4g} (mean of epoch {epoch}) with lr={self.lr} ({self.optimizer}): "
                    "the learning rate is too large for this model"
                )
        users, items = touched(deleted)
        users, items = orphans(users, retained.users, model.num_users), orphans(items, retained.all_items(), model.num_items)
        reset_to_initialisation(model, users, items, context.seed)  # after the steps: an optimiser's decay moves no reset row
        return {"epochs": self.epochs, "steps": self.epochs * len(sampler), "loss_per_epoch": losses, "reset_users": len(users),
                "reset_items": len(items)}
