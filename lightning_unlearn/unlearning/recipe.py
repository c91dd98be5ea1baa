"""``FitRecipe``: how the original model was fitted, so ``Retrain`` can fit again the same way."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from lightning_unlearn.models.base import Recommender

__all__ = ["FitRecipe"]


@dataclass(frozen=True)
class FitRecipe:
    """Trainer settings that decide what a fit converges to.

    Calling the recipe fits a model on a datamodule with a fresh, silent ``Trainer``; with a
    ``monitor`` it stops early on it and ends with the best epoch's weights, like a fit with
    ``ModelCheckpoint`` + ``EarlyStopping`` followed by a test of the best checkpoint.

    Args:
        max_epochs: epoch cap.
        monitor: metric for early stopping and best-epoch selection (``None``: last epoch).
        mode: ``"max"`` or ``"min"``.
        patience: early-stopping patience (checks without improvement).
        min_delta: early-stopping minimum improvement.
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        deterministic: Lightning's ``deterministic`` flag.
        limit_train_batches: Lightning's ``limit_train_batches`` (a share or a count per epoch).
        limit_val_batches: Lightning's ``limit_val_batches``.

    Example:
        >>> FitRecipe(max_epochs=3, monitor=None).max_epochs
        3
    """

    max_epochs: int = 100
    monitor: str | None = "val/ndcg@20"
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    accelerator: str = "cpu"
    devices: int | str = 1
    deterministic: bool = True
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> FitRecipe:
        """The recipe of ``trainer``: its epoch cap, early stopping, best-checkpoint metric and device."""
        stop = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
        best = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        monitor = (best.monitor if best is not None else None) or (stop.monitor if stop is not None else None)
        mode = best.mode if best is not None and best.monitor else (stop.mode if stop is not None else "max")
        return cls(
            max_epochs=trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 100,
            monitor=monitor,
            mode=mode,
            patience=stop.patience if stop is not None else trainer.max_epochs or 100,
            min_delta=abs(float(stop.min_delta)) if stop is not None else 0.0,
            accelerator="gpu" if trainer.strategy.root_device.type == "cuda" else "cpu",
            devices=1,
            deterministic=True,
            limit_train_batches=trainer.limit_train_batches,
            limit_val_batches=trainer.limit_val_batches,
        )

    def __call__(self, model: Recommender, datamodule: pl.LightningDataModule) -> None:
        """Fit ``model`` on ``datamodule`` in place (ending with the best monitored epoch)."""
        with tempfile.TemporaryDirectory() as folder, _quiet_lightning():
            callbacks: list[pl.Callback] = []
            best = None
            if self.monitor:
                best = ModelCheckpoint(dirpath=folder, monitor=self.monitor, mode=self.mode, save_weights_only=True)
                stop = EarlyStopping(monitor=self.monitor, mode=self.mode, patience=self.patience, min_delta=self.min_delta)
                callbacks = [best, stop]
            limits = {k: v for k, v in (("limit_train_batches", self.limit_train_batches),
                                         ("limit_val_batches", self.limit_val_batches)) if v != 1.0}
            trainer = pl.Trainer(
                max_epochs=self.max_epochs, accelerator=self.accelerator, devices=self.devices,
                deterministic=self.deterministic, logger=False, **limits, enable_checkpointing=best is not None,
                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=folder,
            )
            trainer.fit(model, datamodule)
            if best is not None and best.best_model_path:
                state = torch.load(best.best_model_path, map_location=model.device, weights_only=True)["state_dict"]
                model.load_state_dict(state)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's informational lines (devices, tips) during a nested fit."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
