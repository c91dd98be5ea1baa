"""The ``lightning-unlearn`` command: ``fit``, ``validate``, ``test``, ``predict``, ``unlearn`` and ``compare``."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dis
import errno
import inspect
import os
import pydoc
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Literal

import fsspec.core
import pytorch_lightning as pl
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, ReduceLROnPlateau
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_unlearn.console import USER_ERRORS, OptionRefused, PlainHelpParser, counted, quiet_third_party_noise, user_error_message
from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.data.download import DataNotFoundError
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import model_digest
from lightning_unlearn.recommendations import (
    clean_from_the_latest_state,
    clean_recommendations,
    note_recommendations,
    recommendations_file_lock,
    recommendations_lock,
    write_recommendations,
)
from lightning_unlearn.record_checks import (
    check_against_the_run,
    default_unlearning_folder,
    deletes_again,
    folder_of_key,
    in_checking_order,
    lines_from,
    named_record,
    note_the_line,
    one_line_at_a_time,
    records_bound_to,
    records_of,
    refuse_a_second_line,
    refuse_fewer_deletions,
    refuse_training_on,
    unlearning_folder_of,
)
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.compare import check_arguments, compare, format_table, write_outputs
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.journal import KEY_FILE, LOCK_FILE
from lightning_unlearn.unlearning.methods import FineTune, Retrain, Unlearner, UnlearningError
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner
from lightning_unlearn.unlearning.recipe import FitRecipe, trains_nothing
from lightning_unlearn.unlearning.record import (
    JOURNAL_FILE,
    LINES_FILE,
    adopt_key,
    applied_to,
    check_lineage,
    journal_of,
    key_made_undone_on_failure,
    load_checkpoint,
    machine_lines_folder,
    restore_checkpoint,
    unlearning_state,
)
from lightning_unlearn.unlearning.reporting import (
    check_artifact_logging,
    ids_kept_out_of,
    is_measured,
    log_comparison,
    log_config,
    log_unlearning_artifacts,
    wandb_loggers,
    wandb_run_lines,
)

__all__ = ["LightningUnlearnCLI", "UnlearningTrainer", "main"]


class UnlearningTrainer(pl.Trainer):
    """A ``Trainer`` with two more entry points (CLI subcommands), ``unlearn`` and ``compare``, and top-K lists from ``predict``.

    Attributes:
        optimizer_init: the optimizer the command line configured (``--optimizer``), as
            ``{"class_path": ..., "init_args": {...}}``, or ``None`` (the model's own
            ``configure_optimizers``). :meth:`FitRecipe.from_trainer
            <lightning_unlearn.unlearning.recipe.FitRecipe.from_trainer>` carries it, so that
            ``Retrain`` refits with the optimizer the original was trained with.
        lr_scheduler_init: the same for ``--lr_scheduler``.
    """

    optimizer_init: dict[str, Any] | None = None
    lr_scheduler_init: dict[str, Any] | None = None

    def unlearn(
        self,
        model: Recommender,
        datamodule: RecDataModule,
        ckpt_path: str,
        requests: str,
        method: Unlearner,
        out: str | None = None,
        missing: Literal["error", "ignore"] = "error",
        branch: bool = False,
        log_artifacts: bool = False,
    ) -> list[dict[str, Any]]:
        """Load a trained checkpoint, apply the requests with a method, evaluate, log, save.

        The request's counts and digest (never its ids) go into the loggers' hyperparameters
        (``wandb.config``) as ``deletion_applied`` before the method runs; per-request metrics
        are logged with the request index as their W&B x-axis.

        Args:
            model: the recommender (weights come from ``ckpt_path``).
            datamodule: its datamodule.
            ckpt_path: a checkpoint of the trained (or already partly unlearned) model.
            requests: a requests file (CSV or JSON lines) in raw ids.
            method: the unlearning method, e.g. ``FineTune`` or ``Retrain``.
            out: folder for the unlearned checkpoints and the journal (default: the checkpoint's own
                folder when it holds a journal, else ``unlearning/`` beside the checkpoint's folder:
                the same for every run from the checkpoint).
            missing: ``"error"`` refuses pairs that are not training rows, ``"ignore"`` drops them.
            branch: ``ckpt_path`` is a checkpoint of another unlearning folder and ``out`` (a new,
                empty folder) starts a new branch from it; that folder's key is copied along, so
                the requests it applied are still recognised.
            log_artifacts: also log the unlearned checkpoints (W&B artifact type ``unlearned-model``)
                and the journal (``unlearning-journal``); needs a ``WandbLogger`` (offline runs
                upload them at ``wandb sync``).

        Returns:
            One report per request applied (as plain dicts).

        Every check that can refuse the command -- the checkpoint, the requests file, the
        request against the data, the folder's latest state -- runs before any logger starts a
        run (with ``log_artifacts``, W&B's run is started first, to check it is not disabled, and
        records nothing before the checks pass), so a refusal (whose message may name ids) never
        reaches the loggers' files; the command's configuration is logged after them.

        Raises:
            ValueError: ``log_artifacts`` without a W&B logger, or with W&B disabled.
            InvalidDeletionRequest: the request is invalid for this data (nothing changed).
            StaleCheckpoint: ``ckpt_path`` is not the latest state of ``out`` (see ``docs/journal.rst``).
        """
        if log_artifacts:
            with _options_refused():
                check_artifact_logging(self.loggers)  # before any work: a refused option changes nothing
        if isinstance(method, Retrain):
            _refuse_a_refit_of_nothing(self, "unlearn --method Retrain refits the model")
        dirpath = Path(out) if out else default_unlearning_folder(ckpt_path)
        _refuse_a_file_for_a_folder("unlearn --out", dirpath)
        if not out:
            print(f"[unlearn] --out not given: the deletion record of this model is {dirpath}")
        state = restore_checkpoint(ckpt_path, model, datamodule)
        copied = bool(branch) and adopt_key(folder_of_key(ckpt_path, state), dirpath)
        with key_made_undone_on_failure(dirpath, copied):  # a branch refused before its first request keeps no key
            callback = UnlearningCallback(method, requests_file=requests, dirpath=dirpath, missing=missing, branch=branch)
            if state.get("unlearning"):
                callback.load_state_dict(state["unlearning"])
                queued = len(state["unlearning"].get("pending") or ())
                if queued:
                    print(f"[unlearn] {ckpt_path} holds {counted(queued, 'request')} queued and not yet applied (by the "
                          f"UnlearningCallback of its fit): applied first, then the request of {requests}")
            callback.read_requests_file()
            digest = model_digest(model)  # the parameters the requests are applied to
            starts_a_line = not (state.get("unlearning") or {}).get("applied")
            with one_line_at_a_time(digest, ckpt_path, starts_a_line):  # checked and noted while no other process starts a line from it
                # refused: a process killed before its cleaning left what predict wrote (check()'s recovery may close its request)
                run = records_bound_to(ckpt_path, state.get("unlearning"))
                with _cleaning_when_refused({dirpath} | run | _named(state), datamodule, "unlearn"):
                    if not branch:  # before check(), which starts the folder
                        refuse_a_second_line(ckpt_path, digest, datamodule, state.get("unlearning") or {}, dirpath,
                                             callback.queued(datamodule))
                    summaries = callback.check(datamodule)
                ignored = sum(summary.get("num_ignored", 0) for summary in summaries)
                are, were = ("is", "was") if ignored == 1 else ("are", "were")
                if missing == "ignore" and summaries:  # none: the request is applied already (said below)
                    print(f"[unlearn] --missing ignore: {counted(ignored, 'pair')} of the request {are} not in the training split and "
                          f"{were} ignored")
                elif ignored:  # a request the checkpoint holds queued, queued with missing="ignore"
                    print(f"[unlearn] {counted(ignored, 'pair')} of the requests queued in {ckpt_path} {are} not in the training split "
                          f"and {were} ignored, as their request was queued with missing='ignore'")
                self._note_optimizer_use(method, callback.max_deleted_fraction)
                self._note_trainer_use(method, callback.max_deleted_fraction)
                log_config(self.loggers, {**getattr(self, "_command_config", {}),
                                          "deletion_applied": summaries[-1] if summaries else {"num_rows": 0}})
                if summaries and starts_a_line:
                    # a line from a model no request was applied to yet (a state of a record goes on in its record, or branches);
                    # noted before its first request is journaled, so that one killed or failing after another is applied stays noted
                    note_the_line(ckpt_path, dirpath, digest, datamodule, branch=bool(branch))
                device = self.strategy.root_device
                model.to(device)
                reports = callback.apply_pending(  # it cleans predict's files of what is deleted, also when a request fails
                    model, datamodule, loggers=self.loggers, device=device, recipe=FitRecipe.from_trainer(self), seed=callback.seed
                )
        for report in reports:
            print(f"[unlearn] {report.method}: {report.rows_removed} rows removed in {report.seconds:.3f} s")
        if not reports:  # given again: recognised (the checkpoint records it), never applied twice
            print(f"[unlearn] the request of {requests} is already applied in {dirpath}: nothing applied again")
            clean_recommendations(datamodule, "unlearn")  # the run it resumes may have stopped before its cleaning
        print(f"[unlearn] journal: {callback.journal.path}")
        if log_artifacts and reports:
            journal = callback.journal
            applied = [e for e in journal if e["status"] == "applied"][-len(reports):]
            metadata = {"requests": [{k: v for k, v in e.items() if k != "checkpoint"} for e in applied]}
            names = log_unlearning_artifacts(self.loggers, [journal.checkpoint(e) for e in applied], journal.path, metadata)
            print(f"[unlearn] W&B artifacts: {', '.join(names)}")
        _finalize_loggers(self.loggers)
        return [r.as_dict() for r in reports]

    def _note_trainer_use(self, method: Unlearner, max_deleted_fraction: float | None) -> None:
        """``unlearn``: the trainer's training settings serve ``Retrain``'s refits only; say so of those given, and what a
        refit does not carry (:meth:`~lightning_unlearn.unlearning.recipe.FitRecipe.left_out`)."""
        refits = isinstance(method, Retrain) or max_deleted_fraction is not None
        if refits and FitRecipe.left_out(self):
            print(f"[unlearn] Retrain's refits fit as the trainer does, without {', '.join(FitRecipe.left_out(self))}")
        if isinstance(method, Retrain):
            return
        recipe, plain = FitRecipe.from_trainer(self), FitRecipe()
        given = [f"--trainer.{name}" for name in _TRAINING_SETTINGS if getattr(recipe, name) != getattr(plain, name)]
        if given:
            are = "are" if len(given) > 1 else "is"
            print(f"[unlearn] {method.name} does not train with the trainer: {', '.join(given)} "
                  + (f"{are} not used" if max_deleted_fraction is None else f"{are} used only if the retrain policy refits the model "
                     f"(once more than {100 * max_deleted_fraction:g}% of its rows are deleted since its fit)"))

    def _note_optimizer_use(self, method: Unlearner, max_deleted_fraction: float | None) -> None:
        """``unlearn --optimizer``: say when the method does not train with it (only ``Retrain``, and a refit, do)."""
        if self.optimizer_init is None:
            return
        if isinstance(method, FineTune):
            print(f"[unlearn] {method.name} fine-tunes with its own optimizer ({method.optimizer}, lr={method.lr}: "
                  f"--method.optimizer, --method.lr), not with --optimizer")
        elif isinstance(method, SecondOrderUnlearner):  # a method of another kind may refit (context.fit), as Retrain does
            print(f"[unlearn] {method.name} does not train: --optimizer is " + ("not used" if max_deleted_fraction is None else
                  f"used only if the retrain policy refits the model (once more than {100 * max_deleted_fraction:g}% of its "
                  f"rows are deleted since its fit)"))

    def compare(
        self,
        model: Recommender,
        datamodule: RecDataModule,
        methods: list[Unlearner] | None = None,
        deletion: DeletionSpec = DeletionSpec(),
        ckpt_path: str | None = None,
        out: str | None = None,
        k: int = 20,
        resume: bool = False,
        repeats: int = 1,
    ) -> dict[str, Any]:
        """Train (or load) the original, delete, run every method, print and write the comparison.

        Args:
            model: the recommender to train (or load from ``ckpt_path``).
            datamodule: its datamodule.
            methods: the methods (default: ``Retrain``, ``Retrain(seed=seed+1)``, ``FineTune``);
                ``Retrain()`` from the original's seed is always the reference.
            deletion: what to delete.
            ckpt_path: a trained checkpoint to start from instead of training.
            out: folder for ``compare.json`` and ``compare.csv`` (default: the run directory). After
                each method, ``compare.partial.json`` there holds every method measured so far (a
                method that raised: ``status: "failed"`` and its error; compare goes on with the next).
            k: top-K cut-off of the completeness figures.
            resume: skip the methods ``<out>/compare.partial.json`` holds as measured, when it was
                measured from the same data, deletion, original parameters, seed and methods (else
                an error); give ``ckpt_path`` so the original is the same one. See
                :func:`~lightning_unlearn.unlearning.compare.compare`.
            repeats: time each method's request this many times from the same prepared state and
                report the median (every run in its ``diagnostics.seconds_runs``); the retrains run once.

        Every method's figures are logged as ``compare/<method>/<metric>``; a ``WandbLogger``
        also gets the comparison as a ``wandb.Table`` with native charts (utility and
        completeness against seconds, bars per method), see
        :func:`~lightning_unlearn.unlearning.reporting.log_comparison`.

        Returns:
            The ``compare.json`` document.
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        fit_seconds = float("nan")
        recipe = FitRecipe.from_trainer(self)
        self.check_compare(datamodule, methods, deletion, out, k, repeats)
        if FitRecipe.left_out(self):
            print(f"[compare] Retrain's refits fit as the trainer does, without {', '.join(FitRecipe.left_out(self))}: what "
                  f"they change shapes the original, not the reference the gaps are read against")
        if ckpt_path:
            state = restore_checkpoint(ckpt_path, model, datamodule)
            trained_epochs, unlearning = state.get("epoch"), state.get("unlearning") or {}
            self._check_deletion(datamodule, deletion)  # on the data without what the checkpoint removed
            digest = model_digest(model)
            for folder in sorted(records_bound_to(ckpt_path, unlearning)
                                 | lines_from(ckpt_path, digest, "compare")):
                record = journal_of(folder)
                latest = record.last_checkpoint() if record.path.is_file() else None
                if latest is None:
                    continue
                same_data, covered = deletes_again(latest, datamodule)
                if applied_to(record, digest) or (same_data is not None and not covered):  # an older state of it, or its run's
                    print(f"[compare] {folder} records {counted(record.applied_count(), 'deletion')} applied to this "
                          f"checkpoint's model or its run: this comparison runs on a model and data that still hold their "
                          f"rows. Compare from that record's latest state ({latest}) to leave them out.")
            if isinstance(trained_epochs, int) and recipe.max_epochs is not None and 0 <= recipe.max_epochs <= trained_epochs:
                print(f"[compare] the original's checkpoint was saved after epoch {trained_epochs + 1}, and Retrain refits with "
                      f"at most {recipe.max_epochs} (--trainer.max_epochs): the reference every gap is read against is then "
                      f"trained less than the original. Give the trainer options the original was fitted with.")
        else:
            start = time.perf_counter()
            self.fit(model, datamodule)
            fit_seconds = time.perf_counter() - start
            best = getattr(self.checkpoint_callback, "best_model_path", "")
            if best:
                model.load_state_dict(torch.load(best, map_location=model.device, weights_only=True)["state_dict"])
        methods = methods if methods is not None else [Retrain(), Retrain(seed=seed + 1), FineTune()]
        if self.optimizer_init is not None:
            for method in methods:
                if isinstance(method, FineTune):
                    print(f"[compare] {method.name} fine-tunes with its own optimizer ({method.optimizer}, lr={method.lr}: "
                          f"its init_args), not with --optimizer; Retrain refits with --optimizer, like the original")
        model.to(self.strategy.root_device)
        folder = out or self._run_dir()
        result = compare(model, datamodule, methods, deletion, recipe, seed=seed,
                         fit_seconds=fit_seconds, device=self.strategy.root_device, k=k, loggers=self.loggers,
                         out=folder, resume=resume, repeats=repeats)
        json_path, _ = write_outputs(result, folder)
        print(format_table(result))
        failed = [m["name"] for m in result["methods"] if not is_measured(m)]
        print(f"[compare] wrote {json_path} and compare.csv"
              + (f"; failed: {', '.join(failed)} (--resume true runs only those again)" if failed else ""))
        log_comparison(self.loggers, result)
        _finalize_loggers(self.loggers)
        return result

    def check_compare(self, datamodule: RecDataModule, methods: list[Unlearner] | None, deletion: DeletionSpec,
                      out: str | None, k: int, repeats: int) -> None:
        """Refuse what :meth:`compare` would fail on, before anything runs (the command calls it before any logger
        starts a run): the methods, ``k`` and ``repeats``, an ``out`` that cannot be written, and a ``deletion`` that
        selects nothing, or everything, or names an unknown id (checked again once a checkpoint's removals are applied)."""
        with _options_refused():
            check_arguments(methods or [], k, repeats)
        _refuse_a_refit_of_nothing(self, "compare refits the original (Retrain, the reference every gap is read against)")
        if out:
            _refuse_a_file_for_a_folder("compare --out", Path(out))
        self._check_deletion(datamodule, deletion)
        if out:  # last; the folders it makes to try are removed again: a refused command (also later) leaves none behind
            folder = Path(out).absolute()
            made = [p for p in (folder, *folder.parents) if not p.exists()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as err:
                raise OptionRefused(f"compare --out {out} cannot be written ({err.strerror}): give a folder you can "
                                    f"write to.") from err
            finally:
                for path in made:  # the deepest first
                    with contextlib.suppress(OSError):
                        path.rmdir()

    def _check_deletion(self, datamodule: RecDataModule, deletion: DeletionSpec) -> None:
        unused = deletion.unused()
        said = self.__dict__.setdefault("_said", set())  # checked before the command and again in it: said once
        if unused and deletion.requests_file not in said:  # a recipe's kind (say) under a requests file given on the command line
            said.add(deletion.requests_file)
            print(f"[compare] --deletion.requests_file {deletion.requests_file} is the deletion: "
                  f"{', '.join(f'{k}={v!r}' for k, v in unused.items())} (which draw one) {'is' if len(unused) == 1 else 'are'} not used")
        datamodule.setup("fit")
        with _options_refused("--deletion"), ids_kept_out_of(self.loggers):
            resolved = deletion.build(datamodule.train).resolve(datamodule.train, removed=datamodule.removed_keys)
        if not len(resolved.rows):
            raise OptionRefused("--deletion selects no training row: what it names was deleted already (e.g. by the "
                                "unlearned checkpoint compared from), or is only in the validation or test split.")

    def predict(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        out: str | None = None,
        k: int = 20,
        record: str | None = None,
    ) -> Any:
        """Write each user's top-K recommendations to a CSV file: deleted users and items left out.

        For a recommender with its datamodule (and no ``dataloaders``): the model scores every
        item for every user the data still holds and writes, per user, the ``k`` best items it
        has not seen -- neither in the training nor in the validation split (the items the test
        metrics also leave out) -- as rows ``user,rank,item,score`` in raw ids. Users and items
        deleted as a whole are left out: no row for a deleted user, a deleted item is never
        recommended. Other models and dataloaders get Lightning's ``Trainer.predict``.

        Args:
            model: the recommender (weights from ``ckpt_path`` when given).
            dataloaders: for Lightning's ``predict`` only.
            datamodule: its datamodule.
            return_predictions: for Lightning's ``predict`` only.
            ckpt_path: the checkpoint to recommend from: a Lightning checkpoint of ``fit`` or an
                unlearned checkpoint of ``unlearn``; the removals it records are applied to the data
                first. Without it, the model as it is.
            weights_only: for Lightning's ``predict`` only.
            out: the CSV file to write (default ``<run dir>/recommendations.csv``).
            k: recommendations per user (at least 1).
            record: a deletion record folder (with its ``journal.key``) to check ``ckpt_path``
                against as well: where the record its fit's ``UnlearningCallback`` named is now,
                if that folder was moved.

        Returns:
            For a recommender: ``{"path", "users", "k", "deleted_users", "deleted_items"}`` (counts);
            otherwise Lightning's predictions.

        Raises:
            ValueError: ``k < 1``.
            StaleCheckpoint: the deletion record beside ``ckpt_path``
                (:func:`~lightning_unlearn.record_checks.default_unlearning_folder`), or the one its callback state names (a fit
                with an ``UnlearningCallback``), holds deletions whose rows, users or items that
                checkpoint's data still has (it would recommend to the users deleted since), or a
                request it was applying when its process stopped; or the record its callback state
                names is gone and ``record`` does not say where it is.
            JournalCorrupted: that record does not read.
        """
        if not (isinstance(model, Recommender) and isinstance(datamodule, RecDataModule) and dataloaders is None):
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise OptionRefused(f"predict needs k >= 1 recommendations per user (--k), got k={k!r}.")
        if record is not None and not ckpt_path:
            raise OptionRefused("predict --record names the deletion record to check --ckpt_path against: give the checkpoint too.")
        path = Path(out) if out else Path(self._run_dir()) / "recommendations.csv"
        if path.is_dir():
            raise OptionRefused(f"predict --out {path} is a folder: give the CSV file to write, e.g. {path / 'recommendations.csv'}.")
        _refuse_a_file_above("predict --out", path)
        _refuse_a_record_file("predict --out", path, ckpt_path)
        datamodule.setup()
        with recommendations_lock(datamodule):  # a deletion applied meanwhile is cleaned from the file once it is noted
            if ckpt_path:
                state = restore_checkpoint(ckpt_path, model, datamodule)
                folders = in_checking_order(records_of(ckpt_path, model, state.get("unlearning") or {}, record), ckpt_path)
                with _cleaning_when_refused(folders, datamodule, "predict", held=True):
                    for folder in folders:
                        refuse_fewer_deletions(ckpt_path, datamodule, journal_of(folder))
            if hasattr(self, "_command_config"):  # the command's, once its checks passed
                log_config(self.loggers, self._command_config)
            with recommendations_file_lock(path):  # a cleaning of the file this one replaces waits (it may be of other data)
                noted = note_recommendations(path, datamodule, writing=True)  # a write killed midway leaves a temporary file
                counts = write_recommendations(model, datamodule, path, k, device=self.strategy.root_device,
                                               before_rename=(lambda written: note_recommendations(path, datamodule, written=written)) if noted else None)
            clean_recommendations(datamodule, "predict", held=True)  # what an unlearn stopped before its cleaning left
            print(f"[predict] wrote the top-{k} recommendations of {counted(counts['users'], 'user')} to {path} "
                  f"({counted(counts['deleted_users'], 'deleted user')} left out; {counted(counts['deleted_items'], 'deleted item')}, "
                  f"and each user's training and validation items, never recommended)")
        return {"path": str(path), "k": k, **counts}

    def _run_dir(self) -> str:
        return self.log_dir or self.default_root_dir


@contextlib.contextmanager
def _options_refused(what: str | None = None) -> Iterator[None]:
    """This package's refusal of a value the command was given, raised as :class:`OptionRefused` (a message, no
    traceback): a ``ValueError`` raised by its own checks, also one jsonargparse wrapped in its own. A ``ValueError``
    from deeper down (a bug, also one in a user's class) keeps its traceback; the command's other user errors (a
    refused deletion request) stay what they are."""
    try:
        yield
    except USER_ERRORS:
        raise
    except ValueError as err:
        refusal = _refused_here(err)
        if refusal is None:
            raise
        raise OptionRefused(f"{what}: {refusal}" if what else str(refusal)) from err


_PACKAGE = Path(__file__).resolve().parent


def _refused_here(err: BaseException | None) -> ValueError | None:
    """The ``ValueError`` in ``err`` or what caused it that a ``raise`` statement of this package's own code raised, else
    ``None``. One that C code (torch's, Python's) raised on a call from this package is not a refusal: a bug keeps its
    traceback."""
    while err is not None:
        frame = err.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if isinstance(err, ValueError) and frame is not None and _raised_by_a_statement(frame) and \
                Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE):
            return err
        err = err.__cause__ or err.__context__
    return None


