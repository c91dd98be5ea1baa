"""Which deletion records a checkpoint belongs to, and whether it holds their deletions: the checks of ``unlearn``, ``predict`` and ``compare``.

A checkpoint belongs to the record beside it (``unlearning/`` beside its folder, or its own
folder when that holds a journal), to the record its callback state names, and to the lines of
deletions that ``unlearn`` started from it in other folders, noted beside it. A command refuses a
checkpoint that would bring back what one of them deleted, naming the state to start from instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from lightning_unlearn.console import OptionRefused, counted
from lightning_unlearn.data.datamodule import RecDataModule, removed_within
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import model_digest
from lightning_unlearn.private_checkpoints import REMOVALS
from lightning_unlearn.unlearning.journal import KEY_FILE, FolderLocked, Journal, JournalCorrupted
from lightning_unlearn.unlearning.record import (
    JOURNAL_FILE,
    LINES_FILE,
    CheckpointUnreadable,
    StaleCheckpoint,
    applied_to,
    check_lineage,
    data_state,
    file_stamp,
    journal_of,
    key_id,
    lines_of,
    load_checkpoint,
    machine_lines_folder,
    machine_lock,
    note_a_line,
    refuse_a_replaced_key,
    refuse_a_stopped_request,
    refuse_unnamed_checkpoints,
)
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest

__all__ = ["check_against_the_run", "default_unlearning_folder", "deletes_again", "folder_of_key", "in_checking_order", "lines_from", "lines_started_here", "note_the_line", "one_line_at_a_time", "records_beside", "records_bound_to", "records_of",
           "named_record", "records_of_its_run", "records_of_the_run", "refuse_a_second_line", "refuse_fewer_deletions", "refuse_training_on", "unlearning_folder_of"]


def default_unlearning_folder(ckpt_path: str | os.PathLike) -> Path:
    """Where ``unlearn`` keeps a model's deletion record when ``--out`` is not given.

    The folder of ``ckpt_path`` when it holds a journal (an unlearned checkpoint: the next request
    goes on in its folder), else ``unlearning/`` beside the checkpoint's folder. It does not
    depend on the run (a logger's ``version_N`` folder would give every run a new, empty record,
    so a second request from the trained checkpoint would go unchecked and undo the first).

    Example:
        >>> default_unlearning_folder("/srv/runs/ml100k_mf/checkpoints/best.ckpt").as_posix()
        '/srv/runs/ml100k_mf/unlearning'
    """
    return unlearning_folder_of(Path(ckpt_path).resolve().parent)  # `..`, `.` and links resolved: however it is spelt


def unlearning_folder_of(checkpoints: Path) -> Path:
    """The deletion record of the models in the folder ``checkpoints``: that folder when it holds a journal, else its sibling.

    Example:
        >>> unlearning_folder_of(Path("/srv/runs/ml100k_mf/checkpoints")).as_posix()
        '/srv/runs/ml100k_mf/unlearning'
    """
    return checkpoints if (checkpoints / JOURNAL_FILE).exists() else checkpoints.parent / "unlearning"


def folder_of_key(ckpt_path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """The folder whose key made the fingerprints of the requests a checkpoint holds (its ``key_id``): its own, or,
    for a symlink, the folder of the file it points to (a ``serving/latest.ckpt``; a link into a content store such
    as git-annex or DVC keeps the key beside the link), or the record its state names (a refit's checkpoint).

    Args:
        ckpt_path: the checkpoint, as given (a link is followed only after its own folder is tried).
        state: what :func:`~lightning_unlearn.unlearning.record.restore_checkpoint` read from it.
    """
    path = Path(os.path.abspath(ckpt_path))  # `..` folded, links kept
    unlearning = state.get("unlearning") or {}
    wanted, named = unlearning.get("key_id"), unlearning.get("record")  # named: a refit's, whose folder holds no key
    return next((folder for folder in (path.parent, path.resolve().parent, *([Path(named)] if named else []))
                 if wanted and _holds_key(folder, wanted)), path.resolve().parent)


def _holds_key(folder: Path, wanted: str | None) -> bool:
    """Whether ``folder`` holds a journal key, and (unless ``wanted`` is ``None``) the one whose ``key_id`` is ``wanted``."""
    return (folder / KEY_FILE).is_file() and (wanted is None or key_id(journal_of(folder)) == wanted)


def records_of(ckpt_path: str | os.PathLike, model: Recommender, unlearning: dict[str, Any], record: str | None,
               command: str = "predict") -> set[Path]:
    """``predict`` (and ``fit``): the deletion records to check ``ckpt_path`` against: the one beside it (beside the link too, for a
    checkpoint that is a link into a content store), the one its callback state
    (``unlearning``) names, and ``record`` (``--record``). A record is a folder with a journal key; the named one is
    recognised by its key. Refuses a named record that is gone (moved, deleted, re-created empty) unless ``record``
    says where it is, or the record beside the checkpoint is that one (a record moved with its unlearned checkpoints).

    Args:
        ckpt_path: the checkpoint the command was given.
        model: its model, restored (the lines started from its parameters are noted by their digest).
        unlearning: its callback state (``{}`` when it has none).
        record: ``--record``, the folder a named record was moved to (``None``: not given).
        command: the subcommand that asks, named in its messages.

    Raises:
        OptionRefused: ``record`` holds no journal key.
        StaleCheckpoint: ``record`` is another record than the one named, or the named record is gone.
        JournalCorrupted: the named record lost its key.
    """
    besides = records_bound_to(ckpt_path, unlearning)
    named, named_key = unlearning.get("record"), unlearning.get("record_key_id") or unlearning.get("key_id")
    digest = model_digest(model)  # the lines started from this model elsewhere (`unlearn --out`), noted beside it
    if record is not None and not _holds_key(Path(record), None):
        raise OptionRefused(f"predict --record {record} is not a deletion record: it holds no {KEY_FILE}. Give the folder "
                            f"of the record's journal.jsonl and {KEY_FILE}.")
    lines = lines_from(ckpt_path, digest, command, refuse_gone=True, moved_to=Path(record) if record is not None else None,
                       unlearning=unlearning)
    folders = besides | {line for line in lines if applied_to(journal_of(line), digest)}
    moved_line = record is not None and Path(record) in lines  # a line noted beside the checkpoint, moved there
    if record is not None:
        if named and not moved_line and not _holds_key(Path(record), named_key):
            raise StaleCheckpoint(f"predict --record {record} is another deletion record than the one {ckpt_path} names "
                                  f"({named}) or a line of deletions noted beside it: its key differs. Give the folder that "
                                  f"record was moved to.")
        folders.add(Path(record))
    if named:
        journal_of(named).refuse_a_lost_key()
    found = named_record(ckpt_path, unlearning, command) if record is None or moved_line else None
    if found is not None:
        folders.add(found)
    return folders


def named_record(ckpt_path: str | os.PathLike, unlearning: dict[str, Any], command: str) -> Path | None:
    """Where the deletion record that a checkpoint's callback state (``unlearning``) names is now.

    At the folder named; or, moved with its project, at the same place relative to one of the checkpoint's folders
    (the project's root moved, the checkpoint and the record with it, and its old place is gone), recognised by its key;
    ``None`` when the state names none, or the record beside the checkpoint is that one (a record moved with its
    checkpoints).

    Args:
        ckpt_path: the checkpoint.
        unlearning: its callback state (``{}`` when it has none).
        command: the subcommand that asks, named in the refusal.

    Raises:
        StaleCheckpoint: the named record is gone (moved elsewhere, deleted, re-created empty): what was deleted there
            since cannot be checked.
        JournalCorrupted: the named record is there but lost its key, or holds another one.
    """
    named, named_key = unlearning.get("record"), unlearning.get("record_key_id") or unlearning.get("key_id")
    if not named or _holds_key(Path(named), named_key):
        return Path(named) if named else None
    journal = journal_of(named)
    journal.refuse_a_lost_key()  # its journal is there, its key not (or another one): said so, not "gone"
    refuse_a_replaced_key(journal, unlearning.get("lineage"), named_key, str(ckpt_path))
    if named_key is not None and any(_holds_key(b, named_key) for b in records_beside(ckpt_path)):
        return None
    # the project's root moved from parts[:i] (gone: a moved project, not a copy or a backup beside it) to a folder above
    # the checkpoint, with the record at the same place below it
    parts = Path(named).parts
    moved = (root.joinpath(*parts[i:]) for i in range(1, len(parts)) if not Path(*parts[:i]).exists()
             for root in Path(os.path.abspath(ckpt_path)).parents)
    found = next((folder for folder in moved if named_key is not None and _holds_key(folder, named_key)), None)
    if found is not None:
        return found
    advice = "give its place with --record FOLDER" if command == "predict" else "move it back"
    raise StaleCheckpoint(
        f"{ckpt_path} names the deletion record {named} (its UnlearningCallback's folder), and that record is gone: "
        f"{command} cannot check that the checkpoint holds the deletions recorded there since. If it was moved, {advice}.")


_RUN_CHECKPOINTS: ContextVar[tuple[Path, ...]] = ContextVar("run_checkpoints", default=())
_STARTING: ContextVar[frozenset[str]] = ContextVar("starting", default=frozenset())  # digests one_line_at_a_time holds here


def lines_started_here() -> frozenset[str]:
    """The digests of the parameters whose line :func:`one_line_at_a_time` holds in this process now (``unlearn``'s, around
    its requests): it checked and noted the line, which its callback need not do again (nor could: the lock is taken)."""
    return _STARTING.get()


def check_against_the_run(folders: Iterable[str | os.PathLike]) -> None:
    """From now on (in the current context), checkpoints are checked against the record of the run whose checkpoint folders
    are ``folders`` too (:func:`records_of_the_run`).

    The command line gives its recipe's ``ModelCheckpoint`` and ``OnExceptionCheckpoint`` folders.

    Example:
        >>> import contextvars
        >>> def run():
        ...     check_against_the_run(["/srv/runs/ml100k_mf/checkpoints"])
        ...     return sorted(p.as_posix() for p in records_of_the_run("/tmp/copied/best.ckpt", {}))
        >>> contextvars.copy_context().run(run)
        ['/srv/runs/ml100k_mf/unlearning']
    """
    _RUN_CHECKPOINTS.set(tuple(Path(os.path.abspath(folder)) for folder in folders))


def records_of_the_run(ckpt_path: str | os.PathLike, unlearning: dict[str, Any] | None) -> set[Path]:
    """The record of the run :func:`check_against_the_run` names, and the lines noted there, that are not beside the checkpoint.

    A copy elsewhere of one of the run's trained checkpoints (copied out to serve, a SLURM job's ``hpc_ckpt_*.ckpt`` in the
    working directory) is checked against them as if it were in the run folder, and so is a model of another split of
    the run's data (:func:`refuse_fewer_deletions` passes one of other data altogether: another file). A state of a
    record (``unlearning`` holds applied requests: an unlearned checkpoint, a refit from one) is checked against the
    others, branches left out, unless it is a branch's (a line started apart on purpose): a line of the run that deleted
    more than the state's own (all it deleted, given again, and more) makes the state an older one, which would serve
    what that line deleted.
    """
    run = _run_records()
    noted = [line for folder in run for line in lines_of(folder)]
    if not (unlearning or {}).get("applied"):
        return (run | {Path(line["record"]) for line in noted if (Path(line["record"]) / JOURNAL_FILE).is_file()}) - records_of_its_run(ckpt_path)
    own = {folder.resolve() for folder in records_beside(ckpt_path) | ({Path(unlearning["record"])} if unlearning.get("record") else set())}
    # and the lines this machine noted from the trained models its record's requests were applied to (a copy's, elsewhere)
    models = {entry.get("model") for folder in own if journal_of(folder).path.is_file() for entry in _entries(journal_of(folder))}
    noted += [line for line in lines_of(machine_lines_folder()) if line.get("model") in models - {None}]
    if unlearning.get("branch_line") or any(line.get("branch") and Path(line["record"]).resolve() in own for line in noted):
        return set()
    others = run | {Path(line["record"]) for line in noted if not line.get("branch") and (Path(line["record"]) / JOURNAL_FILE).is_file()}
    return {folder for folder in others if folder.resolve() not in own} - records_of_its_run(ckpt_path, unlearning)


def records_bound_to(ckpt_path: str | os.PathLike, unlearning: dict[str, Any] | None) -> set[Path]:
    """The records a checkpoint is checked against by its data: :func:`records_of_its_run` and :func:`records_of_the_run`."""
    return records_of_its_run(ckpt_path, unlearning) | records_of_the_run(ckpt_path, unlearning)


def _entries(journal: Journal) -> list[dict[str, Any]]:
    """``journal``'s entries, none when it does not read (the check of that record says why)."""
    try:
        return journal.entries()
    except JournalCorrupted:
        return []


def in_checking_order(folders: Iterable[Path], ckpt_path: str | os.PathLike) -> list[Path]:
    """``folders`` in the order a command checks a checkpoint against them: a refusal names the latest state of the first
    that refuses it as the one to go on from, so those that deleted the most rows come first (a record that does not read
    before all: its refusal says what to restore; the record beside the checkpoint first among equals), and branches
    (apart on purpose: they hold none of the others' deletions) last."""
    besides = records_beside(ckpt_path)
    beside = {folder.resolve() for folder in besides}
    branches = {Path(line["record"]).resolve() for folder in besides | _run_records() for line in lines_of(folder) if line.get("branch")}

    def deleted_rows(folder: Path) -> float:
        try:
            if not journal_of(folder).path.is_file():  # unlearned checkpoints without their journal: its refusal says to restore it
                return math.inf if any(folder.glob("unlearned-*.ckpt")) else 0
            return sum(e.get("num_rows", 0) for e in journal_of(folder) if e["status"] == "applied")
        except JournalCorrupted:  # a journal that does not read: so does its refusal
            return math.inf

    return sorted(folders, key=lambda folder: (folder.resolve() in branches, -deleted_rows(folder), folder.resolve() not in beside, str(folder)))


def _run_records() -> set[Path]:
    """The records beside the checkpoint folders :func:`check_against_the_run` named (none outside such a context)."""
    return {unlearning_folder_of(folder) for folder in _RUN_CHECKPOINTS.get()}


def records_beside(ckpt_path: str | os.PathLike) -> set[Path]:
    """The record beside a checkpoint: beside the file it resolves to, and beside a link itself (git-annex, DVC).

    Example:
        >>> sorted(p.as_posix() for p in records_beside("/srv/runs/ml100k_mf/checkpoints/best.ckpt"))
        ['/srv/runs/ml100k_mf/unlearning']
    """
    return {default_unlearning_folder(ckpt_path), unlearning_folder_of(Path(os.path.abspath(ckpt_path)).parent)}


def records_of_its_run(ckpt_path: str | os.PathLike, unlearning: dict[str, Any] | None = None) -> set[Path]:
    """The record beside a checkpoint and the lines of deletions (`unlearn --out`) noted there, from whichever checkpoint of its run.

    The data of every checkpoint of a run holds what each of them deleted, unless it was fitted from one of their states:
    an older checkpoint of the run (``epoch=0.ckpt`` beside the ``epoch=1.ckpt`` a line was started from) is checked
    against those lines by its data, as against the record beside it. A state of a record (``unlearning``, its callback
    state, holds applied requests) is not held back by a branch (a line started apart on purpose, ``--branch``) noted
    there. A line whose journal is gone is :func:`lines_from`'s to name.
    """
    besides, state = records_beside(ckpt_path), bool((unlearning or {}).get("applied"))
    return besides | {Path(line["record"]) for folder in besides for line in lines_of(folder)
                      if not (state and line.get("branch")) and (Path(line["record"]) / JOURNAL_FILE).is_file()}


@contextlib.contextmanager
def one_line_at_a_time(digest: str, ckpt_path: str | os.PathLike | None = None, starts_a_line: bool = False) -> Iterator[None]:
    """``unlearn`` from the parameters whose digest is ``digest`` (the file ``ckpt_path``), one process at a time.

    Two processes that start lines of deletions from one trained model at once would each find no
    other line, and each leave out what the other deletes. The block holds a lock of the machine's
    (in :func:`~lightning_unlearn.unlearning.record.machine_lines_folder`) from the check of the
    other lines until its own is applied and noted, and, shared with processes with other machine
    folders (``$LIGHTNING_UNLEARN_HOME``), one on the checkpoint file itself; one that ``starts_a_line``
    (from a model no request was applied to) also holds the checkpoint folder of the recipe's run
    (:func:`check_against_the_run`), so that a line from a copy of one of the run's checkpoints and
    one from the run's own (or another epoch of it), which bind each other by their data, are not
    started at once either. A machine folder that cannot be written costs its lock, not the command:
    it says so.

    Args:
        digest: :func:`~lightning_unlearn.models.functional.model_digest` of the parameters.
        ckpt_path: the checkpoint they were read from.
        starts_a_line: the parameters are a trained model's (no request applied to them), not a state of a record.

    Raises:
        FolderLocked: another process is applying requests from the same parameters (or the same checkpoint file, or,
            starting a line, from a checkpoint of the same run).
    """
    held = [] if ckpt_path is None else [Path(ckpt_path)]
    held += [folder for folder in _RUN_CHECKPOINTS.get() if starts_a_line and folder.is_dir()]
    with machine_lock(digest[:32], "applying deletion requests from the same model's parameters") as error, \
            contextlib.ExitStack() as stack:
        if error is not None:
            print(f"[unlearn] {machine_lines_folder()} cannot be written ({error.strerror}): another process may start a line "
                  f"of deletions from the same model at the same time unnoticed.", file=sys.stderr)
        for path in dict.fromkeys(path.resolve() for path in held):  # each once (the file, then the run's folders)
            stack.enter_context(_held(path))
        token = _STARTING.set(_STARTING.get() | {digest})
        try:
            yield
        finally:
            _STARTING.reset(token)


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """An advisory lock on a checkpoint file or folder while the block runs (opened read-only: nothing is written there)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): the machine's lock alone
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = path if path.is_file() else f"a checkpoint of {path}"
            raise FolderLocked(f"another process is applying deletion requests from {what}: wait for it to finish, then run "
                               f"this command again (it is checked against the line that one started).") from None
        except OSError as err:  # a file system without advisory locks (some network mounts): the machine's lock alone
            print(f"[unlearn] {path} cannot be locked ({err.strerror}): a process with another $LIGHTNING_UNLEARN_HOME may start "
                  f"a line of deletions from it at the same time unnoticed.", file=sys.stderr)
        yield
    finally:
        os.close(fd)


def note_the_line(ckpt_path: str | os.PathLike | None, dirpath: Path, digest: str, datamodule: RecDataModule, branch: bool = False) -> None:
    """Before ``unlearn`` applies requests into ``dirpath`` from a checkpoint no request was applied to yet: note the line
    on this machine
    (:func:`~lightning_unlearn.unlearning.record.machine_lines_folder`), so that later commands from the checkpoint or from
    a copy of it find it, beside the checkpoint (beside a link itself, not in the store it points into) when
    ``dirpath`` is another folder than the record there, and in the record of the recipe's run (:func:`check_against_the_run`)
    when the checkpoint is a copy of (or a link to) one of its checkpoints, whose folder holds one of the same data: the
    run's own checkpoints are then checked against the line, also on a machine with another machine folder. A folder that
    cannot be written costs the note, not the command: it says so.

    Args:
        ckpt_path: the checkpoint the requests are applied from (``None``: weights given in Python, noted on the machine only).
        dirpath: the record they go into (made by ``UnlearningCallback.check``); its journal is started here, empty.
        digest: :func:`~lightning_unlearn.models.functional.model_digest` of the parameters they are applied to.
        datamodule: the checkpoint's data (a run whose checkpoints are on the same data is the checkpoint's run).
        branch: a line started apart on purpose (``--branch``): it does not hold back the states of the records beside it.
    """
    journal_of(dirpath).start()  # there from the note on, even empty: a noted line without it is gone
    folders = [(machine_lines_folder(), False)]
    if ckpt_path is None:
        _note_in(folders, dirpath, digest, None, branch)
        return
    if not any(dirpath.resolve() == folder.resolve() for folder in records_beside(ckpt_path)):
        folders.append((unlearning_folder_of(Path(os.path.abspath(ckpt_path)).parent), True))
    # the run's record: also beside the file a link resolves to (a record there gets no note beside the link)
    noted = {dirpath.resolve(), *(folder.resolve() for folder, _ in folders[1:])}
    runs = [folder for folder in sorted(_run_records()) if folder.resolve() not in noted]
    bound = [folder for folder in runs if _holds_a_checkpoint_of(folder, datamodule)]
    folders += [(folder, True) for folder in bound]
    if runs and not bound and len(runs) == len(_run_records()):  # the recipe's run is not this checkpoint's: say so
        print(f"[unlearn] the checkpoint folder of this recipe's run ({', '.join(str(f) for f in _RUN_CHECKPOINTS.get())}) holds no "
              f"checkpoint of {ckpt_path}'s data: if it is a copy of a checkpoint of a run, that run's own checkpoints are not "
              f"bound by this line. Give the run's recipe, from the folder its fit ran in (a relative dirpath is taken from "
              f"the working folder), to bind them.", file=sys.stderr)
    _note_in(folders, dirpath, digest, ckpt_path, branch)


def _note_in(folders: list[tuple[Path, bool]], dirpath: Path, digest: str, ckpt_path: str | os.PathLike | None, branch: bool) -> None:
    """:func:`note_a_line` in each of ``folders`` (``(folder, relative)``); one that cannot be written costs its note, said."""
    for folder, relative in folders:
        try:  # on the machine, with the checkpoint's file: a record beside it moved away while it stayed is found gone
            note_a_line(folder, dirpath, digest, relative=relative, branch=branch, checkpoint=None if relative else ckpt_path)
        except OSError as err:
            print(f"[unlearn] {folder} cannot be written ({err.strerror}): the line of deletions started in {dirpath} is not "
                  f"noted there, so commands from the checkpoints it is the record of may not find it.", file=sys.stderr)


def _holds_a_checkpoint_of(record: Path, datamodule: RecDataModule) -> bool:
    """Whether the checkpoint folder of the run whose record is ``record`` (:func:`check_against_the_run`) holds a
    checkpoint of ``datamodule``'s data (its source, or, for a state saved before sources were kept, its split)."""
    data = datamodule.state_dict()

    def same_data(path: Path) -> bool:
        try:
            state = load_checkpoint(path, mmap=True)
        except (OSError, CheckpointUnreadable):
            return False
        saved = data_state(state, datamodule)
        key = "source" if saved.get("source") is not None else "fingerprint"
        return saved.get(key) == data.get(key)

    return any(same_data(path) for folder in _RUN_CHECKPOINTS.get() if unlearning_folder_of(folder) == record
               for path in sorted(folder.glob("*.ckpt")))


