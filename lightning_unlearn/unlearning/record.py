"""The unlearning folder's files besides the journal: checkpoints, their lineage, recovery.

Every unlearned checkpoint names the journal entry it embodies (its *lineage*: the journal's
id, the ``seq`` of the request's ``pending`` entry and that entry's ``hash``, which a copy of the
folder that went on separately does not share). A folder's latest state is the
checkpoint of its journal's last ``applied`` entry; requests are applied only on top of it
(:func:`check_lineage`), so a stale checkpoint can never undo a deletion.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.files import append_note, notes, write_whole
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.journal import KEY_FILE, FolderLocked, Journal, JournalCorrupted, exclusive

if TYPE_CHECKING:
    from lightning_unlearn.unlearning.callback import UnlearningCallback

__all__ = [
    "CheckpointUnreadable", "MissingDataState", "StaleCheckpoint", "adopt_key", "applied_to", "check_key", "check_lineage", "key_id",
    "forget_an_unused_key", "key_made_undone_on_failure",
    "data_state", "file_stamp", "lines_of", "load_checkpoint", "machine_lines_folder", "machine_lock", "note_a_line", "recover", "refuse_a_copy_going_on", "refuse_a_replaced_key", "refuse_a_stopped_request", "refuse_unnamed_checkpoints", "restore_checkpoint", "save_checkpoint",
    "unlearning_state",
]

JOURNAL_FILE = "journal.jsonl"
LINES_FILE = "lines.jsonl"
"""In the record beside a trained checkpoint: the other records started from it (``unlearn --out``), with its parameters' digest."""


