"""Every subcommand keeps a deletion, and honours (or refuses) the command line's own options.

On a slice of MovieLens-100K (its first 120 users): one model is trained and one request -- user
7 and item 50 as a whole -- is unlearned once per module; each test then runs a subcommand from
those checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import lightning_unlearn
import lightning_unlearn.cli as cli_module
import lightning_unlearn.unlearning.callback as callback_module
from lightning_unlearn import MF, RecDataModule
from lightning_unlearn.cli import UnlearningTrainer, main
from lightning_unlearn.data import CSVSource, Synthetic
from lightning_unlearn.unlearning import DeletionRequest, FineTune, UnlearningCallback
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.record import journal_of, restore_checkpoint
from tests.conftest import REPO, joined, shared_data
from tests.test_compare import recipe

pytestmark = pytest.mark.usefixtures("cli_run")

DELETED_USER, DELETED_ITEM = 7, 50
MODEL = {"embedding_dim": 16, "l2": 0.05, "lr": 0.01}
BRIEF = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A model fitted on the slice (``best``) and its unlearned checkpoint without user 7 and item 50 (``unlearned``)."""
    data_dir = shared_data()
    if data_dir is None:
        pytest.skip("real data not found: set LIGHTNING_UNLEARN_DATA to a folder with ml-100k/ and ml-1m/")
    folder = tmp_path_factory.mktemp("trained")
    lines = [line for line in (data_dir / "ml-100k" / "u.data").read_text().splitlines() if int(line.split("\t")[0]) <= 120]
    data_file = folder / "slice.tsv"
    data_file.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(sys, "argv", ["lightning-unlearn"])
        fit_recipe = recipe(folder / "fit.yaml", data_file, "")
        main(["fit", "-c", str(fit_recipe), "--trainer.max_epochs=2"])
        (folder / "requests.jsonl").write_text(f'{{"user": {DELETED_USER}}}\n{{"item": {DELETED_ITEM}}}\n')
        main(["unlearn", "-c", str(fit_recipe), "--ckpt_path", "ckpt/best.ckpt", "--requests", "requests.jsonl",
              "--method", "FineTune", "--out", "unlearned"])
        (folder / "unlearning" / "lines.jsonl").unlink()  # each test's lines are its own (lines_of_each_test_apart), the first's too
    return SimpleNamespace(folder=folder, data_file=data_file, recipe=fit_recipe, best=folder / "ckpt" / "best.ckpt",
                           unlearned=next((folder / "unlearned").glob("unlearned-*.ckpt")), requests=folder / "requests.jsonl")


@pytest.fixture(autouse=True)
def lines_of_each_test_apart(request):
    """Each test's lines of deletions from the shared trained checkpoint are its own: the note of them beside it
    (``unlearning/lines.jsonl``, which makes a later line from it delete them again) goes with the test."""
    yield
    if "trained" in request.fixturenames:
        (request.getfixturevalue("trained").folder / "unlearning" / "lines.jsonl").unlink(missing_ok=True)


def restored(trained, checkpoint: Path, removals: bool = True) -> tuple[MF, RecDataModule]:
    """The model and datamodule of the slice with ``checkpoint``'s weights (and, unless told not to, its removals)."""
    dm = RecDataModule(CSVSource(path=str(trained.data_file), sep="\t", header=False), num_negatives=4, batch_size=256)
    model = MF(dm.num_users, dm.num_items, **MODEL)
    if removals:
        restore_checkpoint(checkpoint, model, dm)
    else:
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    return model, dm


def index_of(dm: RecDataModule, user: int | None = None, item: int | None = None) -> int:
    ids = dm.train.user_ids if user is not None else dm.train.item_ids
    return int(list(ids).index(user if user is not None else item))


def spy_results(monkeypatch, name: str) -> list:
    """Record what ``UnlearningTrainer.<name>`` returns when the command calls it."""
    results: list = []
    real = getattr(UnlearningTrainer, name)

    @functools.wraps(real)  # the command's arguments come from the method's signature
    def spy(self, *args, **kwargs):
        results.append(real(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(UnlearningTrainer, name, spy)
    return results


# ---------------------------------------------------------------------- the deletion survives every command
@pytest.mark.parametrize(("command", "split"), [("test", "test"), ("validate", "val")])
def test_evaluating_an_unlearned_checkpoint_applies_its_removals(command, split, trained, monkeypatch, capsys):
    results = spy_results(monkeypatch, command)
    main([command, "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned)])
    out = capsys.readouterr().out
    assert f"[{command}] {trained.unlearned} is an unlearned checkpoint" in out and "1 user, 1 item removed" in out
    model, dm = restored(trained, trained.unlearned)
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    expected = model.evaluate(loader, split)
    measured = results[0][0]
    assert measured[f"{split}/recall@20"] == pytest.approx(expected[f"{split}/recall@20"], abs=1e-6)
    assert measured[f"{split}/ndcg@20"] == pytest.approx(expected[f"{split}/ndcg@20"], abs=1e-6)
    # Without the removals the deleted user is still evaluated: a different figure (what the command printed before).
    model, dm = restored(trained, trained.unlearned, removals=False)
    stale = model.evaluate(dm.test_dataloader() if split == "test" else dm.val_dataloader(), split)
    assert measured[f"{split}/hit@20"] != pytest.approx(stale[f"{split}/hit@20"], abs=1e-6)


@pytest.mark.parametrize("beside", ["nothing", "an on-exception checkpoint", "a SLURM job's checkpoint"])
def test_fit_continues_from_an_unlearned_checkpoint_on_the_retained_data(beside, trained, tmp_path, capsys, monkeypatch):
    """Lightning resumes a command given no checkpoint by itself, a fit from an OnExceptionCheckpoint's file and any command
    in a SLURM job from its hpc_ckpt_*.ckpt: here the trained model, which would replace the unlearned weights (the deleted
    user trained on again)."""
    saver = []
    if beside == "a SLURM job's checkpoint":
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "refit")
        shutil.copy(trained.best, tmp_path / "hpc_ckpt_1.ckpt")
        saver = ["--trainer.default_root_dir", str(tmp_path)]
    elif beside != "nothing":
        (tmp_path / "oe").mkdir()
        shutil.copy(trained.best, tmp_path / "oe" / "on_exception.ckpt")
        saver = [f"--trainer.callbacks+={{class_path: pytorch_lightning.callbacks.OnExceptionCheckpoint, init_args: "
                 f"{{dirpath: {tmp_path / 'oe'}, filename: on_exception}}}}"]
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF, *saver])
    out = capsys.readouterr().out
    assert "is an unlearned checkpoint" in out and "fresh optimizer" in out and "test/recall@20" in out
    saved = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    unlearned = torch.load(trained.unlearned, weights_only=True)["datamodule_state"]
    state = saved["RecDataModule"]  # the new fit's checkpoint: trained without the deleted rows, and says so
    assert state["fingerprint"] == unlearned["fingerprint"]
    for key in ("train_keys", "users", "items"):
        assert torch.equal(state[key], unlearned[key]), key
    _, dm = restored(trained, tmp_path / "ckpt" / "best.ckpt")
    assert index_of(dm, user=DELETED_USER) not in dm.train.users.tolist() + dm.test.users.tolist()


def test_fit_from_an_unlearned_checkpoint_keeps_its_callback_state(trained, tmp_path, capsys):
    """With an UnlearningCallback in the recipe, the request the checkpoint holds is recognised, not applied again."""
    folder = trained.unlearned.parent
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, dirpath: {folder}}}}}")
    journal_before = (folder / "journal.jsonl").read_text()
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF,
          f"--trainer.callbacks+={callback}"])
    assert (folder / "journal.jsonl").read_text() == journal_before


def test_a_fit_that_trains_nothing_keeps_the_drift_of_the_unlearned_checkpoint_it_starts_from(trained, tmp_path, capsys):
    """limit_train_batches=0: the model is not fitted again, so the retrain policy counts the earlier deletions too."""
    folder = tmp_path / "record"
    (tmp_path / "checkpoints").mkdir()
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", shutil.copy(trained.best, tmp_path / "checkpoints"), "--requests",
          str(trained.requests), "--method", "FineTune", "--out", str(folder)])  # a record of its own (a copy would not go on)
    (tmp_path / "user9.csv").write_text("user\n9\n")
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {tmp_path / 'user9.csv'}, "
                f"dirpath: {folder}, evaluate: false}}}}")
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(folder).last_checkpoint()), "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=0", f"--trainer.callbacks+={callback}"])
    before, after = [e for e in journal_of(folder).entries() if e["status"] == "applied"][-2:]
    fitted_rows = len(restored(trained, trained.best, removals=False)[1].train)
    assert after["drift"] == pytest.approx(before["drift"] + after["num_rows"] / fitted_rows)


def test_fit_from_an_unlearned_checkpoint_into_a_branch_recognises_what_it_holds(trained, tmp_path, capsys):
    """A branch callback starts its folder with the checkpoint folder's key: the request given again is not journaled twice.
    A run refused before (no branch said) used to leave the key it made there, and the branch was refused for it."""
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, "
                f"dirpath: {tmp_path / 'branch'}, branch: true}}}}")
    refused = callback.replace(", branch: true", "")  # the same folder without saying branch: refused first
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF, f"--trainer.callbacks+={refused}"])
    assert "another unlearning folder" in capsys.readouterr().err
    assert not (tmp_path / "branch" / "journal.key").exists()  # its key was made, then removed: the branch advised can adopt one
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF, f"--trainer.callbacks+={callback}"])
    assert journal_of(tmp_path / "branch").key == journal_of(trained.unlearned.parent).key
    assert journal_of(tmp_path / "branch").entries() == []


def test_fit_with_the_callback_tests_the_unlearned_model_not_the_best_checkpoint(trained, tmp_path, capsys, monkeypatch):
    """best.ckpt is saved before the callback deletes at the end of training: the final test is of the unlearned weights."""
    tested = []
    original_test = UnlearningTrainer.test

    def test(self, model=None, *args, **kwargs):
        tested.append((kwargs.get("ckpt_path"), {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return original_test(self, model, *args, **kwargs)

    monkeypatch.setattr(UnlearningTrainer, "test", test)
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, dirpath: {tmp_path / 'unl'}}}}}")
    main(["fit", "-c", str(trained.recipe), *BRIEF, f"--trainer.callbacks+={callback}"])
    assert "the test is of the unlearned model" in capsys.readouterr().out
    [(ckpt_path, weights)] = tested
    unlearned = torch.load(next((tmp_path / "unl").glob("unlearned-*.ckpt")), weights_only=True)["state_dict"]
    assert ckpt_path is None and all(torch.equal(weights[k], v) for k, v in unlearned.items())
    # best.ckpt, saved before the end of training, holds the request queued: `unlearn` from it says so.
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--requests", "user8.csv",
          "--method", "FineTune", "--out", "again"])
    assert "holds 1 request queued and not yet applied (by the UnlearningCallback of its fit): applied first" in capsys.readouterr().out
    assert journal_of(tmp_path / "again").applied_count() == 2
    # That line, and a branch, are noted although the checkpoint names its callback's record (no request was applied to
    # it): a line that leaves out what either deleted is refused.
    for name in ("9", "10"):
        (tmp_path / f"user{name}.csv").write_text(f"user\n{name}\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--requests", "user10.csv",
          "--method", "FineTune", "--out", "branched", "--branch", "true"])
    for refused in ("again", "branched"):
        with pytest.raises(SystemExit) as exit_info:
            main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--requests", "user9.csv",
                  "--method", "FineTune", "--out", "third"])
        assert exit_info.value.code == 2 and f"is an older state of the deletion record {tmp_path / refused}" in capsys.readouterr().err
        shutil.rmtree(tmp_path / "third", ignore_errors=True)
        for noted in (tmp_path / "unlearning", tmp_path / "machine"):  # the line "again" left out on purpose: its notes go
            lines = [line for line in (noted / "lines.jsonl").read_text().splitlines() if "again" not in line]
            (noted / "lines.jsonl").write_text("".join(f"{line}\n" for line in lines))
    shutil.rmtree(tmp_path / "branched")
    for noted in (tmp_path / "unlearning", tmp_path / "machine"):
        (noted / "lines.jsonl").unlink(missing_ok=True)
    # Its records are not beside it: predict finds them through the callback state the checkpoint holds and the line noted.
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--out", "p.csv"])
    assert f"{tmp_path / 'unl'} records" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    # The record moved (with the project, say): predict does not skip the check, and finds it where --record says.
    (tmp_path / "unl").rename(tmp_path / "moved")
    (tmp_path / "empty").mkdir()
    gone = f"names the deletion record {tmp_path / 'unl'} (its UnlearningCallback's folder), and that record is gone"
    for where, said in (([], gone),
                        (["--record", "empty"], "predict --record empty is not a deletion record: it holds no journal.key"),
                        (["--record", "again"], "is another deletion record than the one"),
                        (["--record", str(tmp_path / "moved")], f"{tmp_path / 'moved'} records 1 deletion applied")):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--out", "p.csv", *where])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    with pytest.raises(SystemExit) as exit_info:  # nor trained on: the deletions recorded there since would be learned again
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--trainer.max_epochs=3"])
    assert exit_info.value.code == 2 and f"{gone}: fit cannot check" in capsys.readouterr().err
    backup = shutil.copytree(tmp_path / "moved", tmp_path.parent / "unl")  # a copy of the record above the project, not it
    try:
        with pytest.raises(SystemExit):
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--out", "p.csv"])
        assert gone in capsys.readouterr().err
    finally:
        shutil.rmtree(backup)
    (tmp_path / "unl").mkdir()  # re-created empty: not the record
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--out", "p.csv"])
    assert gone in capsys.readouterr().err
    # The record's own latest state, moved with it, predicts: the record beside it is the one it names.
    latest = journal_of(tmp_path / "moved").last_checkpoint()
    assert latest.parent == tmp_path / "moved"
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "latest.csv"])
    assert "[predict] wrote the top-20 recommendations" in capsys.readouterr().out