def lines_from(ckpt_path: str | os.PathLike, digest: str, command: str, refuse_gone: bool = False,
               moved_to: Path | None = None, unlearning: dict[str, Any] | None = None) -> set[Path]:
    """The lines of deletions noted beside a checkpoint, or on this machine, as started from its parameters (``digest``).

    A line that is gone (moved, deleted: its journal is not there) can no longer be checked. One noted beside the checkpoint
    (started from it, or from another checkpoint of its run, whose data the checkpoint's shares), or noted on the machine
    as the record beside it (``unlearn`` without ``--out``, whose line is noted there only), went while the
    checkpoint stayed (a record moved or removed inside the project): with ``refuse_gone`` that is refused, saying how to
    go on, also to an ``unlearn`` that would make a new line in its place (without what it deleted). One noted only on
    the machine otherwise is named on the console (an old experiment's folder, removed with its run).

    Args:
        ckpt_path: the checkpoint.
        digest: :func:`~lightning_unlearn.models.functional.model_digest` of its parameters.
        command: the subcommand that asks, named in the console line.
        refuse_gone: refuse a gone line noted beside the checkpoint, from any checkpoint of its run.
        moved_to: where a gone line noted beside the checkpoint now is (``predict --record``): it is that line if it holds
            the key the line was noted with, and is then returned in its place.
        unlearning: the checkpoint's callback state: a state of a record is not held back by a branch from another
            checkpoint (:func:`records_of_its_run`).

    Raises:
        StaleCheckpoint: with ``refuse_gone``, a line noted beside the checkpoint (from any checkpoint of its run) is gone.
    """
    def is_gone(line: Path) -> bool:
        return not (line / JOURNAL_FILE).is_file()

    moved_key = key_id(journal_of(moved_to)) if moved_to is not None and _holds_key(moved_to, None) else None
    state = bool((unlearning or {}).get("applied"))
    noted, moved = [], set()
    # the recipe's run too, for a trained checkpoint: a copy of one of its checkpoints is checked as if it were in the run folder
    run = set() if state else _run_records() - records_beside(ckpt_path)
    here = records_beside(ckpt_path) | run  # from any checkpoint of its run, whose data this one's shares (records_of_its_run)
    sources = [(folder, line) for folder in here for line in lines_of(folder)]
    # those records themselves, noted on the machine only (moved away with the notes they hold beside the checkpoint)
    sources += [(machine_lines_folder(), line) for line in _records_beside_their_start(ckpt_path, run, digest)
                if Path(line["record"]).resolve() in {folder.resolve() for folder in here}]
    for folder, line in sources:
        if moved_key is not None and line.get("key_id") == moved_key and is_gone(Path(line["record"])):
            moved.add(moved_to)  # the line, moved: checked where it is now
        elif line.get("model") == digest or not (state and line.get("branch")):  # a branch binds no state of a record
            noted.append((folder, Path(line["record"]), line.get("model") == digest))
    beside = {line for _, line, from_it in noted if from_it} | moved
    lines = beside | _noted_on_the_machine(digest)
    kept = {line for line in lines if (line / JOURNAL_FILE).is_file()}
    gone = sorted(line for line in lines - kept if is_gone(line))
    gone_beside = sorted((not from_it, line, folder) for folder, line, from_it in noted if is_gone(line))
    if refuse_gone and gone_beside:
        other, first, folder = gone_beside[0]  # one started from this checkpoint first
        where = "give its place with --record FOLDER" if command == "predict" else "move it back"
        noted_as = (f"noted on this machine as the deletion record beside {ckpt_path} (or its run's)" if folder == machine_lines_folder() else
                    f"noted beside {ckpt_path} as a line of deletions started from {'another checkpoint of its run (or a copy of one)' if other else 'it'}")
        raise StaleCheckpoint(
            f"{first}, {noted_as}, "
            f"is gone: {command} cannot check that what it deleted stays deleted. If it was moved, {where}; if it was removed on "
            f"purpose, what it deleted is recorded nowhere now: apply those requests again, and remove its line from "
            f"{folder / LINES_FILE} to go on.")
    for line in gone:
        print(f"[{command}] {line}, noted as a line of deletions started from {ckpt_path}'s parameters, is gone: the deletions "
              f"it held are not checked. If it was moved, its new place is not known here.", file=sys.stderr)
    return kept


