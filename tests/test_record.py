"""The deletion record under operator mistakes: a garbled journal, a stale checkpoint, two
processes on one folder, another working directory, tricky request files, raw ids at rest.

Each test reproduces a case that, before the journal became a hash chain with a folder lock,
lineage and keyed digests, silently lost a deletion, applied one twice or stored an id.
"""
# The fixtures `trained` and `distinctive_slice` are imported from the fault-injection and W&B
# tests, and the test functions take them as arguments:
# ruff: noqa: F811

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning_fabric.plugins.io import TorchCheckpointIO

from lightning_unlearn import files as files_module
from lightning_unlearn.data import RecDataModule
from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.sources import DataSource
from lightning_unlearn.models import MF
from lightning_unlearn.private_checkpoints import PrivateCheckpointIO
from lightning_unlearn.unlearning import record as record_module
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.journal import FolderLocked, Journal, JournalCorrupted
from lightning_unlearn.unlearning.methods import FineTune, Retrain, UnlearningError
from lightning_unlearn.unlearning.record import (
    CheckpointUnreadable,
    MissingDataState,
    StaleCheckpoint,
    adopt_key,
    journal_of,
    recover,
    restore_checkpoint,
)
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest
from tests.conftest import joined
from tests.test_faults import datamodule, new_model, trained  # noqa: F401
from tests.test_wandb import DELETED_USERS, distinctive_slice, member, settled, write_recipe  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the process tests fork")
FORK = multiprocessing.get_context("fork")


def session(checkpoint: Path, out: Path, *requests: DeletionRequest, **kwargs):
    """Load ``checkpoint`` as ``unlearn`` does; queue ``requests`` into ``out``."""
    torch.set_num_threads(1)
    dm = datamodule()
    model = new_model(dm)
    state = restore_checkpoint(checkpoint, model, dm)
    if kwargs.get("branch"):
        adopt_key(Path(checkpoint).parent, out)
    callback = UnlearningCallback(FineTune(epochs=1, batch_size=16), requests=list(requests), dirpath=out, seed=0, **kwargs)
    if state.get("unlearning"):
        callback.load_state_dict(state["unlearning"])
    return model, dm, callback


def apply(checkpoint: Path, out: Path, *requests: DeletionRequest, **kwargs):
    model, dm, callback = session(checkpoint, out, *requests, **kwargs)
    callback.apply_pending(model, dm)
    return model, dm, callback


A, B, C = DeletionRequest(users=[3]), DeletionRequest(users=[6]), DeletionRequest(items=[2])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "journal.lock"}


def removed_users(checkpoint: Path) -> list[int]:
    return sorted(torch.load(checkpoint, weights_only=True)["datamodule_state"]["users"].tolist())


# ----------------------------------------------------------------------------- 1. a garbled journal


@pytest.mark.parametrize("garble", ["hashes", "wrong_type", "byte"])
def test_a_garbled_middle_line_is_refused_naming_the_line_and_nothing_is_applied(garble, trained, tmp_path):
    out = tmp_path / "out"
    apply(trained, out, A)
    apply(journal_of(out).last_checkpoint(), out, B)
    lines = (out / "journal.jsonl").read_bytes().split(b"\n")
    assert [json.loads(line)["status"] for line in lines if line] == ["pending", "applied", "pending", "applied"]
    if garble == "hashes":  # the case: A's applied line overwritten with '#' of the same length
        lines[1] = b"#" * len(lines[1])
    elif garble == "wrong_type":
        entry = json.loads(lines[1])
        entry["checkpoint"] = 5
        lines[1] = json.dumps(entry, sort_keys=True).encode()
    else:
        lines[1] = lines[1].replace(b'"applied"', b'"failed"')
    (out / "journal.jsonl").write_bytes(b"\n".join(lines))
    before = files(out)
    with pytest.raises(JournalCorrupted, match=r"journal.jsonl, line 2: .*restore journal.jsonl from a backup"):
        recover(out)
    latest = sorted(out.glob("unlearned-0001-*.ckpt"))[0]
    with pytest.raises(JournalCorrupted, match="line 2"):
        apply(latest, out, C)
    assert files(out) == before  # nothing written, nothing applied on top of an older state
    assert removed_users(latest) == [3, 6]  # the latest checkpoint still holds both deletions: the branch procedure
    model, dm, _ = apply(latest, tmp_path / "branch", C, branch=True)
    assert not torch.isin(dm.train.users, torch.tensor([3, 6])).any() and not (dm.train.items == 2).any()


def test_a_changed_last_line_is_refused_too(trained, tmp_path):
    out = tmp_path / "out"
    apply(trained, out, A)
    first, last, end = (out / "journal.jsonl").read_text().split("\n")
    (out / "journal.jsonl").write_text("\n".join([first, last.replace('"num_users": 1', '"num_users": 2'), end]))
    with pytest.raises(JournalCorrupted, match="line 2: its content does not match its `hash`"):
        journal_of(out).entries()


