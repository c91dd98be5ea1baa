"""Hessian- and Gauss–Newton-vector products of a scalar loss with respect to a tuple of tensors.

Every function here takes a *functional* loss ``loss_fn(params) -> scalar``: it receives a
tuple of tensors and must compute the loss from them (not from module attributes), because
it is called with detached copies (double backward) or with ``torch.func`` wrappers
(forward-over-reverse). The products never touch any ``.grad`` and never change ``params``.

Restricting a product to some rows of an embedding table is done by the loss, not here:

- rows that a batch touches: pass the gathered rows ``table[touched]`` and let the loss
  index them with local indices (``touched, local = torch.unique(rows, return_inverse=True)``,
  then ``ps[0][local]`` wherever the model would have used ``table[rows]``). Since the loss
  depends on no other row, the result is exactly those rows of the full-table product.
- a subset ``S`` of the touched rows, the others held fixed at their values (pruning):
  ``lambda ps: loss(table.index_copy(0, S, ps[0]))`` with ``params = (table[S],)`` gives
  the ``S × S`` block of the Hessian applied to ``v_S``.

For a module, build the functional loss with ``torch.func.functional_call``.

Example:
    >>> table = torch.tensor([[1., 1.], [2., 2.], [3., 3.]])
    >>> rows = torch.tensor([2, 0, 2])                       # a batch touches rows 0 and 2 (2 twice)
    >>> touched, local = torch.unique(rows, return_inverse=True)
    >>> loss = lambda ps: (ps[0][local] ** 2).sum()         # the loss, on the gathered rows
    >>> hvp(loss, (table[touched],), (torch.ones(2, 2),))[0]  # rows 0 and 2 of H @ 1
    tensor([[2., 2.],
            [4., 4.]])
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from lightning_unlearn.linalg.flat import flatten, unflatten

__all__ = ["gauss_newton_matvec", "gauss_newton_vp", "hessian_matvec", "hvp", "hvp_forward_over_reverse"]

LossFn = Callable[[tuple[Tensor, ...]], Tensor]


def hvp(loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product ``H v`` by double backward (reverse-over-reverse).

    Args:
        loss_fn: ``loss_fn(params_tuple) -> scalar``, computed from the tensors it receives.
        params: the point ``theta`` (any tensors; they are detached, never modified).
        vectors: ``v``, one tensor per parameter, of the same shapes.

    Returns:
        ``[H v]`` as one tensor per parameter (zeros for a parameter the loss does not use).

    Raises:
        ValueError: if ``params`` and ``vectors`` differ in number or shapes, or the loss is
            not a scalar.

    Example:
        >>> f = lambda ps: (ps[0] ** 2).sum() * ps[1].sum()   # H = [[2 b I, 2 a], [2 a^T, 0]]
        >>> a, b = torch.tensor([1., 2.]), torch.tensor([3.])
        >>> hvp(f, (a, b), (torch.tensor([1., 0.]), torch.tensor([1.])))
        [tensor([8., 4.]), tensor([2.])]
    """
    _check_vectors(params, vectors)
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in params)
        grads = torch.autograd.grad(_scalar(loss_fn(leaves)), leaves, create_graph=True, allow_unused=True)
        return _grad_dot_grad(grads, leaves, [v.detach() for v in vectors])