def _records_beside_their_start(ckpt_path: str | os.PathLike, run: set[Path], digest: str) -> list[dict[str, Any]]:
    """The lines noted on the machine whose starting checkpoint file (known by its :func:`file_stamp`, which a folder moved
    or renamed keeps, and a run fitted again in its folder does not) is beside ``ckpt_path`` or in the checkpoint folder of
    the run whose records are ``run``; each with its record where it is now, as placed beside that file. ``ckpt_path``
    itself is also the start of a line noted from its path and its parameters (``digest``): a copy restored over it, or
    the file touched, has another stamp but is the same model."""
    folders = {Path(os.path.abspath(ckpt_path)).parent, Path(ckpt_path).resolve().parent}
    folders |= {folder for folder in _RUN_CHECKPOINTS.get() if unlearning_folder_of(folder) in run}
    starts = {tuple(stamp): path for folder in folders for path in sorted(folder.glob("*.ckpt")) if (stamp := file_stamp(path))}
    here = str(Path(ckpt_path).resolve())
    found = []
    for line in lines_of(machine_lines_folder()):
        start = starts.get(tuple(line.get("stamp") or ()))
        if start is None and line.get("checkpoint") == here and line.get("model") == digest:
            start = Path(here)
        if start is not None and isinstance(line.get("checkpoint"), str):
            record = os.path.normpath(start.parent / os.path.relpath(line["record"], Path(line["checkpoint"]).parent))
            found.append({**line, "record": record})
    return found