def test_a_journal_read_before_still_sees_a_line_changed_since(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    for request in range(3):
        journal.append("aa", "pending", request=request)
    assert len(journal.entries()) == 3  # verified, and remembered as verified
    text = journal.path.read_text().replace('"request": 1', '"request": 7')
    journal.path.write_text(text)
    with pytest.raises(JournalCorrupted, match="line 2"):
        journal.entries()


def test_an_entry_of_the_wrong_type_is_refused_at_write_time(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    with pytest.raises(TypeError, match="`request` must be a int"):
        journal.append("aa", "pending", request="zero")
    assert not journal.path.exists()


# ----------------------------------------------------------------------------- 2. stale checkpoints, two processes


def test_a_stale_checkpoint_is_refused_naming_the_latest_state(trained, tmp_path):
    out = tmp_path / "out"
    apply(trained, out, A)
    latest = journal_of(out).last_checkpoint()
    before = files(out)
    # B from the trained model (the issue's `--ckpt_path best.ckpt`), and the identical command run again after success.
    for request in (B, A):
        model, dm, callback = session(trained, out, request)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(StaleCheckpoint, match=f"latest state is {latest}.*--ckpt_path {latest}"):
            callback.apply_pending(model, dm)
        assert files(out) == before
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # The documented ways on: resume from the latest state, or branch into a new folder.
    apply(latest, out, B)
    assert removed_users(journal_of(out).last_checkpoint()) == [3, 6]
    with pytest.raises(StaleCheckpoint, match=r"older state of the deletion record .*out .*`branch=True`"):  # a second line
        apply(trained, tmp_path / "new", B)  # from the trained model, without what the first deleted (review 35b D1)
    _, dm, _ = apply(trained, tmp_path / "new", B, branch=True)  # started on purpose
    assert removed_users(journal_of(tmp_path / "new").last_checkpoint()) == [6]
    with pytest.raises(StaleCheckpoint, match="another unlearning folder"):
        apply(latest, tmp_path / "other", C)
    new_latest = journal_of(tmp_path / "new").last_checkpoint()
    with pytest.raises(StaleCheckpoint, match=f"new, empty folder.*dirpath`\\), or go on in this folder from its latest state, {new_latest}"):
        apply(latest, tmp_path / "new", C, branch=True)


def test_an_older_state_of_the_same_folder_is_refused(trained, tmp_path):
    out = tmp_path / "out"
    apply(trained, out, A)
    first = journal_of(out).last_checkpoint()
    apply(first, out, B)
    with pytest.raises(StaleCheckpoint, match="an older state of this folder"):
        apply(first, out, C)


def test_a_checkpoint_of_a_copy_of_the_folder_is_refused(trained, tmp_path):
    """A copy (or a restored backup) shares the journal's id and entry numbers; the entry's hash tells them apart. The copy
    does not go on while the record it copies is there (its requests would never reach it); it went on while the record
    was away."""
    out, copy = tmp_path / "out", tmp_path / "copy"
    apply(trained, out, A)
    shutil.copytree(out, copy)
    apply(journal_of(out).last_checkpoint(), out, B)
    with pytest.raises(StaleCheckpoint, match=f"{copy} is a copy of the deletion record {out}"):
        apply(journal_of(copy).last_checkpoint(), copy, C)
    out.rename(tmp_path / "away")
    apply(journal_of(copy).last_checkpoint(), copy, C)
    (tmp_path / "away").rename(out)
    before = files(out)
    with pytest.raises(StaleCheckpoint, match="a copy of this folder that went on separately"):
        apply(journal_of(copy).last_checkpoint(), out, DeletionRequest(users=[9]))
    assert files(out) == before
    assert removed_users(journal_of(out).last_checkpoint()) == [3, 6]


def test_checkpoints_the_journal_does_not_name_are_refused(trained, tmp_path):
    """A journal restored from an older backup no longer records the newer checkpoints' deletions."""
    out = tmp_path / "out"
    apply(trained, out, A)
    backup = (out / "journal.jsonl").read_bytes()
    apply(journal_of(out).last_checkpoint(), out, B)
    newer = journal_of(out).last_checkpoint()
    (out / "journal.jsonl").write_bytes(backup)
    for checkpoint in (trained, journal_of(out).last_checkpoint(), newer):
        with pytest.raises(StaleCheckpoint, match=f"does not name \\({newer.name}\\).*Nothing was applied"):
            apply(checkpoint, out, C)
    newer.rename(tmp_path / newer.name)  # moved out: the restored journal's latest state goes on
    apply(journal_of(out).last_checkpoint(), out, B)
    assert removed_users(journal_of(out).last_checkpoint()) == [3, 6]
    (out / "unlearned-latest.ckpt").symlink_to(journal_of(out).last_checkpoint().name)  # a link to a named one is one
    apply(journal_of(out).last_checkpoint(), out, C)


def _full_disk_once(monkeypatch) -> None:
    """The next checkpoint write finds the disk full (the attempt fails, and is journaled so)."""
    import lightning_unlearn.unlearning.callback as callback_module

    real = callback_module.save_checkpoint

    def full(*args, **kwargs):
        monkeypatch.setattr(callback_module, "save_checkpoint", real)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callback_module, "save_checkpoint", full)


def test_a_journal_restored_from_before_a_retry_does_not_name_the_retry_s_checkpoint(trained, tmp_path, monkeypatch):
    """B fails once, then its retry succeeds: both attempts name the same file, but only the retry's `applied` entry
    records it. A journal backup taken between them, restored, is refused, not gone on from the state without B."""
    out = tmp_path / "out"
    apply(trained, out, A)
    _full_disk_once(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        apply(journal_of(out).last_checkpoint(), out, B)
    backup = (out / "journal.jsonl").read_bytes()
    apply(journal_of(out).last_checkpoint(), out, B)
    retried = journal_of(out).last_checkpoint()
    (out / "journal.jsonl").write_bytes(backup)
    assert [e["status"] for e in journal_of(out)] == ["pending", "applied", "pending", "failed"]
    assert journal_of(out).checkpoint(journal_of(out).entries()[2]) == retried  # the failed attempt's name: the same
    with pytest.raises(StaleCheckpoint, match=f"does not name \\({retried.name}\\).*gives up the deletions they hold"):
        apply(journal_of(out).last_checkpoint(), out, C)


def test_recover_closes_a_pending_entry_as_applied_only_with_the_checkpoint_its_attempt_wrote(trained, tmp_path, monkeypatch):
    """A file of the pending entry's name that another attempt wrote (its lineage names another entry) is not this
    attempt's: the request is closed as interrupted, and the file is left for the folder check to refuse."""
    out = tmp_path / "out"
    apply(trained, out, A)
    _full_disk_once(monkeypatch)
    with pytest.raises(OSError):
        apply(journal_of(out).last_checkpoint(), out, B)
    backup = (out / "journal.jsonl").read_bytes()
    apply(journal_of(out).last_checkpoint(), out, B)
    (out / "journal.jsonl").write_bytes(backup)
    journal = journal_of(out)
    attempt = journal.entries()[2]  # a new attempt at B, killed after its pending entry: the same checkpoint name
    journal.append(attempt["digest"], "pending", checkpoint=str(journal.checkpoint(attempt)), request=1)
    assert recover(out) == journal_of(out).checkpoint(journal_of(out).entries()[1])  # A's: B's attempt is not applied
    assert journal_of(out).entries()[-1]["status"] == "failed"
    assert "interrupted" in journal_of(out).entries()[-1]["reason"]


@pytest.mark.parametrize("error", ["permission", "memory"])
def test_recover_decides_nothing_from_a_checkpoint_it_cannot_read(trained, tmp_path, monkeypatch, error):
    """A whole checkpoint that cannot be read now (another account's ``0600`` file; too little memory, which torch
    reports as a failed read): the interrupted entry stays open, not closed as failed on the strength of a file that
    may well hold the request. A torn file at its name is closed as failed."""
    out = tmp_path / "out"
    apply(trained, out, A)
    journal = journal_of(out)
    journal.append("e" * 64, "pending", request=1, checkpoint=str(journal.last_checkpoint()))

    def unreadable(path, **kwargs):
        if error == "permission":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        raise record_module.CheckpointUnreadable(f"{path}: RuntimeError: unable to mmap: Cannot allocate memory (12)")

    monkeypatch.setattr("lightning_unlearn.unlearning.record.load_checkpoint", unreadable)
    before = (out / "journal.jsonl").read_bytes()
    with pytest.raises(FolderLocked, match="cannot be read now .*run as the account that wrote it"):
        recover(out)
    assert (out / "journal.jsonl").read_bytes() == before and journal_of(out).interrupted()
    monkeypatch.undo()
    torn = out / "unlearned-0001-torn.ckpt"
    torn.write_bytes(journal_of(out).last_checkpoint().read_bytes()[:1000])
    journal_of(out).append("f" * 64, "pending", request=2, checkpoint=str(torn))
    recover(out)
    assert [e["status"] for e in journal_of(out).entries()[-2:]] == ["failed", "failed"]


def _hold_a_request(folder: str, started, release) -> None:
    """A process in the middle of a request: holds the lock, has journaled `pending` and a temp file."""
    journal = journal_of(folder)
    with journal.lock():
        journal.append("d" * 64, "pending", request=0, checkpoint=f"{folder}/unlearned-0000-dddd.ckpt")
        Path(folder, ".unlearned-0000-dddd.ckpt.x.tmp").write_bytes(b"half")
        started.set()
        release.wait(30)


def test_the_refusal_names_the_holders_pid_written_a_moment_after_it_took_the_lock(tmp_path):
    """The holder truncates the lock file, then writes its pid: a process refused between the two reads it a moment later."""
    fcntl = pytest.importorskip("fcntl")
    folder = tmp_path / "out"
    folder.mkdir()
    fd = os.open(folder / "journal.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # taken, the file still empty
        threading.Timer(0.05, os.pwrite, (fd, b"4242\n", 0)).start()
        with pytest.raises(FolderLocked, match="locked by process 4242,"):
            recover(folder)
    finally:
        os.close(fd)


def test_a_second_process_is_refused_while_the_first_applies_and_touches_nothing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    started, release = FORK.Event(), FORK.Event()
    first = FORK.Process(target=_hold_a_request, args=(str(folder), started, release))
    first.start()
    try:
        assert started.wait(30)
        with pytest.raises(FolderLocked, match=f"locked by process {first.pid}"):
            recover(folder)
        assert journal_of(folder).interrupted()[0]["status"] == "pending"  # its live request is not closed
        assert (folder / ".unlearned-0000-dddd.ckpt.x.tmp").exists()  # nor its temp file removed
    finally:
        release.set()
        joined(first, 30)
    assert recover(folder) is None  # after it is gone (it 'died' mid-request), recovery closes the request


def _race(checkpoint: str, out: str, user: int, go, results) -> None:
    go.wait(30)
    try:
        apply(Path(checkpoint), Path(out), DeletionRequest(users=[user]))
        results.put((user, "applied"))
    except (FolderLocked, StaleCheckpoint) as err:
        results.put((user, type(err).__name__))


def test_two_processes_on_one_folder_never_both_apply_from_the_same_state(trained, tmp_path):
    out = tmp_path / "out"
    go, results = FORK.Event(), FORK.Queue()
    workers = [FORK.Process(target=_race, args=(str(trained), str(out), user, go, results)) for user in (3, 6)]
    for worker in workers:
        worker.start()
    go.set()
    for worker in workers:
        joined(worker, 120)
    outcome = dict(results.get(timeout=5) for _ in workers)
    assert sorted(outcome.values()) in (["FolderLocked", "applied"], ["StaleCheckpoint", "applied"])
    winner = next(user for user, status in outcome.items() if status == "applied")
    journal = journal_of(out)
    assert [e["status"] for e in journal] == ["pending", "applied"]
    assert [p.name[:15] for p in out.glob("unlearned-*.ckpt")] == ["unlearned-0000-"]
    assert removed_users(journal.last_checkpoint()) == [winner]


# ----------------------------------------------------------------------------- 3. another working directory


def test_the_journal_reads_the_same_from_any_working_directory(trained, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    apply(trained, Path("unlearning"), A)  # the recipe default: a folder relative to the working directory
    entries = journal_of(tmp_path / "a" / "unlearning").entries()
    assert entries[1]["checkpoint"].startswith("unlearned-0000-")  # relative to the journal's folder
    # A request interrupted after its checkpoint was renamed into place, then recovery from elsewhere.
    journal = journal_of(Path("unlearning"))
    checkpoint = Path("unlearning") / "unlearned-0001-eeee.ckpt"
    pending = journal.append("e" * 64, "pending", request=1, checkpoint=str(checkpoint))
    state = torch.load(Path("unlearning") / entries[1]["checkpoint"], weights_only=True)
    state["unlearning"]["lineage"] = {"journal": journal.id, "seq": pending["seq"], "entry": pending["hash"]}  # the attempt's
    torch.save(state, checkpoint)
    monkeypatch.chdir(tmp_path / "b")
    assert recover(tmp_path / "a" / "unlearning") == tmp_path / "a" / "unlearning" / "unlearned-0001-eeee.ckpt"
    assert journal_of(tmp_path / "a" / "unlearning").entries()[-1]["status"] == "applied"


# ----------------------------------------------------------------------------- 4. request files, canonical ids


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_quoted_newline_is_not_glued_into_another_id(tmp_path):
    path = write(tmp_path, "forget.csv", 'user\n"1\n96\n')  # the file: an open quote
    with pytest.raises(InvalidDeletionRequest, match=r"forget.csv, line 2: malformed CSV"):
        DeletionRequest.from_file(path)
    path = write(tmp_path, "closed.csv", 'user\n"1\n96"\n')  # a closed quote holding a line break
    with pytest.raises(InvalidDeletionRequest, match=r"closed.csv, line 2 \(a quoted field runs on to line 3.*line breaks"):
        DeletionRequest.from_file(path)


def test_a_json_line_with_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, "forget.jsonl", '{"user": 196, "user": 186}\n')
    with pytest.raises(InvalidDeletionRequest, match=r"forget.jsonl, line 1: the key 'user' is given twice"):
        DeletionRequest.from_file(path)


def test_deeply_nested_json_is_refused_with_the_line(tmp_path):
    path = write(tmp_path, "forget.jsonl", '{"user": 1}\n' + "[" * 100_000 + "\n")
    with pytest.raises(InvalidDeletionRequest, match=r"line 2: JSON nested more than"):
        DeletionRequest.from_file(path)


def test_one_id_has_one_canonical_form_in_every_reader(tmp_path):
    data = Interactions.from_raw([196, 196, 186], [242, 302, 242])
    forms = [
        DeletionRequest(users=[196]),
        DeletionRequest(users=["0196"]),
        DeletionRequest(users=[196.0]),
        DeletionRequest.from_file(write(tmp_path, "a.csv", "user\n196.0\n")),
        DeletionRequest.from_file(write(tmp_path, "b.jsonl", '{"user": 196.0}\n')),
        DeletionRequest.from_file(write(tmp_path, "c.csv", "user\n 0196 \n")),
    ]
    assert len({f.canonical(data) for f in forms}) == 1
    assert len({f.resolve(data).digest for f in forms}) == 1


def test_196_then_0196_is_applied_once(trained, tmp_path):
    out = tmp_path / "out"
    apply(trained, out, DeletionRequest(users=[3]))
    _, _, callback = apply(journal_of(out).last_checkpoint(), out, DeletionRequest(users=["03"]))
    assert callback.reports == [] and [e["status"] for e in journal_of(out)] == ["pending", "applied"]


# ----------------------------------------------------------------------------- 5. raw ids at rest


def distinctive_datamodule() -> RecDataModule:
    """Synthetic interactions whose raw ids are strings that cannot occur by chance."""
    base = datamodule()
    base.setup()
    users = [f"usr{u:03d}zq" for u in torch.cat([base.train.users, base.val.users, base.test.users]).tolist()]
    items = [f"itm{i:03d}wk" for i in torch.cat([base.train.items, base.val.items, base.test.items]).tolist()]

    class Named(DataSource):
        def load(self):
            return Interactions.from_raw(users, items), None

    return RecDataModule(Named(), num_negatives=1, batch_size=32, seed=0)


def test_no_raw_id_rests_in_any_checkpoint_or_the_journal_and_digests_are_keyed(tmp_path):
    dm = distinctive_datamodule()
    dm.setup()
    names = ["usr003zq", "usr006zq", "itm002wk"]
    requests = [DeletionRequest(users=[names[0]]), DeletionRequest(users=[names[1]]), DeletionRequest(items=[names[2]])]
    pl.seed_everything(0, verbose=False)
    model = new_model(dm)
    callback = UnlearningCallback(FineTune(epochs=1), requests=requests, dirpath=tmp_path / "unlearning", when="epoch_end")
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
    # The requests are pending while the first epoch's Lightning checkpoint is written.
    callback_run = callback.run
    seen_pending = []

    def run_later(trainer, model):
        seen_pending.append(callback.pending)
        if trainer.current_epoch >= 1:
            return callback_run(trainer, model)
        return []

    callback.run = run_later
    trainer.fit(model, dm)
    assert seen_pending[0] == 3 and callback.pending == 0
    lightning_state = torch.load(next((tmp_path / "ckpt").glob("epoch=0*.ckpt")), weights_only=True)
    assert len(lightning_state["callbacks"]["UnlearningCallback"]["pending"]) == 3  # kept, as indices
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" and p.name.startswith("unlearned-") for p in written)
    for path in written:
        data = path.read_bytes()
        for name in names:
            assert name.encode() not in data, (name, path)
    # Fingerprints and digests are keyed: hashing the known ids does not find them.
    applied = torch.load(journal_of(tmp_path / "unlearning").last_checkpoint(), weights_only=True)["unlearning"]["applied"]
    journal_text = (tmp_path / "unlearning" / "journal.jsonl").read_text()
    key = (tmp_path / "unlearning" / "journal.key").read_text().strip()
    for candidate in [*names, *map(str, range(20))]:
        for guess in (hashlib.sha256(candidate.encode()).hexdigest(),
                      hashlib.sha256(json.dumps({"pairs": [], "users": [candidate], "items": []}, sort_keys=True).encode()).hexdigest()):
            assert guess not in applied and guess not in journal_text
    assert key not in journal_text and all(key.encode() not in p.read_bytes() for p in written if p.name != "journal.key")
    for own in ("journal.key", "journal.jsonl"):  # the journal too: another account could otherwise garble or rewrite it
        assert oct((tmp_path / "unlearning" / own).stat().st_mode & 0o777) == "0o600", own
    # Lightning's own checkpoints hold the pending requests (epoch 0) or the removals (epoch 1) as indices: private too.
    lightning_checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(lightning_checkpoints) == 2
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in lightning_checkpoints), lightning_checkpoints


@pytest.mark.parametrize("method", [Retrain(), FineTune(epochs=1)])
def test_lightning_checkpoints_stay_private_after_a_refit_inside_the_fit_and_through_a_wrapping_io(tmp_path, method):
    """A Retrain fits with a Trainer of its own on the same datamodule; Lightning's AsyncCheckpointIO wraps the default IO."""
    from pytorch_lightning.plugins.io import AsyncCheckpointIO

    dm = datamodule()
    callback = UnlearningCallback(method, requests=[DeletionRequest(users=[3])], when="epoch_end", dirpath=tmp_path / "unlearning",
                                  evaluate=False)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         plugins=[AsyncCheckpointIO()],
                         callbacks=[callback, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)])
    trainer.fit(new_model(dm), dm)
    written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(written) == 3 and dm.trainer is trainer
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in written), written
    url = f"file://{tmp_path / 'url.ckpt'}"  # a local path spelt as a URL is a local file too
    PrivateCheckpointIO(TorchCheckpointIO()).save_checkpoint({"RecDataModule": dm.state_dict()}, url)
    assert oct((tmp_path / "url.ckpt").stat().st_mode & 0o777) == "0o600"


