"""The :class:`Unlearner` contract: change a trained model so it forgets deleted rows, safely."""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import non_finite
from lightning_unlearn.unlearning.methods.scope import retained_graph

__all__ = ["UnlearningContext", "UnlearningError", "UnlearningReport", "Unlearner"]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class UnlearningContext:
    """What a method may use besides the model and the rows (methods never see a Trainer).

    Args:
        device: where to compute (the trainer's root device).
        seed: the original model's seed (initialisation); ``Retrain`` starts from it.
        reduce: sums a tensor over devices (identity on one device).
        fit: fits a freshly initialised model on the current (retained) data with the original
            recipe; provided by the callback and by ``compare``, used by ``Retrain``.
        rank: this process's index among ``world_size`` (each handles :meth:`shard` of the rows).
        world_size: number of processes; their partial sums are combined with ``reduce``.
        progress: show a progress bar for long loops (the command line's ``compare`` and
            ``unlearn`` do when their trainer shows one).

    Example:
        >>> rows = TrainRows(torch.arange(5), torch.arange(5), torch.zeros(5, 1, dtype=torch.long))
        >>> UnlearningContext(rank=1, world_size=2).shard(rows).users.tolist()
        [1, 3]
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    reduce: Callable[[Tensor], Tensor] = _identity
    fit: Callable[[Recommender], None] | None = None
    rank: int = 0
    world_size: int = 1
    progress: bool = False

    def shard(self, rows: TrainRows) -> TrainRows:
        """This rank's share of ``rows`` (every ``world_size``-th row); all of them on one process."""
        if self.world_size == 1:
            return rows
        return rows.select(torch.arange(len(rows), device=rows.users.device) % self.world_size == self.rank)

    def sum(self, value: Callable[[TrainRows], Tensor], rows: TrainRows) -> Tensor:
        """``sum over ranks of value(this rank's shard of rows)``: a sum over ``rows`` on every rank."""
        return self.reduce(value(self.shard(rows)))


@dataclass
class UnlearningReport:
    """The outcome of one unlearning step: timings and the method's own diagnostics."""

    method: str
    seconds: float
    rows_removed: int
    precompute_seconds: float = 0.0
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnlearningError(RuntimeError):
    """A method failed or produced non-finite parameters; the model was restored."""


class Unlearner(ABC):
    """Base class of unlearning methods.

    Subclasses implement :meth:`update`, which changes ``model`` in place so that it forgets
    ``deleted`` and fits ``retained``, and returns diagnostics. Work paid once per trained model
    (such as cached curvature) goes in :meth:`prepare`, whose seconds are reported apart from
    the per-request ``seconds``. :meth:`unlearn` wraps both: it prepares the method for the
    model when it is not yet, times the update, checks every parameter is finite, and restores
    the model's parameters if anything fails, so a failed request never leaves a half-changed model.
    """

    #: What to try when the method fails (appended to the error message).
    hint = "check the method's options"

    #: The share of the training rows a stream of requests may delete, since the model was last
    #: fitted, while the method stays at the retrain's level (measured; ``None``: not measured).
    #: ``UnlearningCallback(max_deleted_fraction="auto")`` serves a request with ``Retrain``
    #: past it. IFRU's and AltEraser's 0.03 and how it was measured: :ref:`retrain-policy`.
    safe_deleted_fraction: float | None = None

    @property
    def name(self) -> str:
        """A short label for tables and logs."""
        return type(self).__name__

    def prepare(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None) -> float:
        """Do the work paid once per trained model (e.g. cache its curvature); the seconds it took.

        The default does nothing. :meth:`unlearn` calls it before every update, so a method that
        overrides it returns at once, with 0, when it is prepared for ``model``'s parameters
        already. The callback and ``compare`` call it themselves before a method's first request
        on a trained model, and report its seconds as ``precompute_seconds``.

        Args:
            model: the trained model (not changed).
            rows: every training row it was trained on (the retained and the deleted ones).
            context: device, reduce and sharding (default: one process).

        Returns:
            The seconds spent (0.0 when there was nothing to do).
        """
        return 0.0

    @abstractmethod
    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        """Change ``model`` in place; return diagnostics (plain values)."""

    def unlearn(
        self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext | None = None
    ) -> UnlearningReport:
        """Run :meth:`update` safely.

        Args:
            model: the trained recommender, changed in place.
            retained: the training rows that remain (with their fixed negatives).
            deleted: the training rows to forget.
            context: device, seed, reduce and fit (default: the model's device, seed 0, one device).

        Returns:
            The report: seconds, rows removed, the seconds :meth:`prepare` took (0 when the method
            was prepared for ``model`` already) and the method's diagnostics.

        Raises:
            ValueError: ``retained`` or ``deleted`` are not rows of ``model``'s size (integer
                indices, one item and one user per row, negatives of one width, ids within the
                model's users and items), or a graph model's graph is neither theirs nor the
                retained rows'; nothing is changed. A graph model still holding the deleted
                rows' edges is given the retained rows' graph first
                (:func:`~lightning_unlearn.unlearning.methods.scope.retained_graph`). These
                checks are not in the reported seconds.
            UnlearningError: the method raised or left a non-finite parameter; ``model`` holds
                its parameters from before the call again.
        """
        context = context or UnlearningContext(device=model.device)
        _check_rows(model, retained, deleted)
        before, graph = copy.deepcopy(model.state_dict()), retained_graph(model, retained, deleted)
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                retained, deleted = retained.to(context.device), deleted.to(context.device)
                precompute = self.prepare(model, retained.concat(deleted), context)  # paid once per trained model, reported apart
                diagnostics = self.update(model, retained, deleted, context)
            bad = non_finite(model)
            if bad:
                raise UnlearningError(f"non-finite parameters after {self.name}: {', '.join(bad)}")
        except Exception as err:
            model.load_state_dict(before)
            if graph is not None:
                model.adjacency = graph
            raise UnlearningError(f"{self.name} failed and the model was restored: {err}. Try: {self.hint}.") from err
        seconds = time.perf_counter() - start - precompute
        return UnlearningReport(self.name, seconds, len(deleted), precompute_seconds=float(precompute), diagnostics=diagnostics)


def _check_rows(model: Recommender, retained: TrainRows, deleted: TrainRows) -> None:
    """Refuse rows that cannot be ``model``'s training rows, naming what is wrong (counts and sizes, never ids)."""
    widths = set()
    for name, rows in (("retained", retained), ("deleted", deleted)):
        columns = (rows.users, rows.items, rows.negatives)
        if any(c.dtype != torch.long for c in columns) or rows.users.dim() != 1 or rows.negatives.dim() != 2 \
                or not len(rows.users) == len(rows.items) == len(rows.negatives):
            raise ValueError(
                f"{name} rows must be int64 users and items of one length and int64 negatives of shape (rows, k), as "
                f"RecDataModule.train_rows() gives them; got {[f'{tuple(c.shape)} {c.dtype}' for c in columns]}.")
        if len(rows):
            widths.add(rows.negatives.shape[1])
            for what, ids, size in (("user", rows.users, model.num_users), ("item", rows.all_items(), model.num_items)):
                if bool((ids < 0).any()) or bool((ids >= size).any()):
                    raise ValueError(f"{name} rows hold {what} indices outside [0, {size}), the model's {what}s: the rows "
                                     f"and the model come from different data.")
    if len(widths) > 1:
        raise ValueError(f"retained and deleted rows must have as many negatives each; got {sorted(widths)}.")
