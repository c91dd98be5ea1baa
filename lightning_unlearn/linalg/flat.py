"""Between a list of parameter tensors and one flat vector (the currency of the solvers).

The layout is plain concatenation of each tensor in row-major order, so a ``(rows, d)``
embedding table becomes ``rows`` consecutive segments of length ``d`` — the layout that
:class:`~lightning_unlearn.linalg.blocks.BlockPreconditioner` expects.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (row-major) into one 1-D vector.

    Args:
        tensors: a non-empty sequence of tensors of one dtype and device.

    Returns:
        ``(sum of numel,)`` vector (a copy).

    Raises:
        ValueError: on an empty sequence.

    Example:
        >>> flatten([torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([5.])])
        tensor([1., 2., 3., 4., 5.])
    """
    if len(tensors) == 0:
        raise ValueError("flatten needs at least one tensor, got an empty sequence.")
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Split a flat vector back into tensors of the given shapes (views, no copy).

    Args:
        vector: 1-D vector laid out as :func:`flatten` lays it out.
        shapes: the shapes, in order (e.g. ``[p.shape for p in params]``).

    Returns:
        list of tensors that are views into ``vector``.

    Raises:
        ValueError: if ``vector`` is not 1-D or its length is not the total size of ``shapes``.

    Example:
        >>> a, b = unflatten(torch.arange(5.), [(2, 2), (1,)])
        >>> a
        tensor([[0., 1.],
                [2., 3.]])
        >>> b
        tensor([4.])
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector must be 1-D with {sum(sizes)} entries for shapes {list(map(tuple, shapes))}; "
                         f"got shape {tuple(vector.shape)}.")
    return [chunk.view(tuple(s)) for chunk, s in zip(torch.split(vector, sizes), shapes)]
