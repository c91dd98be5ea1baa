"""UnlearningCallback inside Trainer.fit: applies requests, journals, restores on failure, resumes."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF, LightGCN
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.journal import JournalCorrupted
from lightning_unlearn.unlearning.methods import FineTune, Retrain, Unlearner, UnlearningError
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.record import StaleCheckpoint, adopt_key, journal_of, key_id, recover, restore_checkpoint
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest

EPOCHS = 3


def datamodule() -> RecDataModule:
    return RecDataModule(Synthetic(num_users=40, num_items=30, density=0.25, seed=1), batch_size=64, num_negatives=2, seed=0)


def trained(cls=MF, callbacks=()):
    """A model fitted with a plain Trainer, the callback(s) attached."""
    pl.seed_everything(0, verbose=False)
    dm = datamodule()
    model = cls(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, callbacks=list(callbacks),
    )
    trainer.fit(model, dm)
    return model, dm, trainer


def first_pair(dm: RecDataModule) -> tuple[int, int]:
    """Raw ids of the first training row."""
    return int(dm.train.user_ids[dm.train.users[0]]), int(dm.train.item_ids[dm.train.items[0]])


def journal(path) -> list[dict]:
    return [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]


class Explodes(Unlearner):
    """A method that corrupts the model and then fails, to test the restore path."""

    hint = "nothing, this is a test"

    def update(self, model, retained, deleted, context):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        return {}


def test_applies_requests_at_train_end(tmp_path):
    dm = datamodule()
    dm.setup()
    request = DeletionRequest(pairs=[first_pair(dm)], users=[5])
    callback = UnlearningCallback(FineTune(epochs=1), requests=[request], dirpath=tmp_path)
    model, dm, _ = trained(callbacks=[callback])
    assert callback.pending == 0 and len(callback.reports) == 1
    removed = callback.reports[0].rows_removed
    assert removed == 1 + int((datamodule_after_setup().train.users == 5).sum())
    assert not (dm.train.users == 5).any() and not (dm.test.users == 5).any() and not (dm.val.users == 5).any()
    entries = journal(tmp_path)
    assert [e["status"] for e in entries] == ["pending", "applied"]
    assert entries[1]["num_rows"] == removed and entries[1]["method"] == "FineTune(epochs=1)"
    checkpoint = torch.load(tmp_path / entries[1]["checkpoint"], weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)
    reloaded = MF.load_from_checkpoint(tmp_path / entries[1]["checkpoint"])
    assert torch.equal(reloaded.user_embedding.weight, model.user_embedding.weight)
    assert not list(tmp_path.glob("*.tmp"))


def datamodule_after_setup() -> RecDataModule:
    dm = datamodule()
    dm.setup()
    return dm


def test_graph_models_get_the_new_graph(tmp_path):
    dm = datamodule_after_setup()
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[2])], dirpath=tmp_path)
    model, dm, _ = trained(LightGCN, callbacks=[callback])
    user_block = model.adjacency.to_dense()[2]
    assert not user_block.any()  # user 2 has no edges left


def test_a_graph_model_resumed_or_evaluated_from_a_checkpoint_with_removals_gets_the_graph_without_them(tmp_path):
    """Lightning restores the datamodule's state after the model's setup built its graph from the data as loaded: the
    removals it restores reach the graph, so a resumed fit (or a validation) does not propagate through deleted rows."""
    model, dm, trainer = trained(LightGCN)
    dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([2]))  # as a callback deleting at an epoch's end leaves it
    model.set_graph(dm.train)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    seen = []

    class Graph(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(pl_module.adjacency.to_dense())

        on_validation_start = on_train_start

    for run in ("fit", "validate"):
        resumed_dm = datamodule()
        resumed = LightGCN(resumed_dm.num_users, resumed_dm.num_items, embedding_dim=8)
        runner = pl.Trainer(max_epochs=EPOCHS + 1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[Graph()])
        getattr(runner, run)(resumed, resumed_dm, ckpt_path=tmp_path / "last.ckpt")
        assert not seen[-1][2].any() and torch.equal(seen[-1], model.adjacency.to_dense())  # user 2 has no edges


def test_bad_request_changes_nothing(tmp_path):
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=["no-such-user"])], dirpath=tmp_path)
    with pytest.raises(InvalidDeletionRequest, match="no-such-user"):
        trained(callbacks=[callback])
    assert not (tmp_path / "journal.jsonl").exists()


def test_failure_restores_model_and_data_and_journals(tmp_path):
    model, dm, _ = trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows_before = len(dm.train)
    callback = UnlearningCallback(Explodes(), requests=[DeletionRequest(users=[5])], dirpath=tmp_path)
    with pytest.raises(UnlearningError, match="restored: non-finite.*Try: nothing, this is a test"):
        callback.apply_pending(model, dm)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert len(dm.train) == rows_before and (dm.train.users == 5).any()
    assert [e["status"] for e in journal(tmp_path)] == ["pending", "failed"]
    assert "non-finite" in journal(tmp_path)[1]["reason"]


def test_requests_queued_during_training_are_applied_between_epochs(tmp_path):
    callback = UnlearningCallback(FineTune(epochs=1), when="epoch_end", dirpath=tmp_path)

    class QueueAtEpoch1(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                callback.request(DeletionRequest(users=[7]))

    class RecordBatches(pl.Callback):
        users_per_epoch: dict[int, set] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.users_per_epoch.setdefault(trainer.current_epoch, set()).update(batch["users"].tolist())

    record = RecordBatches()
    _, dm, _ = trained(callbacks=[QueueAtEpoch1(), callback, record])
    assert len(callback.reports) == 1 and not (dm.train.users == 7).any()
    assert 7 in record.users_per_epoch[1] and 7 not in record.users_per_epoch[2]  # the loader serves the retained rows


def test_no_request_is_applied_twice(tmp_path):
    same = DeletionRequest(users=[4])
    callback = UnlearningCallback(FineTune(epochs=1), requests=[same, DeletionRequest(users=[4])], dirpath=tmp_path)
    trained(callbacks=[callback])
    assert len(callback.reports) == 1


def test_resume_after_crash_between_pending_and_applied(tmp_path):
    """A crash mid-request (journal says pending) is retried from the last checkpoint exactly once."""
    model, dm, _ = trained()
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6]), DeletionRequest(users=[8])], dirpath=tmp_path)
    callback.apply_pending(model, dm)  # request 0 and 1 applied, checkpoints written
    first_ckpt = tmp_path / journal(tmp_path)[1]["checkpoint"]

    # A second session restores from the checkpoint written after request 0, with request 1
    # still pending in its state; it crashes mid-way through request 1, then restarts again.
    state = torch.load(first_ckpt, weights_only=True)
    [pending] = state["unlearning"]["pending"]  # stored as indices into the id maps, never raw ids
    assert pending["pairs"].shape == (0, 2) and pending["users"].tolist() == [8] and pending["items"].tolist() == []

    def restore():
        fresh_dm = datamodule()
        fresh_dm.load_state_dict(state["datamodule_state"])
        fresh_dm.setup()
        fresh_model = MF.load_from_checkpoint(first_ckpt)
        adopt_key(tmp_path, tmp_path / "second")  # the branch recognises what the checkpoint applied
        resumed = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "second", branch=True)
        resumed.load_state_dict(state["unlearning"])
        return fresh_model, fresh_dm, resumed

    fresh_model, fresh_dm, resumed = restore()
    assert (fresh_dm.train.users == 8).any() and not (fresh_dm.train.users == 6).any()

    class Crash(Exception):
        pass

    original_update = FineTune.update

    def crash(*args, **kwargs):
        raise Crash("killed")

    FineTune.update = crash
    try:
        with pytest.raises(UnlearningError):
            resumed.apply_pending(fresh_model, fresh_dm)
    finally:
        FineTune.update = original_update
    assert resumed.pending == 1  # still queued after the crash

    fresh_model, fresh_dm, resumed = restore()
    reports = resumed.apply_pending(fresh_model, fresh_dm)
    assert len(reports) == 1 and resumed.pending == 0
    assert not (fresh_dm.train.users == 8).any()
    statuses = [e["status"] for e in journal(tmp_path / "second")]
    assert statuses == ["pending", "failed", "pending", "applied"]
    # The final state matches the first session's after both requests.
    assert torch.equal(fresh_dm.train.keys, dm.train.keys)


def test_a_branch_without_the_key_of_its_checkpoints_folder_is_refused_until_it_adopts_it(tmp_path):
    """The applied fingerprints a checkpoint carries are keyed with its folder's key: a branch
    folder with another key (or none) would not recognise a request given again and would journal
    it a second time. It is refused, naming ``adopt_key``; with the key adopted it is recognised."""
    model, dm, _ = trained()
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6])], dirpath=tmp_path / "first").apply_pending(model, dm)
    checkpoint = tmp_path / "first" / journal(tmp_path / "first")[-1]["checkpoint"]
    state = torch.load(checkpoint, weights_only=True)
    assert state["unlearning"]["key_id"] == key_id(journal_of(tmp_path / "first"))

    def branch(folder: str) -> tuple[UnlearningCallback, MF, RecDataModule]:
        fresh_dm = datamodule()
        fresh_dm.load_state_dict(state["datamodule_state"])
        callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6])], dirpath=tmp_path / folder, branch=True)
        callback.load_state_dict(state["unlearning"])
        return callback, MF.load_from_checkpoint(checkpoint), fresh_dm

    callback, fresh_model, fresh_dm = branch("keyless")
    with pytest.raises(StaleCheckpoint, match="adopt_key"):
        callback.apply_pending(fresh_model, fresh_dm)
    idle = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "keyless", branch=True)
    idle.load_state_dict(state["unlearning"])
    with pytest.raises(StaleCheckpoint, match="adopt_key"):  # nothing queued yet (on_fit_start's check): refused before a key is made
        idle.check(fresh_dm)
    assert not (tmp_path / "keyless" / "journal.key").exists()
    journal_of(tmp_path / "other").key  # a folder with a key of its own
    callback, fresh_model, fresh_dm = branch("other")
    with pytest.raises(StaleCheckpoint, match="another key"):
        callback.apply_pending(fresh_model, fresh_dm)
    assert not (tmp_path / "keyless" / "journal.jsonl").exists() and not (tmp_path / "other" / "journal.jsonl").exists()
    assert adopt_key(tmp_path / "first", tmp_path / "adopted")
    assert not adopt_key(tmp_path / "first", tmp_path / "other")  # a key of its own (checkpoints of a fit may name it): kept
    callback, fresh_model, fresh_dm = branch("adopted")
    assert callback.apply_pending(fresh_model, fresh_dm) == [] and callback.pending == 0  # recognised: not applied again
    assert not (tmp_path / "adopted" / "journal.jsonl").exists()


def test_a_state_that_did_not_record_its_key_is_not_stamped_with_this_folders(tmp_path):
    """Fingerprints restored from a state written before ``key_id`` were never checked against this folder's key."""
    model, dm, _ = trained()
    first = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6])], dirpath=tmp_path)
    first.apply_pending(model, dm)
    assert first.state_dict()["key_id"] == key_id(journal_of(tmp_path))
    legacy = {k: v for k, v in first.state_dict().items() if k != "key_id"}
    resumed = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path)
    resumed.load_state_dict(legacy)
    assert resumed.state_dict()["key_id"] is None