def _raised_by_a_statement(frame: TracebackType) -> bool:
    """Whether the innermost traceback ``frame`` stopped at a ``raise`` statement (not at a call that raised)."""
    return any(op.offset == frame.tb_lasti and op.opname == "RAISE_VARARGS" for op in dis.get_instructions(frame.tb_frame.f_code))


# FitRecipe settings of how a fit trains (max_epochs left out: every recipe gives it), which only Retrain's refits use in unlearn
_TRAINING_SETTINGS = ("max_steps", "max_time", "min_epochs", "min_steps", "limit_train_batches", "limit_val_batches",
                      "val_check_interval", "accumulate_grad_batches", "gradient_clip_val", "precision")


def _refused_trainer_options(subcommand: str, trainer: Any, data: Any) -> str | None:
    """What ``subcommand`` cannot honour among the ``--trainer`` (and ``--data``) options it was given, as a message."""
    overfit = trainer.get("overfit_batches") if trainer is not None else None
    if overfit:
        return (f"--trainer.overfit_batches={overfit!r} cannot work with this datamodule: Lightning replaces its batch sampler "
                f"(training rows with their fixed negatives) with one of its own, whose batches the models do not take. To fit "
                f"on a few batches, give --trainer.limit_train_batches N (and --trainer.limit_val_batches N).")
    if subcommand == "compare" and trainer is not None and trainer.get("fast_dev_run"):
        return ("compare --trainer.fast_dev_run: Lightning's quick check runs one batch without checkpoints or logging, which "
                "no refit (Retrain) can be compared with. To try a comparison quickly, give --trainer.max_epochs 1 "
                "--trainer.limit_train_batches N.")
    if subcommand != "predict":
        return None
    precision = trainer.get("precision") if trainer is not None else None
    if precision not in (None, 32, "32", "32-true"):
        return (f"predict ranks with the model's own weights, outside Lightning's precision plugin: --trainer.precision="
                f"{precision!r} is not used. Remove it.")
    if data is not None and data.get("eval_candidates") is not None:
        return ("predict ranks every item for each user: --data.eval_candidates (the sampled candidates of evaluation) is not "
                "used. Remove it.")
    return None