class _OwnHooks(MF):
    """A user's model: a hyper-parameter named like a removal field, and its own checkpoint hook (no super() call)."""

    def __init__(self, num_users: int, num_items: int, items: int = 0, **kwargs):
        super().__init__(num_users, num_items, **kwargs)
        self.save_hyperparameters()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mine"] = 1


def test_a_checkpoint_saved_after_a_removal_is_private_whatever_the_model_does_with_its_hooks(tmp_path):
    dm = datamodule()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(_OwnHooks(dm.num_users, dm.num_items, items=3, embedding_dim=4), dm)
    trainer.save_checkpoint(tmp_path / "before.ckpt")
    dm.remove(torch.tensor([0, 1]))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    modes = {name: oct((tmp_path / f"{name}.ckpt").stat().st_mode & 0o777) for name in ("before", "after", "weights")}
    assert modes["after"] == modes["weights"] == "0o600" and modes["before"] != "0o600", modes


def test_a_strategy_that_saves_checkpoints_its_own_way_is_warned_not_wrapped():
    """FSDP, DeepSpeed, model parallel and XLA override save_checkpoint (e.g. meta.pt written with torch.save)."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    from lightning_unlearn.private_checkpoints import keep_checkpoints_private

    class OwnSave(SingleDeviceStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            torch.save(checkpoint, filepath)

    trainer = pl.Trainer(strategy=OwnSave(device=torch.device("cpu")), logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.warns(UserWarning, match="OwnSave writes its checkpoints with its own file mode"):
        keep_checkpoints_private(trainer)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_lightning_checkpoints_are_private_only_once_they_hold_deleted_rows(tmp_path):
    """A fit of untouched data writes checkpoints with the default mode; a refit of data with removals (no callback) privately."""
    old_mask = os.umask(0o022)
    try:
        for name, removed in (("plain", False), ("removed", True)):
            dm = datamodule()
            dm.setup()
            if removed:
                dm.remove(torch.tensor([0, 1]))
            trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                                 default_root_dir=tmp_path / name,
                                 callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)])
            trainer.fit(new_model(dm), dm)
            written = sorted((tmp_path / name).glob("*.ckpt"))
            assert len(written) == 2 and not list((tmp_path / name).glob(".*tmp")), written
            expected = "0o600" if removed else "0o644"
            assert all(oct(p.stat().st_mode & 0o777) == expected for p in written), (name, written)
            state = torch.load(written[0], weights_only=True)["RecDataModule"]
            assert len(state["train_keys"]) == (2 if removed else 0)
    finally:
        os.umask(old_mask)


# ----------------------------------------------------------------------------- 6. the smaller edges


def test_a_checkpoint_without_datamodule_state_is_refused(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    del state["datamodule_state"]
    torch.save(state, tmp_path / "bare.ckpt")
    dm = datamodule()
    with pytest.raises(MissingDataState, match="holds no RecDataModule state"):
        restore_checkpoint(tmp_path / "bare.ckpt", new_model(dm), dm)


def test_a_truncated_checkpoint_gets_a_clear_error(trained, tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(trained.read_bytes()[:300])
    dm = datamodule()
    with pytest.raises(CheckpointUnreadable, match="not a complete PyTorch checkpoint: another kind of file, or one that is truncated"):
        restore_checkpoint(tmp_path / "cut.ckpt", new_model(dm), dm)


def test_a_key_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while the key is written leaves no (empty) journal.key that every later command would refuse."""
    journal = journal_of(tmp_path)

    def crash(fd):
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", crash)
        with pytest.raises(OSError, match="I/O error"):
            journal.keyed("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    digest = journal.keyed("x")
    assert journal_of(tmp_path).keyed("x") == digest and not journal.write_key(b"\0" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.key"]
    assert (tmp_path / "journal.key").stat().st_mode & 0o777 == 0o600

    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # vfat, some FUSE and network mounts: the key is created exclusively
    other = journal_of(tmp_path / "vfat")
    assert len(other.keyed("x")) == 64 and not other.write_key(b"\0" * 32)
    assert sorted(p.name for p in (tmp_path / "vfat").iterdir()) == ["journal.key"]

    real_link, calls = os.link, []

    def tidied_away(source, target):  # another process's `recover` removed the first temporary file
        calls.append(source)
        if len(calls) == 1:
            os.unlink(source)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", source)
        real_link(source, target)

    monkeypatch.setattr(os, "link", tidied_away)
    raced = journal_of(tmp_path / "raced")
    assert raced.write_key(b"\1" * 32) and raced.key == b"\1" * 32
    assert len(calls) == 2 and calls[0] != calls[1]  # a second temporary file, linked whole: never an empty key
    assert sorted(p.name for p in (tmp_path / "raced").iterdir()) == ["journal.key"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_folder_that_cannot_be_written_is_a_clear_refusal(code, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("journal.lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(FolderLocked, match="cannot be opened for writing: a read-only folder"):
        with journal_of(tmp_path).lock():
            pass
    # a record folder that cannot be created (in a read-only model folder: unlearn's default --out)
    real_mkdir = os.mkdir

    def read_only_parent(path, *args):
        if Path(path).name == "unlearning":
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args)

    monkeypatch.setattr(os, "mkdir", read_only_parent)
    with pytest.raises(FolderLocked, match=rf"{tmp_path / 'unlearning'} cannot be locked for writing \(it cannot be created"):
        with journal_of(tmp_path / "unlearning").lock():
            pass


def test_a_note_after_a_torn_line_starts_a_line_of_its_own_and_an_unwritable_lock_is_an_oserror(tmp_path, monkeypatch):
    from lightning_unlearn.files import append_note, notes
    from lightning_unlearn.unlearning.journal import exclusive

    path = tmp_path / "notes.jsonl"
    path.write_text('{"model": "ab')  # a note torn by a crash mid-write
    append_note(path, {"a": 1})
    append_note(path, {"a": 1})
    assert notes(path) == [{"a": 1}]
    real_open = os.open

    def read_only(name, flags, *args):
        if str(name).endswith("one.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as raised:  # not FolderLocked: the caller decides what a lock it cannot take costs
        with exclusive(tmp_path / "one.lock", "testing"):
            pass
    assert not isinstance(raised.value, FolderLocked)


def test_a_recommendations_file_is_cleaned_as_one_of_its_notes_has_it_whatever_stopped_between(tmp_path, monkeypatch, capsys):
    """A file is noted just before its rename (which keeps its size and time): a cleaning killed between the two leaves
    the old file, which an earlier note has, and it is still cleaned later. A predict into the same path stopped before
    its write (from other data, say) neither gives that file to the other data nor makes a file another program writes
    there later cleanable; a file that cannot be read is said, not a traceback."""
    from lightning_unlearn import recommendations
    from lightning_unlearn.data import Synthetic

    dm = RecDataModule(Synthetic(num_users=12, num_items=10, seed=0))
    dm.setup()
    users, item = [str(u) for u in dm.train.user_ids[:5].tolist()], dm.train.item_ids[0]
    path = tmp_path / "top.csv"

    def rows(file=path):
        return [row.split(",")[0] for row in file.read_text().splitlines()[1:]]

    path.write_text("user,rank,item,score\n" + "".join(f"{user},1,{item},0.5\n" for user in users))
    assert recommendations.note_recommendations(path, dm)
    noted = recommendations.note_recommendations

    def noted_then_killed(*args, **kwargs):
        noted(*args, **kwargs)
        raise KeyboardInterrupt  # after the note of the new file, before its rename

    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([0]))
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(recommendations, "note_recommendations", noted_then_killed)
        recommendations.scrub_recommendations(dm)
    assert rows() == users and not list(tmp_path.glob(".top.csv.*"))  # the old file, as noted before; no temporary file
    other = RecDataModule(Synthetic(num_users=12, num_items=10, seed=1))  # a predict from other data, stopped before its write
    other.setup()
    assert recommendations.note_recommendations(path, other, writing=True)
    left = tmp_path / ".top.csv.k1.tmp"  # its temporary file: nobody holds the file's lock, so a leftover of a killed write
    left.write_text("")
    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([1]))
    assert recommendations.scrub_recommendations(dm) == [path.resolve()] and rows() == users[2:] and not left.exists()
    dated, latest = tmp_path / "top-1205.csv", tmp_path / "latest.csv"  # predict --out latest.csv, a link to a dated file
    dated.write_text("")
    latest.symlink_to(dated)
    files_module.write_whole(latest, path.read_text(), before_rename=lambda written: recommendations.note_recommendations(
        latest, dm, written=written))
    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([2]))
    assert latest.resolve() in recommendations.scrub_recommendations(dm) and rows(latest) == users[3:]
    mine = tmp_path / "report.csv"  # predict stopped before writing it; another program writes it later
    assert recommendations.note_recommendations(mine, dm, writing=True)
    mine.write_text("user,segment,score\n" + "".join(f"{user},z,3\n" for user in users))
    capsys.readouterr()
    assert recommendations.scrub_recommendations(dm) == [] and rows(mine) == users
    assert f"{mine.resolve()} (recommendations written by predict) was changed since by something else" in capsys.readouterr().err
    path.write_bytes(b"user,rank,item,score\n\xe9,1,1,0.5\n")  # not ours any more either: left alone
    assert recommendations.note_recommendations(path, dm)  # noted as ours, yet unreadable: said
    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([3]))
    assert path.resolve() not in recommendations.scrub_recommendations(dm)
    assert "cannot be read (UnicodeDecodeError)" in capsys.readouterr().err


def test_a_cleaning_waits_for_a_predict_writing_the_same_file_and_leaves_its_file_alone(tmp_path, capsys):
    """A predict from other data into a file noted for this data holds the file's lock until its file is renamed in and
    noted: a cleaning of the old file waits (it used to rename its cleaned copy over the new file), then finds the
    new file is the other data's and leaves it as it is, without calling it changed by something else."""
    import threading

    from lightning_unlearn import recommendations
    from lightning_unlearn.data import Synthetic

    dm, other = (RecDataModule(Synthetic(num_users=12, num_items=10, seed=seed)) for seed in (0, 1))
    dm.setup()
    other.setup()
    path = tmp_path / "top.csv"
    path.write_text("user,rank,item,score\n" + "".join(f"{user},1,{dm.train.item_ids[0]},0.5\n" for user in dm.train.user_ids[:5].tolist()))
    assert recommendations.note_recommendations(path, dm)
    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([0]))
    theirs = "user,rank,item,score\n7,1,3,0.9\n"
    found = []
    with recommendations.recommendations_file_lock(path):  # the other data's predict is writing
        assert recommendations.note_recommendations(path, other, writing=True)
        cleaning = threading.Thread(target=lambda: found.append(recommendations.scrub_recommendations(dm)))
        cleaning.start()
        cleaning.join(0.5)
        assert cleaning.is_alive()  # waits for the file
        files_module.write_whole(path, theirs, before_rename=lambda written: recommendations.note_recommendations(path, other,
                                                                                                                  written=written))
    cleaning.join(30)
    assert found == [[]] and path.read_text() == theirs
    assert "changed since by something else" not in capsys.readouterr().err


