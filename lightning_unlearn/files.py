"""Files written whole or not at all, and made durable.

Every file the unlearning folder and ``compare`` write in one piece (unlearned checkpoints,
``compare.json``/``.csv``, the partial results and their weights, and a Trainer's checkpoints
that hold deleted rows, :mod:`lightning_unlearn.private_checkpoints`) goes through
:func:`write_whole`; the journal, which is appended to, makes its lines durable itself. The
notes of where things are (lines of deletions, recommendation files) are appended a line at a
time with :func:`append_note` and read with :func:`notes`.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["append_note", "fsync_directory", "notes", "write_whole", "written_whole"]


def write_whole(path: str | os.PathLike, data: bytes | str, private: bool = False, mode: int | None = None,
                before_rename: Callable[[Path], object] | None = None) -> Path:
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
        mode: the file's mode instead (the one of the file it replaces, say).
        before_rename: called with the temporary file, written and fsynced, just before it is renamed over
            ``path`` (the rename keeps its size and modification time: a note of them made here holds
            for ``path`` once renamed).

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
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with written_whole(path, private, mode, size=len(payload), before_rename=before_rename) as fh:
        _write(fh, payload)
    return Path(path)


@contextmanager
def written_whole(path: str | os.PathLike, private: bool = False, mode: int | None = None,
                  size: int | None = None, before_rename: Callable[[Path], object] | None = None) -> Iterator[BinaryIO]:
    """:func:`write_whole` for content written a piece at a time: the block writes into the binary file it is given.

    When the block ends, the file is fsynced and renamed over ``path``; when it raises, ``path`` is
    as it was and no temporary file is left.

    Args:
        path: the file to write (replaced if it exists); its folder must exist.
        private: as :func:`write_whole`.
        mode: as :func:`write_whole`.
        size: the bytes to be written, if known (a full disk's message says it).
        before_rename: as :func:`write_whole`.

    Raises:
        OSError: as :func:`write_whole`.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.csv"
        >>> with written_whole(path) as fh:
        ...     _ = fh.write(b"a,b\\n")
        >>> path.read_text()
        'a,b\\n'
    """
    path = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    except OSError as err:
        raise _naming(err, path, size) from err
    try:
        if mode is not None or not private:
            os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(Path(temporary))
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path, size) from err
        raise
    fsync_directory(path.parent)


def append_note(path: str | os.PathLike, line: dict, once: bool = True) -> None:
    """Append ``line`` as one JSON line to the note file ``path`` (created ``0o600``, with its folder); with ``once``, unless it holds it.

    One ``O_APPEND`` write per line, made durable: notes that processes write at once are all
    kept, and a torn last line is skipped by :func:`notes`.

    Raises:
        OSError: the file or its folder cannot be written: the caller decides what that costs.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.jsonl"
        >>> append_note(path, {"a": 1}); append_note(path, {"a": 1}); notes(path)
        [{'a': 1}]
    """
    path = Path(path)
    if once and line in notes(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a torn last line: this note starts a line of its own
        os.write(fd, ("\n" if torn else "").encode() + (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def notes(path: str | os.PathLike, once: bool = True) -> list[dict]:
    """The JSON objects of the note file ``path`` in order (with ``once``, each at its first place only); none when it
    cannot be read. A line that does not read as one (a torn last line) is skipped: a note is a hint.

    Example:
        >>> notes("/no/such/notes.jsonl")
        []
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    found: list[dict] = []
    seen: set[str] = set()  # by its text
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        key = json.dumps(line, sort_keys=True) if isinstance(line, dict) else None
        if key is not None and not (once and key in seen):
            seen.add(key)
            found.append(line)
    return found


def _naming(err: OSError, path: Path, size: int | None) -> OSError:
    """``err`` with a message that names the file (a full disk says how many bytes were to be written, when known)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, f"No space left on the device to write {path}" + (f" ({size} bytes)" if size is not None else ""))
    return OSError(err.errno, f"{err.strerror}: cannot write {path}")


def _write(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` to an open file (:func:`written_whole` makes it durable)."""
    fh.write(data)


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