def machine_lines_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """Where this machine notes every line of deletions ``unlearn`` starts (a ``lines.jsonl`` of folders and digests, no id).

    ``$LIGHTNING_UNLEARN_HOME``, else ``lightning_unlearn`` in ``$XDG_DATA_HOME`` (by default
    ``~/.local/share``). A copy of a trained checkpoint in another folder knows neither the record
    beside the original nor the lines noted there; its parameters' digest finds them here.

    Args:
        environ: the environment to read.

    Example:
        >>> machine_lines_folder({"LIGHTNING_UNLEARN_HOME": "/srv/unlearn-state"}).as_posix()
        '/srv/unlearn-state'
        >>> machine_lines_folder({"XDG_DATA_HOME": "/home/ann/.data"}).as_posix()
        '/home/ann/.data/lightning_unlearn'
    """
    home = environ.get("LIGHTNING_UNLEARN_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return Path(environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lightning_unlearn"


class StaleCheckpoint(RuntimeError):
    """The model is not the folder's latest state: applying on top of it would undo deletions."""


class CheckpointUnreadable(ValueError):
    """A checkpoint file that does not load (truncated, not a checkpoint)."""


class MissingDataState(ValueError):
    """A checkpoint without the datamodule's state: which data it was trained on cannot be checked."""


def journal_of(dirpath: str | os.PathLike) -> Journal:
    """The journal of an unlearning folder."""
    return Journal(Path(dirpath) / JOURNAL_FILE)


def recover(dirpath: str | os.PathLike) -> Path | None:
    """Tidy an unlearning folder after a crash and name the checkpoint to resume from.

    Under the folder's lock: removes the partial checkpoints (``.unlearned-*.tmp``) and keys a killed
    process left, and closes every request the journal still shows ``pending``: as ``applied``
    (``recovered: true``) when its checkpoint was completely written (the rename is atomic) by
    that attempt (its lineage names the entry; a file of another attempt with the same name does
    not count), else as ``failed`` with the reason ``interrupted``, so it is applied again when queued.

    Args:
        dirpath: the callback's folder (journal and checkpoints).

    Returns:
        The checkpoint of the last applied request, or ``None`` when nothing was applied yet
        (resume from the trained model then).

    Raises:
        FolderLocked: another process is applying requests there (its live request is not
            interrupted).
        JournalCorrupted: the journal does not read as a chain.
        FileNotFoundError: the latest applied request's checkpoint is gone.
        FolderLocked: an interrupted request's checkpoint is there but cannot be read (e.g. another
            account's ``0600`` file); its entry is left open.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = journal_of(folder).append(digest="ab12", status="pending", checkpoint=f"{folder}/gone.ckpt")
        >>> recover(folder) is None, journal_of(folder).status()
        (True, {'ab12': 'failed'})
    """
    journal = journal_of(dirpath)
    with journal.lock():
        for partial in [*Path(dirpath).glob(".unlearned-*.tmp"), *Path(dirpath).glob(".journal.key.*.tmp")]:
            partial.unlink(missing_ok=True)
        for entry in journal.interrupted():
            # not "model": the parameters the request was applied to, not those it left (the checkpoint's)
            fields = {k: v for k, v in entry.items() if k not in ("seq", "prev", "time", "digest", "status", "reason", "model")}
            fields.update(recovered=True, pending_seq=entry["seq"])
            checkpoint = journal.checkpoint(entry)
            if checkpoint is not None and _embodies(checkpoint, entry):
                journal.append(entry["digest"], "applied", **{**fields, "checkpoint": str(checkpoint)})
            else:
                fields.pop("checkpoint", None)
                journal.append(entry["digest"], "failed", **fields,
                               reason="interrupted: the process stopped before the checkpoint holding this request was "
                                      "written; the request is applied again when it is queued")
        return journal.last_checkpoint()


def _embodies(checkpoint: Path, pending: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` is the one the attempt of the ``pending`` entry wrote: a whole file whose lineage names that entry.

    A missing or torn file is not (the rename that puts a checkpoint in place is atomic). A whole
    one that cannot be read now decides nothing.

    Raises:
        FolderLocked: a whole file that cannot be read (permissions, I/O, memory).
    """
    try:
        with open(checkpoint, "rb") as fh:
            whole = zipfile.is_zipfile(fh)
        if not whole:
            return False
        lineage = (load_checkpoint(checkpoint, mmap=True).get("unlearning") or {}).get("lineage") or {}  # no tensor read
    except FileNotFoundError:
        return False
    except (OSError, CheckpointUnreadable) as err:
        raise FolderLocked(f"{checkpoint}, the checkpoint of an interrupted request, cannot be read now ({err}): run as "
                           f"the account that wrote it, with memory to spare. The request stays open until it can be "
                           f"read.") from err
    return lineage.get("seq") == pending["seq"] and lineage.get("entry", pending["hash"]) == pending["hash"]


def refuse_a_stopped_request(journal: Journal, command: str) -> None:
    """Refuse to go on from ``journal``'s folder while it holds a request whose ``pending`` entry is not closed.

    What the folder deleted is known once that request is recovered (:func:`recover`): another process is applying it
    now (it holds the folder's lock), or its process stopped (its ``applied`` line may be torn).

    Raises:
        StaleCheckpoint: there is such a request, saying which of the two, and what to run.
    """
    if not journal.interrupted():
        return
    try:
        with journal.lock():
            pass
    except FolderLocked:
        raise StaleCheckpoint(f"{journal.folder}: a deletion request is being applied now; {command} from the folder's "
                              f"latest state once it is done.") from None
    raise StaleCheckpoint(
        f"{journal.folder} holds a deletion request whose process stopped while applying it: run `unlearn` on that "
        f"folder again (it recovers the request, then applies what is queued), then {command} from its latest state."
    )


def check_lineage(journal: Journal, lineage: dict[str, Any] | None, branch: bool = False, record: str | None = None) -> None:
    """Refuse to apply requests into ``journal``'s folder on top of a model that is not its latest state.

    Args:
        journal: the folder's journal.
        lineage: what the model embodies: ``None`` for a model no request was applied to, else
            ``{"journal": id, "seq": n}`` from the callback's state (its checkpoint).
        branch: the model comes from another folder's checkpoint and this (empty) folder starts
            a new branch from it.
        record: the folder of the journal ``lineage`` names, if known (a state's ``record``):
            the refusal of a model from another folder names it.

    Raises:
        StaleCheckpoint: the folder holds applied requests the model does not embody (or the
            model comes from another folder and ``branch`` is not set, or ``branch`` is set
            for a folder that is not empty). The message names the latest state and how to resume.
    """
    refuse_unnamed_checkpoints(journal)
    latest = journal.latest()
    here = journal.id
    ours = lineage is not None and here is not None and lineage.get("journal") == here
    if latest is None:
        if lineage is None or (branch and not ours):
            return
        if ours:  # a torn `applied` line, or a replaced journal
            refuse_a_stopped_request(journal, "go on")
            raise StaleCheckpoint(
                f"The model embodies request entry {lineage.get('seq')} of the journal in {journal.folder}, but that "
                f"journal records no applied request: it was replaced. Restore {journal.path} from a backup."
            )
        raise StaleCheckpoint(
            f"The model comes from a checkpoint of another unlearning folder (journal {lineage.get('journal')}, entry "
            f"{lineage.get('seq')}), and {Path(journal.folder).resolve()} is not that folder. Resume in its own folder "
            f"({record or '<the folder of that checkpoint>'}: `unlearn --out` it, or make it the UnlearningCallback's "
            f"`dirpath` in a fit), or start a new branch here on purpose (`unlearn --branch true`; in a fit, the "
            f"UnlearningCallback's `branch=True`)."
        )
    if branch:
        raise StaleCheckpoint(
            f"A new branch goes into a new, empty folder, but {journal.folder} already holds "
            f"{journal.applied_count()} applied request(s). Choose another `--out` (in a fit, the UnlearningCallback's "
            f"`dirpath`), or go on in this folder from its latest state, {journal.checkpoint(latest)}."
        )
    entries = journal.entries()
    seq = lineage.get("seq") if lineage is not None else None
    # a copy of the folder shares its journal's id and first entries: the entry's hash tells the copies apart
    copied = ours and "entry" in lineage and not (isinstance(seq, int) and 0 <= seq < len(entries) and entries[seq]["hash"] == lineage["entry"])
    if ours and not copied and seq == latest.get("pending_seq"):
        return
    if lineage is None:
        what = "a model no deletion was applied to (e.g. the trained checkpoint), as far as the callback's state says"
    elif copied:
        what = (f"a checkpoint of a copy of this folder that went on separately (its request entry {seq} is not "
                f"this journal's)")
    elif ours:
        what = f"an older state of this folder (request entry {seq})"
    else:
        what = f"a checkpoint of another unlearning folder (journal {lineage.get('journal')})"
    raise StaleCheckpoint(
        f"{journal.folder} already holds {journal.applied_count()} applied request(s); its latest state is "
        f"{journal.checkpoint(latest)} (request entry {latest.get('pending_seq')}), but the model loaded is {what}. "
        f"Training it or applying requests on top of it would undo the deletions after it. Resume from the latest state "
        f"(`--ckpt_path {journal.checkpoint(latest)}`), or start a new branch from this model in another, empty "
        f"folder (`unlearn --out <new folder> --branch true`; in a fit, the UnlearningCallback's `dirpath` and "
        f"`branch=True`)."
        + (f" In Python, a model restored from the latest state goes on with its callback's state restored too: `state = "
           f"restore_checkpoint('{journal.checkpoint(latest)}', model, datamodule)`, then `callback.load_state_dict("
           f"state['unlearning'])` (without it, the callback takes the model for one no deletion was applied to)."
           " If it is another model than the one this record is of (checkpoints of several models in one folder share "
           "the record `unlearn` keeps without `--out`), give it a record of its own: `unlearn --out <new folder>`, with "
           "requests that also delete again what this record deleted (its data still holds them)."
           if lineage is None else "")
    )


