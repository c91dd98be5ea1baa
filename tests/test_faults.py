"""Fault injection: an exception or a SIGKILL in the middle of an unlearning request.

A session loads a checkpoint the way ``lightning-unlearn unlearn`` does, queues three requests
and applies them. Faults are injected at every stage of a request (inside the method, in the
evaluation, in the retrain policy's bookkeeping, while the checkpoint is written, just before
and just after its rename, while the journal is written). After the fault, :func:`recover`
tidies the folder and names the checkpoint to resume from; a fresh session resumes from it. The end state must equal an uninterrupted
run bit for bit (every accepted request applied exactly once), every checkpoint must load with
``weights_only=True``, no partial file may remain, and the journal must tell what happened.

Killed sessions run in a forked child that SIGKILLs itself at the injected point, so no
``finally`` or ``except`` of the library runs: what is on disk is what a real crash leaves.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn import files as files_module
from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.data.datamodule import DataFingerprintMismatch
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning import record as record_module
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.journal import Journal
from lightning_unlearn.unlearning.methods import FineTune, UnlearningError
from lightning_unlearn.unlearning.policy import RetrainPolicy
from lightning_unlearn.unlearning.record import StaleCheckpoint, recover, restore_checkpoint, save_checkpoint
from lightning_unlearn.unlearning.request import DeletionRequest
from tests.conftest import joined

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork a child process")

FORK = multiprocessing.get_context("fork")


def datamodule(seed: int = 0) -> RecDataModule:
    return RecDataModule(Synthetic(num_users=20, num_items=16, density=0.5, seed=seed), num_negatives=1, batch_size=32, seed=0)


def requests(dm: RecDataModule) -> list[DeletionRequest]:
    """Three requests of three kinds (raw ids are indices for synthetic data)."""
    dm.setup()
    rows = torch.nonzero(dm.train.users == 3).flatten()[:2]
    pairs = [(int(dm.train.users[r]), int(dm.train.items[r])) for r in rows]
    return [DeletionRequest(users=[1]), DeletionRequest(pairs=pairs), DeletionRequest(items=[2])]


def new_model(dm: RecDataModule) -> MF:
    return MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The 'trained' model's checkpoint (initialised from a seed: training adds nothing here)."""
    path = tmp_path_factory.mktemp("trained") / "trained.ckpt"
    dm = datamodule()
    dm.setup()
    pl.seed_everything(0, verbose=False)
    save_checkpoint(path, new_model(dm), dm, UnlearningCallback(FineTune()))
    return path


def session(checkpoint: Path, out: Path):
    """Load ``checkpoint`` as ``unlearn`` does and apply the three requests into ``out``."""
    torch.set_num_threads(1)
    dm = datamodule()
    model = new_model(dm)
    state = restore_checkpoint(str(checkpoint), model, dm)
    callback = UnlearningCallback(FineTune(epochs=1, batch_size=16), requests=requests(datamodule()), dirpath=out, seed=0)
    if state.get("unlearning"):
        callback.load_state_dict(state["unlearning"])
    return model, dm, callback


def run_session(checkpoint: Path, out: Path):
    model, dm, callback = session(checkpoint, out)
    callback.apply_pending(model, dm)
    return model, dm, callback


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """The uninterrupted run: final weights, splits and journal."""
    out = tmp_path_factory.mktemp("reference")
    model, dm, _ = run_session(trained, out)
    return {k: v.clone() for k, v in model.state_dict().items()}, splits(dm), out


def splits(dm: RecDataModule) -> tuple:
    return tuple(t.keys.clone() for t in (dm.train, dm.val, dm.test)) + (dm.train_negatives.clone(),)


# ----------------------------------------------------------------------------- fault points


class Injected(Exception):
    """The injected failure."""


def die(how: str):
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "interrupt":
        raise KeyboardInterrupt
    raise Injected("injected failure")


