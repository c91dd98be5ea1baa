"""Files written whole or not at all, and made durable; checkpoints that hold deleted rows kept private.

Every file the unlearning folder and ``compare`` write in one piece (unlearned checkpoints,
``compare.json``/``.csv``, the partial results and their weights) goes through
:func:`write_whole`; the journal, which is appended to, makes its lines durable itself. A
Trainer's own checkpoints go through :class:`PrivateCheckpointIO` once they hold deleted rows
(:func:`holds_deleted_rows`, :func:`keep_checkpoints_private`).
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.plugins.io.wrapper import _WrappingCheckpointIO
from pytorch_lightning.strategies import Strategy
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["PrivateCheckpointIO", "fsync_directory", "holds_deleted_rows", "keep_checkpoints_private", "write_whole"]


def write_whole(path: str | os.PathLike, data: bytes | str, private: bool = False) -> Path:
    """Write ``data`` to ``path`` whole or not at all, and make it durable.

    The bytes go to a temporary file in ``path``'s folder, which is fsynced, renamed over
    ``path``, and the folder fsynced. A reader, a crash or a kill finds the old file or the new
    one, never part of one; a write that fails leaves no temporary file behind (a kill leaves a
    hidden ``.<name>.*.tmp``).

    Args:
        path: the file to write (replaced if it exists); its folder must exist.
        data: the content; a ``str`` is written as UTF-8.
        private: leave the file readable by its owner only (``0o600``). Otherwise it gets the
            mode a plain ``open`` would give it (``0o666`` less the umask).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        OSError: the file could not be written (e.g. no space left on the device); the message
            names it, and ``path`` is as it was.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.json"
        >>> write_whole(path, '{"a": 1}').read_text()
        '{"a": 1}'
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    except OSError as err:
        raise _naming(err, path, payload) from err
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            _write(fh, payload)
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path, payload) from err
        raise
    fsync_directory(path.parent)
    return path


def _naming(err: OSError, path: Path, payload: bytes) -> OSError:
    """``err`` with a message that names the file (a full disk says how many bytes were to be written)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, f"No space left on the device to write {path} ({len(payload)} bytes)")
    return OSError(err.errno, f"{err.strerror}: cannot write {path}")


def _write(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` to an open file and fsync it."""
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a file creation or rename in folder ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask: from ``/proc`` where there is one (reading it with ``os.umask`` sets it, for a moment)."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


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


_REMOVALS = ("train_keys", "users", "items")  # a RecDataModule's state: what was removed, beside its data "fingerprint"


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
               if isinstance(state, dict) and "fingerprint" in state and all(name in state for name in _REMOVALS) for name in _REMOVALS]
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