def refuse_a_copy_going_on(journal: Journal, lineage: dict[str, Any] | None, record: str | None) -> None:
    """Refuse to go on in ``journal``'s folder when it is a copy (a backup) of the record the model's state names, and that
    record is still there: a line of deletions applied in the copy would never reach the record, whose states would
    keep serving what it deleted. A record moved (the named folder gone, or holding another journal) goes on where it is.

    Args:
        journal: the folder's journal.
        lineage: what the model embodies (its callback state's ``lineage``).
        record: the folder its state names (its ``record``), if known.

    Raises:
        StaleCheckpoint: the folder is a copy of the named record, which still holds the same journal.
    """
    if not lineage or record is None or lineage.get("journal") != journal.id or Path(record).resolve() == Path(journal.folder).resolve():
        return
    if journal_of(record).id == journal.id:
        raise StaleCheckpoint(
            f"{journal.folder} is a copy of the deletion record {record} (its journal has the same id), which is still there: "
            f"requests applied in the copy would never reach that record, whose states would keep what they delete. Go on in "
            f"{record} (`--out {record}`; in a fit, the UnlearningCallback's `dirpath`), or start a new branch from this model in "
            f"another, empty folder (`unlearn --out <new folder> --branch true`).")


def refuse_unnamed_checkpoints(journal: Journal) -> None:
    """Refuse a folder holding unlearned checkpoints that no ``applied`` entry (or open ``pending`` one) of its journal names.

    Every checkpoint an attempt wrote is named by its ``applied`` entry (or removed when the
    attempt failed), so such a file means the journal was replaced by an older copy, or files were
    copied in: the journal no longer records every deletion the folder's models embody. A
    ``pending`` entry that a ``failed`` one closed names no checkpoint: a retry of the same request
    writes a file of the same name, which that older journal does not record.
    """
    entries = [*(e for e in journal.entries() if e["status"] == "applied"), *journal.interrupted()]
    named = {journal.checkpoint(e).resolve() for e in entries if e.get("checkpoint")}
    unnamed = sorted(p.name for p in journal.folder.glob("unlearned-*.ckpt") if p.resolve() not in named)  # a link to one is one
    if unnamed:
        raise StaleCheckpoint(
            f"{journal.folder} holds {len(unnamed)} unlearned checkpoint(s) that its journal does not name "
            f"({', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}): {journal.path} was replaced by an older "
            f"copy, or checkpoints were copied in, so it no longer records every deletion they hold. Restore the journal "
            f"that names them (the newest backup). Moving those files out of the folder instead gives up the deletions they "
            f"hold: their requests must then be applied again. Nothing was applied."
        )


