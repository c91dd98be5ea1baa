"""``FitRecipe``: how the original model was fitted, so ``Retrain`` can fit again the same way."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import timedelta
from types import MethodType
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary, ProgressBar, Timer

from lightning_unlearn.models.base import Recommender

__all__ = ["FitRecipe", "trains_nothing"]

# FitRecipe fields handed to the refit's Trainer only when they differ from their defaults (Lightning's own)
_PASSED_WHEN_SET = ("limit_train_batches", "limit_val_batches", "max_steps", "min_epochs", "min_steps", "max_time",
                    "val_check_interval", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "precision")


@dataclass(frozen=True)
class FitRecipe:
    """Trainer settings that decide what a fit converges to.

    Calling the recipe fits a model on a datamodule with a fresh ``Trainer`` (no logger, no
    checkpoint kept; a progress bar only with ``progress``); with a ``monitor`` it stops early on
    it and ends with the best epoch's weights, like a fit with ``ModelCheckpoint`` +
    ``EarlyStopping`` followed by a test of the best checkpoint. With ``optimizer`` (and
    ``lr_scheduler``), the model trains with that optimizer instead of its own
    ``configure_optimizers``: what ``lightning-unlearn --optimizer ... --lr_scheduler ...``
    gives the original, so ``Retrain`` refits the way the original was fitted.

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
        check_val_every_n_epoch: Lightning's ``check_val_every_n_epoch`` (validate every n-th
            epoch; early stopping's patience counts validations).
        max_steps: Lightning's ``max_steps`` (``-1``: no cap).
        min_epochs: Lightning's ``min_epochs``.
        min_steps: Lightning's ``min_steps``.
        max_time: Lightning's ``max_time``, in seconds (``None``: no cap).
        val_check_interval: Lightning's ``val_check_interval``.
        accumulate_grad_batches: Lightning's ``accumulate_grad_batches``.
        gradient_clip_val: Lightning's ``gradient_clip_val``.
        gradient_clip_algorithm: Lightning's ``gradient_clip_algorithm``.
        precision: Lightning's ``precision`` (``"32-true"``, ``"bf16-mixed"``, ...).
        optimizer: the optimizer as LightningCLI's ``--optimizer`` gives it,
            ``{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}`` (``None``: the
            model's own ``configure_optimizers``).
        lr_scheduler: the learning-rate scheduler the same way (``--lr_scheduler``; needs
            ``optimizer``).
        progress: show Lightning's progress bar during the fit (the command line does, when its
            own trainer shows one; default off).

    Raises:
        ValueError: ``lr_scheduler`` without ``optimizer``; (when called) a recipe that trains
            nothing, ``max_epochs=0``, ``limit_train_batches=0`` or ``max_steps=0``.

    Example:
        >>> FitRecipe(max_epochs=3, monitor=None).max_epochs
        3
        >>> FitRecipe(optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}).optimizer["init_args"]
        {'lr': 0.1}
    """

    max_epochs: int = 100
    monitor: str | None = "val/ndcg@20"
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    deterministic: bool = True
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    check_val_every_n_epoch: int = 1
    max_steps: int = -1
    min_epochs: int | None = None
    min_steps: int | None = None
    max_time: float | None = None
    val_check_interval: int | float | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: int | float | None = None
    gradient_clip_algorithm: str | None = None
    precision: str = "32-true"
    optimizer: Mapping[str, Any] | None = field(default=None, hash=False)
    lr_scheduler: Mapping[str, Any] | None = field(default=None, hash=False)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.lr_scheduler is not None and self.optimizer is None:
            raise ValueError("FitRecipe(lr_scheduler=...) needs optimizer=...: a scheduler is built on the optimizer it steps.")

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> FitRecipe:
        """The recipe of ``trainer``: its epoch and step caps, time limit, validation interval,
        gradient accumulation and clipping, precision, early stopping, best-checkpoint metric,
        device, progress bar, and the optimizer and scheduler the command line configured (the
        trainer's ``optimizer_init`` and ``lr_scheduler_init``, which ``lightning-unlearn`` sets
        from ``--optimizer`` and ``--lr_scheduler``; absent on a plain ``Trainer``). A refit runs
        on one device (the trainer's root device) and deterministically."""
        stop = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        best = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        monitor = (best.monitor if best is not None else None) or (stop.monitor if stop is not None else None)
        mode = best.mode if best is not None and best.monitor else (stop.mode if stop is not None else "max")
        return cls(
            max_epochs=trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else 100,  # -1: unbounded
            monitor=monitor,
            mode=mode,
            patience=stop.patience if stop is not None else trainer.max_epochs or 100,
            min_delta=abs(float(stop.min_delta)) if stop is not None else 0.0,
            accelerator="gpu" if trainer.strategy.root_device.type == "cuda" else "cpu",
            devices=[trainer.strategy.root_device.index or 0] if trainer.strategy.root_device.type == "cuda" else 1,
            deterministic=True,
            limit_train_batches=trainer.limit_train_batches,
            limit_val_batches=trainer.limit_val_batches,
            check_val_every_n_epoch=trainer.check_val_every_n_epoch or 1,
            max_steps=trainer.max_steps,
            min_epochs=trainer.min_epochs,
            min_steps=trainer.min_steps,
            max_time=timer._duration if timer is not None else None,
            val_check_interval=trainer.val_check_interval if trainer.val_check_interval != 1.0 else None,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=trainer.gradient_clip_algorithm,
            precision=str(trainer.precision),
            optimizer=getattr(trainer, "optimizer_init", None),
            lr_scheduler=getattr(trainer, "lr_scheduler_init", None),
            progress=trainer.progress_bar_callback is not None,
        )

    @staticmethod
    def left_out(trainer: pl.Trainer) -> list[str]:
        """What of ``trainer``'s fit :meth:`from_trainer` does not carry into a refit, described (empty: nothing).

        The refit has no callbacks but its early stopping and best-epoch choice, both on the
        ``ModelCheckpoint``'s metric: another callback (one of the user's, stochastic weight
        averaging) and an ``EarlyStopping`` on another metric or with thresholds shape the original
        and not the refit.

        Example:
            >>> from pytorch_lightning.callbacks import StochasticWeightAveraging
            >>> FitRecipe.left_out(pl.Trainer(logger=False, callbacks=[StochasticWeightAveraging(swa_lrs=0.01)]))
            ['the callback StochasticWeightAveraging']
        """
        carried = (EarlyStopping, ModelCheckpoint, Timer, ProgressBar, ModelSummary)
        out = [f"the callback {type(c).__name__}" for c in trainer.callbacks  # LightningCLI's (saving its config) trains nothing
               if not isinstance(c, carried) and not type(c).__module__.startswith(("lightning_unlearn", "pytorch_lightning.cli"))]
        best = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        for stop in (c for c in trainer.callbacks if isinstance(c, EarlyStopping)):
            if best is not None and best.monitor and stop.monitor != best.monitor:
                out.append(f"EarlyStopping's metric {stop.monitor} (the refit stops on ModelCheckpoint's, {best.monitor})")
            out += [f"EarlyStopping's {name}" for name in ("stopping_threshold", "divergence_threshold") if getattr(stop, name) is not None]
        return out

    def __call__(self, model: Recommender, datamodule: pl.LightningDataModule) -> None:
        """Fit ``model`` on ``datamodule`` in place (ending with the best monitored epoch)."""
        nothing = trains_nothing(self)
        if nothing:  # e.g. taken from a Trainer that only applies requests: the refit would be the untrained model
            raise ValueError(f"this refit's recipe trains nothing ({nothing}, from the trainer it was taken from), so the refit "
                             f"would be an untrained model. Apply requests that need a refit (Retrain, or the retrain policy's) "
                             f"with a trainer of the original's training settings, e.g. by resuming its fit from its last "
                             f"checkpoint with the original max_epochs.")
        # the best weights stay in memory: a checkpoint file would hold the datamodule's removals and outlive a killed refit
        with tempfile.TemporaryDirectory() as folder, _quiet_lightning(), self._optimizers_of(model):
            callbacks: list[pl.Callback] = []
            best = None
            if self.monitor:
                best = _BestWeights(self.monitor, self.mode)
                stop = EarlyStopping(monitor=self.monitor, mode=self.mode, patience=self.patience, min_delta=self.min_delta)
                callbacks = [best, stop]
            defaults = {f.name: f.default for f in fields(self)}
            limits = {k: getattr(self, k) for k in _PASSED_WHEN_SET if getattr(self, k) != defaults[k]}  # as the original gave them
            if "max_time" in limits:
                limits["max_time"] = timedelta(seconds=limits["max_time"])
            trainer = pl.Trainer(
                max_epochs=self.max_epochs, accelerator=self.accelerator, devices=self.devices,
                deterministic=self.deterministic, logger=False, **limits, check_val_every_n_epoch=self.check_val_every_n_epoch,
                enable_checkpointing=False,
                enable_progress_bar=self.progress, enable_model_summary=False, callbacks=callbacks, default_root_dir=folder,
            )
            previous = datamodule.trainer
            try:
                trainer.fit(model, datamodule)
            finally:
                datamodule.trainer = previous  # the datamodule stays the outer Trainer's (a refit inside a fit)
            if best is not None and best.state is not None:
                model.load_state_dict(best.state)

    @contextmanager
    def _optimizers_of(self, model: Recommender) -> Iterator[None]:
        """Make ``model`` train with :attr:`optimizer` and :attr:`lr_scheduler` (if set) for the block.

        The same construction as LightningCLI's for ``--optimizer``/``--lr_scheduler``, so a
        refit trains like the original did under ``lightning-unlearn``.
        """
        if self.optimizer is None:
            yield
            return
        from pytorch_lightning.cli import LightningCLI, instantiate_class

        optimizer_init, scheduler_init = _plain(self.optimizer), _plain(self.lr_scheduler)

        def configure_optimizers(module: Recommender) -> Any:
            optimizer = instantiate_class(module.parameters(), optimizer_init)
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            return LightningCLI.configure_optimizers(module, optimizer, scheduler)

        had_own = "configure_optimizers" in vars(model)
        own = vars(model).get("configure_optimizers")
        model.configure_optimizers = MethodType(configure_optimizers, model)
        try:
            yield
        finally:
            if had_own:
                model.configure_optimizers = own
            else:
                del model.configure_optimizers


def _plain(init: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A ``class_path``/``init_args`` mapping (dict or jsonargparse ``Namespace``) as plain dicts."""
    if init is None:
        return None
    as_dict = getattr(init, "as_dict", None)
    init = as_dict() if callable(as_dict) else dict(init)
    args = init.get("init_args") or {}
    as_dict = getattr(args, "as_dict", None)
    return {"class_path": init["class_path"], "init_args": dict(as_dict() if callable(as_dict) else args)}


class _BestWeights(pl.Callback):
    """Keep a copy of the weights at the best monitored validation so far (as ``ModelCheckpoint`` picks it), in memory.

    Strictly better only (the first of equal values stays), sanity checks and NaN skipped.
    """

    def __init__(self, monitor: str, mode: str):
        self.monitor, self.better = monitor, (torch.gt if mode == "max" else torch.lt)
        self.value: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or torch.isnan(value):
            return
        if self.value is None or bool(self.better(value, self.value)):
            self.value = value.detach().clone()
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}



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


def trains_nothing(settings: pl.Trainer | FitRecipe) -> str | None:
    """The limit that makes a Trainer's (or a recipe's) fit train nothing, as ``"name=0"``; ``None`` when it trains.

    Example:
        >>> trains_nothing(FitRecipe(limit_train_batches=0)), trains_nothing(FitRecipe())
        ('limit_train_batches=0', None)
    """
    return next((f"{name}=0" for name in ("max_epochs", "limit_train_batches", "max_steps") if getattr(settings, name) == 0), None)