def refuse_a_second_line(ckpt_path: str | os.PathLike | None, digest: str, datamodule: RecDataModule, unlearning: dict[str, Any],
                         dirpath: Path, requests: list[DeletionRequest]) -> None:
    """``unlearn`` into ``dirpath`` without ``--branch``: refuse a checkpoint that is an older state of another record -- the
    one beside it, or the one its callback state names -- unless ``requests`` (those it holds queued and those given)
    delete again everything that record deleted. Otherwise the second line of deletions would bring the rest back
    (and ``predict`` from it checks only its own record).

    The state's lineage tells it for the named record (a fit's checkpoint saved before its callback applied requests);
    the parameters' digest, journaled with each request, for the checkpoint a request beside it was applied to (the
    trained one); for the record beside it, also its data: a model fitted again in that run folder on the data as
    loaded still holds what the record deleted, whatever its parameters. A record with a request whose process stopped is refused until ``unlearn`` on it recovers that request.

    Without ``ckpt_path`` (weights given to an ``UnlearningCallback`` in Python, loaded by hand) the lines this machine
    noted as started from the parameters are checked, and the advice is Python's.

    Args:
        ckpt_path: the checkpoint ``unlearn`` was given (``None``: the parameters of a model in Python).
        digest: :func:`~lightning_unlearn.models.functional.model_digest` of its parameters.
        datamodule: its data, with the removals it holds.
        unlearning: its callback state (``{}`` when it has none).
        dirpath: the record ``unlearn`` writes into (not checked against itself).
        requests: the requests it holds queued and those given.

    Raises:
        StaleCheckpoint: the checkpoint is an older state of another record whose deletions ``requests`` do not
            delete again, or of one with a request whose process stopped.
        JournalCorrupted: one of those records' journals does not read.
    """
    named = unlearning.get("record")
    if ckpt_path is None:
        besides, lines = set(), {line for line in _noted_on_the_machine(digest) if (line / JOURNAL_FILE).is_file()}
    else:
        besides = records_bound_to(ckpt_path, unlearning)
        lines = lines_from(ckpt_path, digest, "unlearn", refuse_gone=True, unlearning=unlearning)  # started from it elsewhere
    given = ckpt_path if ckpt_path is not None else "the model given"
    for folder in sorted(besides | lines | ({Path(named)} if named else set())):
        journal = journal_of(folder)
        if folder.resolve() == dirpath.resolve() or not journal.path.is_file():
            continue
        try:
            stopped = journal.interrupted()
        except JournalCorrupted as err:
            noted = f" (noted as a line of deletions started from {given})" if folder in lines else ""
            raise JournalCorrupted(f"unlearn checks that {given} is not an older state of {folder}{noted}, and its "
                                   f"journal does not read: {err}") from None
        if not (journal.applied_count() or stopped):
            continue
        if named and folder.resolve() == Path(named).resolve():
            try:
                check_lineage(journal, unlearning.get("lineage"))
                on_its_line = not stopped  # its latest state, or a checkpoint of its own line (a stopped request may follow)
            except StaleCheckpoint:
                on_its_line = False
            behind = None if on_its_line else "its callback state says so"
        elif applied_to(journal, digest):
            behind = "a request there was applied to its parameters"
        else:  # beside it: a model refitted in its folder, say, on data that still holds what the record deleted
            behind = None if folder not in besides else "by its data"
        if behind is None:
            continue
        by_data = behind == "by its data"
        older = (f"{given} was trained beside the deletion record {folder}" if by_data
                 else f"{given} is an older state of the deletion record {folder} ({behind})")
        if stopped:  # what that record deleted is known once its request is done, or recovered
            try:
                refuse_a_stopped_request(journal, "unlearn")
            except StaleCheckpoint as err:
                raise StaleCheckpoint(f"{older}. {err}") from None
        same_data, again = deletes_again(journal.last_checkpoint(), datamodule, requests)
        if same_data is None:  # a model of other data beside it (another file): another experiment; another split holds them
            continue
        if not again:
            why = ("the requests of this command do not delete again all they deleted" if same_data else
                   "its latest state is on other data (another seed or split), so whether these requests delete again all "
                   "they deleted cannot be checked")
            latest = journal.last_checkpoint()
            resume, start, branch = ((f"`--ckpt_path {latest} --out {folder}`", "this checkpoint", "`--branch true`") if ckpt_path is not None else
                                     (f"`state = restore_checkpoint('{latest}', model, datamodule)`, then an UnlearningCallback with "
                                      f"dirpath='{folder}' and `callback.load_state_dict(state['unlearning'])`", "these parameters",
                                      "`branch=True`"))
            raise StaleCheckpoint(
                f"{older}, which holds {counted(journal.applied_count(), 'deletion')}, and {why}: applying them into {dirpath} would start a "
                f"second line of deletions that brings the rest back{'' if ckpt_path is not None else ', and training on from it would learn their rows again'}. "
                f"Resume from that record's latest state ({resume}), {'give all of its requests again in one requests file, ' if same_data else ''}"
                f"or start a new line from {start} on purpose, in a new, empty folder ({branch}).")