def applied_to(journal: Journal, digest: str) -> dict[str, Any] | None:
    """The ``pending`` entry of the first request ``journal`` applied (or was applying when its process stopped) to the
    parameters whose :func:`~lightning_unlearn.models.functional.model_digest` is ``digest`` (``None``: none).

    Such a model is an older state of the record (the trained model its first request was
    applied to, or an unlearned state a later request went on from, or a checkpoint its
    callback's trainer saved before the request: ``saved``), whatever file it was loaded
    from. Entries written before the digest was journaled match nothing.

    Args:
        journal: the record's journal.
        digest: the parameters' digest.
    """
    entries = journal.entries()
    applied = {e.get("pending_seq") for e in entries if e["status"] == "applied"} | {e["seq"] for e in journal.interrupted()}
    return next((e for e in entries if e["status"] == "pending" and e["seq"] in applied
                 and (e.get("model") == digest or digest in (e.get("saved") or ()))), None)


@contextmanager
def machine_lock(name: str, busy: str, wait: bool = False) -> Iterator[OSError | None]:
    """Hold the machine's lock ``name`` (a file in ``locks/`` of :func:`machine_lines_folder`) while the block runs.

    Yields ``None`` when it is held, else the error that cost it: a machine folder that cannot be
    written costs the lock, not the command.

    Args:
        name: the lock's name (a file name).
        busy: what a holder does, said to a process that finds it held (:func:`~lightning_unlearn.unlearning.journal.exclusive`).
        wait: wait for a holder instead of refusing.

    Raises:
        FolderLocked: another process holds it (and ``wait`` is false).
    """
    held, error = ExitStack(), None
    try:
        held.enter_context(exclusive(machine_lines_folder() / "locks" / f"{name}.lock", busy, wait))
    except OSError as err:
        error = err
    with held:
        yield error