def test_unlearn_refuses_a_second_line_that_leaves_out_the_deletions_of_the_record_the_checkpoint_is_older_than(trained, tmp_path,
                                                                                                                 capsys, monkeypatch):
    """The record beside the trained checkpoint (known by the parameters its first request was applied to), and the
    record a fit's callback state names: a new line of deletions from an older state of them must delete again all
    they deleted, or say it starts a new line on purpose (--branch)."""
    for name, ids in (("user8", "8"), ("user9", "9"), ("both", "8\n9")):
        (tmp_path / f"{name}.csv").write_text(f"user\n{ids}\n")
    best, elsewhere = (shutil.copy(trained.best, tmp_path / run / "checkpoints") for run in ("run", "run2") if
                       (tmp_path / run / "checkpoints").mkdir(parents=True) is None)
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, dirpath: {tmp_path / 'unl'}}}}}")
    main(["fit", "-c", str(trained.recipe), *BRIEF, f"--trainer.callbacks+={callback}"])  # ckpt/best.ckpt holds the request queued
    # each copy's own run (its recipe's checkpoint folder): with the first recipe it would be a checkpoint of that one's run
    own = {}
    for run, checkpoint in (("run", best), ("run2", elsewhere)):
        own[checkpoint] = tmp_path / f"{run}.yaml"
        own[checkpoint].write_text(trained.recipe.read_text().replace("dirpath: ckpt", f"dirpath: {tmp_path / run / 'checkpoints'}"))
    for record, checkpoint in ((tmp_path / "run" / "unlearning", best), (tmp_path / "unl", tmp_path / "ckpt" / "best.ckpt"),
                               (tmp_path / "quick", elsewhere)):  # the quick start's --out: a line noted beside the checkpoint
        unlearn = ["unlearn", "-c", str(own.get(checkpoint, trained.recipe)), "--method", "FineTune"]
        if record == tmp_path / "quick":  # on another machine: the copy finds the lines of the first only beside itself
            monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", str(tmp_path / "another machine"))
        main([*unlearn, "--ckpt_path", str(journal_of(record).last_checkpoint() or checkpoint), "--requests", "user8.csv",
              "--out", str(record)])  # the record goes on: user 8 deleted there
        capsys.readouterr()
        note = Path(checkpoint).parent.parent / "unlearning" / "lines.jsonl"
        noted = note.read_bytes() if note.exists() else None
        with pytest.raises(SystemExit) as exit_info:
            main([*unlearn, "--ckpt_path", str(checkpoint), "--requests", "user9.csv", "--out", f"{record.name}-second"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"is an older state of the deletion record {record}" in err and "--branch true" in err
        assert not (tmp_path / f"{record.name}-second").exists()  # nothing written, not even the folder
        assert (note.read_bytes() if note.exists() else None) == noted and (record != tmp_path / "quick" or noted)  # nor noted
        main([*unlearn, "--ckpt_path", str(checkpoint), "--requests", "both.csv", "--out", f"{record.name}-again"])  # deletes it all
        main([*unlearn, "--ckpt_path", str(checkpoint), "--requests", "user9.csv", "--out", f"{record.name}-branch", "--branch", "true"])
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    body = "methods: [{class_path: lightning_unlearn.unlearning.FineTune}]\ndeletion: {kind: interactions, count: 5, seed: 0}\nout: cmp\n"
    main(["compare", "-c", str(recipe(tmp_path / "compare.yaml", trained.data_file, body)), "--ckpt_path", str(best), *BRIEF])
    assert f"[compare] {tmp_path / 'run' / 'unlearning'} records 1 deletion applied" in capsys.readouterr().out  # said, not silent
    with pytest.raises(SystemExit) as exit_info:  # predict from a trained checkpoint finds the line started from it elsewhere
        main(["predict", "-c", str(own[elsewhere]), "--ckpt_path", str(elsewhere), "--out", "p.csv"])  # with its own run's recipe
    err = capsys.readouterr().err  # one of the lines started from it: quick, quick-again or quick-branch
    assert exit_info.value.code == 2 and re.search(rf"error: {re.escape(str(tmp_path / 'quick'))}(-again|-branch)? records \d deletion", err)
    # A fit from an older state of a record, unlearned or the fit's own Lightning checkpoint resumed without its
    # callback: the deletions after it would be learned again.
    first = journal_of(tmp_path / "unl").checkpoint(next(e for e in journal_of(tmp_path / "unl") if e["status"] == "applied"))
    for older, said in ((first, "older state of this folder"), (tmp_path / "ckpt" / "best.ckpt", "a model no deletion was applied to")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(older), *BRIEF])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
    # A request whose process stopped in the record: what it deleted is known once unlearn there recovers it.
    record = journal_of(tmp_path / "run" / "unlearning")
    record.append("0" * 64, "pending", checkpoint=str(record.folder / "unlearned-0009-stopped.ckpt"), model="0" * 64)
    from lightning_unlearn.unlearning.journal import exclusive
    with exclusive(record.folder / "journal.lock", "applying it"), pytest.raises(SystemExit) as exit_info:  # still running
        main([*unlearn, "--ckpt_path", str(best), "--requests", "both.csv", "--out", "after-a-stop"])
    assert exit_info.value.code == 2 and "a deletion request is being applied now" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*unlearn, "--ckpt_path", str(best), "--requests", "both.csv", "--out", "after-a-stop"])
    assert exit_info.value.code == 2 and "whose process stopped while applying it" in capsys.readouterr().err
    # A journal removed beside its unlearned checkpoints: predict refuses, as unlearn does (on a machine with no other line).
    monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", str(tmp_path / "a third machine"))
    (tmp_path / "run" / "unlearning" / "journal.jsonl").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "p.csv"])
    assert exit_info.value.code == 2 and "that its journal does not name" in capsys.readouterr().err


def test_a_line_that_cannot_be_noted_or_is_gone_is_said_not_fatal(trained, tmp_path, capsys, monkeypatch):
    """The notes of lines are hints: a folder that cannot be written costs the note, a line noted on the machine that is
    gone is named on the console, and one noted beside the checkpoint that went while the checkpoint stayed is refused
    until it is found again (or its line removed on purpose)."""
    import lightning_unlearn.record_checks as record_checks

    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"]

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(record_checks, "note_a_line", read_only)
        main([*unlearn, "--out", "mine"])
    assert "cannot be written (Permission denied): the line of deletions started in mine is not noted" in capsys.readouterr().err
    assert journal_of(tmp_path / "mine").applied_count() == 1 and not (tmp_path / "unlearning" / "lines.jsonl").exists()
    main([*unlearn, "--out", "exp"])
    (tmp_path / "unlearning" / "lines.jsonl").unlink()  # noted on the machine only, then removed with its experiment
    (tmp_path / "exp").rename(tmp_path / "old experiment")
    capsys.readouterr()
    main([*unlearn, "--out", "noted"])  # named, not refused
    assert f"[unlearn] {tmp_path / 'exp'}, noted as a line of deletions started from {best}'s parameters, is gone" in capsys.readouterr().err
    (tmp_path / "noted").rename(tmp_path / "moved")  # noted beside the checkpoint, which stayed: refused until told
    for command, how in ((["predict", "--out", "p.csv"], "give its place with --record FOLDER"),
                         (["unlearn", "--requests", "user8.csv", "--method", "FineTune", "--out", "third"], "move it back")):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(best), *command[1:]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"{tmp_path / 'noted'}, noted beside {best} as a line of deletions started from it, is gone" in err
        assert how in err and f"remove its line from {tmp_path / 'unlearning' / 'lines.jsonl'}" in err
    with pytest.raises(SystemExit) as exit_info:  # given its place: the trained model holds what it deleted, refused as such
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "p.csv", "--record", "moved"])
    assert exit_info.value.code == 2 and "moved records 1 deletion applied" in capsys.readouterr().err


def test_recommendations_written_before_a_deletion_lose_the_deleted_users_and_items(trained, tmp_path, capsys, monkeypatch):
    """predict's CSV names users and items by raw id: once they are deleted, no file predict wrote keeps them."""

    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    (tmp_path / "other.csv").write_bytes((tmp_path / "top.csv").read_bytes())  # a copy predict did not write: not touched
    os.chmod(tmp_path / "top.csv", 0o640)
    before = list(csv.reader((tmp_path / "top.csv").open()))
    item = next(row[2] for row in before[1:] if row[0] != "8")
    assert any(row[0] == "8" for row in before) and before[0] == ["user", "rank", "item", "score"]
    (tmp_path / "forget.jsonl").write_text(f'{{"user": 8}}\n{{"item": {item}}}\n')
    (tmp_path / ".top.csv.k1ll3d.tmp").write_text("user,rank,item,score\n8,1,1,0.5\n")  # a write killed midway
    capsys.readouterr()
    with monkeypatch.context() as patch:  # the cleaned file's note cannot be written: said as such
        patch.setattr("lightning_unlearn.recommendations.append_note", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "No space left")))
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "forget.jsonl", "--method", "FineTune"])
    out, err = capsys.readouterr()
    assert f"{(tmp_path / 'top.csv').resolve()} (recommendations written by predict) no longer names" in out
    assert "top.csv is not noted: the machine's folder cannot be written (No space left), so later deletions" in err
    assert not (tmp_path / ".top.csv.k1ll3d.tmp").exists()
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "unlearning").last_checkpoint()),
          "--out", "top.csv", "--k", "5"])  # as the message advises: noted again
    after = list(csv.reader((tmp_path / "top.csv").open()))
    assert not any(row[0] == "8" or row[2] == item for row in after) and after[0] == before[0]
    assert (tmp_path / "top.csv").stat().st_mode & 0o777 == 0o640 and (tmp_path / "other.csv").read_bytes() != b""
    assert list(csv.reader((tmp_path / "other.csv").open())) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".top.csv")) == []  # no temporary file left
    # A file changed since by another program is not touched (it is said); one an unlearn stopped before cleaning is
    # cleaned by the next predict from the data.
    latest = journal_of(tmp_path / "unlearning").last_checkpoint()
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "edited.csv", "--k", "5"])
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "stopped.csv", "--k", "5"])
    with open(tmp_path / "edited.csv", "a") as fh:
        fh.write("9,1,1,0.5\n")
    edited = (tmp_path / "edited.csv").read_bytes()
    (tmp_path / "user9.csv").write_text("user\n9\n")
    with monkeypatch.context() as patch:
        patch.setattr(callback_module, "clean_recommendations", lambda *args, **kwargs: None)  # stopped before it cleaned
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--requests", "user9.csv", "--method", "FineTune"])
    assert any(row[0] == "9" for row in csv.reader((tmp_path / "stopped.csv").open()))
    capsys.readouterr()
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "unlearning").last_checkpoint()),
          "--out", "after.csv", "--k", "5"])
    out, err = capsys.readouterr()
    assert f"{(tmp_path / 'stopped.csv').resolve()} (recommendations written by predict) no longer names" in out
    assert not any(row[0] == "9" for name in ("stopped.csv", "after.csv") for row in csv.reader((tmp_path / name).open()))
    assert f"{(tmp_path / 'edited.csv').resolve()} (recommendations written by predict) was changed since by something else" in err
    assert (tmp_path / "edited.csv").read_bytes() == edited


def test_a_checkpoint_of_a_model_built_in_python_is_read_with_the_recipes_model_class(trained, tmp_path, capsys):
    """A model built in Python (``UnlearningCallback.apply_pending`` writes its checkpoints) saves its options without the
    class LightningCLI adds: the command reads them with the recipe's class, not a parser error (review 35b D3)."""
    state = torch.load(trained.unlearned, weights_only=False)
    del state["hyper_parameters"]["_class_path"]
    written = tmp_path / trained.unlearned.name
    torch.save(state, written)
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(written), "--out", "top.csv", "--k", "5"])
    rows = list(csv.reader((tmp_path / "top.csv").open()))
    assert len(rows) > 1 and not any(row[0] == str(DELETED_USER) for row in rows)
    state["hyper_parameters"]["num_layers"] = 2  # a LightGCN's options: not read as the recipe's MF (review 36b D1)
    torch.save(state, written)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(written), "--out", "other.csv"])
    assert exit_info.value.code == 2 and "names no model class" in capsys.readouterr().err and not (tmp_path / "other.csv").exists()


def test_predict_does_not_replace_what_is_not_a_recommendations_file(trained, tmp_path, capsys):
    """--out naming the data file, a requests file or a pipe would replace it with a file of raw ids (review 36b D5, D7)."""
    os.mkfifo(tmp_path / "pipe")
    for out, named in ((trained.data_file, "is not a recommendations file"), (trained.requests, "is not a recommendations file"),
                       (tmp_path / "pipe", "is not a regular file")):
        before = None if named == "is not a regular file" else out.read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--out", str(out)])
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
        assert before is None and stat.S_ISFIFO(os.stat(out).st_mode) or out.read_bytes() == before
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--out", "top.csv", "--k", "2"])
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--out", "top.csv", "--k", "3"])  # its own: again


def test_an_older_state_copied_over_the_latest_states_file_is_refused(trained, tmp_path, capsys):
    """A backup of the first state restored under the second's name: checked against itself it would pass as the latest
    and serve the user the second deleted (review 35a #1)."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    for user in (8, 9):
        (tmp_path / f"user{user}.csv").write_text(f"user\n{user}\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"])
    first = journal_of(tmp_path / "unlearning").last_checkpoint()
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(first), "--requests", "user9.csv", "--method", "FineTune"])
    latest = journal_of(tmp_path / "unlearning").last_checkpoint()
    shutil.copy2(first, latest)
    capsys.readouterr()
    for command in (["predict", "--out", "top.csv"], ["test"], ["validate"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(latest), *command[1:]])
        assert exit_info.value.code == 2 and f"{latest}, and that file holds another state" in capsys.readouterr().err
    assert not (tmp_path / "top.csv").exists()


def test_recommendations_of_another_split_of_the_data_lose_the_users_deleted_from_one(trained, tmp_path):
    """A model of another seed of the same data was trained on the same users, and its predict's file names them by the same
    raw ids: a deletion from the run's model cleans that file too (review 35b D2)."""
    main(["fit", "-c", str(trained.recipe), "--data.seed=1", *BRIEF])
    other = next((tmp_path / "ckpt").glob("best*.ckpt"))
    main(["predict", "-c", str(trained.recipe), "--data.seed=1", "--ckpt_path", str(other), "--out", "other_seed.csv", "--k", "5"])
    assert any(row[0] == "8" for row in csv.reader((tmp_path / "other_seed.csv").open()))
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"])
    rows = list(csv.reader((tmp_path / "other_seed.csv").open()))
    assert len(rows) > 1 and not any(row[0] == "8" for row in rows)


