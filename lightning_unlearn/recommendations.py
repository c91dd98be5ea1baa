"""``predict``'s recommendation files: written with raw ids, noted on the machine, and kept free of what is deleted later.

A recommendations CSV names users and items by their raw ids. ``predict`` notes each file it
writes (its path and the data's fingerprints, no id) in ``recommendations.jsonl`` of
:func:`~lightning_unlearn.unlearning.record.machine_lines_folder`; once an ``UnlearningCallback`` (``unlearn``'s, a
fit's, a script's) has deleted users or items of that data (or of another split or seed of it: the same raw ids),
:func:`scrub_recommendations` removes their rows from every noted file, so that no raw id of a deletion stays at rest in them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import glob
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.files import append_note, notes, write_whole, written_whole
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.record import journal_of, load_checkpoint, machine_lines_folder, machine_lock

__all__ = ["NOTE_FILE", "clean_from_the_latest_state", "clean_recommendations", "note_recommendations", "recommendations_file_lock",
           "recommendations_lock", "scrub_recommendations", "write_recommendations"]

NOTE_FILE = "recommendations.jsonl"
"""In :func:`~lightning_unlearn.unlearning.record.machine_lines_folder`: the recommendation files ``predict`` wrote."""


def write_recommendations(model: Recommender, datamodule: RecDataModule, path: str | os.PathLike, k: int = 20,
                          device: torch.device | str | None = None, before_rename: Callable[[Path], object] | None = None) -> dict[str, int]:
    """Write ``user,rank,item,score`` rows (raw ids): each remaining user's ``k`` best unseen items, whole or not at all.

    Seen items are the user's rows in the training and validation splits; users and items the
    datamodule removed as a whole (its recorded removals) get no row and are never recommended.
    A user with fewer than ``k`` items left gets fewer rows.

    Args:
        model: the recommender.
        datamodule: its datamodule (with the removals applied).
        path: the CSV file to write (its folder is created).
        k: recommendations per user.
        device: where to score (default: the model's device).
        before_rename: as :func:`~lightning_unlearn.files.write_whole` (to note the file, :func:`note_recommendations`).

    Returns:
        ``{"users", "deleted_users", "deleted_items"}``: how many users got recommendations,
        and how many users and items were left out as deleted.

    Example:
        >>> import tempfile
        >>> from lightning_unlearn.data import RecDataModule, Synthetic
        >>> from lightning_unlearn.models import MF
        >>> dm = RecDataModule(Synthetic(num_users=6, num_items=8, seed=0))
        >>> dm.setup()
        >>> write_recommendations(MF(dm.num_users, dm.num_items, embedding_dim=4), dm, Path(tempfile.mkdtemp()) / "top.csv", k=2)
        {'users': 6, 'deleted_users': 0, 'deleted_items': 0}
    """
    datamodule.setup()
    train, val = datamodule.train, datamodule.val
    removed = datamodule.state_dict()
    gone_users = torch.as_tensor(removed.get("users", []), dtype=torch.long)
    gone_items = torch.as_tensor(removed.get("items", []), dtype=torch.long)
    num_items = train.num_items
    keep = torch.ones(train.num_users, dtype=torch.bool)
    keep[gone_users] = False
    users = torch.nonzero(keep).flatten()
    blocked = torch.zeros(num_items, dtype=torch.bool)
    blocked[gone_items] = True
    seen = torch.cat([train.keys, val.keys])
    seen_users, seen_items = seen // num_items, seen % num_items
    device = torch.device(device) if device is not None else model.device
    top = min(k, num_items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.to(device)
    model.set_graph(train)
    model.eval()
    try:
        mode = path.stat().st_mode & 0o777 if path.is_file() else None  # a file written again keeps its mode
        with torch.no_grad(), written_whole(path, mode=mode, before_rename=before_rename) as raw:
            fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            writer = csv.writer(fh)
            writer.writerow(["user", "rank", "item", "score"])
            representations = model.representations()
            for batch in torch.split(users, datamodule.hparams.eval_batch_size):
                scores = model.full_scores(batch.to(device), representations).float().cpu()
                hit = torch.isin(seen_users, batch)
                scores[torch.searchsorted(batch, seen_users[hit]), seen_items[hit]] = float("-inf")
                scores[:, blocked] = float("-inf")
                values, items = torch.topk(scores, top, dim=1)
                raw_users = train.user_ids[batch.numpy()].tolist()
                raw_items = train.item_ids[items.numpy()].tolist()
                for user, row_items, row_values in zip(raw_users, raw_items, values.tolist()):
                    for rank, (item, score) in enumerate(zip(row_items, row_values), start=1):
                        if score != float("-inf"):
                            writer.writerow([user, rank, item, f"{score:.6g}"])
            fh.flush()
            fh.detach()  # the file is closed, fsynced and renamed into place by written_whole
    finally:
        model.train(was_training)
    return {"users": len(users), "deleted_users": len(gone_users), "deleted_items": len(gone_items)}


@contextlib.contextmanager
def recommendations_lock(datamodule: RecDataModule) -> Iterator[None]:
    """Hold, waiting for it if need be, the machine's lock of the recommendation files of ``datamodule``'s data.

    ``predict`` holds it from its checks until its file is written and noted; :func:`scrub_recommendations`'
    callers hold it while they clean. So a deletion applied while ``predict`` runs is cleaned from its
    file once it is written, and a file is never cleaned while it is being written. A machine folder
    that cannot be written costs the lock, not the command.

    Args:
        datamodule: the data, set up.
    """
    state = datamodule.state_dict()  # the data before its split: a predict from another split of it is cleaned by the same deletions
    with machine_lock(f"data-{str(state.get('source') or state.get('fingerprint'))[:32]}",
                      "writing or cleaning recommendation files of the same data", wait=True):
        yield


def _of_the_data(note: dict, state: dict) -> bool:
    """Whether a file's ``note`` is of the data of a datamodule's ``state``: the same split, or another split or seed of the
    same data (the same raw ids; a note from before the data's source was noted has its split only)."""
    return note.get("data") == state.get("fingerprint") or (state.get("source") is not None and note.get("source") == state.get("source"))


@contextlib.contextmanager
def recommendations_file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold, waiting for it if need be, the machine's lock of the recommendations file ``path``.

    ``predict`` holds it while it writes and notes the file, :func:`scrub_recommendations` while it
    cleans it: a ``predict`` from other data (another lock of :func:`recommendations_lock`) into the
    same path is never replaced by a cleaning of the file it replaced, and a temporary file found
    beside the path is a leftover of a write that was killed. A machine folder that cannot be
    written costs the lock, not the command.

    Args:
        path: the recommendations file (it need not exist).

    Example (not run here: the lock is a file in the machine's folder)::

        with recommendations_file_lock("runs/top20.csv"):
            ...  # write the file whole and note it
    """
    name = hashlib.sha256(str(_file(path)).encode()).hexdigest()[:32]
    with machine_lock(f"recommendations-{name}", "writing or cleaning the same recommendations file", wait=True):
        yield


def _file(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: a link there is replaced, not what it points to."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


def note_recommendations(path: str | os.PathLike, datamodule: RecDataModule, command: str = "predict",
                         written: Path | None = None, writing: bool = False, like: dict | None = None) -> bool:
    """Note that ``path`` holds recommendations of ``datamodule``'s data (no id).

    A note holds the file's path, the data's fingerprints (of its split, and of the data before it), and the file's size and modification
    time: :func:`scrub_recommendations` cleans a file only as one of its notes has it. Written
    whole (:func:`~lightning_unlearn.files.write_whole`), a file is noted from its temporary file
    just before the rename (``written``), which keeps both: a process killed between the two
    leaves either the old file, as an earlier note has it, or the new one, as this note has it.
    Before a write starts, ``writing`` notes the path alone (it matches no file), so that the
    temporary file of a write killed midway is found and removed.

    Args:
        path: the file :func:`write_recommendations` wrote, or writes.
        datamodule: its data.
        command: named on the console when the machine's folder cannot be written (that costs the note, not the command).
        written: the temporary file about to be renamed over ``path``, whose size and time are noted.
        writing: note the path alone, before its write.
        like: an earlier note of the file, whose data it keeps (a cleaning by a deletion in another split of that data).

    Returns:
        Whether it is noted.
    """
    path, state = _file(path), datamodule.state_dict()
    data = {"data": like.get("data"), "source": like.get("source")} if like else {"data": state.get("fingerprint"), "source": state.get("source")}
    line = {"path": str(path), **data, **({"writing": True} if writing else _identity(written or path))}
    try:
        append_note(machine_lines_folder() / NOTE_FILE, line, once=False)
    except OSError as err:
        print(f"[{command}] {path} is not noted: the machine's folder cannot be written ({err.strerror}), so later deletions "
              f"will not remove their users and items from it. Predict into it again once the folder can be written.",
              file=sys.stderr)
        return False
    return True


def scrub_recommendations(datamodule: RecDataModule, command: str = "unlearn") -> list[Path]:
    """Remove the rows of the users and items ``datamodule`` has removed from every recommendation file noted for its data.

    Its data is that of every split or seed of the data it was split from (:func:`~lightning_unlearn.data.source_fingerprint`):
    a model of another split was trained on the same users, and its files name them by the same raw ids.

    A row goes when its user or its item was deleted as a whole; the other rows keep their ranks.
    A file is cleaned only as one of its notes has it (the latest such note says whose data it
    holds); one that none has, changed since by another program, is left alone and said on the
    console. It is replaced at once (:func:`~lightning_unlearn.files.write_whole`), keeps its mode,
    and is noted before its rename. A noted file that is gone is skipped; one that cannot be read
    or rewritten is said on the console (no id in the messages). Hold :func:`recommendations_lock`; each file's
    :func:`recommendations_file_lock` is taken here.

    Args:
        datamodule: the data, set up, with the removals of the latest state.
        command: the command that deleted them, named on the console.

    Returns:
        The files that held rows of deleted users or items, now without them.

    Example:
        >>> from lightning_unlearn.data import RecDataModule, Synthetic
        >>> dm = RecDataModule(Synthetic(num_users=6, num_items=8, seed=0))
        >>> dm.setup()
        >>> scrub_recommendations(dm)  # nothing deleted: nothing to remove
        []
    """
    state = datamodule.state_dict()
    users, items = (torch.as_tensor(state.get(key, []), dtype=torch.long) for key in ("users", "items"))
    if not len(users) and not len(items):
        return []
    train = datamodule.train
    gone_users = {str(raw) for raw in train.user_ids[users.numpy()].tolist()}
    gone_items = {str(raw) for raw in train.item_ids[items.numpy()].tolist()}
    scrubbed = []
    for name, lines in sorted(_noted().items()):
        if any(_of_the_data(line, state) for line in lines):
            with recommendations_file_lock(name):  # a predict writing it (from any data) finishes first
                if _clean(Path(name), lines, datamodule, state, command, gone_users, gone_items):
                    scrubbed.append(Path(name))
    return scrubbed


def clean_recommendations(datamodule: RecDataModule, command: str, held: bool = False) -> None:
    """:func:`scrub_recommendations` under :func:`recommendations_lock` (unless the caller ``held`` it), saying each file
    cleaned on the console; nothing, and no lock, when ``datamodule`` has removed no user or item.

    Args:
        datamodule: the data, set up, with the removals of the latest state.
        command: the command (or ``UnlearningCallback``) that deleted them, named on the console.
        held: the caller holds :func:`recommendations_lock` already.
    """
    state = datamodule.state_dict()
    if not len(state.get("users", ())) and not len(state.get("items", ())):
        return
    with contextlib.nullcontext() if held else recommendations_lock(datamodule):
        scrubbed = scrub_recommendations(datamodule, command)
    for path in scrubbed:
        print(f"[{command}] {path} (recommendations written by predict) no longer names the users and items deleted since")


def clean_from_the_latest_state(folder: str | os.PathLike, datamodule: RecDataModule, command: str, held: bool = False) -> None:
    """A refusal by the deletion record ``folder``: the recommendation files lose what its latest state deleted.

    A process killed after its request was applied, before its cleaning, left the deleted ids in the files ``predict``
    wrote; a later run (the same one, whose recovery closes the request as applied, or another line from the same run)
    is refused by the record. Cleaned with ``datamodule`` as the latest state holds it (a copy); nothing when that state
    is of other data or cannot be read (the refusal says what is wrong).

    Args:
        folder: the record.
        datamodule: the data, set up (not changed).
        command: named on the console.
        held: the caller holds :func:`recommendations_lock` already.
    """
    try:
        journal = journal_of(folder)
        latest = journal.last_checkpoint() if journal.path.is_file() else None
        if latest is None:
            return
        latest_data = copy.deepcopy(datamodule)
        latest_data.load_state_dict(load_checkpoint(latest, mmap=True).get("datamodule_state") or {})
    except Exception:  # the refusal being raised says what is wrong with the record
        return
    clean_recommendations(latest_data, command, held)


def _clean(path: Path, lines: list[dict], datamodule: RecDataModule, state: dict, command: str, gone_users: set[str],
           gone_items: set[str]) -> bool:
    """:func:`scrub_recommendations` of one noted file (its lock held): whether it held rows of deleted users or items."""
    for left in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # of a write killed midway (written_whole's)
        left.unlink(missing_ok=True)
    if not path.is_file():
        return False
    identity = _identity(path)

    def owner(notes: list[dict]) -> dict | None:  # the latest note of the file as it is
        return next((line for line in reversed(notes) if {key: line.get(key) for key in identity} == identity), None)

    noted = owner(lines) or owner(_noted().get(str(path), []))  # or written by a predict this cleaning waited for
    if noted is None:
        print(f"[{command}] {path} (recommendations written by predict) was changed since by something else: it is not "
              f"cleaned of the users and items deleted since, and may name them. Predict into it again, or remove it, "
              f"to end this message.", file=sys.stderr)
        return False
    if not _of_the_data(noted, state):  # predicted into again from other data: that data's file
        return False
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        print(f"[{command}] {path} (recommendations written by predict) cannot be read ({type(err).__name__}): it is not "
              f"cleaned of the users and items deleted since, and may name them; remove it, or predict into it again.",
              file=sys.stderr)
        return False
    kept = rows[:1] + [row for row in rows[1:] if not (len(row) > 2 and (row[0] in gone_users or row[2] in gone_items))]
    if len(kept) == len(rows):
        return False
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    try:
        write_whole(path, text.getvalue(), mode=path.stat().st_mode & 0o777,
                    before_rename=lambda written: note_recommendations(path, datamodule, command, written=written, like=noted))
    except OSError as err:
        print(f"[{command}] {path} (recommendations written by predict) names users or items deleted since, and cannot be "
              f"rewritten without them ({err.strerror}): remove it, or predict again into it.", file=sys.stderr)
        return False
    return True


def _noted() -> dict[str, list[dict]]:
    """Each noted path's notes, oldest first."""
    noted: dict[str, list[dict]] = {}
    for line in notes(machine_lines_folder() / NOTE_FILE, once=False):
        if isinstance(line.get("path"), str):
            noted.setdefault(line["path"], []).append(line)
    return noted


def _identity(path: Path) -> dict[str, int | None]:
    """What tells a file changed since it was noted: its size and modification time (``None``: there is none)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return {"size": None, "mtime_ns": None}
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}