def note_a_line(folder: str | os.PathLike, record: str | os.PathLike, digest: str, relative: bool = False, branch: bool = False,
                checkpoint: str | os.PathLike | None = None) -> None:
    """Note in ``folder`` (the record beside a trained checkpoint) that ``record`` is a line of deletions started from the
    parameters whose :func:`~lightning_unlearn.models.functional.model_digest` is ``digest``: a later command from that
    checkpoint finds the line there, wherever ``record`` is, and its key's :func:`key_id` (which record it is, if it is
    moved). Paths and digests only, never an id.

    One line appended with a single write (``O_APPEND``), so notes of processes writing at once are all kept; a torn
    last line is skipped when read.

    With ``relative``, ``record`` is noted relative to ``folder`` (beside a checkpoint: the project's folder can move whole).
    With ``branch``, the line was started on purpose apart from the others (``--branch``): it binds the trained
    checkpoints of its run, not the states of the records beside it (which go on from their latest state).
    With ``checkpoint``, the file the line was started from is noted with its :func:`file_stamp`: while that very file is
    there, a record beside it that is gone was moved or removed from under it (not with its run).

    Raises:
        OSError: ``folder`` cannot be written (a read-only model folder, say): the caller decides what that costs.
    """
    record = Path(record).resolve()
    noted = os.path.relpath(record, Path(folder).resolve()) if relative else str(record)
    key = key_id(journal_of(record))  # which record it is, wherever it is moved (``predict --record``)
    started = {"checkpoint": str(Path(checkpoint).resolve()), "stamp": file_stamp(checkpoint)} if checkpoint is not None else {}
    append_note(Path(folder) / LINES_FILE, {"record": noted, "model": digest, **({"key_id": key} if key else {}),
                                            **({"branch": True} if branch else {}), **started})


def data_state(checkpoint: dict[str, Any], datamodule: RecDataModule) -> dict[str, Any]:
    """The datamodule state a loaded checkpoint holds: an unlearned one's ``datamodule_state``, or the one Lightning saves
    under the datamodule's class name (``{}`` when it has neither)."""
    return checkpoint.get("datamodule_state") or checkpoint.get(type(datamodule).__qualname__) or {}