def test_a_request_stopped_or_failing_after_one_was_applied_keeps_its_line_noted_and_the_recommendations_clean(
        trained, tmp_path, capsys, monkeypatch):
    """unlearn notes its line before its first request is journaled, and cleans predict's files once one is applied: a
    process stopped after a request was applied, or a later request that fails, leaves neither a second line free to
    bring that request's deletion back nor its ids in a recommendations file. A failing method is a message, not a
    traceback."""
    (tmp_path / "checkpoints").mkdir()  # a copy: the record beside the shared one may hold the fixture's deletion
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    (tmp_path / "user8.csv").write_text("user\n8\n")
    (tmp_path / "user9.csv").write_text("user\n9\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    real_apply = UnlearningCallback.apply_pending

    def applied_then_stopped(self, *args, **kwargs):
        real_apply(self, *args, **kwargs)
        raise KeyboardInterrupt  # a Ctrl-C (or a kill) once the request is applied, before the command's end

    with monkeypatch.context() as patch:  # stopped before its first request was journaled: its line deleted nothing
        patch.setattr(UnlearningCallback, "apply_pending", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(SystemExit):
            main([*unlearn, "--ckpt_path", str(best), "--requests", "user9.csv", "--out", "never"])
    assert (tmp_path / "never" / "journal.jsonl").read_bytes() == b""  # started with the note: a noted line without one is gone
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(UnlearningCallback, "apply_pending", applied_then_stopped)
        with pytest.raises(SystemExit):
            main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv", "--out", "first"])
    assert journal_of(tmp_path / "first").applied_count() == 1 and "never" not in capsys.readouterr().err  # neither gone nor refused
    assert not any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a second line that leaves user 8 out
        main([*unlearn, "--ckpt_path", str(best), "--requests", "user9.csv", "--out", "second"])
    assert exit_info.value.code == 2 and f"is an older state of the deletion record {tmp_path / 'first'}" in capsys.readouterr().err
    archive = tmp_path / "archive"  # the line's journal and checkpoints moved away, its key left: gone, not hidden
    archive.mkdir()
    for moved in (tmp_path / "first").glob("*.*"):
        if moved.name != "journal.key":
            moved.rename(archive / moved.name)
    with pytest.raises(SystemExit) as exit_info:
        main([*unlearn, "--ckpt_path", str(best), "--requests", "user9.csv", "--out", "second"])
    assert exit_info.value.code == 2 and f"{tmp_path / 'first'}, noted beside {best} as a line of deletions started from it, is gone" \
        in capsys.readouterr().err
    for moved in archive.iterdir():
        moved.rename(tmp_path / "first" / moved.name)
    # A request that fails after one was applied (the checkpoint's queued one, then the file's).
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {tmp_path / 'user9.csv'}, dirpath: {tmp_path / 'unl'}}}}}")
    main(["fit", "-c", str(trained.recipe), *BRIEF, f"--trainer.callbacks+={callback}"])  # best.ckpt holds user 9's request queued
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "first").last_checkpoint()), "--out", "top.csv",
          "--k", "5"])
    assert any(row[0] == "9" for row in csv.reader((tmp_path / "top.csv").open()))
    calls, real_update = [], FineTune.update

    def fails_second(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise FloatingPointError("diverged")
        return real_update(self, *args, **kwargs)

    # user 8 again: the line `first`, noted beside this run folder, deleted it from the data that fit loaded
    (tmp_path / "user10.csv").write_text("user\n10\n8\n")
    capsys.readouterr()
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(FineTune, "update", fails_second)
        main([*unlearn, "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--requests", "user10.csv", "--out", "third"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "lightning-unlearn unlearn: error: FineTune(epochs=1) failed and the model was restored: diverged." in err
    assert "Nothing of that request is applied; the requests applied before it stay applied" in err
    assert [e["status"] for e in journal_of(tmp_path / "third")] == ["pending", "applied", "pending", "failed"]
    assert not any(row[0] == "9" for row in csv.reader((tmp_path / "top.csv").open()))


def test_a_branch_from_a_copy_of_a_record_does_not_stop_the_record_going_on(trained, tmp_path, capsys):
    """A state of a record (requests applied to it) goes on in its record or branches: a copy of the record does not go on
    by itself (test_a_copy_of_a_record_does_not_go_on_while_the_record_is_there), a branch from its state is not noted as
    a line from that state, so the record itself goes on, and predicts, from its latest state."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    for name in ("8", "9", "10"):
        (tmp_path / f"user{name}.csv").write_text(f"user\n{name}\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv", "--out", "record"])
    shutil.copytree(tmp_path / "record", tmp_path / "copy")
    main([*unlearn, "--ckpt_path", str(journal_of(tmp_path / "copy").last_checkpoint()), "--requests", "user9.csv", "--out", "branch",
          "--branch", "true"])
    main([*unlearn, "--ckpt_path", str(journal_of(tmp_path / "record").last_checkpoint()), "--requests", "user10.csv"])
    assert journal_of(tmp_path / "record").applied_count() == 2 and journal_of(tmp_path / "branch").applied_count() == 1
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "record").last_checkpoint()), "--out", "p.csv"])


def test_a_fit_whose_callback_deletes_also_clears_the_recommendations_written_before(trained, tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()  # a copy: the record beside the shared one may hold the fixture's deletion
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", shutil.copy(trained.best, tmp_path / "checkpoints"), "--out", "top.csv",
          "--k", "5"])
    assert any(row[0] == str(DELETED_USER) for row in csv.reader((tmp_path / "top.csv").open()))
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, dirpath: {tmp_path / 'unl'}}}}}")
    capsys.readouterr()
    main(["fit", "-c", str(trained.recipe), *BRIEF, f"--trainer.callbacks+={callback}"])
    assert "(recommendations written by predict) no longer names" in capsys.readouterr().out
    rows = list(csv.reader((tmp_path / "top.csv").open()))
    assert rows[1:] and not any(row[0] == str(DELETED_USER) or row[2] == str(DELETED_ITEM) for row in rows)


def test_a_model_fitted_again_beside_a_record_must_delete_again_what_the_record_deleted(trained, tmp_path, capsys):
    """A fit again in the run folder, after a deletion, trains on the data as loaded: its new parameters are of no record,
    but a line from them into a new folder must still delete again what the record beside them deleted."""
    for name, ids in (("user8", "8"), ("user9", "9"), ("both", "8\n9")):
        (tmp_path / f"{name}.csv").write_text(f"user\n{ids}\n")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    best = shutil.copy(trained.best, tmp_path / "run" / "checkpoints")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv"])  # the record beside it deletes user 8
    refit = torch.load(best, weights_only=False)
    refit["state_dict"]["user_embedding.weight"] += 0.01  # the fit again: other parameters, the same data
    torch.save(refit, best)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*unlearn, "--ckpt_path", str(best), "--requests", "user9.csv", "--out", "second"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"was trained beside the deletion record {tmp_path / 'run' / 'unlearning'}" in err
    assert "do not delete again all they deleted" in err and not (tmp_path / "second").exists()
    main([*unlearn, "--ckpt_path", str(best), "--requests", "both.csv", "--out", "again"])  # as the fit's note advises
    assert journal_of(tmp_path / "again").applied_count() == 1


def test_a_project_moved_whole_keeps_the_records_its_checkpoints_name(trained, tmp_path, capsys, monkeypatch):
    """A refit from an unlearned state names its record by an absolute path; the project moved whole (checkpoints and
    record together), the record is found at the same place relative to the checkpoint, by its key, and still checked."""
    project = tmp_path / "project"
    (project / "run" / "checkpoints").mkdir(parents=True)
    best = shutil.copy(trained.best, project / "run" / "checkpoints")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    (tmp_path / "user9.csv").write_text("user\n9\n")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    latest = journal_of(project / "run" / "unlearning").last_checkpoint()
    monkeypatch.chdir(project)  # the refit's checkpoints go to project/ckpt
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(latest), *BRIEF])
    project.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    refit, record = tmp_path / "moved" / "ckpt" / "best.ckpt", tmp_path / "moved" / "run" / "unlearning"
    main(["test", "-c", str(trained.recipe), "--ckpt_path", str(refit)])
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(refit), "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"])
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(journal_of(record).last_checkpoint()),
          "--requests", str(tmp_path / "user9.csv")])  # the record goes on where it is now
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # so the refit, whose data still holds user 9, is stale: found and checked
        main(["test", "-c", str(trained.recipe), "--ckpt_path", str(refit)])
    assert exit_info.value.code == 2 and f"{record} records 2 deletions applied" in capsys.readouterr().err


def two_epochs(trained, tmp_path: Path, folder: Path, last: str = "best.ckpt") -> tuple[Path, Path]:
    """``folder`` (made) holding the trained checkpoint as ``last`` and an earlier epoch of the same fit, ``epoch=0.ckpt``
    (other parameters, the same data), and the request files user8.csv and user9.csv in ``tmp_path``: ``(last, epoch=0)``."""
    folder.mkdir(parents=True)
    for name, ids in (("user8", "8"), ("user9", "9")):
        (tmp_path / f"{name}.csv").write_text(f"user\n{ids}\n")
    older = torch.load(trained.best, weights_only=False)
    older["state_dict"]["user_embedding.weight"] -= 0.01
    torch.save(older, folder / "epoch=0.ckpt")
    return Path(shutil.copy(trained.best, folder / last)), folder / "epoch=0.ckpt"


def a_model_of_other_data(trained, tmp_path: Path, monkeypatch, without: str) -> tuple[list[str], Path]:
    """A model fitted with the recipe on the data file without user ``without`` (other data, not another split of it), in
    ``tmp_path/without<user>/ckpt``: the data options that load that file, and its best.ckpt."""
    rows = [line for line in trained.data_file.read_text().splitlines() if line.split("\t")[0] != without]
    (tmp_path / f"without{without}.tsv").write_text("\n".join(rows) + "\n")
    options = ["--data.source.init_args.path", str(tmp_path / f"without{without}.tsv")]
    (tmp_path / f"without{without}").mkdir()
    monkeypatch.chdir(tmp_path / f"without{without}")  # its checkpoints go to its own ckpt/
    main(["fit", "-c", str(trained.recipe), *options, *BRIEF])
    monkeypatch.chdir(tmp_path)
    return options, tmp_path / f"without{without}" / "ckpt" / "best.ckpt"


def a_line_from_the_last_epoch(trained, tmp_path: Path) -> Path:
    """`unlearn --out line` from epoch=1.ckpt of a run deletes user 8: its epoch=0.ckpt (returned), on the same data, still
    holds user 8's rows."""
    newer, older = two_epochs(trained, tmp_path, tmp_path / "run" / "checkpoints", "epoch=1.ckpt")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(newer), "--requests", "user8.csv",
          "--out", "line"])
    return older


COMMANDS_FROM_A_CHECKPOINT = (["predict", "--out", "recs.csv"], ["fit", *BRIEF], ["test"], ["validate"],
                              ["unlearn", "--method", "FineTune", "--requests", "user9.csv", "--out", "second"])


def refused_by_every_command(recipe: Path, checkpoints, said, capsys, *extra: str) -> None:
    """Each command of ``COMMANDS_FROM_A_CHECKPOINT`` from each of ``checkpoints`` exits with status 2, its message naming
    ``said`` (or ``said(checkpoint)``), and writes nothing (no recommendations, no second line)."""
    capsys.readouterr()
    for checkpoint in checkpoints:
        for command in COMMANDS_FROM_A_CHECKPOINT:
            with pytest.raises(SystemExit) as exit_info:
                main([command[0], "-c", str(recipe), "--ckpt_path", str(checkpoint), *command[1:], *extra])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and (said(checkpoint) if callable(said) else said) in err, (checkpoint, command, err)
    assert not any(Path(name).exists() for name in ("recs.csv", "second"))


@pytest.mark.parametrize("spelt", ["a path", "a file:// URL", "a file: URL", "a local: URL", "a path under ~", "hpc"])
def test_an_older_checkpoint_of_the_run_a_line_was_started_from_is_checked_against_it_by_its_data(spelt, trained, tmp_path, capsys,
                                                                                                    monkeypatch):
    """epoch=0.ckpt still holds user 8, whom the line from epoch=1.ckpt deleted: predicting, training, evaluating or starting
    a line from it without user 8 is refused as from a checkpoint beside the record, however the checkpoint is spelt (as
    Lightning opens it: `~` expanded; `hpc`, the newest hpc_ckpt_*.ckpt of the trainer's folder)."""
    older = a_line_from_the_last_epoch(trained, tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(older, older.parent / "hpc_ckpt_1.ckpt")  # a SLURM job's checkpoint, in the trainer's folder
    root = ["--trainer.default_root_dir", str(older.parent)] if spelt == "hpc" else []
    given = {"a path": str(older), "a file:// URL": f"file://{older}", "a file: URL": f"file:{older}", "a local: URL": f"local:{older}",
             "a path under ~": "~/run/checkpoints/epoch=0.ckpt", "hpc": "hpc"}[spelt]
    refused_by_every_command(trained.recipe, [given], str(tmp_path / "line"), capsys, *root)


@pytest.mark.parametrize("folder", ["given", "Lightning's"], ids=["the recipe's dirpath", "no dirpath"])
@pytest.mark.parametrize("copy", ["copied out", "a SLURM job's checkpoint in the working directory"])
def test_a_copy_elsewhere_of_a_checkpoint_of_the_recipes_run_is_checked_against_the_runs_record(copy, folder, trained, tmp_path, capsys):
    """unlearn deleted user 8 from the run's epoch=1.ckpt (in the recipe's checkpoint folder: its dirpath, ckpt/, or without
    one where Lightning puts them, checkpoints/); a copy of its epoch=0.ckpt elsewhere has no record beside it, nor a line
    started from its parameters, but with this recipe it is a checkpoint of that run: every command refuses it by its data,
    which still holds user 8."""
    recipe = trained.recipe
    if folder != "given":
        recipe = tmp_path / "no_dirpath.yaml"
        recipe.write_text(trained.recipe.read_text().replace("dirpath: ckpt, ", ""))
    run = tmp_path / ("ckpt" if folder == "given" else "checkpoints")
    best, _ = two_epochs(trained, tmp_path, run, "epoch=1.ckpt")
    main(["unlearn", "-c", str(recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    (tmp_path / "serving" / "models").mkdir(parents=True)  # not beside the run's folders: its own record would be serving/unlearning
    given = shutil.copy(run / "epoch=0.ckpt", tmp_path / "serving" / "models" / "best.ckpt") if copy == "copied out" else "hpc"
    if copy != "copied out":
        shutil.copy(run / "epoch=0.ckpt", tmp_path / "hpc_ckpt_1.ckpt")
    refused_by_every_command(recipe, [given], str(tmp_path / "unlearning"), capsys)


@pytest.mark.parametrize(("branch", "copy"), [(False, "a copy"), (True, "a copy"), (False, "a link")], ids=["a line", "a branch", "a link"])
def test_a_line_started_on_another_machine_from_a_copy_of_a_run_checkpoint_binds_the_runs_checkpoints(branch, copy, trained, tmp_path,
                                                                                                          capsys, monkeypatch):
    """A serving machine (its own $LIGHTNING_UNLEARN_HOME) deleted user 8 from a copy of the run's best.ckpt (or a link to
    it), with the run's recipe: the line is noted in the run's record too, so that on the run's machine its best.ckpt and
    epoch=0.ckpt (whose data still holds user 8) are refused by every command. A model of other data (another file) with
    the same recipe is not the run's: its line is not noted there, and unlearn says so."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    (tmp_path / "serving" / "models").mkdir(parents=True)
    served = tmp_path / "serving" / "models" / "best.ckpt"
    served.symlink_to(best) if copy == "a link" else shutil.copy(best, served)
    run_machine = os.environ["LIGHTNING_UNLEARN_HOME"]
    monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", str(tmp_path / "serving machine"))
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(served), "--requests", "user8.csv",
          "--out", str(tmp_path / "serving" / "line"), *(["--branch", "true"] if branch else [])])
    monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", run_machine)
    refused_by_every_command(trained.recipe, [best, tmp_path / "ckpt" / "epoch=0.ckpt"], str(tmp_path / "serving" / "line"), capsys)
    # other data, with the run's recipe: a model fitted on the file without user 9, served from elsewhere
    other, model = a_model_of_other_data(trained, tmp_path, monkeypatch, "9")
    noted = (tmp_path / "unlearning" / "lines.jsonl").read_bytes()
    main(["unlearn", "-c", str(trained.recipe), *other, "--method", "FineTune", "--ckpt_path", str(model), "--requests", "user8.csv",
          "--out", str(tmp_path / "other_line")])
    assert (tmp_path / "unlearning" / "lines.jsonl").read_bytes() == noted
    assert f"holds no checkpoint of {model}'s data" in capsys.readouterr().err


class PutBackAtTrainStart(pl.Callback):
    """Moves files into place once training starts, after the fit's own checks: here, the notes of a line of deletions that
    another process started from the same checkpoint while the fit ran."""

    def __init__(self, moves: list[list[str]]):
        self.moves = moves

    def on_train_start(self, trainer, pl_module):
        for source, target in self.moves:
            shutil.move(source, target)


def test_a_fit_with_the_callback_from_a_trained_checkpoint_checks_the_lines_started_from_it_meanwhile(trained, tmp_path, capsys):
    """While a fit resumed from epoch=1.ckpt trained, with an UnlearningCallback deleting user 9, another process started a
    line from epoch=1.ckpt deleting user 8: the callback's first request is checked as unlearn's is (here refused: its
    queue does not delete user 8 again), not journaled as a second line that brings user 8 back."""
    trained_one, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt", "epoch=1.ckpt")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(trained_one), "--requests", "user8.csv",
          "--out", "other"])
    notes = [tmp_path / "unlearning" / "lines.jsonl", Path(os.environ["LIGHTNING_UNLEARN_HOME"]) / "lines.jsonl"]
    moves = [[str(tmp_path / f"hidden{i}.jsonl"), str(note)] for i, note in enumerate(notes)]
    for hidden, note in moves:  # not there when the fit starts
        shutil.move(note, hidden)
    callbacks = [f"--trainer.callbacks+={{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                 f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: user9.csv, dirpath: {tmp_path / 'forget'}}}}}",
                 f"--trainer.callbacks+={{class_path: tests.test_commands.PutBackAtTrainStart, init_args: {{moves: {json.dumps(moves)}}}}}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained_one), "--trainer.max_epochs=3", "--trainer.limit_train_batches=2",
              *callbacks])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"is an older state of the deletion record {tmp_path / 'other'}" in err, err
    assert journal_of(tmp_path / "forget").applied_count() == 0


def test_a_fit_with_the_callback_from_a_trained_checkpoint_notes_its_line(trained, tmp_path, capsys):
    """fit --ckpt_path the run's trained checkpoint, with an UnlearningCallback writing into its own folder, deleted user 8:
    its line is noted as unlearn notes one, so that checkpoint and an older epoch of the run (whose data still holds
    user 8) are refused by every command."""
    trained_one, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt", "epoch=1.ckpt")
    callback = (f"--trainer.callbacks+={{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: user8.csv, dirpath: {tmp_path / 'forget'}}}}}")
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained_one), *BRIEF, callback])  # finished: applied at its end
    assert journal_of(tmp_path / "forget").applied_count() == 1
    refused_by_every_command(trained.recipe, [trained_one, tmp_path / "ckpt" / "epoch=0.ckpt"], str(tmp_path / "forget"), capsys)


@pytest.mark.parametrize("copied", ["best", "epoch=0"])
def test_a_copy_elsewhere_of_a_checkpoint_of_a_run_with_a_gone_line_is_refused(copied, trained, tmp_path, capsys):
    """A line from the run's best.ckpt moved away: the checkpoints in the run folder are refused until it is back, and so is a
    copy of one served from elsewhere, the one the line started from or another (the line is noted in the run's folder)."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv",
          "--out", "line"])
    (tmp_path / "serving" / "models").mkdir(parents=True)  # its own record would be serving/unlearning
    served = shutil.copy(tmp_path / "ckpt" / f"{copied}.ckpt", tmp_path / "serving" / "models" / "best.ckpt")
    shutil.move(tmp_path / "line", tmp_path / "moved")
    capsys.readouterr()
    for checkpoint in (tmp_path / "ckpt" / f"{copied}.ckpt", served):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(checkpoint), "--out", "recs.csv"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"{tmp_path / 'line'}, noted beside" in err and "is gone" in err, (checkpoint, err)
    assert not (tmp_path / "recs.csv").exists()


@pytest.mark.parametrize("then", ["moved away", "removed"])
def test_the_record_beside_the_run_moved_away_refuses_the_runs_checkpoints(then, trained, tmp_path, capsys):
    """unlearn without --out deleted user 8 into the record beside the run's checkpoints (noted on the machine only); that
    record moved away (or removed) while the run stayed: its best.ckpt and older epoch still hold user 8, and are refused
    by every command until it is back or given (--record), or its line is removed from the machine's note on purpose.
    The very file restored over itself, or touched, is still refused; a run removed whole and fitted again in its folder to
    other parameters is not held back by it."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    record = tmp_path / "unlearning"
    if then == "moved away":
        shutil.move(record, tmp_path / "elsewhere")
    else:
        shutil.rmtree(record)
    refused_by_every_command(trained.recipe, [best, tmp_path / "ckpt" / "epoch=0.ckpt"],
                             lambda checkpoint: f"{record}, noted on this machine as the deletion record beside {checkpoint}", capsys)
    # the same request again into its place is refused too: a second line without what the moved one deleted
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user9.csv"])
    assert exit_info.value.code == 2 and "is gone" in capsys.readouterr().err and not record.exists()
    if then == "moved away":  # given where it is, it checks the checkpoint: the trained model holds user 8
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "recs.csv", "--record", str(tmp_path / "elsewhere")])
        assert exit_info.value.code == 2 and f"{tmp_path / 'elsewhere'} records 1 deletion" in capsys.readouterr().err
    # the very file put back from a copy (another inode), or touched: the same model, in its place, still refused (35a #5)
    shutil.copy2(best, tmp_path / "saved.ckpt")
    os.unlink(best)
    shutil.copy2(tmp_path / "saved.ckpt", best)
    os.utime(best)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "recs.csv"])
    assert exit_info.value.code == 2 and f"{record}, noted on this machine as the deletion record beside" in capsys.readouterr().err
    # the run removed whole and fitted again in its folder: another model, not held back by the old run's record
    os.unlink(best)
    refit = torch.load(trained.best, weights_only=False)
    refit["state_dict"]["user_embedding.weight"] += 0.01
    torch.save(refit, best)
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "recs.csv"])


def test_the_record_beside_the_run_moved_away_after_the_project_was_renamed_refuses_the_runs_checkpoints(trained, tmp_path, capsys,
                                                                                                          monkeypatch):
    """As above, in a project folder renamed first: the machine's note finds the checkpoint the line started from by its
    file (a rename keeps it), and the record by its place beside that file."""
    project, renamed = tmp_path / "project", tmp_path / "renamed"
    best, _ = two_epochs(trained, project, project / "ckpt")
    monkeypatch.chdir(project)
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    monkeypatch.chdir(tmp_path)
    project.rename(renamed)
    shutil.move(renamed / "unlearning", tmp_path / "elsewhere")
    monkeypatch.chdir(renamed)
    refused_by_every_command(trained.recipe, [renamed / "ckpt" / "best.ckpt", renamed / "ckpt" / "epoch=0.ckpt"],
                             lambda checkpoint: f"{renamed / 'unlearning'}, noted on this machine as the deletion record beside {checkpoint}",
                             capsys)


def test_a_line_that_deleted_more_makes_the_states_of_another_line_of_the_run_older(trained, tmp_path, capsys):
    """Two lines from the run's trained checkpoint: the record beside it deleted user 8, then `second` deleted user 8 again
    and user 9 (allowed: it deletes again all the first deleted). The first's latest state still serves user 9: predict,
    test and unlearn from it are refused, naming the second; the second's latest state and a branch's pass; the trained
    checkpoint's refusal names the second's latest state, which holds every deletion, as the one to go on from (not the
    record beside it)."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    (tmp_path / "both.csv").write_text("user\n8\n9\n")
    (tmp_path / "user10.csv").write_text("user\n10\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best)]
    main([*unlearn, "--requests", "user8.csv"])  # the first: the record beside the run's checkpoints
    main([*unlearn, "--requests", "both.csv", "--out", "second"])
    main([*unlearn, "--requests", "user10.csv", "--out", "branch", "--branch", "true"])
    first, second, branch = (journal_of(tmp_path / name).last_checkpoint() for name in ("unlearning", "second", "branch"))
    capsys.readouterr()
    for command in (["predict", "--out", "recs.csv"], ["test"], ["unlearn", "--method", "FineTune", "--requests", "user10.csv"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(first), *command[1:]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and str(tmp_path / "second") in err, (command, err)
    assert journal_of(tmp_path / "unlearning").applied_count() == 1
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(second), "--out", "recs.csv"])
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(branch), "--out", "branch.csv"])
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "p.csv"])
    assert exit_info.value.code == 2 and f"(`--ckpt_path {second}`)" in capsys.readouterr().err


def test_a_line_noted_only_on_the_machine_holds_back_the_states_of_the_runs_record(trained, tmp_path, capsys, monkeypatch):
    """The record beside the run deleted user 8; a copy of the trained checkpoint, unlearned from another folder (where the
    recipe's relative dirpath is not the run's), deleted users 8 and 9: that line is noted on the machine (and beside the
    copy) only, and it holds back the record's states, which serve user 9, found by the trained model its journal names."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    (tmp_path / "both.csv").write_text("user\n8\n9\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv"])
    (tmp_path / "deploy" / "models").mkdir(parents=True)
    copy = shutil.copy(best, tmp_path / "deploy" / "models" / "model.ckpt")
    monkeypatch.chdir(tmp_path / "deploy")
    main([*unlearn, "--ckpt_path", str(copy), "--requests", str(tmp_path / "both.csv"), "--out", "line"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "unlearning").last_checkpoint()), "--out", "recs.csv"])
    assert exit_info.value.code == 2 and f"{tmp_path / 'deploy' / 'line'} records 1 deletion" in capsys.readouterr().err


def test_a_branch_from_a_state_is_not_held_back_by_its_record_going_on(trained, tmp_path, capsys):
    """A branch started from a state of the record beside the run (--branch true from its latest state, deleting user 9) is
    apart on purpose, like one from the trained checkpoint: the record going on (user 10) does not hold back its states."""
    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    (tmp_path / "user10.csv").write_text("user\n10\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv"])
    state = journal_of(tmp_path / "unlearning").last_checkpoint()
    main([*unlearn, "--ckpt_path", str(state), "--requests", "user9.csv", "--out", "branch", "--branch", "true"])
    main([*unlearn, "--ckpt_path", str(state), "--requests", "user10.csv"])
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "branch").last_checkpoint()), "--out", "recs.csv"])
    main([*unlearn, "--ckpt_path", str(journal_of(tmp_path / "branch").last_checkpoint()), "--requests", "user10.csv"])
    main(["test", "-c", str(trained.recipe), "--ckpt_path", str(journal_of(tmp_path / "branch").last_checkpoint())])
    assert journal_of(tmp_path / "branch").applied_count() == 2


def test_a_copy_of_a_record_does_not_go_on_while_the_record_is_there(trained, tmp_path, capsys):
    """A backup copy of a record (cp -a) given its latest state would go on in the copy (an unlearned checkpoint's record
    is its folder): a line of deletions the record never learns of, whose states keep what it deletes. Refused while the
    record is there; a record moved (the original gone) goes on where it is."""
    (tmp_path / "ckpt").mkdir()
    best = shutil.copy(trained.best, tmp_path / "ckpt" / "best.ckpt")
    for name, ids in (("user8", "8"), ("user9", "9")):
        (tmp_path / f"{name}.csv").write_text(f"user\n{ids}\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv", "--out", "line"])
    shutil.copytree(tmp_path / "line", tmp_path / "backup")
    copied_state = tmp_path / "backup" / journal_of(tmp_path / "line").last_checkpoint().name
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*unlearn, "--ckpt_path", str(copied_state), "--requests", "user9.csv"])  # into its own folder, the copy
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{tmp_path / 'backup'} is a copy of the deletion record {tmp_path / 'line'}" in err
    assert journal_of(tmp_path / "backup").applied_count() == 1
    shutil.rmtree(tmp_path / "line")  # moved: the record now lives in the copy only, and goes on there
    main([*unlearn, "--ckpt_path", str(copied_state), "--requests", "user9.csv"])
    assert journal_of(tmp_path / "backup").applied_count() == 2


def test_a_branch_started_from_another_checkpoint_of_the_run_does_not_hold_back_the_runs_own_record(trained, tmp_path, capsys):
    """The run's record deleted user 8 from epoch=1.ckpt; a branch (--branch true, a separate line on purpose) deleted user 9
    from epoch=0.ckpt. The run's record goes on from its latest state, whether the branch is there or was removed, and so
    does the branch in its own folder, with the run's recipe (whose checkpoint folder is the run's)."""
    older = a_line_from_the_last_epoch(trained, tmp_path)  # writes the run's epoch=0 and epoch=1.ckpt, users' request files
    shutil.rmtree(tmp_path / "line")
    (older.parent.parent / "unlearning" / "lines.jsonl").unlink()
    (tmp_path / "user7.csv").write_text("user\n7\n")
    run = tmp_path / "run.yaml"
    run.write_text(trained.recipe.read_text().replace("dirpath: ckpt", f"dirpath: {older.parent}"))
    unlearn = ["unlearn", "-c", str(run), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(older.parent / "epoch=1.ckpt"), "--requests", "user8.csv"])  # into run/unlearning
    record = tmp_path / "run" / "unlearning"
    main([*unlearn, "--ckpt_path", str(older), "--requests", "user9.csv", "--out", "exp", "--branch", "true"])
    branch = str(journal_of(tmp_path / "exp").last_checkpoint())
    main(["predict", "-c", str(run), "--ckpt_path", branch, "--out", "recs.csv"])
    main(["test", "-c", str(run), "--ckpt_path", branch])
    main([*unlearn, "--ckpt_path", branch, "--requests", "user7.csv", "--out", "exp"])
    for removed in (False, True):
        if removed:
            shutil.rmtree(tmp_path / "exp")  # a finished experiment
        latest = str(journal_of(record).last_checkpoint())
        main(["predict", "-c", str(run), "--ckpt_path", latest, "--out", "recs.csv"])
        main(["test", "-c", str(run), "--ckpt_path", latest])
    main([*unlearn, "--ckpt_path", latest, "--requests", "user7.csv"])
    assert journal_of(record).applied_count() == 2


def test_a_branch_as_the_first_line_of_a_run_binds_its_other_trained_checkpoints(trained, tmp_path, capsys):
    """--branch true from epoch=1.ckpt with no record yet: epoch=0.ckpt's data still holds what that line deleted."""
    older = a_line_from_the_last_epoch(trained, tmp_path)
    shutil.rmtree(tmp_path / "line")
    (older.parent.parent / "unlearning" / "lines.jsonl").unlink()
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(older.parent / "epoch=1.ckpt"),
          "--requests", "user8.csv", "--out", "br", "--branch", "true"])
    capsys.readouterr()
    for command in COMMANDS_FROM_A_CHECKPOINT[:-1]:
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(older), *command[1:]])
        assert exit_info.value.code == 2 and str(tmp_path / "br") in capsys.readouterr().err, command