def test_retrain_equals_a_fresh_fit_on_the_retained_rows(tmp_path):
    """Retrain = same seed, same initialisation, same negatives, same recipe: bit for bit on CPU."""
    recipe = FitRecipe(max_epochs=EPOCHS, monitor=None)
    model, dm, _ = trained()
    callback = UnlearningCallback(Retrain(), requests=[DeletionRequest(users=[3])], dirpath=tmp_path, seed=0)
    callback.apply_pending(model, dm, recipe=recipe, seed=0)

    expected_dm = datamodule()
    expected_dm.setup()
    expected_dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([3]))
    pl.seed_everything(0, verbose=False)
    expected = MF(expected_dm.num_users, expected_dm.num_items, embedding_dim=8, lr=0.05)
    pl.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, deterministic=True).fit(expected, expected_dm)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_state_dict_round_trip_keeps_pending_requests_as_indices(tmp_path):
    dm = datamodule_after_setup()
    user, item = first_pair(dm)
    callback = UnlearningCallback(FineTune(), requests=[DeletionRequest(pairs=[(user, item)], users=[2], items=["7"])])
    assert callback.state_dict()["pending"] == [] and callback.state_dict()["unstored_pending"] == 1  # no data yet
    callback.check(dm)
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values and tensors only
    [pending] = state["pending"]
    assert pending["pairs"].tolist() == [[user, item]] and pending["users"].tolist() == [2] and pending["items"].tolist() == [7]
    other = UnlearningCallback(FineTune())
    other.load_state_dict(state)
    other.check(dm)
    assert other.pending == 1 and other._queue[0].canonical(dm.train) == callback._queue[0].canonical(dm.train)


