"""A Trainer's checkpoints that hold deleted rows, written readable by their owner only.

A checkpoint whose datamodule state has removals, or whose ``UnlearningCallback`` state has
pending requests, holds the deleted rows as indices, which map back to ids with the data set.
:class:`PrivateCheckpointIO` writes those like the unlearned checkpoints (``0o600``, whole or not
at all); :func:`keep_checkpoints_private` gives it to a Trainer when the datamodule or the
callback is set up.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import fsspec
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.plugins.io.wrapper import _WrappingCheckpointIO
from pytorch_lightning.strategies import Strategy
from pytorch_lightning.utilities import rank_zero_warn

from lightning_unlearn.files import write_whole

__all__ = ["PrivateCheckpointIO", "holds_deleted_rows", "keep_checkpoints_private"]


class PrivateCheckpointIO(CheckpointIO):
    """A Trainer's checkpoint IO that writes a local checkpoint holding deleted rows readable by its owner only (``0o600``).

    A checkpoint whose datamodule state has removals, or whose
    :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback` state has pending
    requests (:func:`holds_deleted_rows`), holds the deleted rows as indices, which map back to
    ids with the data set: it is written like the unlearned checkpoints, with :func:`write_whole`
    (``private=True``). Every other checkpoint, and paths on another file system (``s3://``,
    ``memory://``: no file mode), go to the wrapped IO unchanged, as do loading and removing.

    Args:
        inner: the IO it wraps (Lightning's default :class:`~lightning_fabric.plugins.io.TorchCheckpointIO`).

    Example:
        >>> import tempfile, pathlib
        >>> from lightning_unlearn.files import _umask
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> io = PrivateCheckpointIO(TorchCheckpointIO())
        >>> io.save_checkpoint({"RecDataModule": {"fingerprint": "f", "train_keys": torch.tensor([3]), "users": torch.tensor([]),
        ...                                       "items": torch.tensor([])}}, folder / "removals.ckpt")
        >>> io.save_checkpoint({"state_dict": {}}, folder / "plain.ckpt")
        >>> oct((folder / "removals.ckpt").stat().st_mode & 0o777), (folder / "plain.ckpt").stat().st_mode & 0o777 == 0o666 & ~_umask()
        ('0o600', True)
    """

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        filesystem, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem) or not holds_deleted_rows(checkpoint):
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        write_whole(local, buffer.getvalue(), private=True)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


REMOVALS = ("train_keys", "users", "items")  # a RecDataModule's state: what was removed, beside its data "fingerprint"


def holds_deleted_rows(checkpoint: dict[str, Any]) -> bool:
    """Whether a Trainer's checkpoint holds deleted rows as indices: a datamodule state with removals, or a callback state with pending requests.

    A datamodule state is a top-level entry with a ``"fingerprint"`` and the removals
    ``"train_keys"``, ``"users"`` and ``"items"`` (tensors); a callback state, an entry of
    ``"callbacks"`` with ``"applied"`` and ``"pending"`` (a list).

    Args:
        checkpoint: the dictionary Lightning is about to write.

    Example:
        >>> removals = {"fingerprint": "f", "train_keys": torch.tensor([3]), "users": torch.tensor([]), "items": torch.tensor([])}
        >>> holds_deleted_rows({"RecDataModule": removals, "hyper_parameters": {"users": 943}})
        True
        >>> holds_deleted_rows({"callbacks": {"UnlearningCallback": {"applied": ["a"], "pending": []}}})
        False
    """
    tensors = [state[name] for state in checkpoint.values()
               if isinstance(state, dict) and "fingerprint" in state and all(name in state for name in REMOVALS) for name in REMOVALS]
    callbacks = checkpoint.get("callbacks")
    queues = [state["pending"] for state in (callbacks.values() if isinstance(callbacks, dict) else ())
              if isinstance(state, dict) and "applied" in state and isinstance(state.get("pending"), list)]
    return any(isinstance(t, torch.Tensor) and t.numel() for t in tensors) or any(queues)


def keep_checkpoints_private(trainer: pl.Trainer | None) -> None:
    """Give ``trainer`` a :class:`PrivateCheckpointIO`, so that its checkpoints that hold deleted rows are private; nothing without a trainer.

    Called when a :class:`~lightning_unlearn.data.datamodule.RecDataModule` or an
    :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback` is set up by a Trainer. Wraps
    Lightning's default IO, also inside a wrapping IO such as ``AsyncCheckpointIO``. A checkpoint
    IO of another kind, or a strategy that saves checkpoints its own way (FSDP, DeepSpeed, model
    parallel, XLA: it overrides ``save_checkpoint``), is warned, once, that the checkpoints which
    come to hold deleted rows get the mode it gives them.

    Args:
        trainer: the Trainer.

    Example:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> keep_checkpoints_private(trainer)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'PrivateCheckpointIO'
    """
    if trainer is None:
        return
    strategy = trainer.strategy
    holder = strategy.checkpoint_io if isinstance(strategy.checkpoint_io, _WrappingCheckpointIO) else None
    current = holder.checkpoint_io if holder is not None else strategy.checkpoint_io
    if isinstance(current, PrivateCheckpointIO):
        return
    if type(current) is not TorchCheckpointIO or type(strategy).save_checkpoint is not Strategy.save_checkpoint:  # FSDP, DeepSpeed, ...
        writer = type(strategy).__name__ if type(current) is TorchCheckpointIO else type(current).__name__
        rank_zero_warn(f"This Trainer's {writer} writes its checkpoints with its own file mode: those that come to hold deleted "
                       f"rows (a datamodule's removals, pending requests), as indices which map back to ids with the data set, "
                       f"are not made private. Keep them so (e.g. chmod 600).", category=UserWarning)
        return
    if holder is None:
        strategy.checkpoint_io = PrivateCheckpointIO(current)
    else:  # its setter does not replace an IO it already has
        holder._checkpoint_io = PrivateCheckpointIO(current)
