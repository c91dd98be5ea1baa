"""The :class:`Recommender` contract every model fulfils and every unlearning method relies on."""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterable, Literal, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.metrics.ranking import FullRankingMetrics
from lightning_unlearn.models.losses import data_loss, item_slots

__all__ = ["LOSSES", "OPTIMIZERS", "Recommender"]

LOSSES = ("bpr", "bce")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class Recommender(pl.LightningModule):
    """Base ``LightningModule`` for recommenders trained on rows with fixed negatives.

    The training objective is the finite sum over training rows ``r = (u, i, negatives)``::

        L(theta) = 1/n * sum_r loss_r(theta) + dense_penalty(theta)
        loss_r   = data term (BPR or BCE) + l2/2 * ||embedding rows that r touches||^2

    so deleting rows removes well-defined terms. A subclass implements
    :meth:`representations` (all user and item vectors), :meth:`interact` (scores of
    aligned user/item vectors), :meth:`embedding_penalty` and :meth:`parameter_groups`;
    it may override :meth:`full_scores` and :meth:`dense_penalty`, and graph models
    :meth:`set_graph`.

    Args:
        num_users: number of users (linked from the datamodule in the CLI).
        num_items: number of items.
        loss: ``"bpr"`` (pairwise, one term per negative) or ``"bce"`` (pointwise).
        l2: L2 weight on the embedding rows a row touches.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        top_k: cut-offs of the logged ranking metrics.
        eval_auc: also log per-user AUC.

    Raises:
        ValueError: on an unknown loss or optimizer, non-positive sizes or negative ``l2``.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        loss: Literal["bpr", "bce"] = "bpr",
        l2: float = 1e-4,
        lr: float = 1e-3,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        top_k: Sequence[int] = (10, 20),
        eval_auc: bool = True,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"{type(self).__name__}(loss=...) must be one of {LOSSES}, got {loss!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}(optimizer=...) must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}.")
        if num_users < 1 or num_items < 1:
            raise ValueError(f"{type(self).__name__} needs num_users >= 1 and num_items >= 1, got {num_users}, {num_items}.")
        if l2 < 0 or lr <= 0:
            raise ValueError(f"{type(self).__name__} needs l2 >= 0 and lr > 0, got l2={l2}, lr={lr}.")
        self.save_hyperparameters()
        self.num_users, self.num_items = num_users, num_items
        self.loss_name, self.l2, self.top_k = loss, l2, tuple(top_k)
        self.val_metrics = FullRankingMetrics(self.top_k, auc=eval_auc)
        self.test_metrics = FullRankingMetrics(self.top_k, auc=eval_auc)
        self._eval_repr: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def representations(self) -> tuple[Tensor, Tensor]:
        """``(num_users, D)`` user and ``(num_items, D)`` item vectors fed to :meth:`interact`."""

    @abstractmethod
    def interact(self, user_vectors: Tensor, item_vectors: Tensor) -> Tensor:
        """Scores of aligned (broadcastable) ``(..., D)`` user and item vectors -> ``(...)``."""

    @abstractmethod
    def embedding_penalty(self, users: Tensor, items: Tensor) -> Tensor:
        """Per row, the squared norm of the embedding rows of its user ``(B,)`` and items ``(B, m)``."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[Tensor]]:
        """Named parameters: ``user_embedding``, ``item_embedding`` (rows indexed by id), ``dense``."""

    def interact_jacobians(self, user_vectors: Tensor, item_vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of each score w.r.t. its own user vector and item vector.

        Args:
            user_vectors: ``(P, Du)`` aligned pairs.
            item_vectors: ``(P, Di)``.

        Returns:
            ``(P, Du)`` and ``(P, Di)``. The default uses ``torch.func``; models with a closed
            form (a dot product) override it.
        """
        grads = torch.func.vmap(torch.func.grad(lambda u, v: self.interact(u, v), argnums=(0, 1)))
        return grads(user_vectors, item_vectors)

    def dense_penalty(self) -> Tensor:
        """Regularisation of the dense (non-embedding) weights; a constant per objective."""
        return torch.zeros((), device=self.device)

    def set_graph(self, interactions: Interactions) -> None:
        """Give a graph model the training graph; a no-op for models without one."""

    def fresh(self) -> Recommender:
        """A new model with the same hyper-parameters, initialised from the current RNG state."""
        return type(self)(**{k: v for k, v in self.hparams.items() if not k.startswith("_")})  # e.g. the CLI's _class_path

    # ------------------------------------------------------------------ scoring
    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of ``(user, item)`` pairs (broadcastable index tensors)."""
        user_vectors, item_vectors = self.representations()
        return self.interact(user_vectors[users], item_vectors[items])

    def full_scores(self, users: Tensor, representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(len(users), num_items)`` scores of every item for ``users``."""
        user_vectors, item_vectors = representations or self.representations()
        return self.interact(user_vectors[users].unsqueeze(1), item_vectors.unsqueeze(0))

    def loss(self, batch: dict[str, Tensor], reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
        """Per-row training loss (data term + L2 on the touched rows) of a batch of rows.

        Args:
            batch: ``users`` (B,), ``items`` (B,) and ``negatives`` (B, k) index tensors.
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a ``(B,)`` tensor).
        """
        users, items, negatives = batch["users"], batch["items"], batch["negatives"]
        user_vectors, item_vectors = self.representations()
        u = user_vectors[users]
        pos = self.interact(u, item_vectors[items])
        neg = self.interact(u.unsqueeze(1), item_vectors[negatives])
        data = data_loss(torch.cat([pos.unsqueeze(1), neg], dim=1), self.loss_name)
        per_row = data + 0.5 * self.l2 * self.embedding_penalty(users, item_slots(batch))
        if reduction == "none":
            return per_row
        return per_row.sum() if reduction == "sum" else per_row.mean()

    @torch.no_grad()
    def evaluate(self, loader: Iterable[dict[str, Tensor]], prefix: str = "test") -> dict[str, float]:
        """Full-ranking metrics over ranking batches (e.g. ``datamodule.test_dataloader()``), outside a Trainer.

        The loader covers every user it is given, so the metric is not synchronised across
        processes (one process may evaluate while the others wait, e.g. rank zero under DDP).

        Returns:
            ``{"<prefix>/recall@K": ..., ...}`` as floats.
        """
        metric = FullRankingMetrics(self.top_k, auc=self.hparams.eval_auc, sync_on_compute=False).to(self.device)
        representations = self.representations()
        for batch in loader:
            self._ranking_update({k: v.to(self.device) for k, v in batch.items()}, metric, representations)
        return {f"{prefix}/{k}": v.item() for k, v in metric.compute().items()}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        train = getattr(datamodule, "train", None)
        if isinstance(train, Interactions):
            self.set_graph(train)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch) + self.dense_penalty()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["users"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.hparams.optimizer](self.parameters(), lr=self.hparams.lr)

    def _ranking_step(self, batch: dict[str, Tensor], metric: FullRankingMetrics) -> None:
        if self._eval_repr is None:
            self._eval_repr = self.representations()
        self._ranking_update(batch, metric, self._eval_repr)

    def _ranking_update(self, batch: dict[str, Tensor], metric: FullRankingMetrics, representations: tuple[Tensor, Tensor]) -> None:
        scores = self.full_scores(batch["users"], representations)
        target = torch.zeros_like(scores, dtype=torch.bool)
        target[batch["target_rows"], batch["target_items"]] = True
        exclude = torch.zeros_like(target)
        exclude[batch["exclude_rows"], batch["exclude_items"]] = True
        metric.update(scores, target, exclude)

    def _log_ranking(self, prefix: str, metric: FullRankingMetrics) -> None:
        self._eval_repr = None
        self.log_dict({f"{prefix}/{k}": v for k, v in metric.compute().items()}, prog_bar=prefix == "val")
        metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_repr = None

    def on_test_epoch_start(self) -> None:
        self._eval_repr = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._ranking_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_ranking("val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._ranking_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_ranking("test", self.test_metrics)
