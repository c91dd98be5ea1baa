"""Functions of a model's tensors: a closure evaluated with some of them replaced (for autograd
and torch.func), and a checksum telling whether they changed (for caches kept across requests)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["call_with", "fingerprint", "fingerprints_by_version", "gather_rows", "non_finite"]

_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float of this many bytes, read as bits
_KNOWN: ContextVar[dict | None] = ContextVar("lightning_unlearn_fingerprints", default=None)  # within fingerprints_by_version()


class _Closure(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, closure: Callable[[], Any]) -> Any:
        return closure()


def call_with(model: nn.Module, replaced: dict[str, Tensor], closure: Callable[[], Any]) -> Any:
    """``closure()`` evaluated while ``model``'s named tensors are replaced by ``replaced``.

    Gradients flow into the replacement tensors; the model's own parameters are untouched.

    Example:
        >>> layer = nn.Linear(1, 1, bias=False)
        >>> call_with(layer, {"weight": torch.full((1, 1), 3.0)}, lambda: layer(torch.ones(1, 1))).item()
        3.0
    """
    return torch.func.functional_call(_Closure(model), {f"model.{k}": v for k, v in replaced.items()}, (closure,), strict=False)


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 2-d ``table`` and an index of any shape: ``(*index.shape, table.shape[1])``.

    By ``index_select`` on the flattened index: on the CPU its forward is 2.5-6x and its backward
    1.2-1.7x faster than ``[]`` indexing with a multi-dimensional index (a batch's ``(R, 1 + k)``
    item slots, 2 threads), the same values and gradients.

    Args:
        table: ``(n, d)`` rows.
        index: integer indices into ``table``'s rows, any shape.

    Example:
        >>> gather_rows(torch.arange(6.0).view(3, 2), torch.tensor([[2, 0]]))
        tensor([[[4., 5.],
                 [0., 1.]]])
    """
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def fingerprint(model: nn.Module, *extra: Tensor) -> Tensor:
    """A cheap checksum of ``model``'s parameters (and of ``extra`` tensors): which model a cache belongs to.

    Per tensor, its number of elements and wrapping integer sums of its entries' bits: plain,
    weighted by row and weighted by column (so a permutation of the entries changes it too); a
    ``(tensors, 4)`` int64 CPU tensor. Integer sums are exact: the same tensors give the same
    fingerprint on any device and thread count (compare with :func:`torch.equal`), a change of
    any one entry changes it, and more changes leave it the same only by a 64-bit coincidence.
    One pass over each tensor, a piece of rows at a time on the CPU, without a copy: cheap enough
    to check on every request (MF with 10,000 users and a million items at ``d = 32``: 10 ms on two
    cores, where summing the entries in float64, as it did before, took 41 ms).
    Caches of the unlearning methods key on it, and
    :func:`~lightning_unlearn.metrics.completeness.completeness_report` adds the model's
    representations as ``extra`` (they depend on a graph model's graph as well).

    Args:
        model: the model; its parameters are only read.
        *extra: further tensors to cover, after the parameters.

    Example:
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        >>> before = fingerprint(layer)
        >>> before.shape, torch.equal(before, fingerprint(layer))
        (torch.Size([1, 4]), True)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[2.0, 1.0]]))  # same sum, other order
        >>> torch.equal(before, fingerprint(layer))
        False
    """
    tensors, known = (*model.parameters(), *extra), _KNOWN.get()
    state = tuple((id(t), t.data_ptr(), t._version) for t in tensors) if known is not None else None
    if state in (known or {}):
        return known[state][1].clone()
    rows = []
    with torch.no_grad():
        for tensor in tensors:
            table = tensor.detach().reshape(1, 1) if tensor.dim() == 0 else tensor.detach().flatten(1) if tensor.dim() > 1 else tensor.detach().unsqueeze(1)
            rows.append(_checksum(table))
    result = torch.stack(rows).cpu() if rows else torch.zeros(0, 4, dtype=torch.int64)
    if known is not None:
        known[state] = (tensors, result.clone())  # the tensors are held, so their ids are not reused meanwhile
    return result


@contextmanager
def fingerprints_by_version() -> Iterator[None]:
    """Within: :func:`fingerprint` is computed once per state of the tensors, and recalled after.

    A tensor's state is which tensor it is and its version, the counter that in-place operations
    on it advance (an optimizer step, ``copy_``, ``index_add_``): one unlearning request checks the
    model's fingerprint several times (its caches, before and after its step) and pays for two.
    Writes through ``.data`` do not advance the counter, so outside this context every call
    computes the fingerprint again. Nested contexts share the outermost one's memory.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> with fingerprints_by_version():
        ...     first = fingerprint(layer)
        ...     with torch.no_grad():
        ...         _ = layer.weight.mul_(2.0)  # in place: a new version
        ...     torch.equal(first, fingerprint(layer))
        False
    """
    if _KNOWN.get() is not None:
        yield
        return
    token = _KNOWN.set({})
    try:
        yield
    finally:
        _KNOWN.reset(token)


def non_finite(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that hold a NaN or an infinity.

    One reduction per parameter (its minimum and maximum, which a NaN or an infinity reaches),
    without a boolean copy of it: on a catalog's embedding tables about 30 times faster than
    ``torch.isfinite(p).all()``.

    Args:
        model: any module.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = layer.bias.fill_(float("nan"))
        >>> non_finite(layer)
        ['bias']
    """
    return [name for name, p in model.named_parameters()
            if p.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(p.detach()))).all())]


def _checksum(table: Tensor, piece_elements: int = 2**21) -> Tensor:
    """``[numel, sum, sum weighted by row, sum weighted by column]`` of a 2-d ``table``'s bits, as int64.

    The entries are read as integers of their width (a bit view, no copy) and summed with
    wrap-around: exact, so the result does not depend on the order of the additions (threads,
    device), and a change of any one entry changes the plain sum. A row's sum is wrapped at its
    entries' width, the weighted sums at 64 bits; weights are the row's (column's) index plus one,
    so two entries swapped between rows (columns) change the weighted sum. On the CPU the rows
    are read a piece at a time, so that the column sums find the piece in the cache (a piece's
    column sums are wrapped at the entries' width; the pieces' size is fixed, not the threads').
    """
    if table.is_complex():
        table = torch.view_as_real(table).reshape(len(table), -1)
    ints = _INTEGERS[table.element_size()]
    bits = table.view(ints)
    count, width = bits.shape
    step = max(1, piece_elements // max(width, 1)) if table.device.type == "cpu" else max(count, 1)  # a GPU: one pass
    total = torch.zeros(3, dtype=torch.int64, device=table.device)
    columns = torch.zeros(width, dtype=torch.int64, device=table.device)
    for start in range(0, count, step):
        piece = bits[start:start + step]
        rows = piece.sum(1, dtype=ints).long()
        positions = torch.arange(start + 1, start + len(piece) + 1, device=table.device)
        total[0] += rows.sum()
        total[1] += (rows * positions).sum()  # no integer matmul on a GPU
        columns += piece.sum(0, dtype=ints).long()
    total[2] = (columns * torch.arange(1, width + 1, device=table.device)).sum()
    return torch.cat([total.new_tensor([table.numel()]), total])