def test_a_full_disk_is_reported_as_such_and_nothing_is_applied(trained, tmp_path, monkeypatch):
    def full(fh, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module, "_write", full)
    model, dm, callback = session(trained, tmp_path / "out", A)
    with pytest.raises(OSError, match="No space left on the device to write .*apply the request again"):
        callback.apply_pending(model, dm)
    assert [e["status"] for e in journal_of(tmp_path / "out")] == ["pending", "failed"]
    assert not list((tmp_path / "out").glob("*.ckpt")) and not list((tmp_path / "out").glob(".*.tmp"))
    assert callback.pending == 1


def test_a_refused_request_can_be_dropped_and_the_queue_goes_on(trained, tmp_path):
    model, dm, callback = session(trained, tmp_path / "out", DeletionRequest(users=["no-such-user"]), B)
    with pytest.raises(InvalidDeletionRequest, match="unknown user id"):
        callback.apply_pending(model, dm)
    assert callback.pending == 2  # the refused request is not skipped silently
    dropped = callback.drop(0, reason="unknown user, asked the requester again")
    assert dropped.users == ("no-such-user",)
    callback.apply_pending(model, dm)
    assert [e["status"] for e in journal_of(tmp_path / "out")] == ["dropped", "pending", "applied"]
    assert "no-such-user" not in (tmp_path / "out" / "journal.jsonl").read_text()
    with pytest.raises(IndexError, match="the queue holds 0"):
        callback.drop()