def _noted_on_the_machine(digest: str) -> set[Path]:
    """The records this machine noted as lines of deletions started from the parameters whose digest is ``digest``."""
    return {Path(line["record"]) for line in lines_of(machine_lines_folder(), digest)}


def deletes_again(latest: Path, datamodule: RecDataModule, requests: Sequence[DeletionRequest] = ()) -> tuple[bool | None, bool]:
    """``(same data, covered)``: whether a record's ``latest`` checkpoint is on ``datamodule``'s data, and whether
    ``datamodule``'s removals, and ``requests`` if given, together remove all that checkpoint removed.

    ``same data`` is ``False`` for another split or seed of the same data (it holds the users the record deleted, so it
    is not covered), and ``None`` for other data altogether (another file, or the same file without some users: the
    record is not its to check), known by the states' source fingerprints (a state written before they were saved is
    taken as another split).

    Args:
        latest: a record's latest checkpoint (only its data state is read).
        datamodule: the data of the checkpoint being checked, with its removals.
        requests: requests still to be applied to it.
    """
    deleted = load_checkpoint(latest, mmap=True).get("datamodule_state") or {}  # its removals, not its weights
    line = datamodule.state_dict()
    if deleted.get("fingerprint") != line.get("fingerprint"):  # nothing to compare row by row
        other = deleted.get("source") is not None and line.get("source") is not None and deleted["source"] != line["source"]
        return (None if other else False), False
    train, removed = datamodule.train, {key: [line[key]] for key in REMOVALS}
    for request in requests:
        try:
            resolved = request.resolve(train, missing="ignore", removed=datamodule.removed_keys)
        except InvalidDeletionRequest:  # nothing of it left here
            continue
        removed["train_keys"].append(train.users[resolved.rows] * train.num_items + train.items[resolved.rows])
        removed["users"].append(resolved.users)
        removed["items"].append(resolved.items)
    return True, removed_within(deleted, {key: torch.cat(parts) for key, parts in removed.items()})


