"""The unlearning journal: an append-only, fsynced JSON-lines audit of every request."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Journal"]

STATUSES = ("pending", "applied", "failed")


class Journal:
    """Append-only JSON lines; each entry is flushed and fsynced before :meth:`append` returns.

    Entries carry a request's digest, never its raw ids. The last entry of a digest is its
    status: ``pending`` (accepted, being applied), ``applied`` or ``failed``.

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

        Raises:
            ValueError: on an unknown status.
        """
        if status not in STATUSES:
            raise ValueError(f"journal status must be one of {STATUSES}, got {status!r}.")
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "digest": digest, "status": status, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return iter(())
        lines = self.path.read_text(encoding="utf-8").splitlines()
        # A crash mid-write can leave a torn last line; everything before it is intact.
        return iter([json.loads(line) for line in lines if line.strip() and _complete(line)])

    def status(self) -> dict[str, str]:
        """The latest status of every digest in the journal."""
        return {entry["digest"]: entry["status"] for entry in self}


def _complete(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