def test_a_pair_an_earlier_request_deleted_is_satisfied_not_refused(trained, tmp_path):
    """A whole user, then one of their pairs: the second request is applied (it has nothing left to remove),
    not refused at apply time after check() accepted it, which left it stuck in the folder's latest state."""
    dm = datamodule()
    dm.setup()
    row = int(torch.nonzero(dm.train.users == 3).flatten()[0])
    pair, rows_of_3 = DeletionRequest(pairs=[(3, int(dm.train.items[row]))]), int((dm.train.users == 3).sum())
    model, dm, callback = session(trained, tmp_path / "out", A, pair)
    callback.check(dm)
    reports = callback.apply_pending(model, dm)
    assert callback.pending == 0 and [r.rows_removed for r in reports] == [rows_of_3, 0]
    assert [e["status"] for e in journal_of(tmp_path / "out")] == ["pending", "applied"] * 2
    model, dm, callback = session(journal_of(tmp_path / "out").last_checkpoint(), tmp_path / "out", pair)
    assert callback.apply_pending(model, dm) == []  # given again: recognised as applied
    never = next(i for i in range(dm.num_items) if not bool(((dm.train.users == 4) & (dm.train.items == i)).any())
                 and not bool(((dm.val.users == 4) & (dm.val.items == i)).any()) and not bool(((dm.test.users == 4) & (dm.test.items == i)).any()))
    with pytest.raises(InvalidDeletionRequest, match="not a row"):
        session(trained, tmp_path / "other", DeletionRequest(pairs=[(4, never)]))[2].check(dm)