def file_stamp(path: str | os.PathLike) -> list[int] | None:
    """``[inode, size, modification time in ns]`` of the file ``path`` (``None`` when there is none): a file written again
    (a run fitted again in the same folder) has another."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def lines_of(folder: str | os.PathLike, digest: str | None = None) -> list[dict[str, str]]:
    """The lines :func:`note_a_line` noted in ``folder`` (those started from ``digest``'s parameters, if given), once each;
    none when there is no note. A line that does not read is skipped: the note is a hint, each line's journal the record."""
    lines = [line for line in notes(Path(folder) / LINES_FILE)
             if isinstance(line.get("record"), str) and (digest is None or line.get("model") == digest)]
    return [{**line, "record": os.path.normpath(Path(folder).resolve() / line["record"])} for line in lines]  # relative: to it


def key_id(journal: Journal) -> str | None:
    """A short public name of ``journal``'s folder key (``None`` while it has none): a keyed digest of a constant, not the key.

    A checkpoint stores it beside its applied requests' fingerprints, which only the same key recognises.

    Args:
        journal: the folder's journal.

    Example:
        >>> import tempfile, os
        >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
        >>> key_id(journal) is None, len(journal.keyed("made")), len(key_id(journal))
        (True, 64, 16)
    """
    return journal.keyed(b"lightning_unlearn/key-id/v1")[:16] if journal.key_exists() else None


def check_key(journal: Journal, recorded: str | None, applied: int) -> None:
    """Refuse a state whose ``applied`` fingerprints were keyed with another folder's key than ``journal``'s.

    Its requests would not be recognised here: one given again would be journaled a second time.

    Args:
        journal: the folder's journal.
        recorded: :func:`key_id` stored with the fingerprints (``None``: not recorded, nothing to check).
        applied: how many fingerprints the state holds.

    Raises:
        StaleCheckpoint: the folder has no key or another one, and the state holds fingerprints.
        JournalCorrupted: the folder's key is gone while its journal records entries.

    Example:
        >>> import tempfile, os
        >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal.jsonl"))
        >>> check_key(journal, key_id(journal), applied=0)  # nothing applied: nothing to recognise
        >>> try:
        ...     check_key(journal, "0123456789abcdef", applied=2)
        ... except StaleCheckpoint as err:
        ...     print(str(err)[:60])
        The model's checkpoint records 2 applied request(s), recogni
    """
    journal.refuse_a_lost_key()
    ours = key_id(journal)
    if recorded is None or not applied or ours == recorded:
        return
    raise StaleCheckpoint(
        f"The model's checkpoint records {applied} applied request(s), recognised by the key of the unlearning folder "
        f"they were applied in (key id {recorded}), but {journal.folder} has {'no key' if ours is None else 'another key'}. "
        f"A new branch starts with that folder's key: `lightning_unlearn.unlearning.record.adopt_key(<that folder>, "
        f"{journal.folder})` before the run (`unlearn --branch true`, and `fit` from an unlearned checkpoint with a "
        f"branch callback, do it), into a folder that has no key yet."
    )


def refuse_a_replaced_key(journal: Journal, lineage: dict[str, Any] | None, recorded: str | None, what: str) -> None:
    """Refuse a record whose key is not the one a state of it (``lineage`` names this journal) was recognised with.

    Args:
        journal: the record's journal.
        lineage: the state's lineage (``{"journal": id, "seq": n}``), or ``None``.
        recorded: the :func:`key_id` the state's fingerprints were keyed with.
        what: the state, named in the message (a checkpoint's path).

    Raises:
        JournalCorrupted: the journal is the state's and holds a key, but another one: it was replaced.
    """
    ours = key_id(journal)
    if not (lineage and recorded and ours and ours != recorded and lineage.get("journal") == journal.id):
        return
    raise JournalCorrupted(
        f"{journal.folder / KEY_FILE} is not the key {what}'s requests were recognised with, and {journal.path} records "
        f"them: the key was replaced (by another record's?). A request given again would not be recognised and would be "
        f"applied a second time. Restore the folder's own {KEY_FILE} from a backup. Nothing was changed.")


def adopt_key(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Start a branch folder with the key of the folder it branches from (if it has one).

    The applied requests' fingerprints in a checkpoint are keyed with its folder's key; with the
    same key, the branch still recognises them when they are queued again.

    Args:
        source: the folder of the checkpoint the branch starts from.
        target: the branch's new folder.

    Returns:
        Whether a key was copied (``False`` when ``source`` has none or ``target`` has one).

    Raises:
        JournalCorrupted: ``source``'s or ``target``'s key is gone while its journal records entries.
    """
    theirs, ours = journal_of(source), journal_of(target)
    theirs.refuse_a_lost_key()
    ours.refuse_a_lost_key()
    if not theirs.key_exists() or ours.key_exists() or Path(source).resolve() == Path(target).resolve():
        return False
    return ours.write_key(theirs.key)  # False: another process (a rank of the same run) copied it meanwhile


@contextmanager
def key_made_undone_on_failure(folder: str | os.PathLike, made: bool) -> Iterator[None]:
    """While the block runs: if it fails before ``folder``'s journal exists, the key this run ``made`` (or copied) there
    is removed again, so that a refused run leaves no key to refuse the next one with (a branch into that folder,
    say). Nothing recorded was keyed with it; a folder another process holds keeps it.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> try:
        ...     with key_made_undone_on_failure(folder, made=journal_of(folder).key is not None):
        ...         raise ValueError("refused")
        ... except ValueError:
        ...     pass
        >>> journal_of(folder).key_exists()
        False
    """
    try:
        yield
    except BaseException:
        if made:
            forget_an_unused_key(folder)
        raise


def forget_an_unused_key(folder: str | os.PathLike) -> None:
    """Remove ``folder``'s key while its journal does not exist (nothing was keyed with it), under the folder's lock; a
    folder another process holds keeps it. For a run that made or copied the key and was refused before its first request."""
    journal = journal_of(folder)
    with contextlib.suppress(FolderLocked, OSError), journal.lock():
        if not journal.path.exists():
            (Path(folder) / KEY_FILE).unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, model: Recommender, datamodule: RecDataModule, callback: UnlearningCallback) -> Path:
    """Write an unlearned checkpoint atomically (temp file in the same folder, fsync, rename, fsync the folder).

    The file loads with ``ModelClass.load_from_checkpoint(path)`` and with
    ``torch.load(path, weights_only=True)`` (plain values and tensors only), and holds the
    datamodule's removals with the data fingerprint and the callback's state (applied
    fingerprints, pending requests as indices, lineage), so a restart neither forgets nor
    repeats a request. It never holds a raw id. A killed process leaves at most a hidden
    ``.unlearned-*.tmp`` file, which :func:`recover` removes; never a partial ``.ckpt``.

    Args:
        path: where to write the checkpoint (an existing file is never replaced).
        model: the recommender.
        datamodule: its datamodule (set up).
        callback: the callback whose state goes into the checkpoint.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists.
        OSError: the file could not be written, e.g. no space left on the device (no partial
            file is left).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: an unlearned checkpoint is never overwritten.")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "datamodule_state": datamodule.state_dict(),
        "unlearning": callback.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        return write_whole(path, buffer.getvalue(), private=True)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"{err.strerror}: free space in {path.parent} and apply the request again (it was "
                                     f"not applied)") from err
        raise


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only``), with an error that says what is wrong with it.

    With ``mmap`` its tensors are mapped from the file, not read into memory (to read its small
    entries, such as the lineage, from a large checkpoint).

    Raises:
        FileNotFoundError: no such file.
        CheckpointUnreadable: the file is truncated or not a PyTorch checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder: give a checkpoint file in it (a .ckpt file).")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as err:
        # KeyError, IndexError: the unpickler reading a file that is no pickle at all (a CSV given for the checkpoint)
        raise CheckpointUnreadable(
            f"{path} ({path.stat().st_size} bytes) is not a complete PyTorch checkpoint: another kind of file, or one that "
            f"is truncated (a copy or a write that stopped, e.g. on a full disk). Use another checkpoint, or restore this "
            f"one from a backup. ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointUnreadable(f"{path} is not a model checkpoint (it has no `state_dict`).")
    return state


def restore_checkpoint(path: str | os.PathLike, model: Recommender, datamodule: RecDataModule) -> dict[str, Any]:
    """Load weights into ``model`` and re-apply the checkpoint's recorded removals to ``datamodule``.

    Reads Lightning checkpoints and the callback's unlearned checkpoints alike. Nothing changes
    unless every check passes.

    Args:
        path: the checkpoint.
        model: the recommender to load the weights into.
        datamodule: its datamodule (its splits lose the recorded removals).

    Returns:
        The checkpoint, with its callback state under ``"unlearning"`` (``None`` if it has none).

    Raises:
        CheckpointUnreadable: the file does not load.
        MissingDataState: it holds no datamodule state, so the data it was trained on cannot
            be checked (and its removals, if any, are unknown).
        DataFingerprintMismatch: it was recorded on other data than ``datamodule`` loads.
    """
    state = load_checkpoint(path)
    removals = data_state(state, datamodule)
    if not removals:
        raise MissingDataState(
            f"{path} holds no {type(datamodule).__name__} state (no data fingerprint, no record of removals): it "
            f"was not written by a fit, `unlearn` or the UnlearningCallback with this datamodule, so whether it was "
            f"trained on this data (and what was deleted from it) cannot be checked. Use a checkpoint written by "
            f"`lightning-unlearn fit` (checkpoints/best.ckpt) or by `unlearn`."
        )
    datamodule.check_state_dict(removals)
    model.load_state_dict(state["state_dict"])
    datamodule.load_state_dict(removals)
    datamodule.setup()
    model.set_graph(datamodule.train)
    state["unlearning"] = unlearning_state(state)
    return state


def unlearning_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The callback state a checkpoint holds: an unlearned checkpoint's (or a refit's) ``unlearning`` entry, or a
    Lightning checkpoint's ``UnlearningCallback`` entry among its callbacks' states (``None``: neither)."""
    if checkpoint.get("unlearning") is not None:
        return checkpoint["unlearning"]
    return next((v for k, v in (checkpoint.get("callbacks") or {}).items() if k.startswith("UnlearningCallback")), None)