@pytest.mark.parametrize("skipped", ["resumed at max_epochs", "limit_train_batches=0", "max_steps=0"])
def test_requests_are_applied_when_the_fit_skips_its_training_loop(skipped, tmp_path):
    """Lightning calls no train end when it skips the loop: the fit's end applies what is queued, and no request waits unseen."""
    pl.seed_everything(0, verbose=False)
    dm = datamodule()
    model = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.Trainer(max_epochs=1, callbacks=[saver], **quiet).fit(model, dm)
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path / "unlearning",
                                  evaluate=False)
    limits, resume = {"resumed at max_epochs": ({}, saver.last_model_path), "limit_train_batches=0": ({"limit_train_batches": 0}, None),
                      "max_steps=0": ({"max_steps": 0}, None)}[skipped]
    pl.Trainer(max_epochs=1, callbacks=[callback], enable_checkpointing=False, **limits, **quiet).fit(model, dm, ckpt_path=resume)
    assert len(callback.reports) == 1 and callback.pending == 0
    assert 5 not in dm.train.user_ids[dm.train.users].tolist()
    assert [e["status"] for e in journal(tmp_path / "unlearning")] == ["pending", "applied"]
    assert model.device.type == "cpu"  # where a fit leaves it


def test_a_retrain_at_the_end_of_a_fit_that_trains_nothing_is_refused_not_journaled_as_applied(tmp_path):
    model, dm, _ = trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = UnlearningCallback(Retrain(), requests=[DeletionRequest(users=[5])], dirpath=tmp_path / "unlearning", evaluate=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=0, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UnlearningError, match="trains nothing"):
        trainer.fit(model, dm)
    assert [e["status"] for e in journal(tmp_path / "unlearning")] == ["pending", "failed"] and callback.pending == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_trainer_given_an_unlearned_checkpoint_refuses_it_before_loading_its_weights(tmp_path):
    """Lightning would load its weights but not its removals: the deleted rows would be trained on again."""
    model, dm, _ = trained()
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path / "unlearning",
                                  evaluate=False)
    callback.apply_pending(model, dm)
    unlearned = tmp_path / "unlearning" / journal(tmp_path / "unlearning")[-1]["checkpoint"]
    fresh_dm = datamodule()
    fresh = MF(fresh_dm.num_users, fresh_dm.num_items, embedding_dim=8, lr=0.05)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"Trainer.fit\(ckpt_path=...\) was given an unlearned checkpoint.*restore_checkpoint"):
        trainer.fit(fresh, fresh_dm, ckpt_path=unlearned)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(MF.load_from_checkpoint(unlearned).user_embedding.weight, model.user_embedding.weight)  # no Trainer: read


def test_check_reads_a_requests_file_that_setup_could_not(tmp_path):
    """The refusal inside a W&B-logged fit points to check(): it must show the file's error, not return nothing."""
    bad = tmp_path / "requests.csv"
    bad.write_text("user,item\n873,258,1\n")
    callback = UnlearningCallback(FineTune(), requests_file=bad)
    with pytest.raises(InvalidDeletionRequest, match="requests.csv.*line 2"):
        callback.check(datamodule_after_setup())
    bad.write_text("user\n5\n")  # mended: read at the next check
    assert callback.check(datamodule_after_setup())[0]["num_users"] == 1 and callback.pending == 1


def test_a_record_whose_key_is_gone_is_refused_naming_the_key_not_made_anew(tmp_path):
    """A new key would not recognise the recorded requests: each path that reads the key says to restore it."""
    model, dm, _ = trained()
    folder = tmp_path / "unlearning"
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=folder, evaluate=False).apply_pending(model, dm)
    (folder / "journal.key").unlink()
    for attempt in (lambda: UnlearningCallback(FineTune(), requests=[DeletionRequest(users=[6])], dirpath=folder).check(dm),
                    lambda: adopt_key(folder, tmp_path / "branch"), lambda: journal_of(folder).key):
        with pytest.raises(JournalCorrupted, match="journal.key is gone.*Restore journal.key from a backup"):
            attempt()
    assert not (folder / "journal.key").exists() and not (tmp_path / "branch" / "journal.key").exists()
    journal_of(tmp_path / "other").key  # noqa: B018 - a record with its key: not copied into the keyless one
    with pytest.raises(JournalCorrupted, match="journal.key is gone"):
        adopt_key(tmp_path / "other", folder)
    assert not (folder / "journal.key").exists()