def test_nan_parameters_before_unlearning_are_named_as_a_broken_model(trained, tmp_path):
    model, dm, callback = session(trained, tmp_path / "out", A)
    with torch.no_grad():
        model.user_embedding.weight[0, 0] = float("nan")
    with pytest.raises(UnlearningError, match="before unlearning .*the trained model itself is broken"):
        callback.apply_pending(model, dm)
    assert not (tmp_path / "out" / "journal.jsonl").exists()


class GivenSplit(DataSource):
    """Synthetic training rows, and a test split with one more item (99) that no training row has."""

    def load(self):
        base = datamodule()
        base.setup()
        users = [*base.train.users.tolist(), 0, 1]
        items = [*base.train.items.tolist(), 99, 99]
        data = Interactions.from_raw(users, items)
        test = torch.zeros(len(data), dtype=torch.bool)
        test[-2:] = True
        test[:5] = True
        return data.select(~test), data.select(test)


def test_an_item_only_in_the_test_split_leaves_the_model_alone(tmp_path):
    dm = RecDataModule(GivenSplit(), split="given", val_fraction=0.0, num_negatives=1, batch_size=32)
    model = new_model(dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(items=[99])], dirpath=tmp_path / "out")
    callback.apply_pending(model, dm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # FineTune did not run
    assert len(dm.test) == 5 and not (dm.test.items == dm.test.item_index(np.array([99]))).any()
    [_, applied] = journal_of(tmp_path / "out").entries()
    assert applied["method"] == "none (no training rows)" and applied["num_rows"] == 0


def test_pairs_outside_the_training_split_name_the_split(trained, tmp_path):
    dm = datamodule()
    dm.setup()
    user, item = int(dm.test.users[0]), int(dm.test.items[0])
    model, dm, callback = session(trained, tmp_path / "out", DeletionRequest(pairs=[(user, item)]))
    with pytest.raises(InvalidDeletionRequest, match=r"not a row of this table \(the training split\).*only in the test split"):
        callback.apply_pending(model, dm)
    # and a pair in no split beside it: not said to be only in the test split
    keys = set(torch.cat([dm.train.keys, dm.val.keys, dm.test.keys]).tolist())
    nowhere = next(i for i in range(dm.num_items) if user * dm.num_items + i not in keys)
    model, dm, callback = session(trained, tmp_path / "out2", DeletionRequest(pairs=[(user, item), (user, nowhere)]))
    with pytest.raises(InvalidDeletionRequest, match=r"\(1 of them only in the test split, the others in no split\)"):
        callback.apply_pending(model, dm)


# ----------------------------------------------------------------------------- the kill helper for the property test


def _killed(checkpoint: str, out: str, cwd: str, request: DeletionRequest, point: str) -> None:
    os.chdir(cwd)
    target = {"method": (FineTune, "update"), "write": (files_module, "_write"), "rename": (os, "replace"),
              "after_rename": (files_module, "fsync_directory")}[point]
    original = getattr(*target)

    def die(*args, **kwargs):
        if point == "after_rename":
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(*target, die)
    apply(Path(checkpoint), Path(out), request)
    os._exit(0)


def kill_midway(checkpoint: Path, out: Path, cwd: Path, request: DeletionRequest, point: str) -> None:
    child = FORK.Process(target=_killed, args=(str(checkpoint), str(out), str(cwd), request, point))
    child.start()
    assert joined(child, 120) == -signal.SIGKILL




# ----------------------------------------------------------------------------- the property


def pool() -> list[DeletionRequest]:
    dm = datamodule()
    dm.setup()
    row = int(torch.nonzero(dm.train.users == 8).flatten()[0])
    return [A, B, C, DeletionRequest(pairs=[(8, int(dm.train.items[row]))])]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.integers(0, 3)),
        st.tuples(st.just("kill"), st.integers(0, 3), st.sampled_from(["method", "write", "rename", "after_rename"])),
        st.tuples(st.just("cwd"), st.integers(0, 1)),
        st.tuples(st.just("corrupt"), st.integers(0, 2**20)),
    ),
    min_size=1, max_size=5,
)