def test_a_model_of_another_split_of_the_data_given_with_the_recipe_of_a_run_with_deletions_is_refused(trained, tmp_path, capsys,
                                                                                                        monkeypatch):
    """The recipe's run (ckpt/) deleted user 8; a model fitted with --data.seed 1 elsewhere was trained on user 8's rows too
    (another split of the same data): given with that recipe it is refused, as it would be in the run folder, saying whose
    record it is; with its own run's recipe (its checkpoint folder) it is that run's to check."""
    (tmp_path / "ckpt").mkdir()
    best = shutil.copy(trained.best, tmp_path / "ckpt" / "best.ckpt")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    (tmp_path / "exp2").mkdir()
    monkeypatch.chdir(tmp_path / "exp2")  # its checkpoints go to exp2/ckpt
    main(["fit", "-c", str(trained.recipe), "--data.seed", "1", *BRIEF])
    other = str(tmp_path / "exp2" / "ckpt" / "best.ckpt")
    main(["predict", "-c", str(trained.recipe), "--data.seed", "1", "--ckpt_path", other, "--out", "recs.csv"])  # its own run
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for command in (["predict", "--out", "recs.csv"], ["test"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--data.seed", "1", "--ckpt_path", other, *command[1:]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "is a record of the run this recipe writes its checkpoints into" in err, err
    (tmp_path / "user9.csv").write_text("user\n9\n")  # nor is a line started from it that leaves user 8 in
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(trained.recipe), "--data.seed", "1", "--ckpt_path", other, "--requests", "user9.csv",
              "--method", "FineTune", "--out", "line"])
    assert exit_info.value.code == 2 and "its latest state is on other data (another seed or split)" in capsys.readouterr().err
    assert not (tmp_path / "line").exists()


