"""Files written whole or not at all, and made durable; checkpoints that hold deleted rows kept private.

Every file the unlearning folder and ``compare`` write in one piece (unlearned checkpoints,
``compare.json``/``.csv``, the partial results and their weights) goes through
:func:`write_whole`; the journal, which is appended to, makes its lines durable itself. A
Trainer's own checkpoints go through :class:`PrivateCheckpointIO` once they hold deleted rows
(:func:`keep_checkpoints_private`).
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["PrivateCheckpointIO", "fsync_directory", "keep_checkpoints_private", "write_whole"]


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
    """A Trainer's checkpoint IO that writes local checkpoints readable by their owner only (``0o600``), whole or not at all.

    A checkpoint of a datamodule with removals, or of an
    :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback` with pending requests,
    holds the deleted rows as indices, which map back to ids with the data set: like the
    unlearned checkpoints, it is written with :func:`write_whole` (``private=True``) instead
    of the default mode. Paths with a protocol (``s3://``, ...) have no file mode and go to the
    wrapped IO, as do loading and removing.

    Args:
        inner: the IO it wraps (Lightning's default :class:`~lightning_fabric.plugins.io.TorchCheckpointIO`).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.ckpt"
        >>> PrivateCheckpointIO(TorchCheckpointIO()).save_checkpoint({"state_dict": {}}, path)
        >>> oct(path.stat().st_mode & 0o777)
        '0o600'
    """

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, buffer.getvalue(), private=True)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def keep_checkpoints_private(trainer: pl.Trainer | None) -> None:
    """Make ``trainer``'s later checkpoints private (:class:`PrivateCheckpointIO`); nothing without a trainer.

    Called when a checkpoint's state is taken that holds deleted rows, before it is written.
    Wraps Lightning's default IO only: a strategy with its own IO (sharded, XLA, a plug-in) is
    warned, once, that its files get the mode that IO gives them.

    Args:
        trainer: the Trainer about to write a checkpoint (``None``: a state taken outside a fit).

    Example:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> keep_checkpoints_private(trainer)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'PrivateCheckpointIO'
    """
    if trainer is None:
        return
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, PrivateCheckpointIO):
        return
    if type(current) is not TorchCheckpointIO:
        rank_zero_warn(f"The checkpoints of this Trainer hold deleted rows as indices, which map back to ids with the data set, "
                       f"and its {type(current).__name__} writes them with its own file mode: keep them private "
                       f"(e.g. chmod 600).", category=UserWarning)
        return
    strategy.checkpoint_io = PrivateCheckpointIO(current)
