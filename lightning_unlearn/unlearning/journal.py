"""The unlearning journal: the system of record of every deletion request in one folder.

Like a database's write-ahead log, ``journal.jsonl`` is append-only JSON lines, and each entry

- carries a sequence number ``seq`` (0, 1, 2, ...), ``hash``, the SHA-256 of its own content,
  and ``prev``, the previous entry's ``hash``, so a changed, removed, reordered or garbled line
  breaks the chain (the last line too);
- is written with a single ``write`` and fsynced (the folder too when the file is created)
  before :meth:`Journal.append` returns;
- names its checkpoint relative to the journal's folder, so the folder can be read from any
  working directory (and moved as a whole).

Reading is strict: a line that does not parse, has the wrong types or breaks the chain raises
:class:`JournalCorrupted` naming the line and what to do, instead of being skipped. The one
exception is a last line without its newline: a crash mid-write leaves such a torn line, the
entry was never acknowledged, and the next append cuts it off.

One writer at a time: :meth:`Journal.lock` takes an advisory lock (``fcntl.flock``) on the
folder; a second process gets :class:`FolderLocked` naming the holder's pid. The lock dies with
its process, so a crash never leaves the folder locked.

Digests are keyed: :meth:`Journal.keyed` is an HMAC-SHA256 with a secret made once per folder
(``journal.key``, readable by its owner only). The key never goes into a checkpoint or a logger,
so a digest cannot be reversed by hashing known ids.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lightning_unlearn.files import fsync_directory

__all__ = ["FolderLocked", "Journal", "JournalCorrupted", "exclusive"]

STATUSES = ("pending", "applied", "failed", "dropped")
KEY_FILE, LOCK_FILE = "journal.key", "journal.lock"
GENESIS = "0" * 64
"""``prev`` of the first entry."""
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "prev": str, "hash": str, "time": str, "digest": str, "status": str, "checkpoint": str, "request": int,
    "pending_seq": int, "reason": str, "recovered": bool, "method": str, "journal": str, "model": str, "saved": list,
}
_HELD: dict[str, list] = {}  # folder -> [fd, depth, (pid, thread)]: the locks this process holds, and which thread


class JournalCorrupted(RuntimeError):
    """The journal does not read as an unbroken chain of entries; nothing was applied.

    The message names the file, the line and what to do (see ``docs/journal.rst``).
    """


class FolderLocked(RuntimeError):
    """Another process is applying requests into the same folder (its pid is in the message)."""


class Journal:
    """The append-only, hash-chained record of the requests applied in one folder.

    Entries carry a request's keyed digest, never its raw ids. A request's life is a
    ``pending`` entry (accepted, being applied), then ``applied`` or ``failed``, each naming the
    ``pending`` entry it closes in ``pending_seq``; a request refused and taken off the queue is
    ``dropped``. A ``pending`` entry that no later entry closes was interrupted (the process
    died); :func:`~lightning_unlearn.unlearning.record.recover` closes it.

    Args:
        path: the journal file (created, with its folder, on the first append).

    Example:
        >>> import tempfile, os
        >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
        >>> pending = journal.append(digest="ab12", status="pending", method="Retrain")
        >>> pending["seq"], pending["prev"] == "0" * 64
        (0, True)
        >>> journal.append(digest="ab12", status="applied", pending_seq=0)["seq"]
        1
        >>> journal.status()
        {'ab12': 'applied'}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._verified: tuple[int, bytes, list[dict[str, Any]], str] | None = None

    @property
    def folder(self) -> Path:
        """The folder of the journal, its key, lock and checkpoints."""
        return self.path.parent

    # ------------------------------------------------------------------ writing
    def append(self, digest: str, status: str, **fields: Any) -> dict[str, Any]:
        """Write one entry durably (under the folder lock) and return it.

        Args:
            digest: the request's keyed digest.
            status: ``"pending"``, ``"applied"``, ``"failed"`` or ``"dropped"``.
            **fields: more plain values (counts, seconds, the checkpoint path, a reason). A
                ``checkpoint`` path is stored relative to the journal's folder.

        Raises:
            ValueError: on an unknown status.
            TypeError: if a field is not JSON-serialisable or a known field has the wrong type
                (nothing is written).
            JournalCorrupted: the journal does not read as a chain (nothing is written).
            FolderLocked: another process holds the folder, or the lock file was removed or replaced while this process
                held it (another process may have written the journal since).
            JournalCorrupted: the ``pending`` entry it closes (``pending_seq``) was closed already.
        """
        if status not in STATUSES:
            raise ValueError(f"journal status must be one of {STATUSES}, got {status!r}.")
        if fields.get("checkpoint") is not None:
            fields["checkpoint"] = self._relative(fields["checkpoint"])
        with self.lock():
            self._refuse_a_lost_lock()
            entries, last_hash, end = self._read()
            closes = fields.get("pending_seq")
            if closes is not None and any(e.get("pending_seq") == closes for e in entries):
                raise JournalCorrupted(f"{self.path}: request entry {closes} was closed already (by another process that "
                                       f"wrote this journal meanwhile?); this {status} entry is not written.")
            entry = {"seq": len(entries), "prev": last_hash, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "digest": digest, "status": status, **fields}
            problem = _type_problem(entry)
            if problem:
                raise TypeError(f"journal entry: {problem}.")
            entry["hash"] = _content_hash(entry)
            line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
            created = not self.path.exists()
            with os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as fh:  # its owner's, as the key is
                fh.truncate(end)  # a torn last line (a crash mid-write) was never acknowledged
                if end:
                    fh.seek(end - 1)
                    if fh.read(1) != b"\n":  # a whole last entry whose newline was not written
                        line = b"\n" + line
                fh.seek(end)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            if created:
                fsync_directory(self.folder)
        return entry

    def _refuse_a_lost_lock(self) -> None:
        """Refuse to write when the lock file this process locked is no longer the one in the folder (removed by hand as a
        stale lock, say): another process may have locked a new one and written the journal since."""
        held = _HELD.get(str(self.folder.resolve()))
        if held is None:  # no advisory locks here (Windows)
            return
        mine = os.fstat(held[0])
        try:
            there = os.stat(self.folder / LOCK_FILE)
        except FileNotFoundError:
            there = None
        if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            raise FolderLocked(
                f"{self.folder / LOCK_FILE} was removed or replaced while this process held it, so another process may "
                f"have written {self.path} since: nothing more is written by this one. A request it was applying stays as the "
                f"journal has it: the next run (or recover(folder)) closes a pending one as applied if its checkpoint was "
                f"written, as failed otherwise. Never remove the lock file of a running process (it is released when the "
                f"process exits, also if it dies).")

    def start(self) -> None:
        """Create the journal empty, durably, unless it exists (a line of deletions noted before its first entry has one).

        Example:
            >>> import tempfile, os
            >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
            >>> journal.start()
            >>> journal.path.read_bytes(), journal.entries()
            (b'', [])
        """
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))  # one made meanwhile is kept as it is
            fsync_directory(self.folder)

    def _relative(self, path: str | os.PathLike) -> str:
        path = Path(path)
        if not path.is_absolute():
            path = Path.cwd() / path
        try:
            return str(path.resolve().relative_to(self.folder.resolve()))
        except ValueError:
            raise ValueError(f"journal checkpoint {path} is not inside the journal's folder {self.folder}.") from None

    def checkpoint(self, entry: dict[str, Any]) -> Path | None:
        """The checkpoint path an entry names, resolved against the journal's folder."""
        name = entry.get("checkpoint")
        return self.folder / name if name else None

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[list[dict[str, Any]], str, int]:
        """``(entries, hash of the last entry, byte offset where the chain ends)``.

        Lines verified before are not parsed again while the bytes up to where they end are
        unchanged (one SHA-256 over them tells), so a long stream of requests does not re-read
        its whole journal for every entry.
        """
        if not self.path.exists():
            return [], GENESIS, 0
        data = self.path.read_bytes()
        entries: list[dict[str, Any]] = []
        last_hash, offset = GENESIS, 0
        verified = self._verified
        if verified is not None and len(data) >= verified[0] and hashlib.sha256(data[: verified[0]]).digest() == verified[1]:
            offset, _, entries, last_hash = verified[0], verified[1], list(verified[2]), verified[3]
        while offset < len(data):
            newline = data.find(b"\n", offset)
            raw = data[offset:] if newline < 0 else data[offset:newline]
            entry, problem = _parse(raw, len(entries), last_hash)
            if newline < 0 and problem:  # a torn last line: never acknowledged, cut off by the next append
                break
            if problem:
                raise self._corrupted(len(entries) + 1, problem)
            entries.append(entry)
            last_hash = entry["hash"]
            offset = len(data) if newline < 0 else newline + 1
        if data[:offset].endswith(b"\n") or not offset:  # an entry without its newline gets one: verify it again then
            self._verified = (offset, hashlib.sha256(data[:offset]).digest(), list(entries), last_hash)
        return entries, last_hash, offset

    def _corrupted(self, line: int, problem: str) -> JournalCorrupted:
        return JournalCorrupted(
            f"{self.path}, line {line}: {problem}. The journal is the record of every deletion in this folder and "
            f"is never edited by hand; nothing was applied. To go on, restore {self.path.name} from a backup, or "
            f"start a new branch in a new folder from the newest unlearned checkpoint here (`lightning-unlearn "
            f"unlearn --ckpt_path <newest unlearned-*.ckpt> --out <new folder> --branch true`, which carries its "
            f"deletions); see 'A damaged journal' in docs/journal.rst."
        )

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, in order.

        Raises:
            JournalCorrupted: a line other than a torn last one does not read as the next entry.
        """
        return self._read()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())

    def status(self) -> dict[str, str]:
        """The latest status of every digest in the journal."""
        return {entry["digest"]: entry["status"] for entry in self}

    def interrupted(self) -> list[dict[str, Any]]:
        """The ``pending`` entries that no later entry closes: requests whose process died mid-way.

        Example:
            >>> import tempfile, os
            >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
            >>> _ = journal.append(digest="ab12", status="pending", request=0)
            >>> _ = journal.append(digest="cd34", status="pending", request=1)
            >>> _ = journal.append(digest="cd34", status="applied", request=1, pending_seq=1)
            >>> [e["digest"] for e in journal.interrupted()]
            ['ab12']
        """
        entries = self.entries()
        closed = {e["pending_seq"] for e in entries if "pending_seq" in e}
        return [e for e in entries if e["status"] == "pending" and e["seq"] not in closed]

    def latest(self) -> dict[str, Any] | None:
        """The last ``applied`` entry: the folder's latest state (``None`` before the first)."""
        return next((e for e in reversed(self.entries()) if e["status"] == "applied"), None)

    def applied_count(self) -> int:
        """How many requests this folder's chain has applied."""
        return sum(e["status"] == "applied" for e in self.entries())

    def last_checkpoint(self) -> Path | None:
        """The checkpoint of the latest ``applied`` entry (``None`` if nothing was applied).

        Resume from it: it holds the model, the datamodule's removals and the callback's state
        after every request this folder applied.

        Raises:
            FileNotFoundError: that checkpoint is gone. An older one would undo the deletions
                after it, so none is offered instead.
        """
        latest = self.latest()
        if latest is None:
            return None
        path = self.checkpoint(latest)
        if path is None or not path.is_file():
            held = f"is held by {path}, which is missing" if path else "names no checkpoint"
            raise FileNotFoundError(
                f"{self.path}: the latest applied request (entry {latest['seq']}) {held}. "
                f"Restore that file from a backup; resuming from an older checkpoint would undo the deletions "
                f"applied after it."
            )
        return path

    # ------------------------------------------------------------------ the key
    def key_exists(self) -> bool:
        """Whether the folder's key was made (it is, on the first :attr:`key`)."""
        return (self.folder / KEY_FILE).exists()

    def refuse_a_lost_key(self) -> None:
        """Refuse a folder whose journal records entries while the key their digests were made with is gone.

        Raises:
            JournalCorrupted: so, naming the file to restore (a new key would not recognise the requests recorded).
        """
        path = self.folder / KEY_FILE
        if not path.exists() and self.path.is_file() and self.path.stat().st_size > 0:
            raise JournalCorrupted(
                f"{path} is gone, and {self.path} records requests whose digests were made with it: a new key would not "
                f"recognise them (a request given again would be applied a second time), and no branch can start from this "
                f"folder without it. Restore {KEY_FILE} from a backup of the folder; it is kept nowhere else. Nothing was "
                f"applied.")

    @property
    def key(self) -> bytes:
        """The folder's secret HMAC key (``journal.key``, made on first use, owner-readable only).

        Raises:
            JournalCorrupted: the key is gone while the journal records entries (:meth:`refuse_a_lost_key`): none is made.
        """
        self.refuse_a_lost_key()
        path = self.folder / KEY_FILE
        if not path.exists():
            self.write_key(secrets.token_bytes(32))  # False: made by another process meanwhile
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < 16:
            raise JournalCorrupted(f"{path} is not a journal key (64 hex digits). Restore it from a backup.")
        return key

    def write_key(self, key: bytes) -> bool:
        """Give the folder ``key`` unless it has one: whole or not at all (``False`` when it has one).

        The key is written to a temporary file, fsynced, then linked to ``journal.key`` (which
        fails when that exists), so no reader and no crash ever finds an empty or partial key.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".journal.key.", suffix=".tmp")  # mode 0600
            try:
                _write_hex(fd, key)
                try:
                    os.link(temporary, self.folder / KEY_FILE)
                except FileExistsError:
                    return False
                except FileNotFoundError:  # another process's `recover` removed the temporary file: write another
                    continue
                except OSError:  # a filesystem without hard links (vfat, some FUSE and network mounts): create it exclusively
                    return self._create_key(key)
            finally:
                Path(temporary).unlink(missing_ok=True)
            fsync_directory(self.folder)
            return True
        raise FolderLocked(f"{self.folder}: could not write {KEY_FILE}: another process removed its temporary file 100 "
                           f"times. Run one command at a time on this folder.")

    def _create_key(self, key: bytes) -> bool:
        try:
            fd = os.open(self.folder / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        _write_hex(fd, key)
        fsync_directory(self.folder)
        return True

    def keyed(self, data: bytes | str) -> str:
        """HMAC-SHA256 of ``data`` with the folder's key, as hex: a digest safe to store and log.

        Example:
            >>> import tempfile, os
            >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
            >>> digest = journal.keyed("user 196")
            >>> len(digest), digest == journal.keyed("user 196"), digest == journal.keyed("user 186")
            (64, True, False)
        """
        data = data.encode("utf-8") if isinstance(data, str) else data
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    @property
    def id(self) -> str | None:
        """This journal's identity: the hash of its first entry (``None`` while it is empty).

        Checkpoints name it in their lineage; a journal that is replaced, or a branch that
        shares the key, has another.
        """
        entries = self.entries()
        return entries[0]["hash"][:16] if entries else None

    # ------------------------------------------------------------------ the lock
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's advisory lock (re-entrant within this process).

        Raises:
            FolderLocked: another process holds it; the message names its pid.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if err.errno not in _READ_ONLY:
                raise
            raise _cannot_write(self.folder, f"it cannot be created ({err.strerror})") from None
        name = str(self.folder.resolve())
        held = _HELD.get(name)
        if held is not None and held[2] == _holder_here():  # another thread takes the lock as another process would
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        fd = _take_lock(self.folder / LOCK_FILE)
        _HELD[name] = [fd, 1, _holder_here()]
        try:
            yield
        finally:
            if _HELD.get(name, [None])[0] == fd:
                del _HELD[name]
            os.close(fd)  # releases the flock


def _write_hex(fd: int, key: bytes) -> None:
    """Write ``key`` as one line of hex to the open file ``fd`` and make it durable (closes ``fd``)."""
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _cannot_write(folder: Path, why: str) -> FolderLocked:
    return FolderLocked(f"{folder} cannot be locked for writing ({why}). Applying, recovering or checking requests there "
                        f"writes the journal: make the folder writable, or copy it to a writable place and give that folder.")


@contextmanager
def exclusive(path: str | os.PathLike, busy: str, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock on the file ``path`` (created ``0o600``, with its folder) while the block runs.

    It dies with its process, so a crash never leaves it held.

    Args:
        path: the lock file.
        busy: what a holder does, said to a process that finds it held (with the holder's pid).
        wait: wait for a holder to release it, instead of refusing.

    Raises:
        FolderLocked: another process holds it (and ``wait`` is false).
        OSError: ``path`` cannot be created or opened for writing.

    Example:
        >>> import tempfile, pathlib
        >>> with exclusive(pathlib.Path(tempfile.mkdtemp()) / "one.lock", "applying requests"):
        ...     pass
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(path, busy, wait)
    try:
        yield
    finally:
        os.close(fd)


def _holder(fd: int, patience: float = 0.2) -> str:
    """The pid the lock's holder wrote in the file: it truncates, then writes it, so an empty file is read again a moment later."""
    deadline = time.monotonic() + patience
    while not (holder := os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder or "unknown"


def _holder_here() -> tuple[int, int]:
    """Which process and thread hold a lock: re-entrant for the same thread only (a service's two threads are two writers)."""
    return os.getpid(), threading.get_ident()


def _take_lock(path: Path, busy: str | None = None, wait: bool = False) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        if err.errno not in _READ_ONLY or busy is not None:
            raise
        raise _cannot_write(path.parent, f"{path} cannot be opened for writing: a read-only folder or file?") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if not wait:
            os.close(fd)
            if busy is not None:
                raise FolderLocked(f"process {holder} is {busy}: wait for it to finish (the lock is released when it exits, "
                                   f"also if it dies), then run again.") from None
            raise FolderLocked(
                f"{path.parent} is locked by process {holder}, which is applying deletion requests there. Only one "
                f"process may write a journal: wait for it to finish (the lock is released when it exits, also if it "
                f"dies), then run again."
            ) from None
        print(f"waiting for process {holder}, which is {busy or 'applying deletion requests there'} ...", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)  # said above, so that the wait does not look like a hang
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _parse(raw: bytes, seq: int, prev: str) -> tuple[dict[str, Any], str | None]:
    """One line as the entry ``seq`` after the entry whose line hashes to ``prev``, or the problem."""
    try:
        entry = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return {}, f"not a JSON entry ({type(err).__name__}: {str(err)[:80]})"
    if not isinstance(entry, dict):
        return {}, f"not a JSON object but a {type(entry).__name__}"
    if not isinstance(entry.get("seq"), int) or "prev" not in entry:
        return {}, "an entry without a sequence number (`seq`, `prev`): written by hand or by lightning_unlearn < 0.2"
    problem = _type_problem(entry)
    if problem:
        return {}, problem
    if entry["seq"] != seq:
        return {}, f"sequence number {entry['seq']} where {seq} follows (a line was removed, repeated or moved)"
    if entry.get("hash") != _content_hash(entry):
        return {}, "its content does not match its `hash` (the line was changed)"
    if entry["prev"] != prev:
        return {}, "its `prev` hash does not match the entry before it (a line was changed, removed or moved)"
    return entry, None


def _content_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``hash`` field."""
    content = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


def _type_problem(entry: dict[str, Any]) -> str | None:
    for name, kind in _FIELD_TYPES.items():
        value = entry.get(name)
        if name in entry and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            return f"field `{name}` must be a {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
    if entry.get("status") not in STATUSES:
        return f"status {entry.get('status')!r} is not one of {STATUSES}"
    if "digest" not in entry:
        return "an entry without a digest"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)