@settings(max_examples=12, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_any_sequence_of_applies_kills_moves_and_corruption_embodies_exactly_the_accepted_requests(
    operations, trained, tmp_path_factory, monkeypatch,
):
    """Apply, kill at a random point then restart as documented (recover, resume from the latest
    state, give the request again), move to another working directory, or garble a middle byte of
    the journal (the next run must stop with JournalCorrupted and change nothing; the operator then
    restores the journal from a backup): the final model and data embody exactly the accepted requests."""
    requests = pool()
    base = tmp_path_factory.mktemp("sequence")
    monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", str(base / "machine"))  # each example's lines are its own (one trained model)
    homes = [base / "a", base / "b"]
    for home in homes:
        home.mkdir()
    monkeypatch.chdir(homes[0])
    folder = base / "unlearning"
    accepted: list[int] = []
    for operation in operations:
        out = Path(os.path.relpath(folder))  # relative to where the operator stands now
        if operation[0] == "cwd":
            monkeypatch.chdir(homes[operation[1]])
            continue
        if operation[0] == "corrupt":
            journal = folder / "journal.jsonl"
            if not journal.exists() or journal.read_bytes().count(b"\n") < 2:
                continue
            backup = journal.read_bytes()
            middle = backup[: backup.rindex(b"\n", 0, len(backup) - 1)]  # every line but the last
            at = operation[1] % len(middle)
            if middle[at:at + 1] == b"\n":
                at -= 1
            journal.write_bytes(backup[:at] + (b"#" if backup[at:at + 1] != b"#" else b"$") + backup[at + 1:])
            before = files(folder)
            with pytest.raises(JournalCorrupted):
                apply(recover(out) or trained, out, requests[0])
            assert files(folder) == before
            journal.write_bytes(backup)
            continue
        index = operation[1]
        if operation[0] == "kill" and index not in accepted:
            resume = journal_of(folder).last_checkpoint() if (folder / "journal.jsonl").exists() else None
            kill_midway(resume or trained, out, Path.cwd(), requests[index], operation[2])
        apply(recover(out) or trained, out, requests[index])
        if index not in accepted:
            accepted.append(index)

    journal = journal_of(folder)
    applied = [e for e in journal if e["status"] == "applied"]
    assert len(applied) == len(accepted) and len({e["digest"] for e in applied}) == len(accepted)  # each exactly once
    assert journal.interrupted() == []
    if not accepted:
        return
    final = torch.load(journal.last_checkpoint(), weights_only=True)
    model, dm, _ = apply(trained, base / "reference", *(requests[k] for k in accepted))
    assert all(torch.equal(final["state_dict"][k], v) for k, v in model.state_dict().items())
    expected = dm.state_dict()
    assert all(torch.equal(final["datamodule_state"][k], expected[k]) for k in ("train_keys", "users", "items"))


# ----------------------------------------------------------------------------- W&B files after a refusal


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script as a user runs it: its own process, W&B offline, the console as W&B would see it."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_CONSOLE", "WANDB_SERVICE")}  # a W&B service of its own
    return subprocess.run([sys.executable, "-m", "lightning_unlearn.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"})


