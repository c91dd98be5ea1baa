"""``UnlearningCallback``: the Lightning glue from a deletion request to a forgotten model."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from pytorch_lightning.trainer.states import TrainerFn
from typing_extensions import override

from lightning_unlearn.data.datamodule import RecDataModule, removed_within
from lightning_unlearn.files import fsync_directory
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import model_digest, non_finite
from lightning_unlearn.private_checkpoints import REMOVALS, keep_checkpoints_private
from lightning_unlearn.recommendations import clean_from_the_latest_state, clean_recommendations
from lightning_unlearn.unlearning.journal import Journal
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningError, UnlearningReport
from lightning_unlearn.unlearning.methods.retrain import Retrain
from lightning_unlearn.unlearning.policy import RetrainPolicy
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.record import (
    CheckpointUnreadable,
    StaleCheckpoint,
    applied_to,
    check_key,
    check_lineage,
    forget_an_unused_key,
    journal_of,
    key_id,
    load_checkpoint,
    recover,
    refuse_a_copy_going_on,
    refuse_a_replaced_key,
    save_checkpoint,
)
from lightning_unlearn.unlearning.reporting import define_request_axis, ids_kept_out_of
from lightning_unlearn.unlearning.request import DeletionRequest
from lightning_unlearn.unlearning.stationarity import objective_gradient_norm

__all__ = ["UnlearningCallback", "recover", "save_checkpoint"]

_WHEN = ("train_end", "epoch_end")
_MISSING = ("error", "ignore")
# callbacks that write into the model weights averaged over the fit (WeightAveraging: Lightning >= 2.5)
_WEIGHT_AVERAGING = tuple(getattr(pl.callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging") if hasattr(pl.callbacks, name))
MAX_DELETED_FRACTION = 0.03  # the safe_deleted_fraction measured for IFRU and AltEraser (kept for tests/benchmarks/bench_drift.py)


class UnlearningCallback(pl.Callback):
    """Apply deletion requests to the datamodule and make the model forget them.

    For each request, in order: resolve it against the training split (bad input is refused
    here, before anything changes), journal it as ``pending``, remove its rows from the
    datamodule (graph models get the new graph), run the method on the trainer's root device,
    evaluate utility on validation and test, log counts, digest, timings, diagnostics and
    utility through ``trainer.loggers`` (never raw ids), save a checkpoint with the unlearned
    weights (temp file, fsync, rename), and journal ``applied``. If anything fails before the
    checkpoint is on disk (the method, the evaluation, the retrain policy's checks, the write,
    an interrupt), model, datamodule, queue and applied requests are restored, a checkpoint the
    attempt wrote is removed, the journal says ``failed`` with the reason, and the error
    propagates.

    Exactly once: a request is recognised by its content (:func:`request_fingerprint`: its ids'
    indices in the data's id maps, keyed with the folder's secret), and the fingerprints of the
    applied requests travel in every checkpoint with the model, the datamodule's removals and
    the checkpoint's lineage (the journal entry it embodies), so a run resumed from a checkpoint
    skips what that checkpoint holds and applies the rest. Requests are applied only on top of
    the folder's latest state (:func:`~lightning_unlearn.unlearning.record.check_lineage`), by
    one process at a time (the journal's folder lock). After a crash, :func:`recover` tidies the
    folder (partial files, interrupted journal entries) and names the checkpoint to resume from.
    See ``docs/journal.rst``.

    Retrain policy: a fast method's error adds up over a stream of requests, so every so often
    a request is served by :class:`~lightning_unlearn.unlearning.methods.Retrain` (with the
    original's seed and fitting recipe) instead, which brings the model back to the exact answer.
    That happens for the ``retrain_every``-th request since the model was last fitted; for a
    request that arrives when the drift estimate :attr:`drift` -- the training rows deleted
    since the model was last fitted, as a share of the rows it was fitted on -- has passed
    ``max_deleted_fraction``; and, when ``max_grad_ratio`` is set, for a request after which
    the method left the gradient norm of the retained objective more than ``max_grad_ratio``
    times larger or smaller than it was when the model was last fitted (the method's result is
    then discarded). The callback keeps the counter and the decision in a
    :class:`~lightning_unlearn.unlearning.policy.RetrainPolicy`. The journal's ``method`` says
    which one ran, its ``policy`` why (a :class:`~lightning_unlearn.unlearning.policy.RetrainReason`;
    absent when the method ran), ``drift`` the estimate after the request (a retrain resets it
    to 0) and, with ``max_grad_ratio``, ``grad_ratio`` the gradient check.

    Before the method serves a request, the callback calls its
    :meth:`~lightning_unlearn.unlearning.methods.base.Unlearner.prepare` (the work paid once per
    trained model, such as the curvature IFRU and AltEraser cache; nothing when the method is
    prepared for this model already) and reports its seconds as the request's
    ``precompute_seconds``. A retrain makes a new set of parameters, so the method's next
    request prepares it afresh for the retrained model.

    Args:
        method: the :class:`~lightning_unlearn.unlearning.methods.Unlearner` to run.
        requests: requests to apply, given up front.
        requests_file: a requests file (CSV or JSON lines) read in ``setup``.
        when: ``"train_end"`` (default; the model is still on the trainer's device) or
            ``"epoch_end"`` (after every training epoch, for requests arriving during training).
            Whatever is still queued when the fit ends is applied then (a fit whose training
            loop Lightning skipped has no train or epoch end).
        dirpath: folder for the journal and the unlearned checkpoints (default:
            ``<trainer.default_root_dir>/unlearning``).
        missing: ``"error"`` refuses pairs that are not training rows; ``"ignore"`` drops them. A
            request queued with ``"ignore"`` keeps it in the state of a checkpoint that holds it queued.
        branch: the model comes from a checkpoint of another unlearning folder, and ``dirpath``
            (a new, empty folder) starts a new branch from it. Without it such a model is refused.
            The new folder needs that folder's key to recognise the requests the checkpoint holds:
            ``unlearn --branch true`` and ``fit`` from an unlearned checkpoint copy it; in Python,
            call :func:`~lightning_unlearn.unlearning.record.adopt_key` first (else refused).
        evaluate: evaluate utility on validation and test after each request.
        seed: the original model's seed, for ``Retrain`` (default: the seed of the last
            ``seed_everything`` when the requests are applied, else 0).
        retrain_every: serve every ``retrain_every``-th request since the last fit with
            ``Retrain`` (an integer ``>= 1``; ``None``: never for this reason).
        max_deleted_fraction: serve a request with ``Retrain`` when :attr:`drift` has passed this
            share when it arrives (a number in ``(0, 1]``; ``None``: never for this reason). The
            first request after a fit is always the method's, judged as ``compare`` judges one
            deletion; the bound limits what adds up over a stream (the model carries at most this
            share plus one request). ``"auto"``, the default, is the method's
            :attr:`~lightning_unlearn.unlearning.methods.base.Unlearner.safe_deleted_fraction`
            (``0.03`` for ``IFRU`` and ``AltEraser``; ``None`` for methods whose drift was not
            measured). The measurements behind it are in :ref:`retrain-policy`.
        max_grad_ratio: after the method, compute ``||grad L||`` of the objective on the
            retained rows (one forward and backward pass over them, about an epoch without the
            optimiser step) and serve the request with ``Retrain`` when it is more than this
            factor above or below its value when the model was last fitted (a number ``> 1``;
            ``None``, the default: no check, no pass). What it measured over a stream is in
            :ref:`retrain-policy`.

    Raises:
        ValueError: on an unknown ``when`` or ``missing``, or a ``retrain_every``,
            ``max_deleted_fraction`` or ``max_grad_ratio`` outside the accepted values.
        TypeError: if ``method`` is not an ``Unlearner``, or ``requests`` is not a list of ``DeletionRequest``.

    Example:
        >>> from lightning_unlearn.unlearning.methods import FineTune
        >>> callback = UnlearningCallback(FineTune(epochs=1), requests=[DeletionRequest(users=[3])])
        >>> callback.pending
        1
        >>> from lightning_unlearn.unlearning.methods import IFRU
        >>> UnlearningCallback(IFRU()).max_deleted_fraction, callback.max_deleted_fraction  # "auto"
        (0.03, None)
    """

    def __init__(
        self,
        method: Unlearner,
        requests: Sequence[DeletionRequest] = (),
        requests_file: str | os.PathLike | None = None,
        when: Literal["train_end", "epoch_end"] = "train_end",
        dirpath: str | os.PathLike | None = None,
        missing: Literal["error", "ignore"] = "error",
        branch: bool = False,
        evaluate: bool = True,
        seed: int | None = None,
        retrain_every: int | None = None,
        max_deleted_fraction: float | Literal["auto"] | None = "auto",
        max_grad_ratio: float | None = None,
    ):
        if not isinstance(method, Unlearner):
            raise TypeError(f"UnlearningCallback(method=...) must be an Unlearner, got {type(method).__name__}.")
        if when not in _WHEN:
            raise ValueError(f"UnlearningCallback(when=...) must be one of {_WHEN}, got {when!r}.")
        if missing not in _MISSING:
            raise ValueError(f"UnlearningCallback(missing=...) must be one of {_MISSING}, got {missing!r}.")
        self._policy = RetrainPolicy(retrain_every, max_deleted_fraction, max_grad_ratio, auto=method.safe_deleted_fraction,
                                     owner="UnlearningCallback")
        self._retrain = Retrain()
        self.method, self.when, self.missing, self.evaluate, self.branch = method, when, missing, evaluate, bool(branch)
        self._seed = seed
        self.requests_file = requests_file
        self.dirpath = Path(dirpath).expanduser() if dirpath is not None else None  # as ModelCheckpoint takes it
        self._queue: list[DeletionRequest] = _list_of_requests(requests)
        self._restored: list[dict[str, Any]] = []  # pending requests of a loaded state, as indices (need the data)
        self._applied: list[str] = []
        self._lineage: dict[str, Any] | None = None  # the journal entry the model embodies (None: no request yet)
        self._key_id: str | None = None  # of the key the restored applied fingerprints were made with (None: not recorded)
        self._key_unknown = False  # restored fingerprints from a state that did not record their key
        self._named_record: str | None = None  # the record a restored state names (a refit's: not beside its checkpoint)
        self._ignoring: set[bytes] = set()  # contents of restored requests that were queued with missing="ignore"
        self._train_ended = False  # this fit's train end came (Lightning skips the loop, and it, for a finished model)
        self._made_key = False  # this run made (or its branch copied) the folder's key, not checked yet: on_exception removes it
        self._saved: set[str] = set()  # the parameters of the checkpoints the trainer saved since the last request (digests)
        self._resumed_from: tuple[str | None, str] | None = None  # the checkpoint this fit started from (None: loaded in Python), their digest
        self._branch_line = False  # the record is a branch's (started apart on purpose), as the restored state says
        self._datamodule: RecDataModule | None = None
        self.reports: list[UnlearningReport] = []

    # ------------------------------------------------------------------ queueing
    @property
    def pending(self) -> int:
        """Number of requests waiting to be applied (once the data is known, without the ones already applied)."""
        if self._datamodule is not None:
            self._merge_restored(self._datamodule)
        return len(self._queue) + len(self._restored)

    def queued(self, datamodule: RecDataModule) -> list[DeletionRequest]:
        """The requests waiting to be applied to ``datamodule``'s data, in order: a restored state's, then those queued
        here, without repeats and applied ones (a copy; nothing is written)."""
        self._merge_restored(datamodule)
        return list(self._queue)

    @property
    def drift(self) -> float:
        """The drift estimate: training rows deleted since the model was last fitted, as a share of the rows it was fitted on.

        0 before the first request and after a retrain; what ``max_deleted_fraction`` bounds.
        """
        return self._policy.drift

    @property
    def retrain_every(self) -> int | None:
        """Every ``retrain_every``-th request since the last fit is served by ``Retrain`` (``None``: never for this reason)."""
        return self._policy.retrain_every

    @property
    def max_deleted_fraction(self) -> float | None:
        """The bound on :attr:`drift` past which a request is served by ``Retrain`` (``"auto"`` resolved)."""
        return self._policy.max_deleted_fraction

    @property
    def max_grad_ratio(self) -> float | None:
        """The gradient-norm ratio past which the method's result is replaced by a retrain (``None``: no check)."""
        return self._policy.max_grad_ratio

    @property
    def seed(self) -> int:
        """The original model's seed, for ``Retrain``: the one given, else the last ``seed_everything``'s (now), else 0."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) if self._seed is None else self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = value

    def request(self, request: DeletionRequest) -> None:
        """Queue a request; it is applied at the next ``when`` point."""
        if not isinstance(request, DeletionRequest):
            raise TypeError(f"request(...) takes a DeletionRequest, got {type(request).__name__}.")
        self._queue.append(request)

    def drop(self, position: int = 0, reason: str = "dropped by the operator") -> DeletionRequest:
        """Take a queued request off the queue without applying it, e.g. one that was refused.

        A refused request stays at the head of the queue (so it is never skipped silently) and
        blocks the ones behind it until it is fixed or dropped. Dropping it is journaled as
        ``dropped`` with its keyed fingerprint and ``reason`` (when the callback has a folder).

        Args:
            position: the request's place in the queue (0: the head).
            reason: why, for the journal (plain text: do not put ids in it).

        Returns:
            The dropped request.

        Raises:
            IndexError: no request at ``position``.
            RuntimeError: the callback has a folder but not yet its data (``setup``, :meth:`check`),
                which the journal's fingerprint needs (nothing is dropped).
        """
        if self.dirpath is not None and self._datamodule is None:
            raise RuntimeError("drop() journals the request it drops, by a fingerprint taken on the data's id maps, and this "
                               "UnlearningCallback has no data yet: call callback.check(datamodule) first (it keeps the "
                               "data, also when it refuses the request).")
        if self._datamodule is not None:
            self._merge_restored(self._datamodule)
        if not -len(self._queue) <= position < len(self._queue):
            raise IndexError(f"drop(position={position}): the queue holds {len(self._queue)} request(s).")
        request = self._queue.pop(position)
        if self.dirpath is not None and self._datamodule is not None:
            journal = self.journal
            with journal.lock():
                journal.append(self._fingerprint(request, self._datamodule), "dropped", reason=str(reason),
                               **request.summary())
        return request

    def check(self, datamodule: RecDataModule) -> list[dict[str, Any]]:
        """Raise now what applying the queue would refuse, changing neither model nor data.

        Recovers the folder after a crash (:func:`recover`), checks that the model is the
        folder's latest state (:func:`~lightning_unlearn.unlearning.record.check_lineage`; also
        with no request pending once the folder has a journal: training an older state would
        learn deleted rows again) and that the folder's key recognises the applied requests
        (:func:`~lightning_unlearn.unlearning.record.check_key`), reads ``requests_file`` if it
        is not read yet, and resolves every pending
        request against the training split. ``unlearn`` calls it before any logger starts a run,
        so that no error naming ids reaches a logger's files.

        Args:
            datamodule: the model's datamodule.

        Returns:
            The summary of each pending request: counts and, with a folder, the keyed digest the
            journal will record (never ids).

        Raises:
            InvalidDeletionRequest: a pending request is invalid for this data, or ``requests_file`` does not read.
            StaleCheckpoint: the model is not the folder's latest state, or the folder's key is not the
                one its applied requests were recognised by.
            FolderLocked, JournalCorrupted: as :meth:`apply_pending`.
        """
        self._datamodule = datamodule
        self.read_requests_file()  # setup reads it; after its refusal, here is where the message is shown whole
        self._merge_restored(datamodule)
        if self.dirpath is not None and (self._queue or self.journal.path.exists()):
            self.journal.refuse_a_lost_key()  # before the lineage: without its key the record is a dead end
            refuse_a_replaced_key(self.journal, self._lineage, self._key_id, "the model's checkpoint")  # so is another key
            try:
                recover(self.dirpath)
                self._check_lineage(self.journal, datamodule)
            except StaleCheckpoint:  # a run killed after its request was applied, before its cleaning, left it in predict's files
                clean_from_the_latest_state(self.dirpath, datamodule, "UnlearningCallback")
                raise
        if self.dirpath is not None:  # also with nothing queued yet: before on_fit_start makes a branch's key
            check_key(self.journal, self._key_id, len(self._applied))
        elsewhere = {"validation": datamodule.val, "test": datamodule.test}
        resolved = [r.resolve(datamodule.train, missing=self._missing_for(r, datamodule), elsewhere=elsewhere,
                              removed=datamodule.removed_keys) for r in self._queue]
        if self.dirpath is None:
            return [r.summary() for r in resolved]
        return [{**r.summary(), "digest": self.journal.keyed(r.digest)} for r in resolved]

    def _check_lineage(self, journal: Journal, datamodule: RecDataModule) -> None:
        """:func:`check_lineage` of the model, and of its data: the datamodule must hold the removals of the state the model embodies.

        A callback that applied requests (or restored their state) knows it embodies them, but a
        datamodule built afresh (or restored from another checkpoint) still holds their rows.
        """
        check_lineage(journal, self._lineage, self._branching(journal, self._lineage), self._named_record)
        if self._queue:  # requests journaled into a copy of the record its state names would never reach that record
            refuse_a_copy_going_on(journal, self._lineage, self._named_record)
        self._check_data(journal, datamodule)

    def _check_data(self, journal: Journal, datamodule: RecDataModule) -> None:
        """Refuse a ``datamodule`` without the removals of the state the model embodies (this callback's lineage)."""
        lineage = self._lineage or {}
        # a branch's first request: the lineage is its parent's, digested with the key the branch adopted
        same_key = lineage.get("journal") == journal.id or (self._key_id is not None and self._key_id == key_id(journal))
        if lineage.get("data") is None or not same_key or lineage["data"] == _data_state(datamodule, journal):
            return
        source = journal if journal.latest() is not None else journal_of(self._named_record) if self._named_record else None
        latest = source.checkpoint(source.latest()) if source is not None and source.latest() is not None else "<its checkpoint>"
        raise StaleCheckpoint(
            f"The datamodule does not hold the deletions the model embodies (request entry {lineage.get('seq')} of the journal "
            f"in {Path(journal.folder).resolve()}): it was built afresh, or restored from another state than the model. Training "
            f"or unlearning on it would bring deleted rows back, and evaluating or predicting on it would score the users deleted "
            f"since. Restore the model and its data together from the latest state: "
            f"`state = restore_checkpoint('{latest}', model, datamodule)` (lightning_unlearn.unlearning.record), then "
            f"`callback.load_state_dict(state['unlearning'])`; on the command line `--ckpt_path` does this. Nothing was changed."
        )

    @property
    def journal(self) -> Journal:
        """The journal of :attr:`dirpath` (``journal.jsonl``), the record of every request applied there."""
        if self.dirpath is None:
            raise RuntimeError("UnlearningCallback has no folder yet: pass dirpath=... or attach it to a Trainer.")
        return journal_of(self.dirpath)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_environment(trainer, pl_module, getattr(trainer, "datamodule", None))
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "unlearning"
        self._datamodule = trainer.datamodule
        keep_checkpoints_private(trainer)  # its state holds pending requests as indices
        # a branch's is made in on_fit_start, after a resumed state is checked; validate and test apply nothing: no key
        if trainer.is_global_zero and not self.branch and stage == "fit":
            self._made_key = not self.journal.key_exists()  # removed again if the fit stops before on_fit_start's checks pass
            _ = self.journal.key  # made once, before the other ranks read it
        trainer.strategy.barrier("unlearning-key")
        with ids_kept_out_of(trainer.loggers):
            self.read_requests_file()

    def read_requests_file(self) -> None:
        """Queue the request of ``requests_file`` (once; ``setup`` calls this)."""
        if self.requests_file is not None:
            self._queue.append(DeletionRequest.from_file(self.requests_file))
            self.requests_file = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse before training what applying the requests would refuse after it.

        Runs after a resumed fit restored this callback's state, so a stale model (the folder
        already holds deletions this one does not embody, whether or not requests are pending:
        its data still holds their rows) or an invalid request stops the run before an epoch is
        spent, not at ``on_train_end``.
        """
        self._train_ended = False
        # the parameters it starts from (restored from ckpt_path, whose own state was taken before this callback noted it)
        start = model_digest(pl_module)
        self._saved.add(start)
        # a trained checkpoint (no request applied to it): the line its first request starts is noted as unlearn notes it;
        # weights loaded by hand (load_state_dict, no state of a record) too, by their digest. Weights the fit initialised
        # itself are no trained model's: another fit from the same seed is no second line from them.
        by_hand = not trainer.ckpt_path and self._lineage is None and getattr(pl_module, "weights_loaded", False)
        self._resumed_from = (trainer.ckpt_path or None, start) if (trainer.ckpt_path or by_hand) and not self._applied else None
        if trainer.is_global_zero:
            with ids_kept_out_of(trainer.loggers):
                self.check(trainer.datamodule)
                if self._resumed_from is not None and self._lineage is None and not self.branch:  # before an epoch trains on them
                    _refuse_a_second_line(trainer.ckpt_path or None, start, trainer.datamodule, Path(self.dirpath), self._queue)
            if self.dirpath is not None and self.journal.path.exists():  # weights of an older state loaded by hand
                _refuse_older_parameters(self.journal, pl_module, start)
            clean_recommendations(trainer.datamodule, "UnlearningCallback")  # what a run killed before its cleaning left
            self._made_key = False  # checked: checkpoints saved from now on may name the key
            _ = self.journal.key
        trainer.strategy.barrier("unlearning-fit-start")

    def check_checkpoint(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint given to ``trainer`` (``ckpt_path``) that is an older state of this callback's record.

        :class:`~lightning_unlearn.models.base.Recommender` calls it before the checkpoint's
        weights are loaded, so a refusal leaves the model (and this callback's state) as they
        were. ``fit`` refuses what :meth:`on_fit_start` would: a model that does not embody the
        record's latest state (by the lineage of this callback's state in the checkpoint; a
        checkpoint without one leaves this callback's state as it is, and is checked by it). ``validate``,
        ``test`` and ``predict`` refuse a checkpoint this record's fits saved before its latest
        request (e.g. ``ckpt_path="best"``, saved before a request applied at the train end): its
        model still holds deleted rows. A checkpoint without this callback's state
        (``save_weights_only``, a fit without the callback) is known by its parameters (those an
        earlier request of the record was applied to are refused) and, as any checkpoint not of
        another record, by the datamodule state Lightning saves with it (one with fewer of the
        record's removals, and none other, is refused). A checkpoint whose lineage is of another
        record is theirs to evaluate.

        Args:
            trainer: the Trainer loading ``checkpoint``.
            checkpoint: the loaded checkpoint.

        Raises:
            StaleCheckpoint: ``checkpoint`` is an older state of this record.
        """
        if self.dirpath is None or not self.journal.path.exists():
            return
        journal, state = self.journal, (checkpoint.get("callbacks") or {}).get(self.state_key)
        try:
            if not isinstance(state, dict):  # weights only (save_weights_only, a fit without this callback): known by them
                _refuse_older_parameters(journal, trainer.lightning_module,
                                         model_digest(trainer.lightning_module, checkpoint.get("state_dict") or {}))
            if trainer.state.fn == TrainerFn.FITTING:  # Lightning restores this callback's state from it, if it has one
                lineage, record = (state.get("lineage"), state.get("record")) if isinstance(state, dict) else (self._lineage, self._named_record)
                check_lineage(journal, lineage, self._branching(journal, lineage), record)
            elif isinstance(state, dict):
                lineage, record = state.get("lineage"), state.get("record")
                if lineage.get("journal") == journal.id if lineage else record == str(Path(self.dirpath).resolve()):
                    check_lineage(journal, lineage, record=record)
            # and by the data state Lightning saves with the weights (also where its state names the record by an old path),
            # unless its lineage is of another record: theirs to evaluate
            lineage = state.get("lineage") if isinstance(state, dict) else None
            if not lineage or lineage.get("journal") == journal.id:
                _refuse_older_data(journal, checkpoint.get(type(trainer.datamodule).__qualname__) if trainer.datamodule else None)
        except StaleCheckpoint as err:
            if trainer.is_global_zero and trainer.datamodule is not None:  # what a run killed before its cleaning left
                clean_from_the_latest_state(self.dirpath, trainer.datamodule, "UnlearningCallback")
            if trainer.state.fn == TrainerFn.FITTING:
                raise
            fn = trainer.state.fn.value
            raise StaleCheckpoint(
                f"Trainer.{fn}(ckpt_path=...) was refused: {err} To {fn} the model as it is now, give no ckpt_path (the model "
                f"in memory), or restore the latest state with `restore_checkpoint(path, model, datamodule)` "
                f"(lightning_unlearn.unlearning.record)."
            ) from None

    def _branching(self, journal: Journal, lineage: dict[str, Any] | None) -> bool:
        """Whether ``lineage`` starts this callback's branch: ``branch=True`` until the branch's first request is applied here."""
        return self.branch and not (lineage is not None and journal.id is not None and lineage.get("journal") == journal.id)

    def key_made_here(self) -> None:
        """This run copied the folder's key (a branch, ``adopt_key``): a fit stopped before ``on_fit_start``'s checks pass removes it again."""
        self._made_key = True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit stopped before ``on_fit_start``'s checks passed (a refused request file, a stale or foreign checkpoint)
        leaves no key it made (or its branch copied) in a folder without a journal: the branch or resume its message
        advises would be refused for that key."""
        if self._made_key and trainer.is_global_zero and self.dirpath is not None:
            forget_an_unused_key(self.dirpath)
        self._made_key = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # a fit's validation runs on the data the fit checked
            self._refuse_data_without_its_removals(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_data_without_its_removals(trainer)

    def _refuse_data_without_its_removals(self, trainer: pl.Trainer) -> None:
        """``validate``/``test`` of the model in memory (no ``ckpt_path``: :meth:`check_checkpoint` checks a checkpoint and
        the data restored with it) on a datamodule without the removals the callback's model embodies (built afresh): it
        would score the users and items deleted since."""
        if trainer.ckpt_path is None and self.dirpath is not None and self.journal.path.exists() and trainer.datamodule is not None:
            if self._lineage is None:  # a callback that applied nothing here: the record's latest state tells which removals
                _refuse_older_data(self.journal, trainer.datamodule.state_dict(), "the datamodule")
            else:
                self._check_data(self.journal, trainer.datamodule)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook of full checkpoints: noted here (weights-only ones by ``Recommender.on_save_checkpoint``)."""
        self.note_saved_checkpoint(pl_module, checkpoint)

    def note_saved_checkpoint(self, model: Recommender, checkpoint: dict[str, Any]) -> None:
        """Note the parameters of a checkpoint the trainer saves (``epoch=0.ckpt``; ``save_weights_only`` ones: the
        model's ``on_save_checkpoint`` calls this): the next request journals them, so that weights loaded from one by
        hand after it are known for an older state (as the weights it was applied to). Kept in this callback's state, so
        a fit resumed from a checkpoint knows the ones saved before it."""
        digest = model_digest(model, checkpoint.get("state_dict") or {})
        if digest is not None:
            self._saved.add(digest)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = True
        if self.when == "train_end":
            self.run(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end":
            self.run(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply what is still queued: a fit whose training loop did not run has no train end and no epoch end.

        Lightning skips the loop of a fit resumed from a checkpoint that reached ``max_epochs``
        or ``max_steps`` (the natural way to apply new requests to a finished model), and of a
        fit given ``limit_train_batches=0`` or ``max_steps=0`` (a refit, by ``Retrain`` or the
        retrain policy, is refused then: its recipe, taken from this trainer, trains nothing).
        Also a request queued after this callback's train end or last epoch end (by a callback
        after this one, or the user's code). The trainer has moved the model to the CPU by now: it
        goes back to the trainer's device for the requests, and to the CPU after them.

        On several processes, requests were applied at the train end (``when="train_end"``), and
        the ranks are not brought together again once the strategy is torn down: a request queued
        after it is refused on the ranks that hold it, not left queued unsaid.

        Raises:
            RuntimeError: on several processes, a request queued after the train end.
        """
        if trainer.world_size > 1 and self._train_ended and self.when == "train_end":
            if self.pending:  # this rank's own queue: no collective after the strategy's teardown
                raise RuntimeError(
                    f"UnlearningCallback: {self.pending} request(s) were queued after the end of training on this rank, and "
                    f"on several processes requests are applied only at the train end, where the ranks meet: they were not "
                    f"applied. Queue requests before training ends, or apply them with another fit resumed from its last "
                    f"checkpoint.")
            return
        if trainer.world_size == 1 and not self.pending:
            return  # several ranks compare their queues in run(), all of them alike
        pl_module.to(trainer.strategy.root_device)
        try:
            self.run(trainer, pl_module)
        finally:
            pl_module.cpu()

    def run(self, trainer: pl.Trainer, model: Recommender) -> list[UnlearningReport]:
        """Apply every queued request now (what the hooks call).

        Once a request is applied, the trainer's optimizers start afresh: their state (Adam's
        moments, SGD's momentum) was accumulated from the deleted rows' gradients too, and the
        epochs after an ``epoch_end`` request (or a later fit, or a checkpoint's
        ``optimizer_states``) would carry it back into the model.
        """
        if trainer.world_size > 1:
            self._refuse_queues_that_differ(trainer)
        reports = self.apply_pending(
            model, trainer.datamodule, loggers=trainer.loggers, device=trainer.strategy.root_device,
            recipe=FitRecipe.from_trainer(trainer), seed=self.seed, is_global_zero=trainer.is_global_zero,
            strategy=trainer.strategy,
        )
        if reports:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()  # every torch optimizer makes its state anew on its next step
        return reports

    def _refuse_queues_that_differ(self, trainer: pl.Trainer) -> None:
        """Every rank must apply the same requests: a request queued on one rank alone would leave the others
        waiting in the method's collectives for ever. Each rank sees every rank's queue (its length and a digest of
        its content, in memory only) and all raise alike when they differ."""
        self._merge_restored(trainer.datamodule)  # as rank zero's check() did: repeats and applied requests dropped
        content = repr([(r.users, r.items, r.pairs) for r in self._queue]).encode()
        digest = int.from_bytes(hashlib.sha256(content).digest()[:7], "little")  # fits int64
        mine = torch.tensor([len(self._queue), digest], dtype=torch.long, device=trainer.strategy.root_device)
        every = trainer.strategy.all_gather(mine).reshape(-1, 2).cpu()
        if not bool((every == every[0]).all()):
            counts = ", ".join(f"{int(n)} on rank {rank}" for rank, n in enumerate(every[:, 0]))
            raise RuntimeError(
                f"UnlearningCallback: the ranks hold different queues ({counts}; or the same number of different "
                f"requests). Queue a request on every rank alike (callback.request(...) in code that every rank runs), or "
                f"give requests_file / requests, which every rank reads."
            )

    # ------------------------------------------------------------------ the work
    def apply_pending(
        self,
        model: Recommender,
        datamodule: RecDataModule,
        loggers: Sequence[Logger] = (),
        device: torch.device | None = None,
        recipe: FitRecipe | None = None,
        seed: int | None = None,
        is_global_zero: bool = True,
        strategy: Strategy | None = None,
    ) -> list[UnlearningReport]:
        """Apply queued requests one by one, outside or inside a Trainer.

        Args:
            model: the trained recommender (changed in place).
            datamodule: its datamodule (its splits lose the deleted rows).
            loggers: where to log per-request metrics (`unlearn/request` holds the request index).
            device: where the method runs (default: the model's device).
            recipe: how to refit, for ``Retrain`` (default: :class:`FitRecipe` defaults).
            seed: the original model's seed (default: the callback's ``seed``).
            is_global_zero: only rank zero evaluates, writes the journal, checkpoints and logs.
            strategy: on several processes (e.g. DDP), the trainer's strategy: each rank handles
                a shard of the rows and the strategy's sum-reduce combines them, so every rank
                applies the identical update.

        Returns:
            The reports of the requests applied.

        Raises:
            InvalidDeletionRequest: a request is invalid (nothing was changed for it). Where a W&B
                run of ``loggers`` records the console, its message (which names ids) is in the
                exception's ``detail`` only.
            UnlearningError: a method failed (model and data were restored; journal says failed).
        """
        queued = bool(self._queue or self._restored)
        try:
            with ids_kept_out_of(loggers):
                return self._apply_pending(model, datamodule, loggers, device, recipe, seed, is_global_zero, strategy)
        finally:
            if queued and is_global_zero:  # what is deleted, also before a request that failed, leaves predict's files
                clean_recommendations(datamodule, "UnlearningCallback")

    def _apply_pending(self, model, datamodule, loggers, device, recipe, seed, is_global_zero, strategy) -> list[UnlearningReport]:
        check_environment(None, model, datamodule)
        device = device or model.device
        recipe = recipe or FitRecipe()
        seed = self.seed if seed is None else seed
        context = UnlearningContext(device=device, seed=seed, fit=lambda fresh: recipe(fresh, datamodule), progress=recipe.progress)
        if strategy is not None and strategy.world_size > 1:
            context.reduce = lambda tensor: strategy.reduce(tensor.clone(), reduce_op="sum")
            context.rank, context.world_size = strategy.global_rank, strategy.world_size
        self._datamodule = datamodule
        self._merge_restored(datamodule)
        if not self._queue:
            return []
        journal = self.journal if is_global_zero else None
        if journal is None:
            return self._apply_queue(model, datamodule, context, loggers, None)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(journal.lock())  # one writer per folder, for the whole run
                journal.refuse_a_lost_key()
                recover(self.dirpath)  # a previous process may have died mid-request
                self._check_lineage(journal, datamodule)
                check_key(journal, self._key_id, len(self._applied))
                define_request_axis(loggers)  # W&B plots unlearn/* against the request index: drift over a stream
            except BaseException:  # the other ranks wait at the first request's vote
                _vote_failed(context)
                raise
            return self._apply_queue(model, datamodule, context, loggers, journal)

    def _apply_queue(self, model, datamodule, context, loggers, journal) -> list[UnlearningReport]:
        done = []
        while self._queue:
            report = self._apply_next(model, datamodule, context, loggers, journal)
            if report is not None:
                done.append(report)
        return done

    @contextlib.contextmanager
    def _starting_a_line(self, journal: Journal | None, datamodule: RecDataModule, parameters: str | None):
        """Around the first request's ``pending`` entry of a new line: what ``unlearn`` does when it starts a line from a
        trained checkpoint, one process at a time (another line from it, unless this is a branch, must be deleted again by
        the queue), and the line noted, so that the checkpoint, its copies and its run's other checkpoints are found to be
        older than it. In Python the model's weights (``parameters``, their digest; and, in a fit of weights loaded by
        hand, those it started from) stand for the checkpoint, checked and noted on this machine by their digest."""
        if journal is None or self._applied or self._resumed_from is None and (self._lineage is not None or journal.applied_count()):
            yield  # a record going on (its own checks), or no journal on this rank
            return
        from lightning_unlearn.record_checks import lines_started_here, note_the_line, one_line_at_a_time  # (it imports this module)

        path, start = self._resumed_from or (None, parameters)
        starts = {start: path, **({parameters: None} if path is None else {})}  # digest -> checkpoint file (None: in Python)
        if lines_started_here() & starts.keys():  # unlearn, around this, checked and noted it
            yield
            return
        with one_line_at_a_time(start, path, starts_a_line=path is not None):
            for digest, checkpoint in starts.items():
                if not self.branch:
                    _refuse_a_second_line(checkpoint, digest, datamodule, Path(self.dirpath), self._queue)
                note_the_line(checkpoint, Path(self.dirpath), digest, datamodule, branch=self.branch)
            yield
        self._resumed_from = None

    def _fingerprint(self, request: DeletionRequest, datamodule: RecDataModule) -> str:
        return request_fingerprint(request, datamodule.train, self.journal)

    def _apply_next(self, model, datamodule, context, loggers, journal: Journal | None) -> UnlearningReport | None:
        """Apply the head of the queue as one transaction (``journal`` is ``None`` on ranks other than zero).

        The request counts as applied once the checkpoint holding its effect is on disk (rank
        zero) and, on several processes, every rank has voted that it got that far (each rank
        votes before the method and after it, so a rank that fails alone, e.g. rank zero on a full
        disk, stops the request on all of them). Anything that fails before that -- the method,
        the evaluation, the retrain policy's checks, writing the checkpoint, an interrupt (also one
        that lands just after the checkpoint's rename, whose file is then removed) -- restores the
        model, the datamodule, the queue and the applied requests, and journals ``failed``; a
        process killed before that leaves the journal at ``pending`` and the previous checkpoint
        as the state to resume from (see :func:`recover`).
        A request that is refused (invalid for this data) stays at the head of the queue: fix it
        or take it off with :meth:`drop`.
        """
        request = self._queue[0]
        drift_before, lineage_before = self._policy.state_dict(), self._lineage
        try:
            fingerprint = self._fingerprint(request, datamodule)
            if fingerprint in self._applied:  # alike on every rank: no vote
                self._queue.pop(0)
                return None
            resolved = request.resolve(datamodule.train, missing=self._missing_for(request, datamodule), removed=datamodule.removed_keys,
                                       elsewhere={"validation": datamodule.val, "test": datamodule.test})
            _refuse_broken_model(model)
            index = len(self._applied)
            digest = journal.keyed(resolved.digest) if journal else None
            checkpoint = self.dirpath / f"unlearned-{journal.applied_count():04d}-{digest[:12]}.ckpt" if journal else None
            self._policy.start(len(datamodule.train), _gradient_norm(model, datamodule.train_rows()) if self._policy.needs_grad_norm else None)
            policy = self._policy.reason()
            method = self.method if policy is None else self._retrain
            summary = {**resolved.summary(), "method": method.name, "request": index, **({"policy": policy.value} if policy else {})}
            # "model": which parameters the request is applied to, so that a copy of them is known for an older state
            parameters = model_digest(model) if journal else None
            if journal:
                _refuse_older_parameters(journal, model, parameters)
            # "saved": the checkpoints the trainer saved before it (epoch=0.ckpt, ...): weights loaded from them by hand are older too
            saved = sorted(self._saved - {parameters})
            with self._starting_a_line(journal, datamodule, parameters):
                pending = journal.append(digest, "pending", checkpoint=str(checkpoint), model=parameters, **summary,
                                         **({"saved": saved} if saved else {})) if journal else None
        except BaseException:  # e.g. rank zero's journal on a full disk: the other ranks, at their first vote, hear of it
            self._policy.load_state_dict(drift_before)
            _vote_failed(context)
            raise
        start = time.perf_counter()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        applied_before, written, must_vote = len(self._applied), None, False
        try:
            if context.world_size > 1:  # every rank got here: rank zero journaled the request
                _all_ranks_succeeded(context, True)
            with datamodule.transaction():  # a failure restores the data
                deleted = datamodule.remove(resolved.rows, resolved.users, resolved.items)
                model.set_graph(datamodule.train)
                if not len(deleted):  # whole users/items with no training rows: only other splits lose them
                    method, policy = _NOTHING_TO_UNLEARN, None
                    summary.update(method=method.name)
                    summary.pop("policy", None)
                retained = datamodule.train_rows()
                # once per trained model (the method returns 0 s when it is prepared for this one already)
                precompute = method.prepare(model, retained.concat(deleted).to(context.device), context)
                report = method.unlearn(model, retained, deleted, context)
                report.precompute_seconds += precompute
                if self.max_grad_ratio is not None and policy is None and len(deleted):
                    grad_ratio = self._policy.grad_ratio(_gradient_norm(model, datamodule.train_rows()))
                    summary["grad_ratio"] = grad_ratio
                    astray = self._policy.astray(grad_ratio)
                    if astray is not None:  # the method went astray: retrain
                        policy, method = astray, self._retrain
                        summary.update(method=method.name, policy=policy.value, replaced=self.method.name)
                        report = method.unlearn(model, datamodule.train_rows(), deleted, context)
                must_vote = context.world_size > 1  # past the method's collectives: every rank votes on the outcome
                utility = self._utility(model, datamodule) if self.evaluate and journal else {}
                if policy is None:
                    self._policy.served(len(deleted))
                else:  # the model is now fitted on the rows that remain (the method's next request prepares for it)
                    grad_norm = _gradient_norm(model, datamodule.train_rows()) if self.max_grad_ratio is not None else None
                    self._policy.refitted(len(datamodule.train), grad_norm)
                self._queue.pop(0)
                self._applied.append(fingerprint)
                if pending is not None:
                    self._lineage = {"journal": journal.id, "seq": pending["seq"], "entry": pending["hash"],
                                     "data": _data_state(datamodule, journal)}
                if checkpoint is not None:  # it holds the callback's state *after* this request
                    written = None if checkpoint.exists() else checkpoint  # a file there from now on is this attempt's (one there now is refused)
                    save_checkpoint(checkpoint, model, datamodule, self)
                if must_vote:
                    must_vote = False
                    _all_ranks_succeeded(context, True)
        except BaseException as err:
            if must_vote:  # this rank failed after the method: the others wait for its vote
                _vote_failed(context)
            with torch.no_grad():
                model.load_state_dict(before)
            model.set_graph(datamodule.train)
            self._policy.load_state_dict(drift_before)
            self._lineage = lineage_before
            del self._applied[applied_before:]
            if not (self._queue and self._queue[0] is request):
                self._queue.insert(0, request)
            if written is not None:  # e.g. interrupted after the rename: the request is journaled failed, so no checkpoint may hold it
                with contextlib.suppress(OSError):
                    written.unlink(missing_ok=True)
                    fsync_directory(written.parent)
            if pending is not None:
                reason = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else str(err) or type(err).__name__
                journal.append(digest, "failed", reason=reason, seconds=time.perf_counter() - start,
                               pending_seq=pending["seq"], **summary)
            raise
        self.reports.append(report)
        self._saved.clear()
        if journal:
            # "model": the parameters it left, the latest state's (an earlier request's "model" is an older state)
            journal.append(digest, "applied", seconds=report.seconds, checkpoint=str(checkpoint), pending_seq=pending["seq"],
                           total_seconds=time.perf_counter() - start, drift=self.drift, model=model_digest(model), **summary)
            metrics = {"unlearn/request": index, "unlearn/seconds": report.seconds, "unlearn/rows_removed": report.rows_removed,
                       "unlearn/drift": self.drift, "unlearn/retrained": int(policy is not None),
                       **{f"unlearn/{k}": v for k, v in utility.items()}, **_scalars(report.diagnostics, "unlearn/diag/")}
            for logger in loggers:  # no explicit step: training may already have logged past `index`
                logger.log_metrics(metrics)
                logger.save()  # CSVLogger buffers until save(): outside a fit (`unlearn`) nothing else writes metrics.csv
        return report

    def _utility(self, model: Recommender, datamodule: RecDataModule) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return {**model.evaluate(datamodule.val_dataloader(), "val"), **model.evaluate(datamodule.test_dataloader(), "test")}
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors, never a raw id: the applied requests' keyed fingerprints (and
        :func:`~lightning_unlearn.unlearning.record.key_id` of their key), the pending requests as
        indices into the data's id maps, the drift counter, the lineage, its record folder and that folder's key id, and
        the parameters' digests of the checkpoints saved since the last request.

        A pending request can be stored only once the data is known (after ``setup`` or
        :meth:`apply_pending`) and if its ids are in the data's maps; one that is not is left out
        of the state (``unstored_pending`` counts them): give it again when resuming.
        """
        train = self._datamodule.train if self._datamodule is not None else None
        stored = [r.indices(train) if train is not None else None for r in self._queue]
        stored = [s if s is None or self._missing_for(r, self._datamodule) == "error" else {**s, "missing": "ignore"}
                  for r, s in zip(self._queue, stored)]
        return {
            "applied": list(self._applied),
            "pending": [*self._restored, *(s for s in stored if s is not None)],
            "unstored_pending": sum(s is None for s in stored),
            "drift": self._policy.state_dict(),
            "lineage": dict(self._lineage) if self._lineage is not None else None,
            "key_id": self._applied_key_id() if self._applied else None,
            "record": str(Path(self.dirpath).resolve()) if self.dirpath is not None else None,  # where its journal is
            "record_key_id": key_id(self.journal) if self.dirpath is not None else None,  # which record that is (predict)
            "saved": sorted(self._saved),  # the checkpoints saved since the last request (parameter digests)
            # a state of a line started apart on purpose (a branch, also from a state): not held back by the run's other lines
            "branch_line": self._branch_line or (self.branch and bool(self._applied)),
        }

    def _applied_key_id(self) -> str | None:
        """:func:`~lightning_unlearn.unlearning.record.key_id` of the key the applied fingerprints were made with (``None``: unknown)."""
        if self._key_unknown:
            return None
        return self._key_id or (key_id(self.journal) if self.dirpath is not None else None)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the applied fingerprints, the pending requests, the drift counter and the lineage (a checkpoint's ``unlearning`` entry).

        The queue becomes the state's pending requests, then the ones queued here that are
        neither among them nor already applied (same content, :func:`request_fingerprint`), so
        the requests given again on a restart are not listed twice. (The stored requests are
        indices: they join the queue when the data is known.)
        """
        self._applied = list(state_dict.get("applied", []))
        if "drift" in state_dict:  # a state written before the retrain policy has none: the counter starts afresh
            self._policy.load_state_dict(state_dict["drift"])
        self._lineage, self._key_id = state_dict.get("lineage"), state_dict.get("key_id")
        self._named_record = state_dict.get("record")
        self._saved = set(state_dict.get("saved") or ())
        self._branch_line = bool(state_dict.get("branch_line"))
        self._key_unknown = bool(self._applied) and self._key_id is None  # a state written before key_id: never checked
        pending = state_dict.get("pending", [])
        if any(not isinstance(spec.get("users", ()), torch.Tensor) for spec in pending):
            raise ValueError(
                "This UnlearningCallback state stores pending requests as raw ids (lightning_unlearn < 0.2): it is "
                "not loaded, so that no raw id is carried into new checkpoints. Resume from a checkpoint without "
                "pending requests, or give the requests again."
            )
        self._restored = [dict(spec) for spec in pending]
        if self._datamodule is not None:
            self._merge_restored(self._datamodule)

    def _merge_restored(self, datamodule: RecDataModule) -> None:
        """Put the restored pending requests (indices) at the head of the queue; drop repeats and applied ones."""
        datamodule.setup()
        train = datamodule.train
        restored = [DeletionRequest.from_indices(train, spec) for spec in self._restored]
        self._ignoring |= {r.canonical(train) for r, spec in zip(restored, self._restored) if spec.get("missing") == "ignore"}
        queue = restored + self._queue
        applied = set(self._applied)
        keyed = bool(applied) and self.dirpath is not None and self.journal.key_exists()
        seen: set[bytes] = set()
        kept = []
        for request in queue:
            content = request.canonical(train)
            if content in seen or (keyed and self._fingerprint(request, datamodule) in applied):
                continue
            seen.add(content)
            kept.append(request)
        self._queue, self._restored = kept, []

    def _missing_for(self, request: DeletionRequest, datamodule: RecDataModule) -> str:
        """``missing`` for ``request``: this callback's, or ``"ignore"`` where the request was queued with it (a restored state)."""
        ignored = self.missing == "ignore" or bool(self._ignoring) and request.canonical(datamodule.train) in self._ignoring
        return "ignore" if ignored else "error"


class _NothingToUnlearn(Unlearner):
    """What serves a request that removes no training row: the model saw none of its data."""

    name = "none (no training rows)"

    def update(self, model, retained, deleted, context) -> dict[str, Any]:
        return {}


_NOTHING_TO_UNLEARN = _NothingToUnlearn()


def _list_of_requests(requests: Any) -> list[DeletionRequest]:
    """``requests`` as a list, refused unless it is a sequence of :class:`DeletionRequest` (named by types, never ids)."""
    if isinstance(requests, (DeletionRequest, str, bytes, os.PathLike)) or not isinstance(requests, Iterable):
        given = f"a {type(requests).__name__}"
    else:
        requests = list(requests)
        if all(isinstance(r, DeletionRequest) for r in requests):
            return requests
        given = f"a {type(requests).__name__} of {', '.join(sorted({type(r).__name__ for r in requests}))}"
    raise TypeError(f"UnlearningCallback(requests=...) takes a list of DeletionRequest, got {given}; a requests file goes "
                    f"to requests_file=...")


def _data_state(datamodule: RecDataModule, journal: Journal) -> str:
    """A keyed digest of what ``datamodule`` has removed (training rows, whole users and items): the data a lineage embodies."""
    state = datamodule.state_dict()
    removed = [state[name] for name in REMOVALS]
    return journal.keyed(repr([len(t) for t in removed]).encode() + b"".join(t.cpu().numpy().tobytes() for t in removed))


def _refuse_a_second_line(ckpt_path: str | None, digest: str, datamodule: RecDataModule, dirpath: Path,
                          queue: list[DeletionRequest]) -> None:
    """:func:`~lightning_unlearn.record_checks.refuse_a_second_line` from a trained model (no callback state)."""
    from lightning_unlearn.record_checks import refuse_a_second_line  # (it imports this module)

    refuse_a_second_line(ckpt_path, digest, datamodule, {}, dirpath, list(queue))


def _refuse_older_parameters(journal: Journal, model: Recommender, parameters: str | None) -> None:
    """Refuse a ``model`` whose parameters (their digest, ``parameters``) are those an earlier request of ``journal`` was
    applied to, not its latest state's.

    The callback's lineage says which state it embodies, not which weights the model holds:
    weights from before a deletion loaded by hand (``model.load_state_dict``) would carry the
    deleted rows on. A model trained on since its latest request is not recognised (its
    parameters are new). The latest state's are journaled with each ``applied`` entry; one
    recovered after a crash (or journaled before that field) is read from its checkpoint.
    """
    latest = journal.latest()
    if latest is None or parameters is None:
        return
    now, path = latest.get("model"), journal.checkpoint(latest)
    if now is None and path is not None:
        try:
            now = model_digest(model, load_checkpoint(path, mmap=True).get("state_dict") or {})
        except (OSError, CheckpointUnreadable):  # the latest state is gone: the lineage's check says so
            return
    older = applied_to(journal, parameters) if parameters != now else None
    if older is not None:
        raise StaleCheckpoint(
            f"The model's parameters are those request entry {older['seq']} of the journal in {Path(journal.folder).resolve()} "
            f"was applied to: an older state of this record (e.g. weights saved before that request and loaded by hand), not "
            f"its latest state, {journal.checkpoint(latest)}. Applying requests on top of it would undo the deletions after "
            f"it. Restore the latest state: `restore_checkpoint('{journal.checkpoint(latest)}', model, datamodule)` "
            f"(lightning_unlearn.unlearning.record). Nothing was applied."
        )


def _refuse_older_data(journal: Journal, data: dict[str, Any] | None, holder: str = "the checkpoint") -> None:
    """Refuse a checkpoint whose datamodule state (``data``: Lightning saves it with the weights, ``save_weights_only``
    too) is on the data of ``journal``'s latest state and holds fewer of its removals, and none other: it was saved before
    a request. One that removed something the latest state did not is of another line of deletions. (``holder``: what
    ``data`` is of, in the message: a datamodule built afresh is refused alike.)"""
    try:
        latest = journal.last_checkpoint() if isinstance(data, dict) and journal.latest() is not None else None
        removed = load_checkpoint(latest, mmap=True).get("datamodule_state") or {} if latest is not None else {}
    except (OSError, CheckpointUnreadable) as err:
        raise StaleCheckpoint(
            f"{journal.folder} holds {journal.applied_count()} applied request(s), and its latest state does not read ({err}): "
            f"whether the checkpoint holds what they deleted cannot be checked. Restore that file (from a backup)."
        ) from None
    if not removed or removed.get("fingerprint") != data.get("fingerprint") or not all(
            isinstance(data.get(k), torch.Tensor) for k in REMOVALS):
        return  # other data, or no removals recorded: its parameters tell (_refuse_older_parameters)
    if removed_within(data, removed) and not removed_within(removed, data):
        raise StaleCheckpoint(
            f"{journal.folder} holds {journal.applied_count()} applied request(s), and the data of {holder} still holds "
            f"some of what they deleted: it is of a state before one of them (a datamodule built afresh holds them all). The "
            f"latest state, to restore with its data (`restore_checkpoint`), is {latest}."
        )


def _refuse_broken_model(model: Recommender) -> None:
    """Refuse to unlearn from a model whose parameters are not finite: no method can repair that."""
    broken = non_finite(model)
    if broken:
        raise UnlearningError(
            f"The model's parameters are NaN or infinite before unlearning ({', '.join(broken)}): the trained model itself "
            f"is broken, so no unlearning method (and no damping) can give a meaningful result. Nothing was changed. "
            f"Load a healthy checkpoint (e.g. the latest unlearned one, or the best of the fit) or retrain the model."
        )


def _gradient_norm(model: Recommender, rows) -> float:
    """:func:`objective_gradient_norm` in evaluation mode (no dropout), leaving the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        return objective_gradient_norm(model, rows)
    finally:
        model.train(was_training)


def check_environment(trainer: pl.Trainer | None, model: Any, datamodule: Any) -> None:
    """Refuse set-ups the callback cannot serve, with a message that says what is needed.

    Raises:
        TypeError: the model is not a ``Recommender`` or the datamodule not a ``RecDataModule``.
        RuntimeError: the strategy shards parameters (FSDP, DeepSpeed), or a callback averages the weights over the
            fit (``StochasticWeightAveraging``, ``WeightAveraging``).
    """
    if not isinstance(model, Recommender):
        raise TypeError(f"UnlearningCallback needs a lightning_unlearn Recommender model, got {type(model).__name__}.")
    if not isinstance(datamodule, RecDataModule):
        raise TypeError(
            f"UnlearningCallback needs a RecDataModule (fit with `datamodule=`), got {type(datamodule).__name__}."
        )
    averaging = [type(c).__name__ for c in (trainer.callbacks if trainer is not None else ()) if isinstance(c, _WEIGHT_AVERAGING)]
    if averaging:
        raise RuntimeError(
            f"UnlearningCallback cannot run beside {averaging[0]}: it writes into the model an average of weights taken before a "
            f"deletion (at the train end, after the request was applied), which brings the deleted rows back. Average the "
            f"weights in a fit without the UnlearningCallback, then apply the requests to the averaged model "
            f"(`lightning-unlearn unlearn --ckpt_path ...`, or a fit resumed from its checkpoint with the callback)."
        )
    if trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise RuntimeError(
            f"UnlearningCallback cannot run with {type(trainer.strategy).__name__}: unlearning updates whole embedding "
            "rows, which sharded-parameter strategies split across devices. Use a single device or DDP."
        )


def request_fingerprint(request: DeletionRequest, interactions, journal: Journal) -> str:
    """A request's identity across restarts: HMAC of its canonical content with the folder's key.

    The content is the request's ids as indices into the data's id maps
    (:meth:`DeletionRequest.canonical`), so ``196``, ``"196"`` and ``"0196"`` are one request
    of an integer-id data set; unlike the digest of the resolved rows it does not depend on what
    was already removed, so a request seen again after a restart is recognised. Keyed, so it
    cannot be reversed by hashing known ids.

    Args:
        request: the request.
        interactions: a table with the data's id maps (e.g. the training split).
        journal: the folder's journal (its key).

    Returns:
        64 hex digits.
    """
    return journal.keyed(b"lightning_unlearn/request/v2\x00" + request.canonical(interactions))


def _scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _all_ranks_succeeded(context: UnlearningContext, succeeded: bool) -> None:
    """One vote of every rank on a request: it goes on (then stays applied) on all of them or on none.

    Each request has two votes on several processes: before the method (rank zero has journaled
    it; rank zero alone checks the folder and writes the journal) and after it (rank zero alone
    evaluates and writes the checkpoint). A rank that fails before a vote casts ``False`` there
    and raises its own error; the others raise :class:`UnlearningError` and roll back with it,
    instead of waiting in a collective for ever or keeping an update that the record does not hold.

    Raises:
        UnlearningError: this rank succeeded and another did not.
    """
    votes = context.reduce(torch.tensor([float(succeeded)], device=context.device))
    failed = context.world_size - int(votes.item())
    if succeeded and failed:
        raise UnlearningError(f"{failed} other rank(s) failed to apply the request (see their errors); it is rolled "
                              f"back on every rank.")


def _vote_failed(context: UnlearningContext) -> None:
    """This rank's ``False`` vote, on several processes; the rollback after it comes first, whatever the process group does."""
    if context.world_size > 1:
        with contextlib.suppress(Exception):
            _all_ranks_succeeded(context, False)