def test_a_request_queued_with_missing_ignore_keeps_it_in_the_state(tmp_path):
    """A checkpoint holding a request queued with missing="ignore" (a fit's) is applied from by a callback whose own is "error"."""
    dm = datamodule_after_setup()
    user, item = first_pair(dm)
    seen = set(dm.train.items[dm.train.users == dm.train.users[0]].tolist())
    unseen = int(dm.train.item_ids[next(i for i in range(dm.num_items) if i not in seen)])
    request = DeletionRequest(pairs=[(user, item), (user, unseen)])
    queued = UnlearningCallback(FineTune(), requests=[request], missing="ignore")
    assert queued.check(dm)[0]["num_ignored"] == 1
    state = queued.state_dict()
    later = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "unlearning")
    later.load_state_dict(state)
    assert later.check(dm)[0]["num_ignored"] == 1  # not refused for the pair it was queued to ignore
    (report,) = later.apply_pending(MF(dm.num_users, dm.num_items, embedding_dim=4), dm)
    assert report.rows_removed == 1
    with pytest.raises(InvalidDeletionRequest, match="missing='ignore'"):  # given anew, the callback's own choice holds
        UnlearningCallback(FineTune(), requests=[request]).check(dm)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "FineTune"}, TypeError, "Unlearner"),
        ({"when": "validation_end"}, ValueError, "when"),
        ({"missing": "skip"}, ValueError, "missing"),
        ({"requests": DeletionRequest(users=[3])}, TypeError, "takes a list of DeletionRequest, got a DeletionRequest"),
        ({"requests": ["requests.csv"]}, TypeError, "got a list of str; a requests file goes to requests_file"),
        ({"requests": "requests.csv"}, TypeError, "got a str"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        UnlearningCallback(**{"method": FineTune(), **kwargs})


def test_drop_with_a_folder_needs_the_data_to_journal_it(tmp_path):
    callback = UnlearningCallback(FineTune(), requests=[DeletionRequest(users=[3])], dirpath=tmp_path / "unlearning")
    with pytest.raises(RuntimeError, match=r"has no data yet: call callback.check\(datamodule\) first"):
        callback.drop()
    assert callback.pending == 1 and not (tmp_path / "unlearning" / "journal.jsonl").exists()
    callback.check(datamodule_after_setup())
    callback.drop(reason="asked again")
    assert [e["status"] for e in journal(tmp_path / "unlearning")] == ["dropped"]
    assert UnlearningCallback(FineTune(), requests=[DeletionRequest(users=[3])]).drop().users == (3,)  # no folder: nothing to journal


def test_retrain_without_a_fit_is_refused_naming_what_it_needs():
    dm = datamodule_after_setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    rows = dm.train_rows()
    gone = torch.zeros(len(rows), dtype=torch.bool)
    gone[0] = True
    with pytest.raises(ValueError, match=r"needs context.fit.*UnlearningContext\(fit="):
        Retrain().unlearn(model, rows.select(~gone), rows.select(gone))


def test_refuses_models_and_datamodules_outside_the_contract(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[UnlearningCallback(FineTune(), dirpath=tmp_path)])
    with pytest.raises(TypeError, match="Recommender"):
        trainer.fit(Plain(), loader)


class RecordingLogger(pl.loggers.Logger):
    """Keeps what it is given, to check what leaves the callback."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[dict, int]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((dict(metrics), step))


def test_logs_counts_timings_and_utility_never_raw_ids(tmp_path):
    model, dm, _ = trained()
    # Distinctive raw ids: the synthetic users are 0..39, so delete by user 37 and pairs of user 29.
    pairs = [(29, int(dm.train.item_ids[i])) for i in dm.train.items[dm.train.users == 29][:2]]
    logger = RecordingLogger()
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[37]), DeletionRequest(pairs=pairs)],
                                  dirpath=tmp_path)
    callback.apply_pending(model, dm, loggers=[logger])
    assert [record["unlearn/request"] for record, _ in logger.records] == [0, 1]
    metrics = logger.records[1][0]
    assert metrics["unlearn/rows_removed"] == 2 and metrics["unlearn/seconds"] > 0
    assert {"unlearn/val/recall@20", "unlearn/test/ndcg@20", "unlearn/diag/epochs"} <= set(metrics)
    for record, _ in logger.records:
        assert all(isinstance(v, (int, float)) for v in record.values())
        assert not any(str(raw) in key for key in record for raw in (29, 37))
    allowed = {"time", "digest", "status", "kind", "method", "request", "num_rows", "num_pairs", "num_users", "num_items",
               "num_ignored", "seconds", "total_seconds", "checkpoint", "drift", "policy", "seq", "prev", "hash", "pending_seq", "model"}
    for entry in journal(tmp_path):
        assert set(entry) <= allowed, set(entry) - allowed


def test_refuses_sharded_strategies():
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from lightning_unlearn.unlearning.callback import check_environment

    dm = datamodule()
    fake_trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), callbacks=[])
    with pytest.raises(RuntimeError, match="FSDPStrategy.*single device or DDP"):
        check_environment(fake_trainer, MF(dm.num_users, dm.num_items), dm)


def test_the_default_seed_is_the_one_seed_everything_set_before_the_requests_are_applied(tmp_path, monkeypatch):
    """seed=None reads PL_GLOBAL_SEED when the requests are applied, not when the callback is built."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")  # (restored after the test, with what seed_everything sets below)
    seeds = []

    class RecordingRetrain(Retrain):
        def update(self, model, retained, deleted, context):
            seeds.append(context.seed)
            return super().update(model, retained, deleted, context)

    dm = datamodule()
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    callback = UnlearningCallback(RecordingRetrain(), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    fixed = UnlearningCallback(Retrain(), seed=3)
    assert callback.seed == 0
    pl.seed_everything(7, verbose=False)
    (report,) = callback.apply_pending(model, dm, recipe=FitRecipe(max_epochs=1, monitor=None))
    assert report.method == "Retrain" and seeds == [7] and callback.seed == 7 and fixed.seed == 3


def test_a_request_queued_after_the_callbacks_train_end_is_applied_when_the_fit_ends(tmp_path):
    """A callback after this one (the user's intake) may queue a request in its own on_train_end: it is applied, not left."""
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False)

    class Intake(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            callback.request(DeletionRequest(users=[6]))

    _, dm, _ = trained(callbacks=[callback, Intake()])
    assert callback.pending == 0 and len(callback.reports) == 1 and not (dm.train.users == 6).any()
    assert [e["status"] for e in journal(tmp_path)] == ["pending", "applied"]


def test_the_optimizers_start_afresh_after_a_request_so_training_on_does_not_carry_the_deleted_rows_back(tmp_path):
    """Adam's moments hold the deleted user's gradients: without a reset its row keeps moving in the epochs after its
    deletion, although no batch holds it any more (no L2 term either: the penalty is on the batch's rows)."""
    callback = UnlearningCallback(FineTune(epochs=1), when="epoch_end", dirpath=tmp_path, evaluate=False)
    rows: dict[int, torch.Tensor] = {}

    class Queue(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                callback.request(DeletionRequest(users=[7]))

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # after the UnlearningCallback's: the row as each epoch left it
            rows[trainer.current_epoch] = pl_module.user_embedding.weight[7].detach().clone()

    trained(callbacks=[Queue(), callback, Watch()])
    assert len(callback.reports) == 1 and len(rows) == EPOCHS
    assert torch.equal(rows[0], rows[EPOCHS - 1])  # reset at epoch 0's end, then untouched


def test_finetune_of_a_request_that_leaves_no_training_row_resets_what_it_touched(tmp_path):
    model, dm, _ = trained()
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=list(range(dm.num_users)))],
                                  dirpath=tmp_path, evaluate=False)
    report, = callback.apply_pending(model, dm)
    assert len(dm.train) == 0 and report.diagnostics["steps"] == 0 and report.diagnostics["loss_per_epoch"] == []
    assert report.diagnostics["reset_users"] == dm.num_users and torch.isfinite(model.user_embedding.weight).all()