_WOULD = {"predict": "its recommendations would name users deleted since, and rank from their rows",
          "fit": "training on from it would learn their rows again, and its checkpoints would name no deletion record",
          "validate": "its metrics would score users deleted since, from a model trained on their rows",
          "test": "its metrics would score users deleted since, from a model trained on their rows"}


def refuse_fewer_deletions(ckpt_path: str | os.PathLike, datamodule: RecDataModule, journal: Journal, command: str = "predict") -> None:
    """``predict`` (and ``fit``): refuse a checkpoint whose data still holds what the deletion record ``journal`` deleted.

    A refit from the latest state, or a later unlearned checkpoint, removes at least as much and
    passes; the trained checkpoint after a deletion does not: ``predict`` would recommend to the
    users deleted since, a ``fit`` would train on their rows again. Unlearned checkpoints that the journal
    does not name (it was removed, emptied or replaced) are refused as ``unlearn`` refuses them.

    Args:
        ckpt_path: the checkpoint the command was given.
        datamodule: its data, with the removals it holds.
        journal: one of the records it belongs to (:func:`records_of`).
        command: ``"predict"`` or ``"fit"``, named in the messages.

    Raises:
        StaleCheckpoint: its data holds what the record deleted, the record's latest state is missing, or a request
            is being (or was stopped while being) applied there.
        JournalCorrupted: the record's journal does not read.
    """
    try:
        refuse_unnamed_checkpoints(journal)  # also a journal removed or emptied beside its checkpoints
        if not journal.path.is_file():
            return
        interrupted, latest = journal.interrupted(), journal.last_checkpoint()
    except JournalCorrupted as err:
        raise JournalCorrupted(f"{command} checks that {ckpt_path} holds the deletions of the record beside it, and that "
                               f"record does not read: {err}") from None
    except FileNotFoundError as err:
        raise StaleCheckpoint(f"{command} checks that {ckpt_path} holds the deletions recorded in {journal.folder}, and "
                              f"the latest state there is missing: {err}") from None
    if interrupted:
        refuse_a_stopped_request(journal, command)
    if latest is None:
        return
    _refuse_a_replaced_latest(journal, latest, command)
    same_data, holds_them = deletes_again(latest, datamodule)
    if same_data is None:  # other data altogether: not what this record deleted from
        return
    if not holds_them:
        # another split or seed of the same data still holds the users deleted there: refused as beside the record
        held = ("still holds some of what they deleted" if same_data else
                "is not the data they were applied to (another seed or split), so it may hold what they deleted")
        run = (f" ({journal.folder} is a record of the run this recipe writes its checkpoints into, or a line noted there: a "
               f"checkpoint of another run is checked against its own run with that run's recipe)"
               if Path(journal.folder) in records_of_the_run(ckpt_path, None) else "")
        raise StaleCheckpoint(
            f"{journal.folder} records {counted(journal.applied_count(), 'deletion')} applied to this model's run, and the "
            f"data of {ckpt_path} {held}: {_WOULD.get(command, _WOULD['predict'])}. "
            f"{command.capitalize()} from the latest state (`--ckpt_path {latest}`), or from a checkpoint fitted from it.{run}"
        )


