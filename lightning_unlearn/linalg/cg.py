"""Damped, preconditioned conjugate gradient that reports what happened instead of failing silently.

Solves ``(A + damping I) x = b`` for a symmetric ``A`` given only as a matvec on flat
vectors (a Hessian or Gauss–Newton product). The rules:

- ``damping > 0`` always: a Newton correction on a model that is not at a stationary point
  of a convex objective (early stopping, an indefinite Hessian) over-corrects without it.
- Numerical trouble never raises and never returns a wrecked iterate: on negative curvature
  (``p^T (A + damping I) p < 0``), on curvature lost in rounding (``|p^T (A + damping I) p|``
  within the dtype's precision of the curvature scale: the damping is too small for the
  dtype), on a non-finite value (in ``b``, in a product, in the preconditioner) or on an
  indefinite preconditioner, CG stops and says why in :class:`CGResult`. A solve that stops
  without converging returns the iterate with the smallest residual CG saw, and never one
  whose true residual is larger than the starting point's (it returns the start then, ``0``
  by default). Only invalid arguments raise.
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
        negative_curvature: a direction with ``p^T (A + damping I) p < 0`` (beyond rounding)
            was met; CG stopped before stepping along it.
        nonfinite: a non-finite value was met in ``b``, a product or the preconditioner.
        stop_reason: ``"converged"``, ``"zero_rhs"``, ``"max_iter"``, ``"negative_curvature"``,
            ``"lost_precision"`` (the damped curvature along a search direction is zero to the
            dtype's precision, relative to the largest curvature seen: the damping is too
            small for this dtype; more damping or float64 helps), ``"nonfinite"``,
            ``"indefinite_preconditioner"`` or ``"residual_drift"`` (the recursive residual met
            ``tol`` but the true one does not: rounding in a very ill-conditioned system; more
            damping helps).
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
        ``(x, result)``: ``x`` always finite (``0`` for ``b = 0``, with ``converged=True``);
        when CG did not converge, the iterate with the smallest residual, and never one with
        a larger true residual than the start.

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
    eps = torch.finfo(b.dtype).eps if b.dtype.is_floating_point else torch.finfo(torch.float32).eps
    scale = 0.0  # largest Rayleigh quotient p^T op p / p^T p seen: what rounding is relative to
    start_residual = float(torch.linalg.vector_norm(r)) / b_norm  # true: r was formed from x directly
    best_x, best_residual = x, math.inf
    while True:
        r_norm = float(torch.linalg.vector_norm(r))
        if r_norm < best_residual:
            best_x, best_residual = x, r_norm
        if r_norm <= tol * b_norm:
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
        pp = float(torch.dot(p, p))
        if not (math.isfinite(pap) and math.isfinite(pp)):
            reason = "nonfinite"
            break
        scale = max(scale, abs(pap) / pp) if pp > 0 else scale
        noise = 16 * eps * scale * pp  # rounding in p^T op p, relative to the curvature seen so far
        if pap < -noise or (pap <= 0.0 and noise == 0.0):
            reason = "negative_curvature"
            break
        if pap <= noise:
            reason = "lost_precision"
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
    if reason != "converged":
        x = best_x  # the smallest (recursive) residual seen; the last iterate unless CG went astray
    return _finish(x, b, b_norm, op, tol, iterations, reason, start, start_residual)


def _finish(x: Tensor, b: Tensor, b_norm: float, op: Matvec, tol: float, iterations: int, reason: str,
            start: Tensor | None = None, start_residual: float = math.inf) -> tuple[Tensor, CGResult]:
    """The true residual of the returned iterate (the start if that is better), and the result record."""
    residual = b if not x.any() else b - op(x)
    relative = float(torch.linalg.vector_norm(residual)) / b_norm
    if start is not None and math.isfinite(relative) and relative > start_residual:
        x, relative = start, start_residual  # rounding wrecked the iterates: doing nothing is better
    converged = math.isfinite(relative) and relative <= tol
    if reason == "converged" and not converged:
        reason = "residual_drift"  # CG's recursive residual fell below tol, the true one did not
    return x, CGResult(iterations, relative, converged, negative_curvature=reason == "negative_curvature",
                       nonfinite=reason == "nonfinite", stop_reason=reason)