def test_a_folder_under_the_home_directory_is_expanded_as_model_checkpoint_expands_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert UnlearningCallback(FineTune(), dirpath="~/forget").dirpath == tmp_path / "forget"


def test_a_datamodule_without_the_removals_the_model_embodies_is_refused_until_restored_with_it(tmp_path):
    """The callback that applied a request, given a datamodule built afresh: its deleted rows would be trained on again."""
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    model, _, _ = trained(callbacks=[callback])
    fresh = datamodule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_epochs=EPOCHS + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    with pytest.raises(StaleCheckpoint, match=r"does not hold the deletions the model embodies.*restore_checkpoint"):
        trainer.fit(model, fresh)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    callback.request(DeletionRequest(users=[6]))
    with pytest.raises(StaleCheckpoint, match="does not hold the deletions"):
        callback.apply_pending(model, fresh)
    assert (fresh.train.users == 6).any() and [e["status"] for e in journal(tmp_path)] == ["pending", "applied"]
    state = restore_checkpoint(tmp_path / journal(tmp_path)[-1]["checkpoint"], model, fresh)  # model and data together
    callback.load_state_dict(state["unlearning"])
    callback.request(DeletionRequest(users=[6]))
    callback.apply_pending(model, fresh)
    assert not (fresh.train.users == 5).any() and not (fresh.train.users == 6).any()


def fit_saving_checkpoints(folder, users, weights_only=False):
    """A two-epoch fit whose callback (in ``folder/unlearning``) deletes ``users`` at its train end, saving every epoch's
    checkpoint in ``folder/checkpoints``: ``(trainer, model, datamodule, callback)``."""
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=users)], dirpath=folder / "unlearning",
                                  evaluate=False)
    saved = pl.callbacks.ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=-1, save_weights_only=weights_only)
    pl.seed_everything(0, verbose=False)
    dm = datamodule()
    model = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, saved])
    trainer.fit(model, dm)
    return trainer, model, dm, callback


@pytest.mark.parametrize("saved_at", ["last epoch", "first epoch"])
@pytest.mark.parametrize("weights_only", [False, True])
@pytest.mark.parametrize("command", ["test", "validate", "fit"])
def test_a_checkpoint_saved_before_the_latest_deletion_is_refused_before_its_weights_are_loaded(command, weights_only, saved_at,
                                                                                                 tmp_path):
    """ckpt_path="best" after a fit whose request was applied at its train end: the file predates the deletion. With
    the callback's state, its lineage says so; with the weights only, they are those the request was applied to (the last
    epoch's, or those of an earlier checkpoint of the fit, journaled with the request)."""
    trainer, model, dm, callback = fit_saving_checkpoints(tmp_path, [5], weights_only)
    older = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1 if saved_at == "last epoch" else 0]
    assert len(callback.reports) == 1
    before, lineage = {k: v.clone() for k, v in model.state_dict().items()}, callback.state_dict()["lineage"]
    if command == "fit":
        trainer.fit_loop.max_epochs = 3
    said = "already holds 1 applied request" if not weights_only else "are those request entry 0"  # applied to, or saved before it
    with pytest.raises(StaleCheckpoint, match=said):
        getattr(trainer, command)(model, dm, ckpt_path=older)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # refused before the weights were loaded
    assert callback.state_dict()["lineage"] == lineage
    if command != "fit":  # the model as it is now, on the same trainer: the refused checkpoint is not kept for its next call
        assert getattr(trainer, command)(model, dm)


