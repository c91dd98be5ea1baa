"""Shared numerics of the unlearning methods: HVPs, damped preconditioned CG, per-row curvature blocks.

Nothing here knows of recommenders or Lightning: functions take callables (functional
losses, matvecs on flat vectors) and tensors.

- :mod:`~lightning_unlearn.linalg.flat`: parameter tensors <-> one flat vector.
- :mod:`~lightning_unlearn.linalg.hvp`: Hessian- and Gauss–Newton-vector products.
- :mod:`~lightning_unlearn.linalg.cg`: ``(A + damping I) x = b`` by CG, with diagnostics.
- :mod:`~lightning_unlearn.linalg.blocks`: ``d × d`` blocks per row, batched damped solves, block-Jacobi.
"""

from lightning_unlearn.linalg.blocks import (
    BlockPreconditioner,
    BlockSolveResult,
    factor_blocks,
    inverse_factored,
    pcg_blocks,
    scatter_outer,
    solve_blocks,
    solve_factored,
    solve_low_rank,
    symmetric_matvec,
)
from lightning_unlearn.linalg.cg import CGResult, conjugate_gradient
from lightning_unlearn.linalg.flat import flatten, unflatten
from lightning_unlearn.linalg.hvp import (
    gauss_newton_matvec,
    gauss_newton_vp,
    hessian_matvec,
    hvp,
    hvp_forward_over_reverse,
)

__all__ = [
    "BlockPreconditioner", "BlockSolveResult", "CGResult", "conjugate_gradient", "factor_blocks", "flatten", "gauss_newton_matvec",
    "gauss_newton_vp", "hessian_matvec", "hvp", "hvp_forward_over_reverse", "inverse_factored", "pcg_blocks", "scatter_outer", "solve_blocks", "solve_factored", "solve_low_rank", "symmetric_matvec",
    "unflatten",
]