def test_a_refused_request_leaves_its_ids_in_no_file_of_the_run(distinctive_slice, tmp_path):
    data_file, _ = distinctive_slice
    recipe = write_recipe(tmp_path / "forget.yaml", data_file, tmp_path / "runs")
    assert run_cli("fit", "-c", str(recipe), cwd=tmp_path).returncode == 0
    checkpoint = next((tmp_path / "ckpt").glob("best*.ckpt"))
    known, unknown = member(DELETED_USERS[0]), "member-0999-qx7z"
    (tmp_path / "requests.csv").write_text(f"user\n{known}\n{unknown}\n")
    refused = run_cli("unlearn", "-c", str(recipe), "--ckpt_path", str(checkpoint), "--requests", "requests.csv",
                      "--method", "FineTune", "--out", "unlearned", cwd=tmp_path)
    assert refused.returncode != 0 and unknown in refused.stderr  # the operator is told which id
    # The same request given to the callback of a training run: refused after W&B started logging.
    (tmp_path / "in_fit.yaml").write_text(recipe.read_text().replace(
        "  callbacks: [", "  callbacks: [{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: "
                         "{method: {class_path: lightning_unlearn.unlearning.FineTune}, requests_file: requests.csv, "
                         "dirpath: in_fit}},\n              "))
    refused = run_cli("fit", "-c", "in_fit.yaml", cwd=tmp_path)
    assert refused.returncode != 0 and unknown in refused.stderr
    # Ids inline in the config would be copied into config.yaml and W&B's config: refused before any run starts.
    (tmp_path / "inline.yaml").write_text((tmp_path / "in_fit.yaml").read_text().replace(
        "requests_file: requests.csv", f"requests: [{{users: ['{known}']}}]"))
    refused = run_cli("fit", "-c", "inline.yaml", cwd=tmp_path)
    assert refused.returncode != 0 and "cannot be given in a config" in refused.stderr and known not in refused.stderr
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*"))) == 2  # the fit, and the refused fit: not unlearn
    settled(tmp_path, until=lambda: True)  # W&B's service may write on after the command exits
    inputs = {tmp_path / "requests.csv", tmp_path / "inline.yaml", data_file}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in inputs]
    assert any(p.suffix == ".wandb" for p in written)
    leaks = [str(p) for p in written for needle in (known, unknown) if needle.encode() in p.read_bytes()]
    assert not leaks


def test_a_training_run_into_a_folder_that_moved_on_stops_before_its_first_step(tmp_path):
    steps = []

    class Count(pl.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    def fit(request: DeletionRequest | None, folder: str = "unlearning") -> pl.Trainer:
        dm = datamodule()
        pl.seed_everything(0, verbose=False)
        callback = UnlearningCallback(FineTune(epochs=1), requests=[request] if request else [], dirpath=tmp_path / folder)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback, Count()])
        trainer.fit(new_model(dm), dm)
        return trainer

    fit(A)
    trained_steps = len(steps)
    with pytest.raises(StaleCheckpoint, match="a model no deletion was applied to"):
        fit(B)
    with pytest.raises(StaleCheckpoint, match="a model no deletion was applied to"):
        fit(None)  # nothing pending: still refused, its training data holds the rows A deleted
    with pytest.raises(InvalidDeletionRequest, match="unknown user id"):
        fit(DeletionRequest(users=["no-such-user"]), folder="fresh")
    assert len(steps) == trained_steps  # neither refused run trained a step
    assert [e["status"] for e in journal_of(tmp_path / "unlearning")] == ["pending", "applied"]