def test_weights_from_before_a_deletion_loaded_by_hand_are_refused_not_unlearned_further(tmp_path):
    """The callback's lineage is the latest state, but the model holds the weights its first request was applied to."""
    model, dm, _ = trained()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    callback.apply_pending(model, dm)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(old)
    callback.request(DeletionRequest(users=[6]))
    with pytest.raises(StaleCheckpoint, match=r"are those request entry 0 .* an older state.*restore_checkpoint"):
        callback.apply_pending(model, dm)
    assert len(journal(tmp_path)) == 2 and callback.pending == 1 and (dm.train.users == 6).any()
    fit = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[callback])
    with pytest.raises(StaleCheckpoint, match="are those request entry 0"):  # nor trained on: refused before the first step
        fit.fit(model, dm)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in old.items())
    model.load_state_dict(after)  # the latest state: applied
    callback.apply_pending(model, dm)
    assert [e["status"] for e in journal(tmp_path)] == ["pending", "applied"] * 2


def test_a_branch_needs_its_parents_removals_and_goes_on_request_after_request(tmp_path):
    """A branch from the first folder's state, its key adopted: a datamodule without the parent's removals is refused
    (it would train on user 6 again), and once its first request is applied the branch is an ordinary folder."""
    model, dm, _ = trained()
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6])], dirpath=tmp_path / "first",
                       evaluate=False).apply_pending(model, dm)
    checkpoint = tmp_path / "first" / journal(tmp_path / "first")[-1]["checkpoint"]
    assert adopt_key(tmp_path / "first", tmp_path / "branch")
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[7])], dirpath=tmp_path / "branch",
                                  branch=True, evaluate=False)
    callback.load_state_dict(torch.load(checkpoint, weights_only=True)["unlearning"])
    fresh_model, fresh_dm = MF.load_from_checkpoint(checkpoint), datamodule()
    with pytest.raises(StaleCheckpoint, match="does not hold the deletions the model embodies"):
        callback.apply_pending(fresh_model, fresh_dm)
    restore_checkpoint(checkpoint, fresh_model, fresh_dm)
    callback.apply_pending(fresh_model, fresh_dm)
    callback.request(DeletionRequest(users=[8]))
    callback.apply_pending(fresh_model, fresh_dm)  # its second request: the branch was started by the first
    assert [e["status"] for e in journal(tmp_path / "branch")] == ["pending", "applied"] * 2
    assert not any((fresh_dm.train.users == user).any() for user in (6, 7, 8))


def test_weights_from_before_a_request_recovered_after_a_crash_are_refused_too(tmp_path):
    """A process killed after the checkpoint was written, before `applied`: recovery closes the request as applied, and
    the parameters it was applied to are still an older state (the recovered entry names the checkpoint's, not those)."""
    model, dm, _ = trained()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    callback.apply_pending(model, dm)
    lines = (tmp_path / "journal.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "journal.jsonl").write_text("".join(lines[:-1]))  # killed before its `applied` line
    recover(tmp_path)
    assert journal(tmp_path)[-1]["status"] == "applied" and journal(tmp_path)[-1]["recovered"]
    model.load_state_dict(old)
    callback.request(DeletionRequest(users=[6]))
    with pytest.raises(StaleCheckpoint, match="are those request entry 0"):
        callback.apply_pending(model, dm)


def test_evaluating_with_the_callback_attached_makes_no_key_in_its_folder(tmp_path):
    """A key made by `test` in a folder a record was moved from would stand for a record there (empty)."""
    model, dm, _ = trained()
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "unlearning")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.validate(model, dm)
    trainer.test(model, dm)
    assert not (tmp_path / "unlearning").exists()


def test_only_a_data_state_with_fewer_of_the_records_removals_and_none_other_is_older(tmp_path):
    """A checkpoint's data state that lacks some of the record's removals, and removed nothing else, was saved before a
    request; one that removed something the record did not is another line of deletions, theirs to evaluate."""
    from lightning_unlearn.unlearning.callback import _refuse_older_data

    model, dm, _ = trained()
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False).apply_pending(model, dm)
    record = journal_of(tmp_path)

    def state(*users):
        other = datamodule_after_setup()
        index = [list(other.train.user_ids).index(user) for user in users]
        if index:
            other.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor(index))
        return other.state_dict()

    with pytest.raises(StaleCheckpoint, match="still holds some of what they deleted"):
        _refuse_older_data(record, state())  # trained before the request
    for later_or_other in (state(5), state(5, 6), state(6)):
        _refuse_older_data(record, later_or_other)


def test_a_checkpoint_naming_its_record_by_an_old_path_is_still_known_by_its_data(tmp_path):
    """After the project moved, a checkpoint's callback state names the record where it was: its data state still tells
    that it was saved before the request."""
    trainer, model, dm, callback = fit_saving_checkpoints(tmp_path, [5])
    checkpoint = torch.load(sorted((tmp_path / "checkpoints").glob("*.ckpt"))[0], weights_only=False)
    checkpoint["callbacks"][callback.state_key]["record"] = str(tmp_path / "where-it-was" / "unlearning")
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    with pytest.raises(StaleCheckpoint, match="still holds some of what they deleted"):
        trainer.test(model, dm, ckpt_path=tmp_path / "moved.ckpt")