def test_a_model_of_a_data_file_without_the_deleted_users_is_not_held_back_by_the_recipes_run(trained, tmp_path, capsys, monkeypatch):
    """The recipe's run deleted user 8; a model fitted afresh on the data file without user 8 is of other data (its source
    differs, not only its split): the run's record is not its to check, so predict and test pass with that recipe."""
    (tmp_path / "ckpt").mkdir()
    best = shutil.copy(trained.best, tmp_path / "ckpt" / "best.ckpt")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv"])
    clean, refit = a_model_of_other_data(trained, tmp_path, monkeypatch, "8")
    main(["predict", "-c", str(trained.recipe), *clean, "--ckpt_path", str(refit), "--out", "recs.csv"])
    main(["test", "-c", str(trained.recipe), *clean, "--ckpt_path", str(refit)])


@pytest.mark.parametrize("given", [[], ["--ckpt_path", "last"]], ids=["none given", "last"])
def test_a_fit_resumed_from_an_on_exception_checkpoint_is_checked_as_the_file_lightning_picks(given, trained, tmp_path, capsys):
    """With an OnExceptionCheckpoint, a fit given no ckpt_path (or `last`) resumes from its file, here one of epoch 0,
    which still holds user 8: refused as that file is."""
    older = a_line_from_the_last_epoch(trained, tmp_path)
    shutil.copy(older, older.parent / "on_exception.ckpt")
    saver = (f"--trainer.callbacks+={{class_path: pytorch_lightning.callbacks.OnExceptionCheckpoint, init_args: "
             f"{{dirpath: {older.parent}, filename: on_exception}}}}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), *BRIEF, saver, *given])
    assert exit_info.value.code == 2 and str(tmp_path / "line") in capsys.readouterr().err


def test_compare_from_an_older_checkpoint_of_a_run_says_what_its_lines_deleted(trained, tmp_path, capsys):
    """Not only from the checkpoint a line was started from: epoch=0.ckpt's data holds what the line from epoch=1 deleted."""
    older = a_line_from_the_last_epoch(trained, tmp_path)
    body = "methods: [{class_path: lightning_unlearn.unlearning.FineTune}]\ndeletion: {kind: interactions, count: 5, seed: 0}\nout: cmp\n"
    capsys.readouterr()
    main(["compare", "-c", str(recipe(tmp_path / "compare.yaml", trained.data_file, body)), "--ckpt_path", str(older), *BRIEF])
    assert f"[compare] {tmp_path / 'line'} records 1 deletion applied to this checkpoint's model or its run" in capsys.readouterr().out


def test_a_checkpoint_elsewhere_is_refused_as_it_cannot_be_checked(trained, tmp_path, capsys):
    for command in COMMANDS_FROM_A_CHECKPOINT[:-1]:
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", "s3://bucket/run/epoch=0.ckpt", *command[1:]])
        assert exit_info.value.code == 2, command
        assert "--ckpt_path s3://bucket/run/epoch=0.ckpt: a checkpoint elsewhere cannot be checked" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["best", "a folder"])
def test_fit_refuses_a_ckpt_path_that_names_no_checkpoint_file_here(given, trained, tmp_path, capsys):
    """`best` names the best checkpoint of a fit run in the same process, a folder no file: a message, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", "best" if given == "best" else str(tmp_path), *BRIEF])
    assert exit_info.value.code == 2 and "fit needs a checkpoint file, and there is none at that name here" in capsys.readouterr().err


def test_a_line_of_the_run_moved_away_is_refused_as_gone_for_its_other_checkpoints_too(trained, tmp_path, capsys):
    """The line from epoch=1.ckpt moved: epoch=0.ckpt cannot be checked against what it deleted any more."""
    older = a_line_from_the_last_epoch(trained, tmp_path)
    (tmp_path / "archive").mkdir()
    shutil.move(tmp_path / "line", tmp_path / "archive" / "line")
    capsys.readouterr()
    for command in COMMANDS_FROM_A_CHECKPOINT:
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(older), *command[1:]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, command
        assert f"{tmp_path / 'line'}, noted beside {older} as a line of deletions started from another checkpoint of its run (or a copy of one), is gone" in err
    assert not any((tmp_path / name).exists() for name in ("recs.csv", "second"))
    _ = journal_of(tmp_path / "another").key  # a record that is not the line: --record of it checks nothing in the line's place
    for record, said in (("another", "is gone"), (str(tmp_path / "archive" / "line"), f"{tmp_path / 'archive' / 'line'} records 1 deletion")):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(older), "--out", "recs.csv", "--record", record])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err, record
    assert not (tmp_path / "recs.csv").exists()


def test_fit_from_a_checkpoint_with_callback_state_is_checked_against_the_lines_started_from_it(trained, tmp_path, capsys):
    """The recipe's UnlearningCallback saved its (empty) state in the checkpoint a line was then started from: fitting it
    again would train on the user the line deleted."""
    (tmp_path / "user8.csv").write_text("user\n8\n")
    callback = (f"--trainer.callbacks+={{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, dirpath: {tmp_path / 'own'}, evaluate: false}}}}")
    main(["fit", "-c", str(trained.recipe), *BRIEF, callback])
    main(["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", "ckpt/best.ckpt", "--requests", "user8.csv",
          "--out", "line"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", "ckpt/best.ckpt", "--trainer.max_epochs=2", callback])
    assert exit_info.value.code == 2 and str(tmp_path / "line") in capsys.readouterr().err


@pytest.mark.parametrize("again", ["the same command", "another line", "predict", "test", "fit"])
def test_an_unlearn_refused_after_a_process_stopped_before_its_cleaning_cleans_the_recommendations(again, trained, tmp_path, capsys,
                                                                                                     monkeypatch):
    """A process killed after its request was applied, before its cleaning, left user 8 in predict's file; the same
    command run again recovers the request and is refused (its checkpoint is now older than the record), as are another
    line, a predict, a test or a fit from the checkpoint without user 8: each cleans."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    (tmp_path / "user8.csv").write_text("user\n8\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--ckpt_path", str(best), "--requests", "user8.csv",
               "--out", "first"]
    with monkeypatch.context() as patch:  # stopped before its cleaning
        patch.setattr(callback_module, "clean_recommendations", lambda *args, **kwargs: None)
        main(unlearn)
    assert any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))
    capsys.readouterr()
    (tmp_path / "user9.csv").write_text("user\n9\n")
    command = {"the same command": unlearn, "another line": [*unlearn[:-3], "user9.csv", "--out", "second"],
               "predict": ["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "again.csv"],
               "test": ["test", "-c", str(trained.recipe), "--ckpt_path", str(best)],
               "fit": ["fit", "-c", str(trained.recipe), "--ckpt_path", str(best), *BRIEF]}[again]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    said = {"the same command": "already holds 1 applied request", "another line": "would start a second line of deletions"}
    assert exit_info.value.code == 2 and said.get(again, str(tmp_path / "first")) in capsys.readouterr().err
    assert not any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))


def test_a_callback_in_a_script_cleans_predicts_files_of_what_it_deletes(trained, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    model, dm = restored(trained, best)
    callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[8])], dirpath=tmp_path / "own", evaluate=False)
    callback.apply_pending(model, dm)
    rows = list(csv.reader((tmp_path / "top.csv").open()))
    assert len(rows) > 1 and not any(row[0] == "8" for row in rows)


@pytest.mark.parametrize("then", ["the same fit again", "a fit resumed from its latest state"])
def test_a_fit_whose_callback_stopped_before_its_cleaning_is_cleaned_after_by_the_next_fit(then, trained, tmp_path, capsys,
                                                                                           monkeypatch):
    """The same fit run again is refused by the record (its checkpoint is older than it now: the callback's line from it is
    noted beside it): it cleans, as the fit it advises (from the record's latest state) does."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    (tmp_path / "user8.csv").write_text("user\n8\n")
    callback = (f"--trainer.callbacks+={{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {tmp_path / 'user8.csv'}, "
                f"dirpath: {tmp_path / 'own'}, evaluate: false}}}}")
    fit = ["fit", "-c", str(trained.recipe), "--trainer.max_epochs=3", "--trainer.limit_train_batches=2", callback]
    with monkeypatch.context() as patch:  # stopped before its cleaning
        patch.setattr(callback_module, "clean_recommendations", lambda *args, **kwargs: None)
        patch.setattr(cli_module, "clean_recommendations", lambda *args, **kwargs: None)
        main([*fit, "--ckpt_path", str(best)])
    assert journal_of(tmp_path / "own").applied_count() == 1
    assert any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))
    if then == "the same fit again":
        with pytest.raises(SystemExit) as exit_info:
            main([*fit, "--ckpt_path", str(best)])  # the weights the first fit started from: an older state of the record
        assert exit_info.value.code == 2 and f"{tmp_path / 'own'} records 1 deletion" in capsys.readouterr().err  # its line, noted
    else:
        main([*fit, "--ckpt_path", str(journal_of(tmp_path / "own").last_checkpoint()), "--trainer.max_epochs=1"])
    assert not any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))


@pytest.mark.parametrize("then", ["unlearn of the same request from its latest state", "test", "validate"])
def test_an_unlearn_stopped_before_its_cleaning_is_cleaned_after_by_what_resumes_from_its_latest_state(then, trained, tmp_path, capsys,
                                                                                                     monkeypatch):
    """unlearn's stop message advises running it again from the record's latest state: the request is recognised as applied
    (nothing queued then), and the deleted user must still leave predict's files; so must an evaluation of that state."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "top.csv", "--k", "5"])
    (tmp_path / "user8.csv").write_text("user\n8\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--requests", "user8.csv", "--method", "FineTune", "--out", "line"]
    with monkeypatch.context() as patch:  # stopped before its cleaning
        patch.setattr(callback_module, "clean_recommendations", lambda *args, **kwargs: None)
        main([*unlearn, "--ckpt_path", str(best)])
    assert any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))
    latest = str(journal_of(tmp_path / "line").last_checkpoint())
    if then == "unlearn of the same request from its latest state":
        main([*unlearn, "--ckpt_path", latest])
        assert "already applied" in capsys.readouterr().out and journal_of(tmp_path / "line").applied_count() == 1
    else:
        main([then, "-c", str(trained.recipe), "--ckpt_path", latest])
    assert not any(row[0] == "8" for row in csv.reader((tmp_path / "top.csv").open()))


@pytest.mark.parametrize("key", ["lost", "replaced"])
def test_a_record_that_lost_its_key_is_said_so_by_every_command_from_its_latest_state(key, trained, tmp_path, capsys):
    """Not "the record is gone: move it back": the journal is there, the key that recognises its requests not (fit said
    so when it was lost, every command when another record's was copied over it)."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--requests", "user8.csv", "--method", "FineTune", "--ckpt_path", str(best), "--out", "line"])
    latest = str(journal_of(tmp_path / "line").last_checkpoint())
    (tmp_path / "line" / "journal.key").unlink()
    if key == "replaced":
        main(["unlearn", "-c", str(trained.recipe), "--requests", "user8.csv", "--method", "FineTune", "--ckpt_path", str(best),
              "--out", "other", "--branch", "true"])  # another record, whose key is copied over the line's
        shutil.copy(tmp_path / "other" / "journal.key", tmp_path / "line" / "journal.key")
    capsys.readouterr()
    for command in (["fit", *BRIEF], ["test"], ["validate"], ["predict", "--out", "recs.csv"],
                    ["unlearn", "--method", "FineTune", "--requests", "user8.csv", "--out", "line"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", latest, *command[1:]])
        err = capsys.readouterr().err
        said = "line/journal.key is gone" if key == "lost" else "line/journal.key is not the key"
        assert exit_info.value.code == 2 and said in err, (command, err)


def test_a_torn_applied_line_is_said_to_need_unlearn_again_by_every_command(trained, tmp_path, capsys):
    """A crash while the `applied` line was written: its request is recovered by unlearn on the folder, which every
    command says (fit said the journal was replaced and to restore a backup)."""
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    (tmp_path / "user8.csv").write_text("user\n8\n")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--requests", "user8.csv", "--method", "FineTune", "--out", "line"]
    main([*unlearn, "--ckpt_path", str(best)])
    latest = str(next((tmp_path / "line").glob("unlearned-0000-*.ckpt")))
    journal = tmp_path / "line" / "journal.jsonl"
    journal.write_bytes(journal.read_bytes()[:-40])  # the applied line torn
    capsys.readouterr()
    for command in (["fit", *BRIEF], ["test"], ["predict", "--out", "recs.csv"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", latest, *command[1:]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "holds a deletion request whose process stopped while applying it" in err, (command, err)
    main([*unlearn, "--ckpt_path", latest])  # recovers it, as said: applied once
    assert [e["status"] for e in journal_of(tmp_path / "line")] == ["pending", "applied"]


@pytest.mark.parametrize("first", ["this machine's folder", "another machine folder", "the run's folder"])
def test_two_lines_from_one_model_at_once_are_refused_while_the_first_runs(first, trained, tmp_path, capsys):
    """Two unlearn processes from one trained model, started together, each found no other line and left out what the
    other deleted: the second is refused while the first checks, applies and notes its line (the machine's lock, and
    one on the checkpoint file, which a first process with another $LIGHTNING_UNLEARN_HOME holds too). The run's: a first
    process from one of the run's checkpoints holds its folder, and a second from a copy elsewhere, with the run's recipe
    and another $LIGHTNING_UNLEARN_HOME, is refused too."""
    import fcntl

    from lightning_unlearn.models.functional import model_digest
    from lightning_unlearn.unlearning.journal import exclusive

    (tmp_path / "user8.csv").write_text("user\n8\n")
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    digest = model_digest(restored(trained, best, removals=False)[0])
    if first == "the run's folder":  # the first unlearns from the run's own checkpoint (ckpt/, the recipe's), the second from a copy
        (tmp_path / "ckpt").mkdir()
        shutil.copy(best, tmp_path / "ckpt" / "best.ckpt")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"]
    with contextlib.ExitStack() as held:  # as the first process holds them
        held.enter_context(exclusive(tmp_path / ("machine" if first == "this machine's folder" else "other") / "locks" /
                                     f"{digest[:32]}.lock", "the first"))
        handle = os.open(tmp_path / "ckpt" if first == "the run's folder" else best, os.O_RDONLY)
        held.callback(os.close, handle)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            main([*unlearn, "--out", "second"])
    err = capsys.readouterr().err
    said = {"this machine's folder": f"process {os.getpid()} is applying deletion requests from the same model's parameters",
            "another machine folder": f"another process is applying deletion requests from {best}",
            "the run's folder": f"another process is applying deletion requests from a checkpoint of {tmp_path / 'ckpt'}"}[first]
    assert exit_info.value.code == 2 and said in err
    assert not (tmp_path / "second").exists()  # nothing written
    main([*unlearn, "--out", "second"])  # once it is done
    assert journal_of(tmp_path / "second").applied_count() == 1


def test_a_record_going_on_does_not_wait_for_a_line_being_started_in_its_run(trained, tmp_path):
    """Only an unlearn that starts a line (from a trained checkpoint) holds the run's checkpoint folder: a record going on from
    its latest state meanwhile, which starts none, is not refused."""
    import fcntl

    best, _ = two_epochs(trained, tmp_path, tmp_path / "ckpt")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune", "--out", "line"]
    main([*unlearn, "--ckpt_path", str(best), "--requests", "user8.csv"])
    handle = os.open(tmp_path / "ckpt", os.O_RDONLY)  # as another unlearn starting a line from the run's epoch=0.ckpt holds it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        main([*unlearn, "--ckpt_path", str(journal_of(tmp_path / "line").last_checkpoint()), "--requests", "user9.csv"])
    finally:
        os.close(handle)
    assert journal_of(tmp_path / "line").applied_count() == 2


def test_a_checkpoint_on_a_file_system_without_locks_is_unlearned_with_the_machines_lock_alone(trained, tmp_path, capsys, monkeypatch):
    """Some network mounts refuse advisory locks (ENOLCK): said, not a traceback."""
    import errno
    import fcntl

    (tmp_path / "user8.csv").write_text("user\n8\n")
    (tmp_path / "checkpoints").mkdir()
    best = shutil.copy(trained.best, tmp_path / "checkpoints")
    flock = fcntl.flock

    def no_locks_there(fd, operation):
        if os.readlink(f"/proc/self/fd/{fd}") == str(Path(best).resolve()):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks_there)
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune", "--out", "line"])
    assert journal_of(tmp_path / "line").applied_count() == 1 and f"{best} cannot be locked" in capsys.readouterr().err


def test_a_line_removed_and_made_again_in_its_folder_or_moved_with_its_project(trained, tmp_path, capsys):
    """The quick start's line removed is refused as gone also to the same command making it again in its place (it cannot
    tell a line moved away from one removed on purpose) until its line is removed from the note on purpose; a project
    folder moved whole (the note beside the checkpoint holds its lines relative to it) is not gone."""
    (tmp_path / "user8.csv").write_text("user\n8\n")
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    best = shutil.copy(trained.best, project / "checkpoints")
    unlearn = ["unlearn", "-c", str(trained.recipe), "--requests", str(tmp_path / "user8.csv"), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(best), "--out", str(project / "unlearned")])
    shutil.rmtree(project / "unlearned")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*unlearn, "--ckpt_path", str(best), "--out", str(project / "unlearned")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{project / 'unlearned'}, noted beside {best} as a line of deletions started from it, is gone" in err
    assert f"remove its line from {project / 'unlearning' / 'lines.jsonl'}" in err
    (project / "unlearning" / "lines.jsonl").unlink()  # removed on purpose: its requests are applied again
    main([*unlearn, "--ckpt_path", str(best), "--out", str(project / "unlearned")])
    assert journal_of(project / "unlearned").applied_count() == 1
    moved = tmp_path / "moved"
    project.rename(moved)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the line is found where it moved: the trained model holds what it deleted
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(moved / "checkpoints" / "best.ckpt"), "--out", "p.csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{moved / 'unlearned'} records 1 deletion applied" in err
    assert f"{project / 'unlearned'}, noted as a line of deletions" in err  # the machine's note of its old place: named


class StopAtTrainEnd(pl.Callback):
    """A fit that stops with an error after its UnlearningCallback applied its requests (at train end, before this)."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("stopped after the deletions")


