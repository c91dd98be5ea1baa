"""Damped, preconditioned conjugate gradient that reports what happened instead of failing silently.

Solves ``(A + damping I) x = b`` for a symmetric ``A`` given only as a matvec on flat
vectors (a Hessian or Gauss–Newton product). The rules:

- ``damping > 0`` always: a Newton correction on a model that is not at a stationary point
  of a convex objective (early stopping, an indefinite Hessian) over-corrects without it.
- Numerical trouble never raises and never returns a wrecked iterate: on negative curvature
  (``p^T (A + damping I) p <= 0``), on a non-finite value (in ``b``, in a product, in the
  preconditioner) or on an indefinite preconditioner, CG stops, returns the last finite
  iterate and says why in :class:`CGResult`. Only invalid arguments raise.
- The reported ``relative_residual`` is the true ``||b - (A + damping I) x|| / ||b||`` of the
  returned ``x`` (one extra product at the end), not CG's recursively updated estimate,
  and ``converged`` means that true residual is within ``tol``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CGResult", "conjugate_gradient"]

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CGResult:
    """Diagnostics of one :func:`conjugate_gradient` solve.

    Attributes:
        iterations: CG iterations taken (products with ``A`` inside the loop).
        relative_residual: ``||b - (A + damping I) x|| / ||b||`` of the returned ``x``
            (0 for ``b = 0``; ``nan`` when it cannot be computed, e.g. ``b`` is not finite).
        converged: the relative residual is ``<= tol``.
        negative_curvature: a direction with ``p^T (A + damping I) p <= 0`` was met; CG
            stopped before stepping along it.
        nonfinite: a non-finite value was met in ``b``, a product or the preconditioner.
        stop_reason: ``"converged"``, ``"zero_rhs"``, ``"max_iter"``, ``"negative_curvature"``,
            ``"nonfinite"``, ``"indefinite_preconditioner"`` or ``"residual_drift"`` (the
            recursive residual met ``tol`` but the true one does not: rounding in a very
            ill-conditioned system; more damping helps).
    """

    iterations: int
    relative_residual: float
    converged: bool
    negative_curvature: bool = False
    nonfinite: bool = False
    stop_reason: str = "converged"

    def as_dict(self) -> dict[str, int | float | bool | str]:
        """Plain values, for logs and reports."""
        return dataclasses.asdict(self)


def conjugate_gradient(
    matvec: Matvec,
    b: Tensor,
    *,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    preconditioner: Matvec | None = None,
    x0: Tensor | None = None,
) -> tuple[Tensor, CGResult]:
    """Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradient.

    Args:
        matvec: ``v -> A v`` on 1-D vectors, ``A`` symmetric (positive semi-definite for a
            guaranteed solve; negative curvature is detected, see :class:`CGResult`).
        b: 1-D right-hand side.
        damping: ``lambda > 0`` added to the diagonal.
        tol: stop when ``||r|| <= tol * ||b||``.
        max_iter: at most this many iterations (0 returns ``x0``).
        preconditioner: ``v -> M^{-1} v`` with ``M`` symmetric positive definite, e.g. a
            :class:`~lightning_unlearn.linalg.blocks.BlockPreconditioner` built with the same damping.
        x0: starting point (zeros by default; one extra product to form its residual).

    Returns:
        ``(x, result)``: ``x`` always finite (``0`` for ``b = 0``, with ``converged=True``).

    Raises:
        ValueError: if ``damping <= 0`` (or not finite), ``tol < 0``, ``max_iter < 0``, ``b``
            is not 1-D or ``x0`` does not match ``b``.

    Example:
        >>> A = torch.tensor([[1., 1.], [1., 2.]], dtype=torch.float64)   # solves [[2, 1], [1, 3]] x = b
        >>> x, res = conjugate_gradient(lambda v: A @ v, torch.tensor([1., 2.], dtype=torch.float64), damping=1.0)
        >>> x, res.iterations, res.converged
        (tensor([0.2000, 0.6000], dtype=torch.float64), 2, True)
    """
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(
            f"damping must be a finite number > 0, got {damping!r}. An undamped Newton/influence solve on a model "
            "that is early-stopped or has an indefinite Hessian over-corrects (over-forgets) or breaks down; "
            "use a small positive damping (e.g. 1e-3 relative to the curvature scale) and calibrate it.")
    if tol < 0 or max_iter < 0:
        raise ValueError(f"tol and max_iter must be >= 0, got tol={tol!r}, max_iter={max_iter!r}.")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D vector (flatten the parameter tensors first), got shape {tuple(b.shape)}.")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}.")

    def op(v: Tensor) -> Tensor:
        return matvec(v) + damping * v

    b = b.detach()
    b_norm = float(torch.linalg.vector_norm(b))
    start = torch.zeros_like(b) if x0 is None else x0.detach().clone()
    if not math.isfinite(b_norm):
        return start.nan_to_num(0.0, 0.0, 0.0), CGResult(0, math.nan, False, nonfinite=True, stop_reason="nonfinite")
    if b_norm == 0.0:
        return torch.zeros_like(b), CGResult(0, 0.0, True, stop_reason="zero_rhs")

    x = start
    r = b.clone() if x0 is None else b - op(x)
    if x0 is not None and not torch.isfinite(r).all():
        return _finish(torch.zeros_like(b), b, b_norm, op, tol, 0, "nonfinite")
    z = r if preconditioner is None else preconditioner(r)
    rz = float(torch.dot(r, z))
    p = z.clone()
    reason, iterations = "max_iter", 0
    while True:
        if float(torch.linalg.vector_norm(r)) <= tol * b_norm:
            reason = "converged"
            break
        if not math.isfinite(rz):
            reason = "nonfinite"
            break
        if rz <= 0.0:
            reason = "indefinite_preconditioner"
            break
        if iterations >= max_iter:
            break
        ap = op(p)
        pap = float(torch.dot(p, ap))
        if not math.isfinite(pap):
            reason = "nonfinite"
            break
        if pap <= 0.0:
            reason = "negative_curvature"
            break
        alpha = rz / pap
        x_next = x + alpha * p
        if not torch.isfinite(x_next).all():
            reason = "nonfinite"
            break
        x = x_next
        r = r - alpha * ap
        iterations += 1
        z = r if preconditioner is None else preconditioner(r)
        rz_next = float(torch.dot(r, z))
        if math.isfinite(rz_next) and rz_next > 0.0:
            p = z + (rz_next / rz) * p
        rz = rz_next
    return _finish(x, b, b_norm, op, tol, iterations, reason)


def _finish(x: Tensor, b: Tensor, b_norm: float, op: Matvec, tol: float, iterations: int, reason: str) -> tuple[Tensor, CGResult]:
    """The true residual of the returned iterate, and the result record."""
    residual = b if not x.any() else b - op(x)
    relative = float(torch.linalg.vector_norm(residual)) / b_norm
    converged = math.isfinite(relative) and relative <= tol
    if reason == "converged" and not converged:
        reason = "residual_drift"  # CG's recursive residual fell below tol, the true one did not
    return x, CGResult(iterations, relative, converged, negative_curvature=reason == "negative_curvature",
                       nonfinite=reason == "nonfinite", stop_reason=reason)