def test_a_checkpoint_of_another_record_is_theirs_and_one_a_record_cannot_check_is_refused(tmp_path):
    """Record B's checkpoint, after its own request, evaluated with A's callback attached: not an older state of A. And
    with A's latest state gone, a weights-only checkpoint cannot be checked: refused, not let through."""
    fit_saving_checkpoints(tmp_path / "B", [5])
    b_after = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "B" / "unlearning")],
                         default_root_dir=tmp_path / "B")
    trainer, model, dm, _ = fit_saving_checkpoints(tmp_path / "A", [5, 6], weights_only=True)
    b_model, b_dm = MF(dm.num_users, dm.num_items, embedding_dim=8), datamodule()
    state = restore_checkpoint(tmp_path / "B" / "unlearning" / journal(tmp_path / "B" / "unlearning")[-1]["checkpoint"], b_model, b_dm)
    b_after.callbacks[0].load_state_dict(state["unlearning"])
    b_after.fit(b_model, b_dm)  # B goes on training: its last.ckpt names B's lineage, its data B's removals
    theirs = b_after.checkpoint_callback.best_model_path or next((tmp_path / "B").rglob("*.ckpt"))
    assert trainer.test(model, dm, ckpt_path=theirs)
    older = torch.load(sorted((tmp_path / "A" / "checkpoints").glob("*.ckpt"))[0], weights_only=False)
    older["state_dict"]["user_embedding.weight"] += 0.01  # parameters no request knows: only its data can tell
    torch.save(older, tmp_path / "older.ckpt")
    older = tmp_path / "older.ckpt"
    latest = tmp_path / "A" / "unlearning" / journal(tmp_path / "A" / "unlearning")[-1]["checkpoint"]
    latest.rename(tmp_path / "away.ckpt")
    with pytest.raises(StaleCheckpoint, match="its latest state does not read"):
        trainer.test(model, dm, ckpt_path=older)


def test_a_full_checkpoint_is_noted_also_for_a_model_whose_on_save_checkpoint_does_not_call_recommenders(tmp_path, monkeypatch):
    monkeypatch.setattr(MF, "on_save_checkpoint", lambda self, checkpoint: None)  # a user's override without super()
    fit_saving_checkpoints(tmp_path, [5])
    assert len(journal(tmp_path / "unlearning")[0]["saved"]) == 2  # the weights it started from and epoch 0's; epoch 1's is the weights it was applied to


@pytest.mark.parametrize("weights_only", [False, True])
def test_weights_of_a_checkpoint_saved_before_a_request_loaded_by_hand_are_refused(weights_only, tmp_path):
    """Not only the weights the request was applied to (the last epoch's): every checkpoint the fit saved before it is an
    older state (weights-only ones too: Lightning calls only the model's hook for them), and the pending entry names
    their parameters (digests, never ids)."""
    _, model, dm, callback = fit_saving_checkpoints(tmp_path, [5], weights_only)
    first = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[0]
    pending = journal(tmp_path / "unlearning")[0]
    assert pending["status"] == "pending" and len(pending["saved"]) == 2 and pending["model"] not in pending["saved"]
    model.load_state_dict(torch.load(first, weights_only=False)["state_dict"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with pytest.raises(StaleCheckpoint, match="are those request entry 0 .* an older state"):
        trainer.fit(model, dm)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("averaging", [c for c in ("StochasticWeightAveraging", "EMAWeightAveraging") if hasattr(pl.callbacks, c)])
def test_a_callback_that_writes_averaged_weights_into_the_model_is_refused_before_training(averaging, tmp_path):
    """At its train end it writes into the model an average of weights taken before the deletion: the deleted rows are back."""
    kwargs = {"swa_lrs": 0.05} if averaging == "StochasticWeightAveraging" else {}
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    with pytest.raises(RuntimeError, match=f"cannot run beside {averaging}: .* brings the deleted rows back"):
        trained(callbacks=[callback, getattr(pl.callbacks, averaging)(**kwargs)])
    assert not (tmp_path / "journal.jsonl").exists()


@pytest.mark.parametrize("command", ["test", "validate"])
def test_evaluating_the_model_in_memory_on_a_datamodule_without_its_removals_is_refused(command, tmp_path):
    """A datamodule built afresh beside the callback that applied a request: the deleted user's held-out rows would be scored."""
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False)
    model, dm, _ = trained(callbacks=[callback])
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with pytest.raises(StaleCheckpoint, match="does not hold the deletions the model embodies"):
        getattr(trainer, command)(model, datamodule(), verbose=False)
    assert getattr(trainer, command)(model, dm, verbose=False)  # the data the request was applied to
    beside = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False)  # a new one (a new process): no lineage
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[beside])
    with pytest.raises(StaleCheckpoint, match="the data of the datamodule still holds some of what they deleted"):
        getattr(trainer, command)(model, datamodule(), verbose=False)
    assert getattr(trainer, command)(model, dm, verbose=False)


@pytest.mark.parametrize("first, resumed_from", [("with the callback", "last"), ("with the callback", "epoch=1"),
                                                  ("without the callback", "epoch=1")])