def test_a_fit_stopped_after_its_callback_deleted_still_clears_the_recommendations(trained, tmp_path):
    (tmp_path / "checkpoints").mkdir()  # a copy: the record beside the shared one may hold the fixture's deletion
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", shutil.copy(trained.best, tmp_path / "checkpoints"), "--out", "top.csv",
          "--k", "5"])
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}, dirpath: {tmp_path / 'unl'}}}}}")
    with pytest.raises(RuntimeError, match="stopped after the deletions"):
        main(["fit", "-c", str(trained.recipe), *BRIEF, f"--trainer.callbacks+={callback}",
              "--trainer.callbacks+={class_path: tests.test_commands.StopAtTrainEnd}"])
    assert journal_of(tmp_path / "unl").applied_count() == 1
    rows = list(csv.reader((tmp_path / "top.csv").open()))
    assert rows[1:] and not any(row[0] == str(DELETED_USER) or row[2] == str(DELETED_ITEM) for row in rows)


def test_a_copy_of_a_trained_checkpoint_finds_the_lines_started_from_the_original(trained, tmp_path, capsys):
    """A trained checkpoint copied to another folder (a model deployed elsewhere) knows neither the record beside the
    original nor the lines noted there: the lines noted on the machine find them by the parameters' digest, so a line
    from the copy that leaves out what the original's record deleted is refused, and so is predicting from the copy."""
    for name in ("8", "9"):
        (tmp_path / f"user{name}.csv").write_text(f"user\n{name}\n")
    original, copy = (shutil.copy(trained.best, tmp_path / run / "checkpoints") for run in ("run", "deployed")
                      if (tmp_path / run / "checkpoints").mkdir(parents=True) is None)
    unlearn = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*unlearn, "--ckpt_path", str(original), "--requests", "user8.csv"])  # the record beside the original deletes user 8
    capsys.readouterr()
    record = tmp_path / "run" / "unlearning"
    with pytest.raises(SystemExit) as exit_info:  # a line from the copy that leaves user 8 out
        main([*unlearn, "--ckpt_path", str(copy), "--requests", "user9.csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"is an older state of the deletion record {record}" in err and "--branch true" in err
    assert not (tmp_path / "deployed" / "unlearning").exists()  # nothing written
    with pytest.raises(SystemExit) as exit_info:  # nor does the copy recommend from user 8's rows
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(copy), "--out", "p.csv"])
    assert exit_info.value.code == 2 and f"{record} records 1 deletion applied" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    noted = [json.loads(line) for line in (tmp_path / "machine" / "lines.jsonl").read_text().splitlines()]
    assert [sorted(line) for line in noted] == [["checkpoint", "key_id", "model", "record", "stamp"]]  # paths, digests, file stats: no id
    assert noted[0]["record"] == str(record.resolve()) and noted[0]["checkpoint"] == str(Path(original).resolve())
    main([*unlearn, "--ckpt_path", str(copy), "--requests", "user9.csv", "--out", "branch", "--branch", "true"])  # on purpose
    assert journal_of(tmp_path / "branch").applied_count() == 1


def test_compare_refuses_an_unlearning_callback_in_its_trainer(trained, capsys):
    callback = (f"{{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {trained.requests}}}}}")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), f"--trainer.callbacks+={callback}"])
    assert exit_info.value.code == 2 and "remove the UnlearningCallback" in capsys.readouterr().err


def test_fit_from_an_unlearned_checkpoint_checks_the_data(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--data.seed=1", *BRIEF])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-unlearn fit: error: The saved datamodule state") and "fingerprint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("linked", ["path", "symlink", "annexed", "in_another_record"])
def test_unlearn_from_an_unlearned_checkpoint_keeps_its_removals(trained, tmp_path, capsys, linked):
    (tmp_path / "more.csv").write_text("user\n8\n")
    checkpoint = trained.unlearned
    if linked == "symlink":  # e.g. a `serving/latest.ckpt`: the branch takes the key of the folder the file is in
        checkpoint = tmp_path / "serving" / "latest.ckpt"
        checkpoint.parent.mkdir()
        checkpoint.symlink_to(trained.unlearned)
    elif linked == "annexed":  # git-annex, DVC: the folder (with its key) holds a link into a content store
        checkpoint = tmp_path / "annexed" / trained.unlearned.name
        checkpoint.parent.mkdir()
        shutil.copy(trained.unlearned.parent / "journal.key", checkpoint.parent)
        stored = tmp_path / "store" / "SHA256E-s1234"
        stored.parent.mkdir()
        shutil.copy(trained.unlearned, stored)
        checkpoint.symlink_to(stored)
    elif linked == "in_another_record":  # the link sits in a folder with a key of its own, which is not the file's
        checkpoint = tmp_path / "other_record" / "from_unlearned.ckpt"
        assert journal_of(checkpoint.parent).write_key(os.urandom(32))
        checkpoint.symlink_to(trained.unlearned)
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(checkpoint), "--requests", "more.csv",
          "--method", "FineTune", "--out", "branch", "--branch", "true"])
    assert "[unlearn] FineTune(epochs=1):" in capsys.readouterr().out
    state = torch.load(next((tmp_path / "branch").glob("unlearned-*.ckpt")), weights_only=True)["datamodule_state"]
    _, dm = restored(trained, trained.best)
    assert sorted(state["users"].tolist()) == sorted([index_of(dm, user=DELETED_USER), index_of(dm, user=8)])
    assert state["items"].tolist() == [index_of(dm, item=DELETED_ITEM)]


def test_compare_from_an_unlearned_checkpoint_keeps_its_removals(trained, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def compare(model, datamodule, *args, **kwargs):
        seen.update(datamodule.state_dict())
        raise Stop

    monkeypatch.setattr("lightning_unlearn.cli.compare", compare)
    with pytest.raises(Stop):
        main(["compare", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned)])
    _, dm = restored(trained, trained.best)
    assert seen["users"].tolist() == [index_of(dm, user=DELETED_USER)] and seen["items"].tolist() == [index_of(dm, item=DELETED_ITEM)]


def test_compare_says_when_retrain_would_train_less_than_the_original(trained, tmp_path, monkeypatch, capsys):
    state = torch.load(trained.best, weights_only=True)
    state["epoch"] = 4  # saved after its fifth epoch
    torch.save(state, tmp_path / "five.ckpt")
    class Stop(Exception):
        pass

    def compare(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("lightning_unlearn.cli.compare", compare)
    for epochs, said in ((2, True), (5, False)):
        with pytest.raises(Stop):
            main(["compare", "-c", str(trained.recipe), "--ckpt_path", "five.ckpt", f"--trainer.max_epochs={epochs}"])
        out = capsys.readouterr().out
        assert ("saved after epoch 5, and Retrain refits with at most 2" in out) == said, out


def test_predict_writes_top_k_without_deleted_users_items_or_seen_items(trained, capsys):
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--out", "recs.csv", "--k", "5"])
    out = capsys.readouterr().out
    assert "[predict] wrote the top-5 recommendations of 119 users to recs.csv (1 deleted user left out; 1 deleted item" in out
    with open("recs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    _, dm = restored(trained, trained.unlearned)
    users = {int(r["user"]) for r in rows}
    assert DELETED_USER not in users and len(users) == dm.train.num_users - 1
    assert all(int(r["item"]) != DELETED_ITEM for r in rows)
    seen = {(int(dm.train.user_ids[u]), int(dm.train.item_ids[i]))
            for split in (dm.train, dm.val) for u, i in zip(split.users.tolist(), split.items.tolist())}
    assert not {(int(r["user"]), int(r["item"])) for r in rows} & seen
    first = [r for r in rows if r["user"] == rows[0]["user"]]
    assert [int(r["rank"]) for r in first] == [1, 2, 3, 4, 5]
    assert [float(r["score"]) for r in first] == sorted((float(r["score"]) for r in first), reverse=True)


def test_predict_refuses_a_checkpoint_older_than_its_deletion_record(trained, tmp_path, capsys):
    """After `unlearn` deleted user 8 from a run's checkpoint, that checkpoint would still recommend to user 8 and
    write the id: predict is refused, naming the latest state, which predicts without user 8. A fit from it is refused
    too (it trained on user 8's rows again, into checkpoints that no check found stale)."""
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(trained.best.read_bytes())
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"])
    latest = journal_of(tmp_path / "run" / "unlearning").last_checkpoint()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "stale.csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "records 1 deletion applied" in err and f"--ckpt_path {latest}" in err
    assert not (tmp_path / "stale.csv").exists()
    for command in ("validate", "test"):  # nor scored: user 8's held-out rows, from a model trained on theirs
        with pytest.raises(SystemExit) as exit_info:
            main([command, "-c", str(trained.recipe), "--ckpt_path", str(best)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "its metrics would score users deleted since" in err and f"--ckpt_path {latest}" in err
    main(["test", "-c", str(trained.recipe), "--ckpt_path", str(latest)])  # the latest state is tested
    with pytest.raises(SystemExit) as exit_info:  # nor trained on: its checkpoints would learn user 8's rows again, and name no record
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(best), *BRIEF])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "training on from it would learn their rows again" in err
    assert f"Fit from the latest state (`--ckpt_path {latest}`)" in err and not (tmp_path / "ckpt").exists()
    # the same model as `last` of a second ModelCheckpoint's folder: found as Lightning finds it, and refused
    (best.parent / "last.ckpt").write_bytes(best.read_bytes())
    saver = f"{{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {{dirpath: {best.parent}, save_last: true}}}}"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(trained.recipe), "--ckpt_path", "last", *BRIEF, f"--trainer.callbacks+={saver}"])
    assert exit_info.value.code == 2 and "training on from it would learn their rows again" in capsys.readouterr().err
    (best.parent / "last.ckpt").unlink()
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "recs.csv"])
    with open("recs.csv", newline="") as fh:
        assert "8" not in {row["user"] for row in csv.DictReader(fh)}
    # A model fitted from the latest state holds its removals: it predicts (its checkpoint has no lineage).
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--trainer.max_epochs=2"])
    refit = best.parent / "refit.ckpt"  # beside the record, as the run's own fit would write it
    refit.write_bytes((tmp_path / "ckpt" / "best.ckpt").read_bytes())
    main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(refit), "--out", "refit.csv"])
    with open("refit.csv", newline="") as fh:
        assert "8" not in {row["user"] for row in csv.DictReader(fh)}
    # A model fitted afresh on other splits of the data (another seed) was trained on user 8's rows.
    main(["fit", "-c", str(trained.recipe), "--data.seed=1", *BRIEF])
    other = best.parent / "seed1.ckpt"
    other.write_bytes(max((tmp_path / "ckpt").glob("best*.ckpt"), key=lambda p: p.stat().st_mtime_ns).read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(trained.recipe), "--data.seed=1", "--ckpt_path", str(other), "--out", "seed1.csv"])
    assert "is not the data they were applied to (another seed or split)" in capsys.readouterr().err
    # The record's latest state is gone: nothing to check against, so nothing is predicted.
    latest.rename(tmp_path / "away.ckpt")
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(best), "--out", "gone.csv"])
    assert "the latest state there is missing" in capsys.readouterr().err and not (tmp_path / "gone.csv").exists()
    (tmp_path / "away.ckpt").rename(latest)
    # A request being applied now, then one whose process stopped mid-way: no state is the latest until it is done.
    journal = journal_of(tmp_path / "run" / "unlearning")
    journal.append("0" * 64, "pending", request=1, checkpoint=str(journal.folder / "unlearned-0001-000000000000.ckpt"))
    fork = multiprocessing.get_context("fork")
    locked, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold_the_lock, args=(str(journal.folder), locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        with pytest.raises(SystemExit):
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "live.csv"])
        assert "a deletion request is being applied now" in capsys.readouterr().err
    finally:
        release.set()
        joined(holder, 30)
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(latest), "--out", "stopped.csv"])
    assert "whose process stopped while applying it: run `unlearn` on that folder again" in capsys.readouterr().err


