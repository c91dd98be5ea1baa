"""The unlearning journal: an append-only, fsynced JSON-lines audit of every request.

Crash safety: each entry is one line written with a single ``write`` and fsynced (and the
folder fsynced when the file is created) before :meth:`Journal.append` returns. A process killed
mid-write can leave a torn last line; readers skip it, and the next append first ends it with a
newline so that the new entry stays a line of its own (the torn bytes stay, for forensics).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Journal", "fsync_directory"]

STATUSES = ("pending", "applied", "failed")


class Journal:
    """Append-only JSON lines; each entry is flushed and fsynced before :meth:`append` returns.

    Entries carry a request's digest, never its raw ids. The last entry of a digest is its
    status: ``pending`` (accepted, being applied), ``applied`` or ``failed``. A digest whose last
    entry is ``pending`` when no request is running was interrupted (the process died);
    :meth:`interrupted` lists them and the callback closes them as ``failed`` when it starts.

    Args:
        path: the journal file (created, with its folder, on first append).

    Example:
        >>> import tempfile, os
        >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
        >>> journal.append(digest="ab12", status="pending", method="Retrain")["status"]
        'pending'
        >>> journal.status()
        {'ab12': 'pending'}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, digest: str, status: str, **fields: Any) -> dict[str, Any]:
        """Write one entry durably and return it.

        Args:
            digest: the resolved request's digest.
            status: ``"pending"``, ``"applied"`` or ``"failed"``.
            **fields: more plain values (counts, seconds, the checkpoint path, a reason).

        Raises:
            ValueError: on an unknown status.
            TypeError: if a field is not JSON-serialisable (nothing is written).
        """
        if status not in STATUSES:
            raise ValueError(f"journal status must be one of {STATUSES}, got {status!r}.")
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "digest": digest, "status": status, **fields}
        line = json.dumps(entry, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab") as fh:
            if not created and fh.tell() > 0 and not _ends_with_newline(self.path):
                line = "\n" + line  # end a line torn by a crash, so this entry is a line of its own
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            fsync_directory(self.path.parent)
        return entry

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return iter(())
        lines = self.path.read_bytes().decode("utf-8", errors="replace").split("\n")
        # A crash mid-write can leave a torn line; every other line is intact.
        entries = (_entry(line) for line in lines if line.strip())
        return iter([entry for entry in entries if entry is not None])

    def status(self) -> dict[str, str]:
        """The latest status of every digest in the journal."""
        return {entry["digest"]: entry["status"] for entry in self}

    def interrupted(self) -> list[dict[str, Any]]:
        """The last entry of every digest still ``pending``: requests whose process died mid-way.

        Example:
            >>> import tempfile, os
            >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
            >>> _ = journal.append(digest="ab12", status="pending", request=0)
            >>> _ = journal.append(digest="cd34", status="pending", request=1)
            >>> _ = journal.append(digest="cd34", status="applied", request=1)
            >>> [e["digest"] for e in journal.interrupted()]
            ['ab12']
        """
        last: dict[str, dict[str, Any]] = {}
        for entry in self:
            last[entry["digest"]] = entry
        return [entry for entry in last.values() if entry["status"] == "pending"]

    def last_checkpoint(self) -> Path | None:
        """The checkpoint of the latest ``applied`` entry whose file exists (``None`` if none).

        After a crash, resume from it: it holds the model, the datamodule's removals and the
        callback's state as they were after that request.
        """
        for entry in reversed(list(self)):
            if entry["status"] == "applied" and entry.get("checkpoint") and Path(entry["checkpoint"]).is_file():
                return Path(entry["checkpoint"])
        return None


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


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _entry(line: str) -> dict[str, Any] | None:
    """A journal entry, or ``None`` for a torn or foreign line."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("digest"), str) and entry.get("status") in STATUSES
    return entry if ok else None