def _refuse_early_stopping_without_validation(trainer: pl.Trainer, datamodule: RecDataModule, resumed: bool) -> None:
    """An ``EarlyStopping`` that watches a validation metric, in a fit that validates nothing: Lightning would stop with an
    error once training ends (``--trainer.limit_val_batches 0``, ``--data.val_fraction 0``, or a ``--trainer.max_steps``
    that ends the fit before its first validation; not counted for a fit ``resumed`` from a checkpoint, whose removals,
    applied later, leave fewer rows, and whose steps go on from its own)."""
    watching = [c.monitor for c in trainer.early_stopping_callbacks if str(c.monitor).startswith("val")]
    if not watching:
        return
    datamodule.setup()
    why = None
    if trainer.limit_val_batches == 0:
        why = "--trainer.limit_val_batches=0"
    elif not len(datamodule.val.users):
        why = "the data has no validation split (--data.val_fraction=0)"
    elif not resumed and trainer.max_steps > 0 and isinstance(trainer.val_check_interval, float) and trainer.val_check_interval == 1.0:
        limit = trainer.limit_train_batches
        batches = -(-len(datamodule.train) // datamodule.hparams.batch_size)
        batches = min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
        batches = -(-batches // trainer.accumulate_grad_batches)  # optimizer steps: what max_steps counts
        first = batches * (trainer.check_val_every_n_epoch or 1)
        if trainer.max_steps < first:
            why = (f"--trainer.max_steps={trainer.max_steps} ends the fit before its first validation (after {first} steps: "
                   f"{batches} steps an epoch, validated every {trainer.check_val_every_n_epoch or 1} epoch(s))")
    if why:
        raise OptionRefused(
            f"The trainer's EarlyStopping watches {watching[0]}, a validation metric, and {why}: Lightning would "
            f"stop with an error once training ends. Keep a validation that runs, or give trainer.callbacks without that "
            f"EarlyStopping.")


@contextlib.contextmanager
def _cleaning_when_refused(folders: Any, datamodule: RecDataModule, command: str, held: bool = False) -> Iterator[None]:
    """A refusal (by one of the records ``folders``, say): predict's files lose what their latest states deleted (what a
    process killed after applying a request, before its cleaning, left), then the refusal is raised."""
    try:
        yield
    except BaseException:
        for folder in sorted(folders):
            clean_from_the_latest_state(folder, datamodule, command, held)
        raise


# options of one file or folder, whose repeats the parser would drop silently (the last one wins)
_ONCE = ("--requests", "--deletion.requests_file", "--ckpt_path", "--out", "--record")


def _refuse_options_given_twice(args: list[str]) -> None:
    """Refuse ``--requests a.csv --requests b.csv`` (and the other options of :data:`_ONCE`): the parser keeps the last
    one, so the first file's deletion would not be applied, and nothing would say so. So are a method's options given
    before another ``--method``, which would drop them."""
    for option in _ONCE:
        given = [arg for arg in args if arg == option or arg.startswith(f"{option}=")]
        if len(given) > 1:
            more = " To apply the requests of several files, put them in one file, or run the command once per file." \
                if "requests" in option else ""
            raise OptionRefused(f"{option} was given {len(given)} times, and a command takes one (only the last would be "
                                f"used).{more}")
    options = [(i, arg) for i, arg in enumerate(args) if arg.startswith("--method.") and not arg.startswith("--method.help")]
    later = [i for i, arg in enumerate(args) if arg == "--method" or arg.startswith("--method=")]
    if options and later and later[-1] > options[0][0]:  # jsonargparse starts the new class afresh: the options would be dropped
        option = options[0][1].split("=", 1)[0]
        raise OptionRefused(f"{option} was given before another --method, which replaces the method it configured (the option "
                            f"would not be used): give --method first, then its options (--method <Method> --method.<option> ...).")
    sources = _request_files_given(args)
    if len(sources) > 1:
        raise OptionRefused(f"request files were given {len(sources)} times ({', '.join(sources)}), and a command takes one: "
                            f"the last replaces the others, whose deletions would not be applied. Put the requests in one file, "
                            f"or run the command once per file.")


def _request_files_given(args: list[str]) -> list[str]:
    """Where the command line gives a request file: each ``--requests`` / ``--deletion.requests_file``, and each ``-c``
    file that sets one (``requests:``, ``deletion: {requests_file: ...}``; in a file before the subcommand, in its section)."""
    options = ("--requests", "--deletion.requests_file")
    found = [arg.split("=", 1)[0] for arg in args if any(arg == o or arg.startswith(f"{o}=") for o in options)]
    command = _subcommand_of(args)
    keys = {f"{prefix}{key}" for prefix in ("", f"{command}.") for key in ("requests", "deletion.requests_file")}
    for name, config in _config_files(args):
        if isinstance(config, dict) and any(value for key, value in _flat(config).items() if key in keys):
            found.append(f"-c {name}")
    return found


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's values by dotted key, as jsonargparse reads them (``deletion: {requests_file: a}`` and ``deletion.requests_file: a`` alike).

    Example:
        >>> _flat({"deletion": {"requests_file": "a.csv"}, "unlearn.requests": "b.csv"})
        {'deletion.requests_file': 'a.csv', 'unlearn.requests': 'b.csv'}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _named(state: dict[str, Any]) -> set[Path]:
    """The record a restored checkpoint's callback state names (none: an empty set)."""
    named = (state.get("unlearning") or {}).get("record")
    return {Path(named)} if named else set()


def _refused_optimizer(optimizer: Any, scheduler: Any) -> str | None:
    """What torch or Lightning would refuse in ``--optimizer`` / ``--lr_scheduler`` once training starts (a traceback then):
    each is built here on a small table, as the models' embedding tables are (some optimizers take only matrices)."""
    if optimizer is None:
        return None
    name = "--optimizer"
    try:
        cls = pydoc.locate(optimizer.class_path)
        built = cls([torch.nn.Parameter(torch.zeros(2, 2))], **dict(optimizer.init_args or {}))
        if scheduler is not None:
            name, cls = "--lr_scheduler", pydoc.locate(scheduler.class_path)
            if issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau) and not issubclass(cls, ReduceLROnPlateau):
                return (f"--lr_scheduler {scheduler.class_path} needs the metric it watches: give "
                        f"`--lr_scheduler pytorch_lightning.cli.ReduceLROnPlateau --lr_scheduler.monitor <metric>`, a metric "
                        f"logged every epoch (val/ndcg@20 with a validation split, train/loss without one).")
            cls(built, **dict(scheduler.init_args or {}))
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as err:  # what torch's constructors raise on bad values
        what = optimizer if name == "--optimizer" else scheduler
        return f"{name} {what.class_path}: {err}"
    return None


def _refuse_a_refit_of_nothing(trainer: pl.Trainer, what: str) -> None:
    """Refuse, before anything runs, a trainer whose settings make a refit train nothing (its model would be untrained)."""
    nothing = trains_nothing(trainer)
    if nothing:
        raise OptionRefused(f"{what} with the trainer's settings, and --trainer.{nothing} trains nothing: the refit would be "
                            f"an untrained model. Give the settings the original was fitted with (e.g. its --trainer.max_epochs).")


def _refuse_a_file_for_a_folder(option: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OptionRefused(f"{option} {folder} is a file: give the folder to write into (created if needed).")
    _refuse_a_file_above(option, folder)


def _refuse_a_file_above(option: str, path: Path) -> None:
    """Refuse a ``path`` below a file: no folder can be made there."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OptionRefused(f"{option} {path} is below {above}, which is a file, not a folder: give a path in a folder.")


_RECORD_FILES = {JOURNAL_FILE, KEY_FILE, LOCK_FILE, LINES_FILE}


def _refuse_a_record_file(option: str, path: Path, ckpt_path: str | os.PathLike | None) -> None:
    """``predict --out``: refuse to write recommendations over the checkpoint given, any checkpoint, a deletion record's files,
    or into the machine's folder (its notes of lines and recommendation files, its locks)."""
    if ckpt_path and path.exists() and Path(ckpt_path).exists() and path.resolve() == Path(ckpt_path).resolve():
        raise OptionRefused(f"{option} {path} is the checkpoint predict reads: give another file for the recommendations.")
    machine, target = machine_lines_folder().resolve(), path.resolve()
    if path.suffix.lower() == ".ckpt" or path.name.lower() in _RECORD_FILES or machine in (target, *target.parents):
        raise OptionRefused(f"{option} {path} would overwrite a checkpoint or a file of a deletion record (or of the machine's "
                            f"notes, in {machine}) with the recommendations: give a CSV file of its own elsewhere, e.g. "
                            f"{path.parent / 'recommendations.csv'}.")
    if path.exists() and not path.is_file():  # a pipe, a device, a link to one: replaced by a file of raw ids
        raise OptionRefused(f"{option} {path} is not a regular file (a pipe or a device, or a link to one): predict writes the "
                            f"recommendations whole into a file of its own, noted so that later deletions are removed from it, "
                            f"and would replace it. Give a file path.")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            first = fh.read(len(_HEADER))
        if first != _HEADER:  # the data, a requests file: replaced whole by the recommendations
            raise OptionRefused(f"{option} {path} exists and is not a recommendations file (it does not start with "
                                f"`user,rank,item,score`): predict would replace it whole. Give a new file, or remove it first.")


_HEADER = b"user,rank,item,score"  # the first line of every recommendations file predict writes


class LightningUnlearnCLI(LightningCLI):
    """LightningCLI for recommenders: dataset sizes are linked into the model, ``fit`` ends with
    a test of the best checkpoint, and ``unlearn``/``compare`` come from :class:`UnlearningTrainer`.

    Every command records the fully resolved configuration in its loggers' hyperparameters
    (``wandb.config``) before it starts working, so an offline W&B run holds it even if the
    command crashes. W&B does not capture the console (``WANDB_CONSOLE=off`` unless set): an
    error about a deletion request names its ids, and they must not reach the run's files. A
    ``WandbLogger`` without ``group`` is grouped by recipe (``ml100k/compare_mf``
    for ``recipes/ml100k/compare_mf.yaml``) and gets the command as its ``job_type``; when the
    command ends, the run is finished and its folder and ``wandb sync`` command are printed.

    A deletion survives every command: ``fit``, ``validate`` and ``test`` given an unlearned
    checkpoint (``--ckpt_path unlearned-*.ckpt``) load its weights and re-apply the removals it
    records to the data before they run (``fit`` then trains on the retained data with a fresh
    optimizer: the checkpoint holds no optimizer or loop state); ``predict``, ``unlearn`` and
    ``compare`` restore every checkpoint that way. A Lightning checkpoint of ``fit`` brings its
    removals along through Lightning's own datamodule state. ``--optimizer`` and
    ``--lr_scheduler`` reach ``Retrain``'s refits (:class:`FitRecipe
    <lightning_unlearn.unlearning.recipe.FitRecipe>`) as well as the original's fit.

    Example (shell)::

        lightning-unlearn fit -c recipes/ml100k/mf.yaml --trainer.max_epochs=5
        lightning-unlearn compare -c recipes/ml100k/compare_mf.yaml
    """

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] | None = None, **kwargs: Any):
        super().__init__(*args, parser_class=parser_class or PlainHelpParser, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.usage = USAGE  # set once the subcommands are added: their own usage lines start from the default one

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict: a recommender's top-K list (UnlearningTrainer.predict); Lightning's own arguments of it stay out
        predict = {"model", "dataloaders", "datamodule", "return_predictions", "weights_only"}
        return {**LightningCLI.subcommands(), "predict": predict, "unlearn": {"model", "datamodule"},
                "compare": {"model", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].get("ckpt_path") if subcommand else None
        path = _local_path(given) if given else None  # a local URL (`file://`, `~`) is checked, and read, as the file it names
        if path is not None and os.path.normpath(path) == os.path.abspath(str(given)):
            path = given  # a path: named as given
        if path and Path(path).is_file():
            self.config[subcommand]["ckpt_path"] = path
            # a truncated or foreign file: CheckpointUnreadable (a message), not torch's traceback
            hparams = {k: v for k, v in (load_checkpoint(path).get("hyper_parameters") or {}).items() if k != "_instantiator"}
            self._refuse_overridden_hparams(hparams, self.config[subcommand], path)
            model = self.config[subcommand].get("model")
            if hparams and "_class_path" not in hparams and hasattr(model, "get") and model.get("class_path"):
                # a model built in Python (a Trainer's own checkpoints of it) names no class: the recipe's, when its options
                # are that class's, where LightningCLI would refuse the options for want of one
                options = _init_options(pydoc.locate(str(model.get("class_path"))))
                if options is not None and set(hparams) != options:
                    self.parser.error(
                        f"{path} names no model class (it was saved outside the command line), and its options "
                        f"({', '.join(sorted(hparams))}) are not those of the recipe's {model.get('class_path')}: its weights "
                        f"would be read as another model. Use the recipe of the model it holds.")
                read = {subcommand: {"model": {"class_path": model.get("class_path"), "dict_kwargs": hparams}}}
                self.config = self.parser.parse_object(read, self.config)
                return
        super()._parse_ckpt_path()

    def _refuse_overridden_hparams(self, hparams: dict[str, Any], config: Any, path: str) -> None:
        """Refuse model options that LightningCLI would silently replace by the checkpoint's hyperparameters.

        An option counts when the config gives a value other than the model's default (so a
        default changed since the checkpoint was written is not one) and the checkpoint was
        fitted with another.
        """
        model = config.get("model")
        class_path, init_args = (model.get("class_path"), model.get("init_args")) if hasattr(model, "get") else (None, None)
        cls = pydoc.locate(str(class_path)) if class_path else None
        saved = hparams.get("_class_path", class_path)
        if isinstance(cls, type) and pydoc.locate(str(saved)) is not cls:
            self.parser.error(
                f"{path} holds a {saved} model, and the config builds a {class_path}: its weights would be loaded into "
                f"another model (or not at all). Use the recipe the checkpoint was fitted with."
            )
        if not isinstance(cls, type) or init_args is None:
            return
        defaults = _init_defaults(cls)
        overridden = [f"--model.init_args.{name}={value!r} (the checkpoint's: {hparams[name]!r})"
                      for name, value in init_args.items()
                      if name in hparams and name not in ("num_users", "num_items") and value != defaults.get(name, value)
                      and _normalised(value) != _normalised(hparams[name])]
        if overridden:
            self.parser.error(
                f"{path} holds a model fitted with other hyperparameters than the config gives: {'; '.join(overridden)}. "
                "A checkpoint's model keeps its own (LightningCLI loads them over the config), so these options would "
                "have no effect: remove them (or change the recipe to the checkpoint's values), or fit a new model "
                "with them."
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_users", "model.init_args.num_users", apply_on="instantiate")
        parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("lr_scheduler") is not None and config.get("optimizer") is None:
            self.parser.error(
                "--lr_scheduler needs --optimizer: without it the model trains with its own optimizer (its `optimizer` "
                "and `lr` arguments), which no scheduler is attached to. Give the optimizer too, e.g. "
                "`--optimizer torch.optim.Adam --optimizer.lr 0.001`."
            )
        refused = _refused_optimizer(config.get("optimizer"), config.get("lr_scheduler"))
        if refused:
            self.parser.error(refused)
        trainer = config.get("trainer")
        if self.subcommand in ("unlearn", "predict", "compare") and trainer is not None and (
                _several(trainer.get("devices")) or (trainer.get("num_nodes") or 1) > 1):
            self.parser.error(
                f"{self.subcommand} runs on one device, the trainer's root device (Retrain's refits too): "
                f"--trainer.devices={trainer.get('devices')!r} and --trainer.num_nodes={trainer.get('num_nodes')!r} would not "
                "spread it. Give one device (e.g. --trainer.devices=1); several devices serve an UnlearningCallback in fit."
            )
        unused = {"predict": ("limit_predict_batches", "predict writes every user's top-K list in one pass"),
                  "unlearn": ("limit_test_batches", "unlearn measures utility on every test user"),
                  "compare": ("limit_test_batches", "compare measures utility on every test user")}.get(self.subcommand)
        limit = trainer.get(unused[0]) if trainer is not None and unused else None
        if limit is not None and not (isinstance(limit, float) and limit == 1.0):  # int 1: one batch
            self.parser.error(f"{unused[1]}: --trainer.{unused[0]} is not used. Remove it.")
        refused = _refused_trainer_options(self.subcommand, trainer, config.get("data"))
        if refused:
            self.parser.error(refused)
        if self.subcommand == "compare" and _trainer_entries(config, "callbacks", UnlearningCallback):
            self.parser.error(
                "compare makes its own deletion (--deletion.*) from the original: remove the UnlearningCallback from "
                "trainer.callbacks. It would apply its requests to the original at the end of the fit, and every method "
                "would start from a model that already forgot them."
            )
        if any(entry.init_args.get("requests") for entry in _trainer_entries(config, "callbacks", UnlearningCallback)):
            # the parsed config is written out whole: config.yaml in the run folder, the loggers' hyperparameters, W&B's config
            self.parser.error(
                "trainer.callbacks: UnlearningCallback's `requests` cannot be given in a config or on the command line: "
                "its ids would be copied into every file the run writes its configuration to (config.yaml, the "
                "loggers' hyperparameters, W&B's config). Write the request to a CSV or JSON-lines file (docs/requests.rst) "
                "and give its path as `requests_file`."
            )
        if _wandb_logger_configs(config):
            # W&B would copy the console into the run's files (output.log, the .wandb log), and an
            # error about a deletion request names its ids: keep the console out (WANDB_CONSOLE=wrap opts in).
            os.environ.setdefault("WANDB_CONSOLE", "off")
        for logger in _wandb_logger_configs(config):
            args = logger.init_args
            if args.get("offline") and args.get("log_model"):
                self.parser.error(
                    f"trainer.logger.init_args.log_model={args.log_model!r} cannot work with "
                    "trainer.logger.init_args.offline=true: WandbLogger logs checkpoints only from online runs. "
                    "Set `--trainer.logger.init_args.log_model=false` (to keep unlearned "
                    "checkpoints and the journal in an offline run, use `unlearn --log_artifacts=true`; `wandb sync` "
                    "uploads them) or `--trainer.logger.init_args.offline=false`."
                )
            for key in ("save_dir", "dir"):  # W&B's service process writes the run's log from its own working directory,
                if args.get(key):  # which is this one's only if it was started here: an earlier command may have started it
                    args[key] = os.path.abspath(os.path.expanduser(args[key]))
            if args.get("group") is None:
                args.group = _recipe_name(config)
            if args.get("job_type") is None and self.subcommand:
                args.job_type = self.subcommand

    def instantiate_classes(self) -> None:
        with _options_refused():  # a value one of this package's classes refuses, named by it
            try:
                super().instantiate_classes()
            except MisconfigurationException as err:  # e.g. --trainer.accelerator gpu on a machine without one
                raise OptionRefused(f"the trainer options: {err}") from err
        _COMMAND_LOGGERS[:] = self.trainer.loggers
        if isinstance(self.trainer, UnlearningTrainer) and self.subcommand:
            config = self.config_init[self.subcommand]
            optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
            # The same values LightningCLI gave the original's configure_optimizers, for Retrain's refits.
            self.trainer.optimizer_init = _init_dict(optimizer)
            self.trainer.lr_scheduler_init = _init_dict(scheduler) if optimizer else None
        for logger in self.trainer.loggers:
            # WandbLogger passes anonymous=None to wandb.init unless asked, and W&B warns that the setting has no effect.
            init = getattr(logger, "_wandb_init", None) if isinstance(logger, WandbLogger) else None
            if isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        # a checkpoint given (also a copy of one elsewhere) is checked against the record of the run the recipe writes too
        check_against_the_run(self._checkpoint_folders())
        try:
            dumped = self.parser.dump(self.config, skip_unset=False, skip_link_targets=False)
        except TypeError:  # jsonargparse < 4.49 calls it skip_none
            dumped = self.parser.dump(self.config, skip_none=False, skip_link_targets=False)
        config = yaml.safe_load(dumped)[self.subcommand]
        init_args = (config.get("model") or {}).get("init_args")
        if isinstance(init_args, dict):  # linked on instantiation: known only now
            init_args.update(num_users=self.datamodule.num_users, num_items=self.datamodule.num_items)
        if self.subcommand in ("unlearn", "validate", "test", "predict"):  # logged once their checks pass:
            self.trainer._command_config = config  # a refusal starts no logger's run
        else:
            _refuse_early_stopping_without_validation(self.trainer, self.datamodule,
                                                      resumed=bool(self.config_init[self.subcommand].get("ckpt_path")))
            if self.subcommand == "compare":  # its options are checked before a logger starts a run
                given = self.config_init[self.subcommand]
                self.trainer.check_compare(self.datamodule, given.get("methods"), given.get("deletion"), given.get("out"),
                                           given.get("k"), given.get("repeats"))
            log_config(self.trainer.loggers, config)
        # `config` holds the model's and the datamodule's arguments (under `model.init_args` and
        # `data`): Lightning would log their `save_hyperparameters` again, flat at the top level
        # (where the model's `optimizer` overwrote the CLI's own `optimizer` entry).
        for module in (self.model, self.datamodule):
            if module is not None:
                module._log_hyperparams = False

    def before_fit(self) -> None:
        self._local_checkpoint()
        self._require_checkpoint_file(required=False)
        path = self._checkpoint_file(self.config_init[self.subcommand].get("ckpt_path"))  # `last` too, as Lightning finds it
        state = self._restore_unlearned_checkpoint(
            "training continues from its weights on the retained data, with a fresh optimizer from epoch 0 (an unlearned "
            "checkpoint holds no optimizer or loop state)")
        checkpoint = load_checkpoint(path, mmap=True) if state is None and path else None
        if checkpoint is not None:  # a Lightning checkpoint: a refit's, or a fit's callback's
            state = {"unlearning": unlearning_state(checkpoint)}
        if state is None or not state.get("unlearning"):
            if checkpoint is not None:
                self._refuse_a_stale_trained_checkpoint(path, checkpoint)
            self._note_deletions_beside_the_checkpoints()
            return
        # the drift counter starts afresh when the model is fitted again, on the rows that remain; kept when it is not
        fitted = trains_nothing(self.trainer) is None
        carried = {k: v for k, v in state["unlearning"].items() if k != "drift" or not fitted}
        callbacks = [c for c in self.trainer.callbacks if isinstance(c, UnlearningCallback)]
        # where the record it names is now (refused when gone: training on would learn again what was deleted there since)
        named = None if any(c.branch for c in callbacks) else named_record(path, state["unlearning"], self.subcommand)
        if named and journal_of(named).path.is_file():
            # an older state of its record: training it would learn the deletions after it again (a branch is checked by its callback)
            check_lineage(journal_of(named), state["unlearning"].get("lineage"), record=str(named))
        if checkpoint is not None and not any(c.branch for c in callbacks):  # the records of its run, the lines started from it
            self._refuse_a_stale_trained_checkpoint(path, checkpoint)
        for callback in callbacks:  # the requests the checkpoint holds stay applied, once
            if callback.branch and adopt_key(folder_of_key(path, state), callback.dirpath or Path(self.trainer.default_root_dir) / "unlearning"):
                callback.key_made_here()  # a new folder, with the key of the checkpoint's, which recognises them: removed if refused
            callback.load_state_dict(carried)
        if not callbacks:  # without a callback, the refit's checkpoints still name the requests they embody
            self.trainer.callbacks.append(_CarriedUnlearningState(carried))

    def _refuse_a_stale_trained_checkpoint(self, path: Path, checkpoint: dict[str, Any]) -> None:
        """``fit``, ``validate`` or ``test`` of ``--ckpt_path`` (``checkpoint``, loaded): refused as ``predict`` refuses it
        (:func:`~lightning_unlearn.record_checks.refuse_fewer_deletions`) when a record of it deleted what its data still
        holds: a fit would learn those rows again, an evaluation would score the users deleted since, from a model trained
        on their rows. ``fit`` checks it with :func:`~lightning_unlearn.record_checks.refuse_training_on` (and the lineage
        of its callback state, if any, against the record it names). Checked on copies of the model and the data."""
        model = copy.deepcopy(self.model)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except (KeyError, RuntimeError) as err:  # Lightning's restore would fail on it with a traceback
            what = str(err).strip().splitlines()[0] if isinstance(err, RuntimeError) else "it holds no state_dict"
            raise OptionRefused(f"{self.subcommand} --ckpt_path {path} is not a checkpoint of this recipe's model ({what}): give "
                                f"a checkpoint fitted with the same model and sizes.") from err
        folders = records_of(path, model, unlearning_state(checkpoint) or {}, None, command=self.subcommand)
        if not any(journal_of(folder).path.is_file() for folder in folders):
            return
        datamodule = copy.deepcopy(self.datamodule)
        restore_checkpoint(path, model, datamodule)  # its removals (refused when it has no data state to check)
        with _cleaning_when_refused(folders, datamodule, self.subcommand):
            if self.subcommand == "fit":
                refuse_training_on(path, model, datamodule, folders)
                return
            for folder in in_checking_order(folders, path):
                refuse_fewer_deletions(path, datamodule, journal_of(folder), command=self.subcommand)

    def _note_deletions_beside_the_checkpoints(self) -> None:
        """A fit of a model with no deletion whose checkpoint folder has a deletion record beside it: say what that means."""
        saver = self.trainer.checkpoint_callback
        if saver is None or not saver.dirpath:
            return
        folder = unlearning_folder_of(Path(saver.dirpath).resolve())
        journal = journal_of(folder)
        if journal.path.is_file() and journal.applied_count():
            print(f"[fit] {folder} records {counted(journal.applied_count(), 'deletion')} applied to a model of this run "
                  f"folder. This fit trains on the data as loaded, which still holds their rows, and its checkpoints in "
                  f"{saver.dirpath} hold them too: apply the requests again to the new model (unlearn --out <a new folder>), "
                  f"or fit from the latest unlearned checkpoint ({journal.checkpoint(journal.latest())}) to keep them deleted.")

    def _note_unused_optimizer(self) -> None:
        """``validate``/``test``/``predict`` train nothing: say that ``--optimizer`` (``--lr_scheduler``) is not used."""
        if getattr(self.trainer, "optimizer_init", None) is not None:
            print(f"[{self.subcommand}] --optimizer is not used: {self.subcommand} trains nothing")

    def _checkpoint_folders(self) -> list[Path]:
        """Where the recipe's run keeps its checkpoints: each ``ModelCheckpoint``'s and ``OnExceptionCheckpoint``'s
        ``dirpath``; for a ``ModelCheckpoint`` without one, where Lightning puts them (``<default_root_dir>/checkpoints``
        without a logger, else each version folder of the first logger's, ``<save_dir>/<name>/version_*/checkpoints``)."""
        trainer, folders = self.trainer, []
        for saver in trainer.callbacks:
            if isinstance(saver, ModelCheckpoint | OnExceptionCheckpoint) and saver.dirpath:
                folders.append(Path(saver.dirpath))
            elif isinstance(saver, ModelCheckpoint) and not trainer.loggers:
                folders.append(Path(trainer.default_root_dir) / "checkpoints")
            elif isinstance(saver, ModelCheckpoint):
                logger = trainer.loggers[0]
                folders += sorted((Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")).glob("*/checkpoints"))
        return folders

    def before_unlearn(self) -> None:
        self._local_checkpoint()

    def before_compare(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path"):  # none: compare trains the original itself
            self._local_checkpoint()

    def before_predict(self) -> None:
        """``predict`` recommends from a checkpoint: without one, the model is the untrained one the recipe builds."""
        self._note_unused_optimizer()
        self._local_checkpoint()
        if not self.config_init[self.subcommand].get("ckpt_path"):
            raise OptionRefused(
                "predict needs --ckpt_path: without it the recommendations would come from the untrained model the recipe "
                "builds. Give a checkpoint of `fit` (e.g. runs/<name>/checkpoints/best.ckpt) or an unlearned checkpoint."
            )

    def before_validate(self) -> None:
        self._before_evaluating("validating it")

    def before_test(self) -> None:
        self._before_evaluating("testing it")

    def _before_evaluating(self, what_next: str) -> None:
        """``validate``/``test``: the checkpoint checked (an unlearned one restored), then the command's config logged."""
        self._note_unused_optimizer()
        self._local_checkpoint()
        self._require_checkpoint_file()
        path = self._checkpoint_file(self.config_init[self.subcommand].get("ckpt_path"))
        if path is not None:  # an older state of a record, or a checkpoint whose data still holds what a record deleted
            self._refuse_a_stale_trained_checkpoint(path, load_checkpoint(path, mmap=True))
        self._restore_unlearned_checkpoint(what_next)
        log_config(self.trainer.loggers, self.trainer._command_config)

    def _local_checkpoint(self) -> None:
        """``--ckpt_path`` made the file Lightning will load, so that the checks see that file: a local URL
        (``file:///...``) or a path with ``~`` is that file; ``hpc`` (also no ``--ckpt_path`` on SLURM, where Lightning
        resumes by itself) the newest ``hpc_ckpt_*.ckpt`` of the trainer's folder; ``last`` (also no ``--ckpt_path`` for
        a fit with an ``OnExceptionCheckpoint``) the newest last or on-exception checkpoint. Another URL is refused, as its records
        (beside it, and on this machine) cannot be checked.

        Raises:
            OptionRefused: ``--ckpt_path`` is the URL of a file elsewhere (``s3://``, ``https://``, ...), or ``hpc``
                with no HPC checkpoint.
        """
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        hpc = self.trainer._checkpoint_connector._hpc_resume_path
        if path == "hpc" or (path is None and hpc is not None and SLURMEnvironment.detect()):
            if hpc is None:
                raise OptionRefused(f"{self.subcommand} --ckpt_path hpc: there is no hpc_ckpt_*.ckpt in {self.trainer.default_root_dir}.")
            config["ckpt_path"] = hpc
            return
        if path is None and self.subcommand == "fit" and any(isinstance(c, OnExceptionCheckpoint) for c in self.trainer.callbacks):
            path = "last"  # as Lightning takes it: a fit resumes from the newest last or on-exception checkpoint
        if path == "last":
            found = self._checkpoint_file("last")  # the file Lightning would pick (none: a fit starts afresh, as there)
            if found is not None:
                config["ckpt_path"] = str(found)
            return
        if path is None:
            return
        local = _local_path(path)
        if local is None:
            raise OptionRefused(
                f"{self.subcommand} --ckpt_path {path}: a checkpoint elsewhere cannot be checked against the deletion records "
                f"beside it and on this machine, so it could bring deleted rows back. Copy it here (beside its run's "
                f"`unlearning/` folder, if it has one) and give its path.")
        if os.path.normpath(local) != os.path.abspath(str(path)):  # `file:`, `local:`, `~`: Lightning loads the same file
            config["ckpt_path"] = local  # and the checks below see it

    def _checkpoint_file(self, path: str | None) -> Path | None:
        """The checkpoint file ``--ckpt_path`` names here: a path, or ``last`` as Lightning finds it (the newest
        ``last*.ckpt`` of every ModelCheckpoint's folder, a folder not given resolved as Lightning resolves it, and
        every OnExceptionCheckpoint's file);
        ``None`` for none (a URL was made a path, or refused, by :meth:`_local_checkpoint`)."""
        if not path:
            return None
        if path == "last":
            found = {Path(p) for saver in self.trainer.checkpoint_callbacks if isinstance(saver, ModelCheckpoint)
                     for p in saver._find_last_checkpoints(self.trainer)}
            found |= {Path(c.ckpt_path) for c in self.trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
            found = [p for p in found if p.is_file()]
            return max(found, key=lambda p: p.stat().st_mtime) if found else None
        return Path(path) if Path(path).is_file() else None

    def _require_checkpoint_file(self, required: bool = True) -> None:
        """``validate``/``test``: refuse no ``--ckpt_path`` (the untrained model), or one that names no checkpoint file here;
        ``fit`` (not ``required``) a ``--ckpt_path`` other than ``last`` that names no checkpoint file here.

        Lightning resolves ``best`` only after a fit in the same process (else a raw error), and a
        ``last`` it does not find only warns, then evaluates the untrained model (a fit starts afresh).
        """
        path = self.config_init[self.subcommand].get("ckpt_path")
        if not required and (not path or path == "last"):
            return
        if not path:
            raise OptionRefused(
                f"{self.subcommand} needs --ckpt_path: without it the metrics would be those of the untrained model the recipe "
                f"builds. Give a checkpoint of `fit` (e.g. runs/<name>/checkpoints/best.ckpt) or an unlearned checkpoint."
            )
        if self._checkpoint_file(path):
            return
        raise FileNotFoundError(
            f"--ckpt_path {path}: {self.subcommand} needs a checkpoint file, and there is none at that name here "
            f"(`best` names the best checkpoint of a fit run in the same process, `last` the last.ckpt of the trainer's "
            f"checkpoint folder). Give the file, e.g. `--ckpt_path runs/<name>/checkpoints/best.ckpt`."
        )

    def _restore_unlearned_checkpoint(self, what_next: str) -> dict[str, Any] | None:
        """Before ``fit``/``validate``/``test``: an unlearned ``--ckpt_path`` is restored here, removals included.

        Lightning would load its weights but not the removals (an unlearned checkpoint keeps the
        datamodule's state under ``datamodule_state``), and ``fit`` would look for optimizer and
        loop state it does not have. Lightning checkpoints are left to Lightning, which restores
        the datamodule's state (its removals) with the weights.

        Returns:
            The checkpoint, when it was an unlearned one (``None`` otherwise).
        """
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        if not path or not Path(path).is_file() or not _is_unlearned_checkpoint(path):
            return None
        state = restore_checkpoint(path, self.model, self.datamodule)
        config["ckpt_path"] = None  # the weights are in the model already: Lightning runs from them as they are
        _no_checkpoint_of_its_own(self.trainer)
        clean_recommendations(self.datamodule, self.subcommand)  # what a run stopped before its cleaning left
        removed = self.datamodule.state_dict()
        counts = ", ".join(counted(len(removed.get(key, ())), noun)
                           for key, noun in (("train_keys", "training row"), ("users", "user"), ("items", "item")))
        print(f"[{self.subcommand}] {path} is an unlearned checkpoint: its weights are loaded and the removals it records "
              f"are applied to the data ({counts} removed); {what_next}")
        return state

    def after_fit(self) -> None:
        if not self.trainer.interrupted:  # an interrupted fit's callback cleaned the recommendation files of what it applied
            checkpoint = self.trainer.checkpoint_callback
            best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
            applied = [c for c in self.trainer.callbacks if isinstance(c, UnlearningCallback) and c.reports]
            clean_recommendations(self.datamodule, "fit")  # a fit from an unlearned state too: what a killed run left
            if best and applied:  # the best checkpoint predates the deletions: its weights still hold the deleted rows
                at_end = all(c.when == "train_end" for c in applied)
                print(f"[fit] {counted(sum(len(c.reports) for c in applied), 'deletion request')} applied "
                      f"{'at the end of training' if at_end else 'during training'}: the test is of the unlearned model "
                      f"(in {applied[-1].dirpath}), not of {best}, which {'was saved before them' if at_end else 'may predate some of them'}")
                best = ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def after_predict(self) -> None:
        self._finish_wandb()

    def after_unlearn(self) -> None:
        self._finish_wandb()

    def after_compare(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Say where each W&B run was written (and how to upload an offline one), then finish it."""
        if not self.trainer.is_global_zero:
            return
        for line in wandb_run_lines(self.trainer.loggers):
            print(line)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()


def _wandb_logger_configs(config: Any) -> list[Any]:
    """The ``trainer.logger`` entries of a parsed config that are ``WandbLogger``s."""
    return _trainer_entries(config, "logger", WandbLogger)


def _trainer_entries(config: Any, key: str, cls: type) -> list[Any]:
    """The ``trainer.<key>`` entries (one or a list) of a parsed config of class ``cls`` or a subclass, with ``init_args``."""
    trainer = config.get("trainer") if config is not None else None
    entries = trainer.get(key) if trainer is not None else None
    entries = entries if isinstance(entries, list) else [entries]
    return [entry for entry in entries if hasattr(entry, "get") and entry.get("init_args") and _is_class(entry.get("class_path"), cls)]


def _is_class(class_path: Any, cls: type) -> bool:
    """Whether ``class_path`` (as a parsed config names it) is ``cls`` or a subclass of it (by name, if it cannot be imported)."""
    found = pydoc.locate(str(class_path)) if class_path else None
    return issubclass(found, cls) if isinstance(found, type) else str(class_path or "").endswith(cls.__name__)


def _recipe_name(config: Any) -> str | None:
    """``<folder>/<stem>`` of the recipe: the first file given with ``-c`` (those after it override some of its values;
    ``None`` without one).

    Example:
        >>> _recipe_name({"config": ["recipes/ml100k/mf.yaml", "tiny.yaml"]})
        'ml100k/mf'
    """
    files = config.get("config") or []
    if not files:
        return None
    path = Path(str(files[0]))
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


class _CarriedUnlearningState(pl.Callback):
    """A fit from an unlearned checkpoint, without an ``UnlearningCallback``: its checkpoints keep that checkpoint's
    ``unlearning`` state (the applied requests' keyed fingerprints and key id, the lineage, the record folder), so that
    a request given again is recognised as applied, and ``unlearn`` and ``predict`` check the record it came from."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["unlearning"] = dict(self.state)


def _no_checkpoint_of_its_own(trainer: pl.Trainer) -> None:
    """The trainer's next commands given no ``ckpt_path`` run from the model as it is.

    Lightning otherwise picks a checkpoint by itself: a fit with an ``OnExceptionCheckpoint`` resumes
    from the newest last or on-exception file, and any command on SLURM from its ``hpc_ckpt_*.ckpt``.
    After an unlearned checkpoint's weights and removals were restored into the model and the data,
    that file (e.g. the trained run's ``last.ckpt``) would replace both: the deleted rows trained on again.
    """
    connector = trainer._checkpoint_connector
    parse = connector._parse_ckpt_path
    connector._parse_ckpt_path = lambda fn, ckpt_path, *args, **kwargs: None if ckpt_path is None else parse(fn, ckpt_path, *args, **kwargs)


def _is_unlearned_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an unlearned checkpoint (written by ``unlearn`` or the UnlearningCallback),
    not a Lightning one: it holds the datamodule's state under ``datamodule_state`` and no loop state."""
    state = load_checkpoint(path, mmap=True)  # its keys, not its tensors
    return "datamodule_state" in state and "unlearning" in state and "loops" not in state


def _several(devices: Any) -> bool:
    """Whether a ``--trainer.devices`` value asks for more than one device (``"auto"`` does not ask)."""
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()]) > 1
    return text == "-1" or (text.isdigit() and int(text) > 1)


def _normalised(value: Any) -> Any:
    """A hyperparameter as compared with a checkpoint's: sequences as lists (YAML gives lists, a checkpoint may hold tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _init_dict(init: Any) -> dict[str, Any] | None:
    """A parsed ``--optimizer``/``--lr_scheduler`` (``class_path`` and ``init_args``) as plain dicts (``None``: not given)."""
    if not init:
        return None
    init = init.as_dict() if hasattr(init, "as_dict") else dict(init)
    args = init.get("init_args") or {}
    return {"class_path": init["class_path"], "init_args": dict(args.as_dict() if hasattr(args, "as_dict") else args)}


def _finalize_loggers(loggers: list[Any]) -> None:
    """End every logger as Lightning ends a fit: write what it buffered (CSVLogger's metrics.csv,
    TensorBoard's queued events) and close. ``unlearn`` and ``compare`` are not followed by
    Lightning's own finalize; a W&B run is finished afterwards (``after_unlearn``/``after_compare``)."""
    for logger in loggers:
        logger.finalize("success")


def _subcommand_of(args: list[str] | None) -> str | None:
    given = sys.argv[1:] if args is None else args
    return next((a for a in given if a in LightningUnlearnCLI.subcommands()), None)


def _refuse_a_recipe_before_the_subcommand(given: list[str]) -> None:
    """``-c FILE`` before the subcommand takes a file with a section per subcommand (LightningCLI's); a recipe, which
    configures one command, is refused there with the command line that runs it, instead of jsonargparse's
    "Option 'trainer...' is not accepted before subcommand" about its first key."""
    subcommands = LightningUnlearnCLI.subcommands()
    before = given[:next((i for i, a in enumerate(given) if a in subcommands), len(given))]
    for name, config in _config_files(before):
        if isinstance(config, dict) and config and not set(config) & set(subcommands):
            command = _subcommand_of(given) or "fit"
            raise OptionRefused(f"-c {name} before the subcommand takes a file with a section per subcommand ({', '.join(s + ':' for s in subcommands)}); "
                                f"this one configures a single command. Give it after the subcommand: lightning-unlearn {command} -c {name}")


def _config_files(args: list[str]) -> list[tuple[str, Any]]:
    """The files ``args`` give with ``-c`` / ``--config`` (``-cFILE`` and ``--config=FILE`` too), in order, each with its
    YAML content (``None`` where it does not read as YAML: LightningCLI says why)."""
    names = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            names.append(args[i + 1])
        elif arg.startswith("--config="):
            names.append(arg.split("=", 1)[1])
        elif arg.startswith("-c") and not arg.startswith("--") and len(arg) > 2:
            names.append(arg[2:].removeprefix("="))
    read = []
    for name in names:
        try:
            read.append((name, yaml.safe_load(Path(name).read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            read.append((name, None))
    return read


def _refuse_config_files_that_are_not_mappings(given: list[str]) -> None:
    """A ``-c`` file that is not a mapping of options (a requests CSV given by mistake, say) is refused naming the file only:
    jsonargparse's "Unexpected config" would print its content, the raw ids of a request."""
    for name, content in _config_files(given):
        if content is not None and not isinstance(content, dict):
            raise OptionRefused(f"-c {name} is not a configuration: a YAML mapping of options (a recipe, or a file of overrides) "
                                f"is expected. A requests file goes with --requests (unlearn) or --deletion.requests_file (compare).")


def _methods_as_lists(args: list[str] | None) -> list[str] | None:
    """``compare --methods IFRU`` (or ``--methods=IFRU``) means the list ``[IFRU]``, not jsonargparse's "Expected a list"
    after a page of usage; a list (``[IFRU, AltEraser]``) or ``--methods+ X`` (append to the recipe's) is left as given."""
    given = sys.argv[1:] if args is None else list(args)
    if _subcommand_of(given) != "compare":
        return args
    for i, arg in enumerate(given):
        value, at = (given[i + 1], i + 1) if arg == "--methods" and i + 1 < len(given) else (arg[len("--methods="):], i)
        if (arg == "--methods" or arg.startswith("--methods=")) and _one_name(value):
            given[at] = f"[{value}]" if at != i else f"--methods=[{value}]"
    if args is None:
        sys.argv[1:] = given
        return None
    return given


def _one_name(value: str) -> bool:
    """Whether a ``--methods`` value is one method's name (``IFRU``, ``lightning_unlearn.unlearning.IFRU``): not a list, a
    mapping, ``null``, a number or a file."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return isinstance(parsed, str) and not value.startswith("-") and not value.endswith((".yaml", ".yml", ".json"))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script.

    A missing data set ends the command with the error's message (where it looked, how to point
    the library at data) and exit status 2, instead of a traceback; so does an error in what the
    command was given (:data:`~lightning_unlearn.console.USER_ERRORS`: a deletion request, a checkpoint, an unlearning
    folder), as one paragraph on stderr (:func:`~lightning_unlearn.console.user_error_message`). ``--version`` prints
    ``lightning-unlearn <version>``.

    The command flushes denormal floats to zero (``torch.set_flush_denormal``): weights that an L2
    term drives towards zero (e.g. a NeuMF branch the data stops using) reach the denormal range,
    where CPU arithmetic is many times slower; on MovieLens-1M one NeuMF validation pass took
    530 s instead of 31 s.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: on invalid arguments, after ``--help`` or ``--version`` (status 0), (status
            2) when the data set is not found or the command's input is refused, or (status 1) when
            an unlearning method failed on a request (a message, not a traceback).
    """
    from lightning_unlearn import __version__
    from lightning_unlearn.recipes_cli import console_args

    args = _methods_as_lists(console_args(args))  # `recipes list|copy` ends here; `-c ml100k/mf` becomes the shipped recipe's path
    torch.set_flush_denormal(True)
    try:
        given = sys.argv[1:] if args is None else args  # console_args rewrote sys.argv when it was given no arguments
        _refuse_config_files_that_are_not_mappings(given)
        _refuse_a_recipe_before_the_subcommand(given)
        _refuse_options_given_twice(given)
        with quiet_third_party_noise():
            contextvars.copy_context().run(  # the run its checkpoints are checked against is this command's (check_against_the_run)
                LightningUnlearnCLI,
                Recommender,
                RecDataModule,
                trainer_class=UnlearningTrainer,
                subclass_mode_model=True,
                args=args,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": "lightning-unlearn", "version": __version__, "description": DESCRIPTION},
            )
    except DataNotFoundError as err:
        print(f"lightning-unlearn: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except USER_ERRORS as err:
        if _end_console_recording() and getattr(err, "detail", None):  # the message may name ids: whole once no run records it
            err = type(err)(err.detail)
        print(user_error_message(err, _subcommand_of(args)), file=sys.stderr)
        raise SystemExit(2) from err
    except UnlearningError as err:  # a method failed on a request: the record says so, the model was restored
        _end_console_recording()
        command = _subcommand_of(args)
        after = "" if command == "compare" else (" Nothing of that request is applied; the requests applied before it stay applied "
                                                 "(the unlearning folder's journal says which).")
        print(f"lightning-unlearn {command or ''}: error: {' '.join(str(err).split())}{after}", file=sys.stderr)
        raise SystemExit(1) from err
    except BaseException as err:
        if isinstance(err, OSError) and err.errno in _FILE_SYSTEM_REFUSALS:  # a message, not a traceback
            _end_console_recording()  # it names a path the operator chose (a requests file's, say): not into a run's files
            where = f" ({err.filename})" if err.filename else ""
            print(f"lightning-unlearn: {err.strerror}{where}.{_what_is_kept(_subcommand_of(args))}", file=sys.stderr)
            raise SystemExit(2) from err
        stopped = _stopped_by(err)
        if stopped is None:
            raise
        print(f"lightning-unlearn: stopped by {stopped[0]}.{_what_is_kept(_subcommand_of(args))}", file=sys.stderr)
        raise SystemExit(stopped[1]) from err


# a full disk or quota, a file over the size limit, a read-only file, folder or file system, a path that cannot be a file
# (too long, through a file, a folder, a loop of links): said in one paragraph
_FILE_SYSTEM_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPERM, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG,
                         errno.ENOTDIR, errno.EISDIR, errno.ELOOP)


def _local_path(path: str | os.PathLike) -> str | None:
    """The local file ``--ckpt_path`` names, as Lightning opens it (``~`` expanded, a ``file://`` URL made a path); ``None``
    for a URL elsewhere (``s3://``, ``https://``, a protocol fsspec does not have here)."""
    try:
        filesystem, local = fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError):
        return None
    return local if isinstance(filesystem, LocalFileSystem) else None


def _init_defaults(cls: type) -> dict[str, Any]:
    """A model class's ``__init__`` options and their defaults, its bases' too (a subclass's ``**kwargs`` reach them, as
    jsonargparse resolves them); ``self`` left out."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            defaults.update((name, p.default) for name, p in inspect.signature(klass.__init__).parameters.items()
                            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self")
    return defaults


def _init_options(cls: Any) -> set[str] | None:
    """The options ``save_hyperparameters`` keeps for a :class:`Recommender` class (``None`` for anything else)."""
    return set(_init_defaults(cls)) if isinstance(cls, type) and issubclass(cls, Recommender) else None


def _what_is_kept(command: str | None) -> str:
    """What a command stopped midway keeps, and how to go on (said after why it stopped)."""
    if command == "compare":
        return " What finished is kept: `compare --resume true` runs only the methods not measured."
    if command in ("unlearn", "fit"):
        return (" What finished is kept: the requests applied before it stay applied, and the unlearning folder's journal names "
                "the state to resume from (a request it was applying is recovered when the command runs again).")
    return ""


_COMMAND_LOGGERS: list[Logger] = []  # the running command's trainer's loggers (set when they are built)


def _end_console_recording() -> bool:
    """End every live W&B run that records the console (``WANDB_CONSOLE`` other than ``off``, which the command
    sets unless told otherwise): the global one and those of the command's ``WandbLogger`` loggers (which need not be
    global, e.g. with ``reinit="create_new"``), so that what is printed next stays out of their files. Whether none
    records it now."""
    wandb = sys.modules.get("wandb")
    runs = [getattr(wandb, "run", None), *(getattr(logger, "_experiment", None) for logger in wandb_loggers(_COMMAND_LOGGERS))]
    ended = True
    for run in {id(run): run for run in runs if run is not None}.values():
        if not getattr(run, "disabled", False) and getattr(getattr(run, "settings", None), "console", "off") != "off":
            try:
                run.finish(exit_code=2)
            except Exception:  # the message is printed whatever W&B does: as it was raised (redacted, if redacted)
                ended = False
    return ended


def _stopped_by(err: BaseException) -> tuple[str, int] | None:
    """``(what, exit status)`` when ``err`` ends a command stopped by a signal, else ``None``.

    Lightning ends a SIGTERM as a :class:`SIGTERMException` (a ``SystemExit`` of status 0), and
    Ctrl-C inside a Trainer as ``sys.exit(1)`` while it handles the ``KeyboardInterrupt``.
    """
    if isinstance(err, SIGTERMException):
        return "SIGTERM", 143
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)):
        return "an interrupt (Ctrl-C)", 130
    return None


DESCRIPTION = (
    "Train recommenders, forget deletion requests in them, and compare unlearning methods: a LightningCLI with "
    "the subcommands unlearn and compare, and predict for top-K recommendations. `lightning-unlearn recipes list` "
    "names the recipes that ship with the package."
)
# argparse's own line would read `[-c CONFIG] {fit,...}`: a recipe goes after the subcommand, and `recipes` is a command too
USAGE = ("lightning-unlearn [-h] [--version] {fit,validate,test,predict,unlearn,compare} [-c RECIPE] [options]\n"
         "       lightning-unlearn recipes {list,copy} ...")


if __name__ == "__main__":  # pragma: no cover
    main()