def test_a_refit_from_an_unlearned_checkpoint_keeps_the_requests_it_embodies(trained, tmp_path, capsys):
    """Without a callback, the refit's checkpoints held the removals but not the applied requests: a branch from one
    journaled the same request a second time (no training row, the same users)."""
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF])
    refit = tmp_path / "ckpt" / "best.ckpt"
    carried = torch.load(refit, weights_only=True)["unlearning"]
    original = torch.load(trained.unlearned, weights_only=True)["unlearning"]
    assert carried["applied"] == original["applied"] and carried["key_id"] == original["key_id"]
    capsys.readouterr()
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(refit), "--requests", str(trained.requests), "--method", "FineTune",
          "--out", "branch", "--branch", "true"])
    assert "is already applied" in capsys.readouterr().out
    assert not (tmp_path / "branch" / "journal.jsonl").exists() or journal_of(tmp_path / "branch").entries() == []
    # Without --out, the record beside the refit is not the one it embodies: the refusal names that one.
    (tmp_path / "user8.csv").write_text("user\n8\n")
    with pytest.raises(SystemExit):
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(refit), "--requests", "user8.csv", "--method", "FineTune"])
    assert f"Resume in its own folder ({trained.unlearned.parent.resolve()}: `unlearn --out` it" in capsys.readouterr().err
    # A fit resumed from the refit's own checkpoint keeps the state on too.
    (tmp_path / "refit.ckpt").write_bytes(refit.read_bytes())
    saver = f"{{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {{dirpath: {tmp_path / 'again'}, save_last: true}}}}"
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "refit.ckpt"), "--trainer.max_epochs=3",
          f"--trainer.callbacks+={saver}"])
    again = torch.load(tmp_path / "again" / "last.ckpt", weights_only=True)
    assert again["unlearning"]["applied"] == original["applied"] and again["epoch"] == 2


def test_a_fit_refused_before_its_checks_pass_leaves_no_key_it_made_or_copied(trained, tmp_path, capsys):
    """A callback's folder key is made in setup (or copied for a branch before the fit): a fit refused before on_fit_start's
    checks pass (a request file that does not read, an unknown id) left it, and the branch or resume its message advised
    was then refused for that key."""
    (tmp_path / "bad.csv").write_text('garbage,,\n"\n')
    (tmp_path / "unknown.csv").write_text("user\n99999\n")

    def callback(requests: str, branch: str) -> str:
        return (f"--trainer.callbacks+={{class_path: lightning_unlearn.unlearning.UnlearningCallback, init_args: {{method: "
                f"{{class_path: lightning_unlearn.unlearning.FineTune}}, requests_file: {requests}, dirpath: {tmp_path / 'X'}, "
                f"branch: {branch}}}}}")

    for requests, branch, said in (("bad.csv", "false", "unknown header column"), ("unknown.csv", "true", "unknown user id")):
        with pytest.raises(SystemExit):
            main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF, callback(requests, branch)])
        assert said in capsys.readouterr().err and not (tmp_path / "X" / "journal.key").exists()
    main(["fit", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *BRIEF, callback(str(trained.requests), "true")])
    assert journal_of(tmp_path / "X").key == journal_of(trained.unlearned.parent).key  # the advised branch: its key adopted


def test_a_fit_of_other_data_resumed_beside_a_record_is_another_experiment_not_a_stale_state(trained, tmp_path, capsys):
    """A model of another data file fitted in a run folder whose record deleted rows of the first one: resuming it was
    refused as stale, and the advice named a checkpoint of the other data (unlearn takes it as another experiment)."""
    best = tmp_path / "ckpt" / "best.ckpt"
    best.parent.mkdir()
    best.write_bytes(trained.best.read_bytes())
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"])
    assert journal_of(tmp_path / "unlearning").applied_count() == 1
    rows = [line for line in trained.data_file.read_text().splitlines() if int(line.split("\t")[0]) > 40]
    (tmp_path / "other.tsv").write_text("\n".join(rows) + "\n")
    other = recipe(tmp_path / "other.yaml", tmp_path / "other.tsv", "")
    main(["fit", "-c", str(other), *BRIEF])  # a new model in the same run folder: noted, not refused
    resumed = max(best.parent.glob("best-v*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    main(["fit", "-c", str(other), "--ckpt_path", str(resumed), "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"])
    assert "training on from it would learn" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the first data's model under the other data: a message, not Lightning's traceback
        main(["fit", "-c", str(other), "--ckpt_path", str(best), *BRIEF])
    assert exit_info.value.code == 2 and "is not a checkpoint of this recipe's model" in capsys.readouterr().err


def test_a_branch_refused_before_its_first_request_leaves_a_folder_another_branch_can_start_in(trained, tmp_path, capsys):
    """`unlearn --branch true` refused for a typo in its request used to leave its copy of the record's key in the new
    folder: a branch from another record's checkpoint into that folder was then refused for its key, which no request
    was ever recorded with. A refused run removes the key it copied; a folder whose journal recorded something keeps its own."""
    (tmp_path / "typo.csv").write_text("user\n99999\n")
    branch = ["--method", "FineTune", "--out", "br", "--branch", "true"]
    with pytest.raises(SystemExit):
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--requests", "typo.csv", *branch])
    assert "unknown user id" in capsys.readouterr().err
    assert not (tmp_path / "br" / "journal.jsonl").exists() and not (tmp_path / "br" / "journal.key").exists()
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"  # another record, with a key of its own
    best.parent.mkdir(parents=True)
    best.write_bytes(trained.best.read_bytes())
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(best), "--requests", "user8.csv", "--method", "FineTune"])
    other = journal_of(tmp_path / "run" / "unlearning")
    (tmp_path / "user9.csv").write_text("user\n9\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(other.last_checkpoint()), "--requests", "user9.csv", *branch])
    assert journal_of(tmp_path / "br").applied_count() == 1 and (tmp_path / "br" / "journal.key").read_text() == \
        (other.folder / "journal.key").read_text()
    with pytest.raises(SystemExit):  # now its key recorded a request: a branch of the first record is refused there
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--requests", "user9.csv", *branch])
    assert "already holds 1 applied request" in capsys.readouterr().err


def test_an_out_over_a_checkpoint_or_a_record_file_or_below_a_file_is_refused_and_changes_nothing(trained, tmp_path, capsys):
    """predict --out the checkpoint it reads, the record's journal, or the machine's notes of recommendation files used
    to replace it with the CSV (every later command on that record then failed; files noted before were no longer
    cleaned); an --out below a file was a traceback (and a note of a file never written)."""
    journal = trained.unlearned.parent / "journal.jsonl"
    before = {path: path.read_bytes() for path in (trained.unlearned, journal)}
    (tmp_path / "afile").write_text("")
    notes = Path(os.environ["LIGHTNING_UNLEARN_HOME"]) / "recommendations.jsonl"  # the machine's notes of these files
    for out in (trained.unlearned, journal, tmp_path / "copy.ckpt", tmp_path / "COPY.CKPT", tmp_path / "afile" / "recs.csv", notes):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and ("would overwrite a checkpoint or a file of a deletion record" in err
                                              or "is the checkpoint predict reads" in err or "which is a file, not a folder" in err)
    assert {path: path.read_bytes() for path in before} == before and not (tmp_path / "copy.ckpt").exists()
    assert not (Path(os.environ["LIGHTNING_UNLEARN_HOME"]) / "recommendations.jsonl").exists()
    for command in (["unlearn", "--requests", str(trained.requests), "--method", "FineTune"], ["compare", "--deletion.count", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(trained.best), *command[1:], "--out", str(tmp_path / "afile" / "sub")])
        assert exit_info.value.code == 2 and "which is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["--trainer.max_epochs=0", "--trainer.limit_train_batches=0"])
def test_a_refit_that_would_train_nothing_is_refused_before_anything_runs(trained, tmp_path, capsys, limit):
    """compare (whose Retrain reference refits) and unlearn --method Retrain with a trainer that trains nothing used to
    run, then fail in the refit: compare left its partial results, unlearn journaled a failed request."""
    for command in (["compare", "--deletion.count", "1", "--out", "cmp"], ["unlearn", "--requests", str(trained.requests),
                                                                            "--method", "Retrain", "--out", "rec"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], "-c", str(trained.recipe), "--ckpt_path", str(trained.best), *command[1:], limit])
        assert exit_info.value.code == 2 and f"{limit[2:]} trains nothing: the refit would be an untrained model" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "rec" / "journal.jsonl").exists()


def test_predict_checks_the_record_beside_a_checkpoint_that_is_a_link(trained, tmp_path, capsys):
    """git-annex, DVC: the run's folder holds a link into a content store, and its record beside the link."""
    stored = tmp_path / "store" / "SHA256E-s1234"
    stored.parent.mkdir()
    shutil.copy(trained.best, stored)
    link = tmp_path / "run" / "checkpoints" / "best.ckpt"
    link.parent.mkdir(parents=True)
    link.symlink_to(stored)
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(link), "--requests", "user8.csv", "--method", "FineTune",
          "--out", str(tmp_path / "run" / "unlearning")])
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints" / "sub").mkdir()
    for spelt in (link, tmp_path / "run" / "checkpoints" / "sub" / ".." / "best.ckpt"):  # `..` folded before the folder is taken
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(trained.recipe), "--ckpt_path", str(spelt), "--out", "stale.csv"])
        assert exit_info.value.code == 2 and "records 1 deletion applied" in capsys.readouterr().err
        assert not (tmp_path / "stale.csv").exists()


def _hold_the_lock(folder: str, locked, release) -> None:
    with journal_of(folder).lock():
        locked.set()
        release.wait(30)


# ---------------------------------------------------------------------- the optimizer the command line configured
SGD = ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "1e-9"]


def test_commands_that_train_nothing_say_the_optimizer_is_not_used(trained, tmp_path, capsys):
    for command in ("test", "predict"):
        main([command, "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *SGD,
              *(["--out", "recs.csv"] if command == "predict" else [])])
        assert f"[{command}] --optimizer is not used: {command} trains nothing" in capsys.readouterr().out


def test_unlearn_says_when_its_method_does_not_train_with_the_optimizer(trained, tmp_path, capsys):
    for method, said in (("IFRU", "IFRU(k_hop=0) does not train: --optimizer is used only if the retrain policy refits the "
                                  "model (once more than 3% of its rows are deleted since its fit)"),
                         ("FineTune", "FineTune(epochs=1) fine-tunes with its own optimizer (adamw, lr=0.001: --method.optimizer, "
                                      "--method.lr), not with --optimizer")):
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
              "--method", method, "--out", method, *SGD, "--trainer.accumulate_grad_batches=4", "--trainer.gradient_clip_val=1.0",
              "--trainer.callbacks+=pytorch_lightning.callbacks.LambdaCallback"])
        out = capsys.readouterr().out
        assert f"[unlearn] {said}" in out
        # nor with the trainer's training settings, which serve Retrain's refits; and those refits leave the callback out
        refits = method == "IFRU"  # its retrain policy; FineTune's has no bound by default
        use = "are used only if the retrain policy refits the model (once more than" if refits else "are not used"
        assert f"does not train with the trainer: --trainer.accumulate_grad_batches, --trainer.gradient_clip_val {use}" in out
        assert ("[unlearn] Retrain's refits fit as the trainer does, without the callback LambdaCallback" in out) == refits


def test_retrain_in_unlearn_refits_with_the_configured_optimizer(trained, tmp_path):
    """SGD with lr=1e-9 leaves the seeded initialisation where it is: Retrain's model is then a fresh
    model from the original's seed, as a fit with that optimizer gives. The model's own Adam (lr=0.01) moves it."""
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
          "--method", "Retrain", "--out", "retrained", *SGD, *BRIEF])
    weights = torch.load(next((tmp_path / "retrained").glob("unlearned-*.ckpt")), weights_only=True)["state_dict"]
    _, dm = restored(trained, trained.best)
    pl.seed_everything(0, verbose=False)
    fresh = MF(dm.num_users, dm.num_items, **MODEL).state_dict()
    for key, value in fresh.items():
        assert torch.allclose(weights[key], value, atol=1e-6), key


def test_retrain_in_compare_refits_with_the_configured_optimizer(trained, tmp_path, monkeypatch):
    calls = []
    real = FitRecipe.__call__

    def spy(self, model, datamodule):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        real(self, model, datamodule)
        calls.append((self, max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())))

    monkeypatch.setattr(FitRecipe, "__call__", spy)
    body = "methods: [{class_path: lightning_unlearn.unlearning.Retrain}]\ndeletion: {kind: interactions, count: 5, seed: 0}\nout: out\n"
    main(["compare", "-c", str(recipe(tmp_path / "compare.yaml", trained.data_file, body)), *SGD, *BRIEF,
          "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"])
    (fit, moved), = calls
    assert fit.optimizer == {"class_path": "torch.optim.SGD", "init_args": {**fit.optimizer["init_args"], "lr": 1e-9}}
    assert fit.lr_scheduler["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert moved < 1e-6  # trained with SGD at lr=1e-9, like the original; Adam would have moved it by ~0.01


def test_fit_recipe_trains_with_its_optimizer_and_restores_the_model():


    dm = RecDataModule(Synthetic(num_users=30, num_items=20), batch_size=64)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FitRecipe(max_epochs=1, monitor=None, optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}})(model, dm)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "configure_optimizers" not in vars(model)  # the model's own is back
    with pytest.raises(ValueError, match="needs optimizer"):
        FitRecipe(lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}})


@pytest.mark.parametrize("nothing", [{"max_epochs": 0}, {"limit_train_batches": 0}, {"max_steps": 0}])
def test_a_refit_recipe_that_trains_nothing_is_refused(nothing):
    """Taken from a Trainer that only applies requests, it would hand Retrain an untrained model."""
    dm = RecDataModule(Synthetic(num_users=30, num_items=20), batch_size=64)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    with pytest.raises(ValueError, match=rf"trains nothing \({next(iter(nothing))}=0"):
        FitRecipe(**{"max_epochs": 1, "monitor": None, **nothing})(model, dm)


