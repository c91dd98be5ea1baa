"""``RetrainPolicy``: when a request over a stream is served by ``Retrain`` instead of the method.

A fast method's error adds up over a stream of requests, so every so often a request is served
by :class:`~lightning_unlearn.unlearning.methods.Retrain` instead, which brings the model back to
the exact answer. The policy counts what was deleted since the model was last fitted (the
*drift*) and decides; :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback` keeps
one, writes its :class:`RetrainReason` into the journal's ``policy`` and its
:meth:`RetrainPolicy.state_dict` into every checkpoint.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Literal

__all__ = ["RetrainPolicy", "RetrainReason"]


class RetrainReason(str, Enum):
    """Why a request is served by ``Retrain`` (the value is the journal's ``policy``)."""

    RETRAIN_EVERY = "retrain_every"
    MAX_DELETED_FRACTION = "max_deleted_fraction"
    MAX_GRAD_RATIO = "max_grad_ratio"


class RetrainPolicy:
    """The drift counter of a model over a stream of requests, and the retrain decision.

    The counter holds the rows the model was last fitted on (known at the first request), the
    gradient norm of its objective then (with ``max_grad_ratio``), and the requests served and
    rows deleted since. Its state is these four plain values (:meth:`state_dict`).

    Args:
        retrain_every: retrain for the ``retrain_every``-th request since the last fit (an
            integer ``>= 1``; ``None``: never for this reason).
        max_deleted_fraction: retrain a request that arrives when :attr:`drift` has passed this
            share (a number in ``(0, 1]``, or ``"auto"`` for ``auto``; ``None``: never for this reason).
        max_grad_ratio: retrain after a method that left the gradient norm more than this factor
            above or below its value at the last fit (a number ``> 1``; ``None``: no check).
        auto: what ``max_deleted_fraction="auto"`` means (the method's
            :attr:`~lightning_unlearn.unlearning.methods.base.Unlearner.safe_deleted_fraction`).
        owner: the name error messages give the arguments to.

    Raises:
        ValueError: on an argument outside the accepted values.

    Example:
        >>> policy = RetrainPolicy(retrain_every=2)
        >>> policy.start(fitted_rows=100)
        >>> policy.reason() is None
        True
        >>> policy.served(rows=5)
        >>> policy.drift, policy.reason().value
        (0.05, 'retrain_every')
        >>> policy.refitted(fitted_rows=95)
        >>> policy.state_dict()
        {'fitted_rows': 95, 'fitted_grad_norm': None, 'requests': 0, 'rows': 0}
    """

    def __init__(
        self,
        retrain_every: int | None = None,
        max_deleted_fraction: float | Literal["auto"] | None = None,
        max_grad_ratio: float | None = None,
        *,
        auto: float | None = None,
        owner: str = "RetrainPolicy",
    ):
        if retrain_every is not None and (not isinstance(retrain_every, int) or isinstance(retrain_every, bool) or retrain_every < 1):
            raise ValueError(f"{owner}(retrain_every=...) must be None or an integer >= 1, got {retrain_every!r}.")
        if max_deleted_fraction == "auto":
            max_deleted_fraction = auto
        if max_deleted_fraction is not None and not (_finite_number(max_deleted_fraction) and 0 < max_deleted_fraction <= 1):
            raise ValueError(f"{owner}(max_deleted_fraction=...) must be None, 'auto' or a number in (0, 1], got {max_deleted_fraction!r}.")
        if max_grad_ratio is not None and not (_finite_number(max_grad_ratio) and max_grad_ratio > 1):
            raise ValueError(f"{owner}(max_grad_ratio=...) must be None or a finite number > 1, got {max_grad_ratio!r}.")
        self.retrain_every, self.max_deleted_fraction, self.max_grad_ratio = retrain_every, max_deleted_fraction, max_grad_ratio
        self.fitted_rows: int | None = None
        self.fitted_grad_norm: float | None = None
        self.requests = 0
        self.rows = 0

    @property
    def drift(self) -> float:
        """Training rows deleted since the model was last fitted, as a share of the rows it was fitted on (0 before)."""
        return self.rows / self.fitted_rows if self.fitted_rows else 0.0

    @property
    def needs_grad_norm(self) -> bool:
        """Whether the gradient norm at the last fit is wanted and not known yet."""
        return self.max_grad_ratio is not None and self.fitted_grad_norm is None

    def start(self, fitted_rows: int, grad_norm: float | None = None) -> None:
        """Before a request: count the rows the model was fitted on (the first time) and its gradient norm (when wanted)."""
        if self.fitted_rows is None:  # the first request: the model was fitted on the rows there are now
            self.fitted_rows = fitted_rows
        if self.needs_grad_norm and grad_norm is not None:
            self.fitted_grad_norm = grad_norm

    def reason(self) -> RetrainReason | None:
        """Why the next request is served by ``Retrain``, or ``None`` when the method serves it."""
        if self.retrain_every is not None and self.requests + 1 >= self.retrain_every:
            return RetrainReason.RETRAIN_EVERY
        if self.max_deleted_fraction is not None and self.drift > self.max_deleted_fraction:
            return RetrainReason.MAX_DELETED_FRACTION
        return None

    def grad_ratio(self, grad_norm: float) -> float:
        """``grad_norm`` over the gradient norm at the last fit."""
        return grad_norm / max(self.fitted_grad_norm or 0.0, 1e-30)

    def astray(self, grad_ratio: float) -> RetrainReason | None:
        """``MAX_GRAD_RATIO`` when ``grad_ratio`` is outside ``[1 / max_grad_ratio, max_grad_ratio]`` (the method went astray)."""
        if self.max_grad_ratio is not None and not 1 / self.max_grad_ratio <= grad_ratio <= self.max_grad_ratio:
            return RetrainReason.MAX_GRAD_RATIO
        return None

    def served(self, rows: int) -> None:
        """The method served a request that deleted ``rows`` training rows."""
        self.requests += 1
        self.rows += rows

    def refitted(self, fitted_rows: int, grad_norm: float | None = None) -> None:
        """``Retrain`` served a request: the model is now fitted on ``fitted_rows`` rows (its gradient norm then)."""
        self.fitted_rows, self.fitted_grad_norm, self.requests, self.rows = fitted_rows, grad_norm, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The counter as plain values (what a checkpoint's ``unlearning["drift"]`` holds)."""
        return {"fitted_rows": self.fitted_rows, "fitted_grad_norm": self.fitted_grad_norm, "requests": self.requests, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter (missing entries start afresh)."""
        state = {"fitted_rows": None, "fitted_grad_norm": None, "requests": 0, "rows": 0, **state}
        self.fitted_rows, self.fitted_grad_norm = state["fitted_rows"], state["fitted_grad_norm"]
        self.requests, self.rows = state["requests"], state["rows"]


def _finite_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