def on_call(target, name: str, how: str, at: int, mp: pytest.MonkeyPatch, before=None, after=None):
    """Patch ``target.name`` so that its ``at``-th call (1-based) fails: ``before`` it runs
    (``before(*args)`` may do part of its work first) or ``after`` it ran."""
    original = getattr(target, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at and after is None:
            if before is not None:
                before(*args, **kwargs)
            die(how)
        result = original(*args, **kwargs)
        if calls["n"] == at and after is not None:
            die(how)
        return result

    mp.setattr(target, name, patched)


def torn_write(fh, data):
    """The checkpoint write that gets half of the bytes on disk, then stops."""
    fh.write(data[: len(data) // 2])
    fh.flush()


def torn_journal_line(wanted: str, how: str, request: int, mp: pytest.MonkeyPatch):
    """``Journal.append`` that writes half of the ``wanted`` status line of request ``request``, then stops."""
    original = Journal.append

    def patched(self, digest, status, **fields):
        if status == wanted and fields.get("request") == request:
            line = json.dumps({"seq": len(self.entries()), "digest": digest, "status": status, **fields}, sort_keys=True) + "\n"
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line[: len(line) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            die(how)
        return original(self, digest, status, **fields)

    mp.setattr(Journal, "append", patched)


def inject(fault: str, how: str, request: int, mp: pytest.MonkeyPatch) -> None:
    """Make request ``request`` (0-based) fail at ``fault``."""
    at = request + 1  # every patched function runs once per request
    if fault == "method":  # after the method changed the parameters, before it returns
        def scribble(self, model, *args, **kwargs):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)
        on_call(FineTune, "update", how, at, mp, before=scribble)
    elif fault == "evaluate":
        on_call(UnlearningCallback, "_utility", how, at, mp)
    elif fault == "policy":  # the retrain policy's bookkeeping, after the method and the evaluation
        on_call(RetrainPolicy, "served", how, at, mp)
    elif fault == "checkpoint_write":
        on_call(files_module, "_write", how, at, mp, before=torn_write)
    elif fault == "before_rename":
        on_call(os, "replace", how, at, mp)
    elif fault == "after_rename":
        on_call(files_module, "fsync_directory", how, at, mp)
    elif fault == "journal_pending":
        torn_journal_line("pending", how, request, mp)
    elif fault == "journal_applied":
        torn_journal_line("applied", how, request, mp)
    else:
        raise AssertionError(fault)


def killed_session(checkpoint: Path, out: Path, fault: str, request: int) -> int:
    """Run a session in a forked child that SIGKILLs itself at ``fault``; its exit code."""

    def child():
        with pytest.MonkeyPatch.context() as mp:
            inject(fault, "kill", request, mp)
            run_session(checkpoint, out)
        os._exit(0)  # not reached when the fault fires

    process = FORK.Process(target=child)
    process.start()
    return joined(process, 120)


# ----------------------------------------------------------------------------- checks


def journal_trace(out: Path) -> list[tuple[int, str]]:
    return [(e["request"], e["status"] + ("*" if e.get("recovered") else "")) for e in Journal(out / "journal.jsonl")]


def assert_finished_like_reference(model, dm, out: Path, reference) -> None:
    weights, expected_splits, reference_out = reference
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(torch.equal(a, b) for a, b in zip(splits(dm), expected_splits))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    journal = Journal(out / "journal.jsonl")
    assert journal.interrupted() == []
    final = {e["request"]: e["status"] for e in journal}
    assert final == {0: "applied", 1: "applied", 2: "applied"}
    # Each request keeps one digest through every entry; digests are keyed per folder, so they differ from the reference's.
    digests = {(e["request"], e["digest"]) for e in journal}
    assert sorted(r for r, _ in digests) == [0, 1, 2]
    assert not {d for _, d in digests} & {e["digest"] for e in Journal(reference_out / "journal.jsonl")}
    # Every checkpoint on disk loads safely; the last one holds the final model and all three requests.
    for path in out.glob("*.ckpt"):
        torch.load(path, weights_only=True)
    last = journal.last_checkpoint()
    assert last is not None and last.name.startswith("unlearned-0002-")
    state = torch.load(last, weights_only=True)
    assert all(torch.equal(state["state_dict"][k], v) for k, v in weights.items())
    assert state["datamodule_state"]["fingerprint"] == dm.data_fingerprint
    assert len(state["unlearning"]["applied"]) == 3 and state["unlearning"]["pending"] == []
    reloaded = MF.load_from_checkpoint(last, weights_only=True)
    assert torch.equal(reloaded.user_embedding.weight, weights["user_embedding.weight"])


FAULTS = ["method", "evaluate", "policy", "checkpoint_write", "before_rename", "after_rename", "journal_pending", "journal_applied"]

# What the journal says, as (request, status) with * for entries written by recover(), after
# a kill in request 1 and a restart from the checkpoint recover() names.
TRACE_AFTER_KILL = {
    # Nothing of request 1 reached a checkpoint: closed as failed, applied again on restart.
    "method": [(0, "pending"), (0, "applied"), (1, "pending"), (1, "failed*"), (1, "pending"), (1, "applied"),
               (2, "pending"), (2, "applied")],
    # The checkpoint of request 1 was renamed into place: it holds the request, so it counts as applied.
    "after_rename": [(0, "pending"), (0, "applied"), (1, "pending"), (1, "applied*"), (2, "pending"), (2, "applied")],
    # The pending line is torn (unreadable): request 1 never started as far as the journal knows.
    "journal_pending": [(0, "pending"), (0, "applied"), (1, "pending"), (1, "applied"), (2, "pending"), (2, "applied")],
}
TRACE_AFTER_KILL["evaluate"] = TRACE_AFTER_KILL["policy"] = TRACE_AFTER_KILL["checkpoint_write"] = TRACE_AFTER_KILL["before_rename"] = TRACE_AFTER_KILL["method"]
TRACE_AFTER_KILL["journal_applied"] = TRACE_AFTER_KILL["after_rename"]  # its applied line is torn; the checkpoint exists


@pytest.mark.parametrize("fault", FAULTS)
def test_kill_mid_request_then_restart_applies_every_request_exactly_once(fault, trained, reference, tmp_path):
    out = tmp_path / "unlearning"
    assert killed_session(trained, out, fault, request=1) == -signal.SIGKILL
    resume_from = recover(out)
    assert not list(out.glob(".*.tmp")), "recover() leaves no partial checkpoint"
    expected_resume = "unlearned-0001-" if fault in ("after_rename", "journal_applied") else "unlearned-0000-"
    assert resume_from is not None and resume_from.name.startswith(expected_resume)
    model, dm, callback = run_session(resume_from, out)
    assert callback.pending == 0
    assert_finished_like_reference(model, dm, out, reference)
    assert journal_trace(out) == TRACE_AFTER_KILL[fault]
    torn = [line for line in (out / "journal.jsonl").read_text().splitlines() if not _parses(line)]
    assert torn == []  # a torn last line is cut off by the next append: the chain stays whole


def test_kill_in_the_first_request_resumes_from_the_trained_checkpoint(trained, reference, tmp_path):
    out = tmp_path / "unlearning"
    assert killed_session(trained, out, "checkpoint_write", request=0) == -signal.SIGKILL
    assert list(out.glob(".unlearned-0000-*.tmp")), "the kill left a partial temp file (and no .ckpt)"
    assert not list(out.glob("*.ckpt"))
    assert recover(out) is None  # nothing applied: resume from the trained model
    model, dm, _ = run_session(trained, out)
    assert_finished_like_reference(model, dm, out, reference)
    assert journal_trace(out)[:3] == [(0, "pending"), (0, "failed*"), (0, "pending")]


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


@pytest.mark.parametrize("how", ["raise", "interrupt"])
@pytest.mark.parametrize("fault", ["method", "evaluate", "policy", "checkpoint_write", "before_rename", "after_rename"])
def test_an_exception_mid_request_restores_everything_and_a_retry_applies_it_once(fault, how, trained, reference, tmp_path):
    out = tmp_path / "unlearning"
    model, dm, callback = session(trained, out)
    with pytest.MonkeyPatch.context() as mp:
        inject(fault, how, 1, mp)
        with pytest.raises((Injected, UnlearningError, KeyboardInterrupt)):
            callback.apply_pending(model, dm)
        after_first = torch.load(next(out.glob("unlearned-0000-*.ckpt")), weights_only=True)
    # Model, data and queue are as they were after request 0; the journal says why request 1 failed.
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_first["state_dict"][name]), name
    fresh = datamodule()
    fresh.load_state_dict(after_first["datamodule_state"])
    fresh.setup()
    assert all(torch.equal(a, b) for a, b in zip(splits(dm), splits(fresh)))
    assert callback.pending == 2 and len(callback.reports) == 1
    assert journal_trace(out)[-2:] == [(1, "pending"), (1, "failed")]
    reason = list(Journal(out / "journal.jsonl"))[-1]["reason"]
    assert reason and (reason == "interrupted") == (how == "interrupt")  # not `str(KeyboardInterrupt())`, which is ""
    assert not list(out.glob(".*.tmp")) and not list(out.glob("unlearned-0001-*"))
    # The same callback retries: request 1 and 2 are applied once each.
    callback.apply_pending(model, dm)
    assert_finished_like_reference(model, dm, out, reference)
    assert journal_trace(out) == [(0, "pending"), (0, "applied"), (1, "pending"), (1, "failed"), (1, "pending"),
                                  (1, "applied"), (2, "pending"), (2, "applied")]


def test_an_exception_after_the_checkpoint_keeps_the_request_applied(trained, reference, tmp_path):
    """Journalling ``applied`` fails after the checkpoint is on disk: the request stays applied, and
    the next call closes the journal entry from the checkpoint instead of applying it again."""
    out = tmp_path / "unlearning"
    model, dm, callback = session(trained, out)
    with pytest.MonkeyPatch.context() as mp:
        inject("journal_applied", "raise", 1, mp)
        with pytest.raises(Injected):
            callback.apply_pending(model, dm)
    assert callback.pending == 1 and len(callback.reports) == 2
    callback.apply_pending(model, dm)
    assert_finished_like_reference(model, dm, out, reference)
    assert journal_trace(out) == [(0, "pending"), (0, "applied"), (1, "pending"), (1, "applied*"), (2, "pending"),
                                  (2, "applied")]


def test_a_failed_attempt_leaves_a_checkpoint_it_did_not_write_alone(trained, tmp_path, monkeypatch):
    """Only a checkpoint the attempt wrote is removed when it fails: a file already at its name stays as it was.

    The folder check refuses such a file before any attempt (the journal does not name it); past it
    (here switched off), the attempt's rollback still leaves the file alone.
    """
    out = tmp_path / "unlearning"
    model, dm, callback = session(trained, out)
    digest = callback.check(dm)[0]["digest"]
    squatter = out / f"unlearned-0000-{digest[:12]}.ckpt"
    squatter.write_bytes(b"not this attempt's")
    with pytest.raises(StaleCheckpoint, match=f"does not name \\({squatter.name}\\)"):
        callback.apply_pending(model, dm)
    assert squatter.read_bytes() == b"not this attempt's" and journal_trace(out) == []
    monkeypatch.setattr(record_module, "refuse_unnamed_checkpoints", lambda journal: None)
    with pytest.raises(FileExistsError):
        callback.apply_pending(model, dm)
    assert squatter.read_bytes() == b"not this attempt's"
    assert callback.pending == 3 and journal_trace(out) == [(0, "pending"), (0, "failed")]


def test_the_same_requests_again_are_not_applied_twice(trained, reference, tmp_path):
    out = tmp_path / "unlearning"
    run_session(trained, out)
    model, dm, callback = run_session(Journal(out / "journal.jsonl").last_checkpoint(), out)
    assert callback.reports == []
    assert_finished_like_reference(model, dm, out, reference)
    assert len(journal_trace(out)) == 6


# ----------------------------------------------------------------------------- the journal itself


def test_journal_cuts_off_a_torn_last_line_and_keeps_the_chain(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("aa", "pending", request=0)
    with open(journal.path, "a", encoding="utf-8") as fh:
        fh.write('{"digest": "aa", "seq": 1, "status": "appl')  # a crash mid-write
    assert [e["status"] for e in journal] == ["pending"]  # the torn line was never acknowledged
    journal.append("aa", "failed", request=0, reason="x", pending_seq=0)
    journal.append("bb", "pending", request=1)
    assert [(e["seq"], e["digest"], e["status"]) for e in journal] == [(0, "aa", "pending"), (1, "aa", "failed"), (2, "bb", "pending")]
    assert journal.status() == {"aa": "failed", "bb": "pending"}
    assert [e["digest"] for e in journal.interrupted()] == ["bb"]
    assert len(journal.path.read_text().splitlines()) == 3


def test_a_whole_last_entry_without_its_newline_is_kept(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("aa", "pending", request=0)
    journal.append("aa", "applied", request=0, pending_seq=0)
    journal.path.write_bytes(journal.path.read_bytes()[:-1])
    assert [e["status"] for e in journal] == ["pending", "applied"]
    journal.append("bb", "pending", request=1)
    assert [e["seq"] for e in journal] == [0, 1, 2]


def test_recover_closes_interrupted_entries_by_what_is_on_disk(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    (tmp_path / ".unlearned-0001-bbbb.ckpt.x1y2.tmp").write_bytes(b"half a checkpoint")
    pending = journal.append("aaaa", "pending", request=0, checkpoint=str(tmp_path / "unlearned-0000-aaaa.ckpt"))
    lineage = {"journal": journal.id, "seq": pending["seq"], "entry": pending["hash"]}  # the attempt's, renamed into place
    torch.save({"state_dict": {}, "unlearning": {"lineage": lineage}}, tmp_path / "unlearned-0000-aaaa.ckpt")
    journal.append("bbbb", "pending", request=1, checkpoint=str(tmp_path / "unlearned-0001-bbbb.ckpt"))
    assert recover(tmp_path) == tmp_path / "unlearned-0000-aaaa.ckpt"
    assert journal.status() == {"aaaa": "applied", "bbbb": "failed"}
    assert [(e.get("recovered"), e.get("pending_seq")) for e in journal] == [(None, None), (None, None), (True, 0), (True, 1)]
    assert "interrupted" in list(journal)[-1]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl", "journal.lock", "unlearned-0000-aaaa.ckpt"]
    assert recover(tmp_path) == tmp_path / "unlearned-0000-aaaa.ckpt" and len(list(journal)) == 4  # idempotent


# ----------------------------------------------------------------------------- loading checkpoints


def test_unlearn_refuses_a_checkpoint_of_other_data_before_changing_anything(trained, tmp_path):
    other = datamodule(seed=5)
    model = new_model(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = torch.load(trained, weights_only=True)["datamodule_state"]["fingerprint"]
    with pytest.raises(DataFingerprintMismatch) as err:
        restore_checkpoint(str(trained), model, other)
    message = str(err.value)
    assert saved in message and other.data_fingerprint in message and "same data and datamodule settings" in message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert other.state_dict()["train_keys"].numel() == 0


def test_lightning_checkpoints_carry_the_fingerprint_and_refuse_other_data_on_resume(tmp_path):
    dm = datamodule()
    pl.seed_everything(0, verbose=False)
    model = new_model(dm)
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[4])], dirpath=tmp_path / "u", seed=0)
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], **kwargs)
    trainer.fit(model, dm)
    path = tmp_path / "lightning.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)  # plain values only
    assert state["RecDataModule"]["fingerprint"] == dm.data_fingerprint
    assert state["callbacks"]["UnlearningCallback"]["applied"]
    # Resuming with the same data re-applies the removals; with other data it is refused.
    same = datamodule()
    pl.Trainer(max_epochs=2, **kwargs).fit(new_model(same), same, ckpt_path=path, weights_only=True)
    assert not (same.train.users == 4).any()
    other = datamodule(seed=7)
    with pytest.raises(DataFingerprintMismatch, match=dm.data_fingerprint):
        pl.Trainer(max_epochs=2, **kwargs).fit(new_model(other), other, ckpt_path=path, weights_only=True)


def test_a_writer_whose_lock_file_was_removed_writes_nothing_more_and_no_request_is_closed_twice(tmp_path):
    """The lock file of a running process removed by hand (as a stale lock): another process locks a new one, recovers the
    first one's live request as interrupted and goes on; the first one must then not journal its request as applied on
    top (its state would become the latest without what the other deleted) (review 35a #2)."""
    from lightning_unlearn.unlearning.journal import LOCK_FILE, FolderLocked, JournalCorrupted

    first = Journal(tmp_path / "journal.jsonl")
    with first.lock():
        pending = first.append("ab12", "pending")
        os.remove(tmp_path / LOCK_FILE)
        second = multiprocessing.get_context("spawn").Process(target=_close_as_interrupted, args=(str(tmp_path),))
        second.start()
        second.join(60)
        assert second.exitcode == 0
        with pytest.raises(FolderLocked, match="was removed or replaced while this process held it"):
            first.append("ab12", "applied", pending_seq=pending["seq"])
    assert [e["status"] for e in first.entries()] == ["pending", "failed"]
    with pytest.raises(JournalCorrupted, match="request entry 0 was closed already"):  # the lock held again: still refused
        first.append("ab12", "applied", pending_seq=pending["seq"])
    assert [e["status"] for e in first.entries()] == ["pending", "failed"]


def _close_as_interrupted(folder: str) -> None:
    """Another process: it takes the (new) lock and closes the live request, as its recovery does."""
    journal = Journal(Path(folder) / "journal.jsonl")
    journal.append("ab12", "failed", pending_seq=0, reason="interrupted")


def test_a_second_thread_of_the_process_is_refused_the_folder_lock_as_another_process_is(tmp_path):
    """The lock is re-entrant for the thread that holds it only: a service applying requests in two threads would let the
    second recover the first's live request as interrupted (review 36a D7)."""
    import threading

    from lightning_unlearn.unlearning.journal import FolderLocked

    journal, outcome = Journal(tmp_path / "journal.jsonl"), []

    def other_thread():
        try:
            with journal.lock():
                outcome.append("locked")
        except FolderLocked as err:
            outcome.append(str(err))

    with journal.lock():
        with journal.lock():  # the same thread: re-entrant
            journal.append("ab12", "pending")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(30)
    assert len(outcome) == 1 and "is locked by process" in outcome[0]
    other_thread()  # released: taken
    assert outcome[-1] == "locked"