def test_a_refit_keeps_the_best_epoch_in_memory_and_writes_no_file(tmp_path, monkeypatch):
    """A refit's best weights are ModelCheckpoint's pick, but no checkpoint (which would hold the datamodule's
    removals, and outlive a killed refit in the temporary folder) is ever written."""
    from lightning_unlearn.unlearning.recipe import _BestWeights

    dm = RecDataModule(Synthetic(num_users=60, num_items=40), val_fraction=0.2, batch_size=32)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    best, mine = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/ndcg@20", mode="max"), _BestWeights("val/ndcg@20", "max")
    pl.Trainer(max_epochs=6, logger=False, callbacks=[best, mine], enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path).fit(model, dm)
    kept = torch.load(best.best_model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(mine.state[k], v) for k, v in kept.items())

    def no_file(*args, **kwargs):
        raise AssertionError("the refit wrote a file")

    monkeypatch.setattr(torch, "save", no_file)
    fresh = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    FitRecipe(max_epochs=3, monitor="val/ndcg@20", mode="max")(fresh, dm)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------------- unlearn/* reaches every logger
def test_unlearn_metrics_reach_a_csv_logger(trained, tmp_path):
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
          "--method", "FineTune", "--out", "csv_unlearned",
          "--trainer.logger=pytorch_lightning.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=logs"])
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    with open(metrics, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("unlearn/seconds")]
    assert len(rows) == 1 and float(rows[0]["unlearn/seconds"]) > 0 and float(rows[0]["unlearn/test/recall@20"]) >= 0


def tensorboard_tags(folder: Path) -> set[str]:
    """The scalar tags of the TensorBoard event files under ``folder`` (TFRecord framing: length, crc, data, crc)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:
        from tensorboardX.proto.event_pb2 import Event
    tags = set()
    for path in folder.rglob("events.out.tfevents.*"):
        raw, position = path.read_bytes(), 0
        while position + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[position:position + 8])
            event = Event()
            event.ParseFromString(raw[position + 12:position + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            position += 12 + length + 4
    return tags


def test_unlearn_metrics_reach_a_tensorboard_logger(trained, tmp_path):
    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        pytest.skip("TensorBoardLogger needs tensorboard or tensorboardX")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
          "--method", "FineTune", "--out", "tb_unlearned",
          "--trainer.logger=pytorch_lightning.loggers.TensorBoardLogger", "--trainer.logger.init_args.save_dir=tb"])
    assert {"unlearn/seconds", "unlearn/rows_removed", "unlearn/test/auc"} <= tensorboard_tags(tmp_path / "tb")


def test_unlearn_metrics_reach_a_wandb_logger(trained, tmp_path):
    from tests.test_wandb import finished_records, offline_runs, run_history

    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
          "--method", "FineTune", "--out", "wandb_unlearned", "--trainer.logger=pytorch_lightning.loggers.WandbLogger",
          "--trainer.logger.init_args.offline=true", "--trainer.logger.init_args.save_dir=wb"])
    records = finished_records(next(offline_runs(tmp_path / "wb")["unlearn"].glob("run-*.wandb")))
    rows = [row for row in run_history(records) if "unlearn/seconds" in row]
    assert len(rows) == 1 and rows[0]["unlearn/seconds"] > 0


# ---------------------------------------------------------------------- refusals in the command line's words
def pairs_only_in_test(trained, count: int = 2) -> list[tuple[int, int]]:
    _, dm = restored(trained, trained.best)
    users, items = dm.test.users[:count].tolist(), dm.test.items[:count].tolist()
    return [(int(dm.test.user_ids[u]), int(dm.test.item_ids[i])) for u, i in zip(users, items)]


def test_pairs_outside_the_training_split_are_a_one_paragraph_cli_error(trained, tmp_path, capsys):
    pairs = pairs_only_in_test(trained)
    (tmp_path / "pairs.csv").write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in pairs))
    args = ["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", "pairs.csv",
            "--method", "FineTune", "--out", "refused"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-unlearn unlearn: error: Deletion request has 2 pairs that are not in the training split")
    assert "Nothing of it is a row here" in err and "--missing" not in err and "Traceback" not in err  # ignoring them leaves nothing
    assert len(err.splitlines()) == 1
    journal = tmp_path / "refused" / "journal.jsonl"
    assert not journal.exists() or not journal.read_text()  # refused before anything was journaled

    # With a training row too, --missing ignore is the way: the command says how many it dropped, and applies the rest.
    _, dm = restored(trained, trained.best)
    row = (int(dm.train.user_ids[dm.train.users[0]]), int(dm.train.item_ids[dm.train.items[0]]))
    (tmp_path / "pairs.csv").write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in [*pairs, row]))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "`--missing ignore`" in err and "missing='ignore'" not in err
    main([*args, "--missing", "ignore"])
    out = capsys.readouterr().out
    assert "[unlearn] --missing ignore: 2 pairs of the request are not in the training split and were ignored" in out
    assert "1 rows removed" in out
    main([*args[:4], str(journal_of(tmp_path / "refused").last_checkpoint()), *args[5:], "--missing", "ignore"])  # given again
    out = capsys.readouterr().out
    assert "is already applied" in out and "--missing ignore:" not in out  # no count of a request not applied now


def test_unlearn_without_out_keeps_one_record_per_checkpoint(trained, tmp_path, capsys):
    """Without ``--out`` every run from a checkpoint uses the same folder, so a second request from the trained
    checkpoint is refused (it would undo the first) and the unlearned checkpoint goes on in its own folder."""
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(trained.best.read_bytes())
    for user in (8, 9):
        (tmp_path / f"user{user}.csv").write_text(f"user\n{user}\n")
    command = ["unlearn", "-c", str(trained.recipe), "--method", "FineTune"]
    main([*command, "--ckpt_path", str(best), "--requests", "user8.csv"])
    assert f"the deletion record of this model is {tmp_path / 'run' / 'unlearning'}" in capsys.readouterr().out
    first = next((tmp_path / "run" / "unlearning").glob("unlearned-*.ckpt"))
    (best.parent / "sub").mkdir()
    for where, path in ((tmp_path, best), (best.parent, Path("best.ckpt")),  # the same record however the path is spelt
                        (best.parent / "sub", Path("../best.ckpt"))):
        os.chdir(where)
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--ckpt_path", str(path), "--requests", str(tmp_path / "user9.csv")])
        assert exit_info.value.code == 2 and str(first.name) in capsys.readouterr().err
    os.chdir(tmp_path)
    main([*command, "--ckpt_path", str(first), "--requests", "user9.csv"])
    assert journal_of(tmp_path / "run" / "unlearning").applied_count() == 2


def test_a_fit_beside_a_deletion_record_says_its_checkpoints_hold_the_deleted_rows(trained, tmp_path, capsys):
    main(["fit", "-c", str(trained.recipe), *BRIEF])
    (tmp_path / "user8.csv").write_text("user\n8\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", "ckpt/best.ckpt", "--requests", "user8.csv", "--method", "FineTune"])
    capsys.readouterr()
    main(["fit", "-c", str(trained.recipe), *BRIEF])
    assert f"[fit] {tmp_path / 'unlearning'} records 1 deletion applied to a model of this run folder" in capsys.readouterr().out


def test_unlearn_says_when_the_requests_were_applied_already(trained, tmp_path, capsys):
    shutil.copytree(trained.unlearned.parent, tmp_path / "copy")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(tmp_path / "copy" / trained.unlearned.name),
          "--requests", str(trained.requests), "--method", "FineTune"])
    out = capsys.readouterr().out
    assert f"the request of {trained.requests} is already applied in {tmp_path / 'copy'}" in out and "rows removed" not in out
    assert journal_of(tmp_path / "copy").applied_count() == 1


def test_a_stale_or_unreadable_checkpoint_is_a_cli_error(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the trained model into the folder that already holds a deletion
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", str(trained.requests),
              "--method", "FineTune", "--out", str(trained.unlearned.parent)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-unlearn unlearn: error: ") and "--ckpt_path" in err and "Traceback" not in err

    (tmp_path / "cut.ckpt").write_bytes(trained.best.read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", str(trained.recipe), "--ckpt_path", "cut.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-unlearn test: error: cut.ckpt (2000 bytes) is not a complete PyTorch checkpoint")


# ---------------------------------------------------------------------- --version, help, noise, progress
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-unlearn {lightning_unlearn.__version__}"


@pytest.mark.parametrize("args", [["unlearn", "--help"], ["compare", "--help"], ["predict", "--help"],
                                  ["unlearn", "--method.help", "IFRU"], ["--help"]])
def test_help_has_no_rest_markup(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for markup in ("``", ":class:", ":func:", ":meth:", ":doc:", ":ref:", ":data:"):
        assert markup not in out, markup
    if args[0] == "unlearn" and args[1] == "--help":
        assert "--missing" in out and "--log_artifacts" in out


def test_plain_text():
    from lightning_unlearn.console import plain_text

    assert plain_text("``x`` and :class:`~a.b.C` and :meth:`Journal.keyed(digest) <a.b.Journal.keyed>`") == "x and C and Journal.keyed(digest)"
    assert plain_text("see `LightningCLI <https://lightning.ai>`_ and `N`") == "see LightningCLI (https://lightning.ai) and N"


def test_the_console_script_stays_quiet_about_third_party_notices(trained, tmp_path):
    """Lightning's LeafSpec FutureWarning and litlogger tip, and W&B's anonymous-setting warning, are not shown."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_unlearn.cli", "test", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned),
         "--trainer.logger=pytorch_lightning.loggers.WandbLogger", "--trainer.logger.init_args.offline=true",
         f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "test/recall@20" in output and "is an unlearned checkpoint" in output
    for noise in ("LeafSpec", "litlogger", "anonymous"):
        assert noise not in output, noise


def test_nested_fits_show_a_progress_bar_when_the_command_does(trained, tmp_path, monkeypatch, capsys):
    assert FitRecipe.from_trainer(pl.Trainer(enable_progress_bar=True, logger=False)).progress
    assert not FitRecipe.from_trainer(pl.Trainer(enable_progress_bar=False, logger=False)).progress
    recipes = []
    real = FitRecipe.__call__
    monkeypatch.setattr(FitRecipe, "__call__", lambda self, model, dm: recipes.append(self) or real(self, model, dm))
    (tmp_path / "forget.csv").write_text(f"user\n{DELETED_USER}\n")
    main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", "forget.csv",
          "--method", "Retrain", "--out", "progress", *BRIEF, "--trainer.enable_progress_bar=true"])
    assert [r.progress for r in recipes] == [True]
    assert "Epoch 0: 100%" in capsys.readouterr().out  # Lightning's bar, from the nested fit (unlearn itself trains nothing)



def test_finetune_inside_unlearn_shows_a_progress_bar_when_the_command_does(trained, tmp_path, capsys):
    (tmp_path / "forget.csv").write_text(f"user\n{DELETED_USER}\n")
    for shown, out in ((True, "shown"), (False, "hidden")):
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", str(trained.best), "--requests", "forget.csv",
              "--method", "FineTune", "--out", out, *BRIEF, f"--trainer.enable_progress_bar={str(shown).lower()}"])
        assert ("FineTune epoch 0" in capsys.readouterr().err) is shown

def test_make_says_what_it_installs():
    plan = subprocess.run(["make", "-n", "-W", "setup.cfg", ".venv/bin/.installed"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    lines = plan.splitlines()
    install = next(i for i, line in enumerate(lines) if "pip install" in line and "-e '.[test]'" in line)
    assert any(line.startswith("echo") and "nstall" in line for line in lines[:install])


def test_recipes_are_all_listed_in_the_cli_docs():
    page = (REPO / "docs" / "cli.rst").read_text()
    for path in sorted((REPO / "recipes").glob("*/*.yaml")):
        assert f"``recipes/{path.parent.name}/{path.name}``" in page, path
    for class_path in ("lightning_unlearn.models.MF", "lightning_unlearn.data.MovieLens100K", "lightning_unlearn.unlearning.IFRU",
                       "lightning_unlearn.unlearning.UnlearningCallback"):
        module, name = class_path.rsplit(".", 1)
        assert getattr(__import__(module, fromlist=[name]), name) and f"``{class_path}``" in page, class_path


def test_a_refit_validates_as_often_as_the_original_fit():
    """``check_val_every_n_epoch`` reaches the recipe: Retrain validates (and stops early) as the original did."""
    recipe = FitRecipe.from_trainer(pl.Trainer(check_val_every_n_epoch=3, max_epochs=6, logger=False))
    assert recipe.check_val_every_n_epoch == 3 and FitRecipe.from_trainer(pl.Trainer(logger=False)).check_val_every_n_epoch == 1
    dm = RecDataModule(Synthetic(num_users=30, num_items=20, density=0.5, seed=0), val_fraction=0.3, batch_size=64)
    model, validations = MF(dm.num_users, dm.num_items, embedding_dim=4), []
    model.on_validation_epoch_start = lambda: validations.append(model.current_epoch)
    FitRecipe(max_epochs=6, check_val_every_n_epoch=3)(model, dm)
    assert validations == [0, 2, 5]  # the sanity check, then the ends of epochs 3 and 6


def test_a_refit_takes_the_original_fits_step_cap_clipping_accumulation_and_precision():
    """Trainer options that change what a fit converges to reach ``Retrain``'s refit, not only the epoch cap."""
    options = dict(max_steps=3, min_epochs=1, min_steps=2, max_time={"seconds": 600}, val_check_interval=0.5,
                   accumulate_grad_batches=2, gradient_clip_val=0.01, gradient_clip_algorithm="value", precision="bf16-mixed")
    recipe = FitRecipe.from_trainer(pl.Trainer(logger=False, enable_progress_bar=False, **options))
    assert (recipe.max_steps, recipe.min_epochs, recipe.min_steps, recipe.max_time, recipe.val_check_interval,
            recipe.accumulate_grad_batches, recipe.gradient_clip_val, recipe.gradient_clip_algorithm,
            recipe.precision) == (3, 1, 2, 600.0, 0.5, 2, 0.01, "value", "bf16-mixed")
    dm = RecDataModule(Synthetic(num_users=30, num_items=20, density=0.5, seed=0), val_fraction=0.3, batch_size=8)
    model, steps = MF(dm.num_users, dm.num_items, embedding_dim=4), []
    model.on_train_batch_end = lambda *args: steps.append(model.trainer.global_step)
    FitRecipe(max_epochs=5, monitor=None, max_steps=3, accumulate_grad_batches=2)(model, dm)
    assert steps[-1] == 3 and len(steps) == 6  # three optimiser steps of two batches each, then the cap


@pytest.mark.parametrize("spelt", ["a path", "a file:// URL"])
def test_a_model_option_the_checkpoint_would_override_is_refused(spelt, trained, capsys):
    """LightningCLI loads a checkpoint's hyperparameters over the config: an option that differs would have no effect. A
    local URL is checked as the file it names (review 36b D4)."""
    given = str(trained.best) if spelt == "a path" else f"file://{trained.best}"
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(trained.recipe), "--ckpt_path", given, "--requests", str(trained.requests),
              "--method", "FineTune", "--out", "refused", "--model.init_args.l2=0.9"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--model.init_args.l2=0.9 (the checkpoint's: 0.05)" in err


@pytest.mark.parametrize(("deletion", "named"), [
    (["--deletion.kind", "users", "--deletion.count", "119"], "deletes every one of the 119 users"),
    (["--deletion.requests_file", "user7.csv"], "selects no training row: what it names was deleted already"),
])
def test_compare_checks_the_deletion_on_the_data_the_checkpoint_leaves(trained, tmp_path, capsys, deletion, named):
    """From an unlearned checkpoint (user 7 removed), deleting every remaining user, or user 7 again, is refused as
    such once the checkpoint's removals are applied: a message, not a traceback from the comparison."""
    (tmp_path / "user7.csv").write_text(f"user\n{DELETED_USER}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "-c", str(trained.recipe), "--ckpt_path", str(trained.unlearned), *deletion, "--methods", "[]",
              "--out", "cmp"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()  # nothing measured, nothing written, no empty folder