def _refuse_a_replaced_latest(journal: Journal, latest: Path, command: str) -> None:
    """Refuse a record whose latest state's file (the one its last ``applied`` entry names) holds another state: an older one
    copied over it (a backup restored under the newest name) would be checked against itself, and pass, as the latest."""
    try:
        lineage = (load_checkpoint(latest, mmap=True).get("unlearning") or {}).get("lineage")
    except (OSError, CheckpointUnreadable):  # read again by deletes_again, whose error says what is wrong
        return
    try:
        check_lineage(journal, lineage)
    except StaleCheckpoint:
        raise StaleCheckpoint(
            f"{command} checks against the latest state of the deletion record {journal.folder}, {latest}, and that file holds "
            f"another state than the journal's last applied request: it was replaced, e.g. by an older copy restored under "
            f"its name, which would undo the deletions after it. Put that file back as it was written.") from None


def refuse_training_on(ckpt_path: str | os.PathLike, model: Recommender, datamodule: RecDataModule, folders: set[Path]) -> None:
    """``fit --ckpt_path`` a checkpoint: refuse it as :func:`refuse_fewer_deletions` refuses it for
    ``predict``, for each of its records (:func:`records_of`). Training on would learn the deleted rows again, in
    checkpoints that name no record. A record only beside it whose latest state is on other data is another experiment
    in its run folder, as ``unlearn`` takes it (:func:`refuse_a_second_line`).

    Args:
        ckpt_path: the checkpoint ``fit`` was given.
        model: its model, restored.
        datamodule: its data, with the removals it holds.
        folders: its records.

    Raises:
        StaleCheckpoint, JournalCorrupted: as :func:`refuse_fewer_deletions`.
    """
    digest = model_digest(model)
    for folder in in_checking_order(folders, ckpt_path):
        journal = journal_of(folder)
        if not applied_to(journal, digest) and _on_other_data(journal, datamodule):
            continue
        refuse_fewer_deletions(ckpt_path, datamodule, journal, command="fit")


def _on_other_data(journal: Journal, datamodule: RecDataModule) -> bool:
    """Whether the latest state of the record ``journal`` is on other data than ``datamodule``, not another split of it
    (``False`` when it cannot be read: :func:`refuse_fewer_deletions` says why)."""
    try:
        latest = journal.last_checkpoint() if journal.path.is_file() else None
        return latest is not None and deletes_again(latest, datamodule)[0] is None
    except (OSError, JournalCorrupted, CheckpointUnreadable):
        return False