def test_checkpoints_saved_by_an_earlier_fit_with_the_callback_are_known_to_the_fit_resumed_from_them(first, resumed_from, tmp_path):
    """A first fit saves epoch=0, epoch=1 and last.ckpt; a fit resumed from one of them (a new process: a new callback, its
    state restored if it has one) applies a request: the checkpoints the first fit's callback saw, and the one the resumed
    fit started from (whose own state was taken before the callback noted it), are older states of the record too."""
    def fit(callback, epochs, ckpt_path=None):
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="{epoch}", save_top_k=-1, save_last=True)
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*callback, saver])
        trainer.fit(model, dm, ckpt_path=ckpt_path)

    pl.seed_everything(0, verbose=False)
    dm = datamodule()
    model = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    fit([UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path / "unlearning", evaluate=False)] if first == "with the callback" else [], 2)
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path / "unlearning",
                                  evaluate=False)
    fit([callback], 3, ckpt_path=tmp_path / "checkpoints" / f"{resumed_from}.ckpt")
    assert len(callback.reports) == 1
    for older in ("epoch=0", "epoch=1") if first == "with the callback" else ("epoch=1",):
        model.load_state_dict(torch.load(tmp_path / "checkpoints" / f"{older}.ckpt", weights_only=False)["state_dict"])
        callback.request(DeletionRequest(users=[6]))
        with pytest.raises(StaleCheckpoint, match="are those request entry 0 .* an older state"):
            callback.apply_pending(model, dm)
        callback._queue.clear()



def test_a_second_line_from_one_trained_model_given_in_python_is_refused_as_unlearn_refuses_it(tmp_path):
    """Two lines of deletions from the same trained weights, each given in Python (``apply_pending``, or a fit of the
    weights loaded by hand): the second must delete again all the first deleted, as ``unlearn`` asks of a second line from
    one checkpoint, or be a branch; otherwise it is refused before anything changes, the fit before its first step."""
    from lightning_unlearn.unlearning.record import lines_of, machine_lines_folder

    def noted_from(folder: str) -> set[str]:
        return {line["model"] for line in lines_of(machine_lines_folder()) if line["record"] == str((tmp_path / folder).resolve())}

    model, dm, trainer = trained()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trained_checkpoint = tmp_path / "trained.ckpt"  # what a ModelCheckpoint of that fit would have written
    trainer.save_checkpoint(trained_checkpoint)
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path / "first",
                       evaluate=False).apply_pending(model, dm)

    def loaded(users, folder, **options):
        again, again_dm = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05), datamodule()
        again.load_state_dict(weights)  # by hand: no checkpoint names the weights, their digest does
        return again, again_dm, UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=users)] if users else [],
                                                   dirpath=tmp_path / folder, evaluate=False, **options)

    again, again_dm, second = loaded([6], "second")
    with pytest.raises(StaleCheckpoint, match=r"the model given is an older state of the deletion record .*first.*"
                                              r"restore_checkpoint\('.*unlearned-0000"):
        second.apply_pending(again, again_dm)
    assert torch.equal(again.user_embedding.weight, weights["user_embedding.weight"]) and (again_dm.train.users == 5).any()
    fit = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[second])
    with pytest.raises(StaleCheckpoint, match="training on from it would learn their rows again"):
        fit.fit(again, again_dm)
    assert torch.equal(again.user_embedding.weight, weights["user_embedding.weight"]) and not (tmp_path / "second" / "journal.jsonl").exists()
    with pytest.raises(StaleCheckpoint, match="an older state of the deletion record .*first"):  # a Trainer given the checkpoint
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[loaded([], "idle")[2]]).fit(MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05), datamodule(),
                                                           ckpt_path=trained_checkpoint)
    again, again_dm, third = loaded([5, 6], "third")  # all the first deleted, and more: the fit trains on, then applies
    pl.Trainer(max_epochs=EPOCHS + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[third]).fit(again, again_dm)
    given, applied_to = journal(tmp_path / "first")[0]["model"], journal(tmp_path / "third")[0]["model"]
    assert given != applied_to  # trained on before its request
    # noted from the weights it was given and from those the request was applied to: a copy of either finds it
    assert noted_from("third") == {given, applied_to}
    again, again_dm, branch = loaded([7], "branch", branch=True)  # a new line on purpose
    branch.apply_pending(again, again_dm)
    assert (again_dm.train.users == 5).any() and not (again_dm.train.users == 7).any()
    # weights a fit initialised itself are no trained model's: its line is noted from those its request was applied to only,
    # and a line from the same initialisation loaded by hand (a saved one, for a fair comparison) does not hold it back
    def from_seed_1(users, folder, load=False, epochs=1):
        pl.seed_everything(1, verbose=False)  # (seed 0 would train the very weights the lines above started from)
        fresh = MF(dm.num_users, dm.num_items, embedding_dim=8)
        if load:
            fresh.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()})
        pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=users)], dirpath=tmp_path / folder,
                                                 evaluate=False)]).fit(fresh, datamodule())

    from_seed_1([9], "init_loaded", load=True)
    from_seed_1([8], "fresh", epochs=2)  # (one epoch would train the very weights the line above was applied to)
    assert noted_from("fresh") == {journal(tmp_path / "fresh")[0]["model"]}


def test_the_latest_state_restored_without_its_callback_state_is_refused_naming_what_to_restore(tmp_path):
    """The model and data restored from the latest state, the callback's state not: refused (the callback cannot tell it
    from the trained model), and the message says to restore the callback's state as well (review 35b D4)."""
    model, dm, _ = trained()
    UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[5])], dirpath=tmp_path, evaluate=False).apply_pending(model, dm)
    latest = journal_of(tmp_path).last_checkpoint()
    again, again_dm = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05), datamodule()
    restore_checkpoint(latest, again, again_dm)
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[6])], dirpath=tmp_path, evaluate=False)
    with pytest.raises(StaleCheckpoint, match=rf"restore_checkpoint\('{latest}', model, datamodule\)`, then `callback.load_state_dict"):
        callback.apply_pending(again, again_dm)
    callback.load_state_dict(torch.load(latest, weights_only=True)["unlearning"])
    callback.request(DeletionRequest(users=[6]))
    callback.apply_pending(again, again_dm)
    assert [e["status"] for e in journal(tmp_path)] == ["pending", "applied"] * 2