def hvp_forward_over_reverse(loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product ``H v`` as ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse).

    Same semantics as :func:`hvp`; usually cheaper in memory (no second reverse graph), and
    composable with ``torch.func.vmap`` over ``vectors``.

    Args:
        loss_fn: ``loss_fn(params_tuple) -> scalar``, written with torch operations that
            support forward-mode AD.
        params: the point ``theta``.
        vectors: ``v``, one tensor per parameter, of the same shapes.

    Returns:
        ``[H v]`` as one tensor per parameter.

    Raises:
        ValueError: if ``params`` and ``vectors`` differ in number or shapes.

    Example:
        >>> f = lambda ps: (ps[0] ** 2).sum() * ps[1].sum()
        >>> a, b = torch.tensor([1., 2.]), torch.tensor([3.])
        >>> hvp_forward_over_reverse(f, (a, b), (torch.tensor([1., 0.]), torch.tensor([1.])))
        [tensor([8., 4.]), tensor([2.])]
    """
    _check_vectors(params, vectors)
    primals = tuple(p.detach() for p in params)
    tangents = tuple(v.detach().to(p.dtype) for p, v in zip(primals, vectors))
    _, out = torch.func.jvp(torch.func.grad(loss_fn), (primals,), (tangents,))
    return list(out)


def hessian_matvec(
    loss_fn: LossFn, params: Sequence[Tensor], *, mode: Literal["double_backward", "forward_over_reverse"] = "double_backward"
) -> Callable[[Tensor], Tensor]:
    """The Hessian at ``params`` as a matvec on flat vectors (laid out as :func:`flatten`), for CG.

    With ``"double_backward"`` the loss and its gradient graph are built once and kept by the
    returned callable, so each product costs one backward pass through that graph; drop the
    callable to free it. ``"forward_over_reverse"`` recomputes the loss on every call but
    keeps no graph.

    Args:
        loss_fn: ``loss_fn(params_tuple) -> scalar``.
        params: the point ``theta``.
        mode: ``"double_backward"`` or ``"forward_over_reverse"``.

    Returns:
        ``matvec(v_flat) -> (H v)_flat``.

    Raises:
        ValueError: on an unknown ``mode`` or a non-scalar loss.

    Example:
        >>> matvec = hessian_matvec(lambda ps: (ps[0] ** 3).sum(), [torch.tensor([1., 2.])])
        >>> matvec(torch.tensor([1., 1.]))
        tensor([ 6., 12.])
    """
    shapes = [p.shape for p in params]
    if mode == "forward_over_reverse":
        return lambda v: flatten(hvp_forward_over_reverse(loss_fn, params, unflatten(v, shapes)))
    if mode != "double_backward":
        raise ValueError(f"mode must be 'double_backward' or 'forward_over_reverse', got {mode!r}.")
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in params)
        grads = torch.autograd.grad(_scalar(loss_fn(leaves)), leaves, create_graph=True, allow_unused=True)

    def matvec(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return flatten(_grad_dot_grad(grads, leaves, unflatten(v.detach(), shapes), retain_graph=True))

    return matvec


def gauss_newton_vp(
    output_fn: LossFn, loss_fn: Callable[[Tensor], Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """Generalised Gauss–Newton product ``J^T H_z J v`` of ``loss_fn(output_fn(params))``.

    ``J`` is the Jacobian of the outputs ``z = output_fn(params)`` (e.g. the scores of the
    rows) and ``H_z`` the Hessian of ``loss_fn`` in ``z`` — diagonal ``sigmoid'(z)`` for BCE
    on logits. The curvature of the network itself is dropped, so for a loss convex in ``z``
    the matrix is positive semi-definite even where the Hessian is indefinite (as the joint
    user–item Hessian of MF is).

    Args:
        output_fn: ``output_fn(params_tuple) -> z`` (any shape).
        loss_fn: ``loss_fn(z) -> scalar``.
        params: the point ``theta``.
        vectors: ``v``, one tensor per parameter.

    Returns:
        ``[J^T H_z J v]`` as one tensor per parameter.

    Raises:
        ValueError: if ``params`` and ``vectors`` differ in number or shapes.

    Example:
        >>> out = lambda ps: ps[0] * ps[1]          # z = a b, loss = z^2 / 2: G = [b, a]^T [b, a]
        >>> gauss_newton_vp(out, lambda z: 0.5 * (z ** 2).sum(), (torch.tensor([2.]), torch.tensor([3.])),
        ...                 (torch.tensor([1.]), torch.tensor([0.])))
        [tensor([9.]), tensor([6.])]
    """
    _check_vectors(params, vectors)
    product = gauss_newton_matvec(output_fn, loss_fn, params)(flatten([v.to(p.dtype) for p, v in zip(params, vectors)]))
    return unflatten(product, [p.shape for p in params])


def gauss_newton_matvec(
    output_fn: LossFn, loss_fn: Callable[[Tensor], Tensor], params: Sequence[Tensor], *, mode: Literal["forward", "reverse"] = "forward"
) -> Callable[[Tensor], Tensor]:
    """The Gauss–Newton matrix at ``params`` as a matvec on flat vectors, for CG.

    The reverse pass of ``output_fn`` is recorded once and reused; each product costs one
    ``J v`` (forward mode, or with ``mode="reverse"`` a second reverse pass through the linear
    map ``w -> J^T w``, for operations without forward-mode support such as sparse matmul),
    one product on the loss (``H_z J v``) and one reverse pass (``J^T``).

    Args:
        output_fn: ``output_fn(params_tuple) -> z``.
        loss_fn: ``loss_fn(z) -> scalar``.
        params: the point ``theta``.
        mode: how ``J v`` is computed (``"forward"`` or ``"reverse"``).

    Returns:
        ``matvec(v_flat) -> (J^T H_z J v)_flat``.

    Example:
        >>> matvec = gauss_newton_matvec(lambda ps: ps[0] * 2, lambda z: (z ** 2).sum(), [torch.tensor([1.])])
        >>> matvec(torch.tensor([1.]))   # 2 * 2 * 2
        tensor([8.])
    """
    primals = tuple(p.detach() for p in params)
    shapes = [p.shape for p in primals]
    if mode == "reverse":
        return _gauss_newton_matvec_reverse(output_fn, loss_fn, primals, shapes)
    if mode != "forward":
        raise ValueError(f"gauss_newton_matvec(mode=...) must be 'forward' or 'reverse', got {mode!r}.")
    z, pullback = torch.func.vjp(output_fn, primals)
    z = z.detach()
    loss_grad = torch.func.grad(loss_fn)

    def matvec(v: Tensor) -> Tensor:
        tangents = tuple(t.to(p.dtype) for p, t in zip(primals, unflatten(v.detach(), shapes)))
        _, jv = torch.func.jvp(output_fn, (primals,), (tangents,))
        _, hjv = torch.func.jvp(loss_grad, (z,), (jv,))
        (out,) = pullback(hjv)
        return flatten(out)

    return matvec


def _gauss_newton_matvec_reverse(output_fn, loss_fn, primals, shapes) -> Callable[[Tensor], Tensor]:
    """``J^T H_z J v`` with autograd only (no torch.func transforms, which refuse sparse CSR tensors).

    ``J v`` is the vector-Jacobian product of the linear map ``w -> J^T w`` with cotangent ``v``.
    """
    leaves = tuple(p.clone().requires_grad_(True) for p in primals)
    with torch.enable_grad():
        z = output_fn(leaves)
        w = torch.zeros_like(z, requires_grad=True)
        jt_w = _or_zeros(torch.autograd.grad(z, leaves, grad_outputs=w, create_graph=True, allow_unused=True), leaves)
        z_point = z.detach().requires_grad_(True)
        (loss_grad,) = torch.autograd.grad(loss_fn(z_point), z_point, create_graph=True)

    def matvec(v: Tensor) -> Tensor:
        tangents = [t.to(p.dtype) for p, t in zip(primals, unflatten(v.detach(), shapes))]
        (jv,) = torch.autograd.grad(jt_w, w, grad_outputs=tangents, retain_graph=True)
        (hjv,) = torch.autograd.grad(loss_grad, z_point, grad_outputs=jv, retain_graph=True)
        out = torch.autograd.grad(z, leaves, grad_outputs=hjv, retain_graph=True, allow_unused=True)
        return flatten(_or_zeros(out, leaves))

    return matvec


def _or_zeros(grads, leaves) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]


def _grad_dot_grad(grads, leaves, vectors, retain_graph: bool = False) -> list[Tensor]:
    """``d/d theta <grad, v>`` for gradients built with ``create_graph=True``; zeros where unused."""
    terms = [(g * v).sum() for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
    if not terms:
        return [torch.zeros_like(p) for p in leaves]
    out = torch.autograd.grad(torch.stack(terms).sum(), leaves, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(leaves, out)]


def _scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"of shape {tuple(getattr(loss, 'shape', ()))}.")
    return loss.reshape(())


def _check_vectors(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> None:
    if len(params) != len(vectors) or any(p.shape != v.shape for p, v in zip(params, vectors)):
        raise ValueError(f"vectors must match params one to one in shape; got params {[tuple(p.shape) for p in params]} "
                         f"and vectors {[tuple(v.shape) for v in vectors]}.")
