"""linalg against exact answers: dense Hessians (torch.func.hessian), direct solves, explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_unlearn.linalg import (
    BlockPreconditioner,
    CGResult,
    conjugate_gradient,
    factor_blocks,
    flatten,
    gauss_newton_matvec,
    gauss_newton_vp,
    hessian_matvec,
    hvp,
    hvp_forward_over_reverse,
    inverse_factored,
    pcg_blocks,
    scatter_outer,
    solve_blocks,
    solve_low_rank,
    symmetric_matvec,
    unflatten,
)
from lightning_unlearn.linalg.blocks import cholesky_solve, one_thread

F64 = torch.float64
HVPS = pytest.mark.parametrize("product", [hvp, hvp_forward_over_reverse], ids=["double_backward", "fwd_over_rev"])


def dense_hessian(f, params) -> torch.Tensor:
    """The full Hessian of ``f(params_tuple)`` as an ``(N, N)`` matrix in the :func:`flatten` layout."""
    blocks = torch.func.hessian(f)(tuple(params))
    sizes = [p.numel() for p in params]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
                      for i in range(len(sizes))])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_params(g, shapes=((3, 4), (3,), (2, 2))):
    return [torch.randn(*s, generator=g, dtype=F64) for s in shapes]


def coupled_loss(ps):
    """A non-convex function of three tensors with every pair coupled."""
    w, b, c = ps
    x = torch.linspace(-1, 1, 8, dtype=F64).reshape(2, 4)
    return (F.softplus(x @ w.T + b) * torch.tanh(c.sum(0)).unsqueeze(1)).sum() + (w ** 3).sum() * c.prod() + (b @ b).sin()


def spd(g, n: int, eigenvalues: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(eigenvalues.to(F64)) @ q.T


# --- flat vectors -------------------------------------------------------------------------

def test_flatten_unflatten_round_trip_and_layout():
    g = gen(0)
    tensors = random_params(g)
    flat = flatten(tensors)
    assert flat.shape == (12 + 3 + 4,)
    assert torch.equal(flat[:4], tensors[0][0]) and torch.equal(flat[12:15], tensors[1])  # row-major, in order
    back = unflatten(flat, [t.shape for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    with pytest.raises(ValueError, match="19"):
        unflatten(flat[:-1], [t.shape for t in tensors])
    with pytest.raises(ValueError, match="at least one"):
        flatten([])


# --- Hessian-vector products --------------------------------------------------------------

@HVPS
@pytest.mark.parametrize("seed", range(3))
def test_hvp_equals_dense_hessian_times_v(product, seed):
    g = gen(seed)
    params, vectors = random_params(g), random_params(g)
    expected = dense_hessian(coupled_loss, params) @ flatten(vectors)
    out = product(coupled_loss, params, vectors)
    assert [o.shape for o in out] == [p.shape for p in params]
    torch.testing.assert_close(flatten(out), expected, rtol=1e-6, atol=1e-6)


def test_forward_over_reverse_hvp_vmaps_over_many_vectors():
    g = gen(4)
    params = random_params(g)
    stacked = [torch.randn(5, *p.shape, generator=g, dtype=F64) for p in params]
    out = torch.func.vmap(lambda *vs: flatten(hvp_forward_over_reverse(coupled_loss, params, vs)))(*stacked)
    expected = torch.cat([v.reshape(5, -1) for v in stacked], 1) @ dense_hessian(coupled_loss, params).T
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_hessian_matvec_is_reusable_and_exact(mode):
    g = gen(1)
    params = random_params(g)
    matvec = hessian_matvec(coupled_loss, params, mode=mode)
    hessian = dense_hessian(coupled_loss, params)
    for _ in range(3):  # the cached graph serves several products
        v = torch.randn(hessian.shape[0], generator=g, dtype=F64)
        torch.testing.assert_close(matvec(v), hessian @ v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        hessian_matvec(coupled_loss, params, mode="nope")


def test_hvp_unused_parameter_and_bad_arguments():
    a, unused = torch.tensor([1.0, 2.0], dtype=F64), torch.ones(3, dtype=F64)
    f = lambda ps: (ps[0] ** 2).sum()  # noqa: E731
    for product in (hvp, hvp_forward_over_reverse):
        out = product(f, (a, unused), (torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)))
        assert torch.equal(out[0], torch.full((2,), 2.0, dtype=F64)) and torch.equal(out[1], torch.zeros(3, dtype=F64))
        with pytest.raises(ValueError, match="match params"):
            product(f, (a,), (torch.ones(3, dtype=F64),))
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda ps: ps[0] * 2, (a,), (a,))


def test_hvp_does_not_touch_grads_or_params():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    before = p.detach().clone()
    out = hvp(lambda ps: (ps[0] ** 4).sum(), [p], [torch.ones(2, dtype=F64)])
    assert p.grad is None and torch.equal(p.detach(), before)
    torch.testing.assert_close(out[0], 12 * before ** 2)


def mf_case():
    """An MF-like BCE loss on a few (user, item) rows of two tables, with an L2 term on the rows used."""
    g = gen(7)
    users_table, items_table = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    users, items = torch.tensor([4, 1, 4, 2]), torch.tensor([0, 3, 3, 1])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)

    def loss_on(u_rows, i_rows):
        logits = (u_rows * i_rows).sum(1)
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") + 0.1 * (u_rows ** 2).sum()

    return users_table, items_table, users, items, loss_on, g


@HVPS
def test_hvp_on_full_tables_is_zero_outside_touched_rows(product):
    users_table, items_table, users, items, loss_on, g = mf_case()
    full = lambda ps: loss_on(ps[0][users], ps[1][items])  # noqa: E731
    v = [torch.randn_like(users_table), torch.randn_like(items_table)]
    out = product(full, (users_table, items_table), v)
    expected = dense_hessian(full, (users_table, items_table)) @ flatten(v)
    torch.testing.assert_close(flatten(out), expected, rtol=1e-6, atol=1e-6)
    assert out[0][[0, 3, 5]].abs().max() == 0 and out[1][[2, 4]].abs().max() == 0
    assert out[0][[1, 2, 4]].abs().min() > 0 and out[1][[0, 1, 3]].abs().min() > 0


@HVPS
def test_hvp_on_gathered_rows_equals_those_rows_of_the_full_product(product):
    users_table, items_table, users, items, loss_on, g = mf_case()
    touched_u, local_u = torch.unique(users, return_inverse=True)
    touched_i, local_i = torch.unique(items, return_inverse=True)
    gathered = lambda ps: loss_on(ps[0][local_u], ps[1][local_i])  # noqa: E731
    v_rows = [torch.randn(len(touched_u), 3, generator=g, dtype=F64), torch.randn(len(touched_i), 3, generator=g, dtype=F64)]
    out = product(gathered, (users_table[touched_u], items_table[touched_i]), v_rows)

    full = lambda ps: loss_on(ps[0][users], ps[1][items])  # noqa: E731
    v_full = [torch.zeros_like(users_table).index_copy(0, touched_u, v_rows[0]),
              torch.zeros_like(items_table).index_copy(0, touched_i, v_rows[1])]
    hv_full = unflatten(dense_hessian(full, (users_table, items_table)) @ flatten(v_full), [(6, 3), (5, 3)])
    torch.testing.assert_close(out[0], hv_full[0][touched_u], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], hv_full[1][touched_i], rtol=1e-6, atol=1e-6)


@HVPS
def test_hvp_on_a_pruned_subset_of_rows_is_the_sub_block_of_the_hessian(product):
    users_table, items_table, users, items, loss_on, g = mf_case()
    keep = torch.tensor([4, 1])  # only these user rows move; other rows and the items stay fixed
    pruned = lambda ps: loss_on(users_table.index_copy(0, keep, ps[0])[users], items_table[items])  # noqa: E731
    v = torch.randn(2, 3, generator=g, dtype=F64)
    (out,) = product(pruned, (users_table[keep],), (v,))

    hessian = dense_hessian(lambda ps: loss_on(ps[0][users], items_table[items]), (users_table,))
    coords = (keep.unsqueeze(1) * 3 + torch.arange(3)).reshape(-1)
    torch.testing.assert_close(out.reshape(-1), hessian[coords][:, coords] @ v.reshape(-1), rtol=1e-6, atol=1e-6)


def test_gauss_newton_product_equals_jt_h_j():
    g = gen(3)
    params, vectors = random_params(g, ((4, 3), (4,))), random_params(g, ((4, 3), (4,)))
    x = torch.randn(5, 3, generator=g, dtype=F64)
    labels = (torch.rand(5, generator=g) > 0.5).to(F64)
    output_fn = lambda ps: torch.tanh(x @ ps[0].T + ps[1]).sum(1)  # noqa: E731  five logits
    loss_fn = lambda z: F.binary_cross_entropy_with_logits(z, labels, reduction="sum")  # noqa: E731
    jac = torch.cat([j.reshape(5, -1) for j in torch.func.jacrev(output_fn)(tuple(params))], 1)
    h_z = torch.diag(torch.sigmoid(output_fn(params)) * torch.sigmoid(-output_fn(params)))  # sigmoid'(z)
    expected = jac.T @ h_z @ jac @ flatten(vectors)
    torch.testing.assert_close(flatten(gauss_newton_vp(output_fn, loss_fn, params, vectors)), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gauss_newton_matvec(output_fn, loss_fn, params)(flatten(vectors)), expected, rtol=1e-6, atol=1e-8)
    reverse = gauss_newton_matvec(output_fn, loss_fn, params, mode="reverse")  # J v without forward mode
    torch.testing.assert_close(reverse(flatten(vectors)), expected, rtol=1e-6, atol=1e-8)
    # ... and it differs from the (indefinite) Hessian, which keeps the network's own curvature
    hessian = dense_hessian(lambda ps: loss_fn(output_fn(ps)), params)
    assert not torch.allclose(hessian @ flatten(vectors), expected, rtol=1e-3)


# --- conjugate gradient -------------------------------------------------------------------

@pytest.mark.parametrize("eigenvalues", [torch.linspace(1, 10, 30), torch.logspace(-4, 0, 30)], ids=["well", "ill"])
@pytest.mark.parametrize("damping", [1e-6, 0.1])
def test_cg_equals_direct_solve(eigenvalues, damping):
    g = gen(11)
    a = spd(g, 30, eigenvalues)
    b = torch.randn(30, generator=g, dtype=F64)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=damping, tol=1e-11, max_iter=500)
    exact = torch.linalg.solve(a + damping * torch.eye(30, dtype=F64), b)
    assert res.converged and res.stop_reason == "converged" and not res.negative_curvature
    assert torch.linalg.vector_norm(x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)
    true_residual = torch.linalg.vector_norm(b - a @ x - damping * x) / torch.linalg.vector_norm(b)
    assert res.relative_residual == pytest.approx(float(true_residual), rel=1e-2, abs=1e-15) and res.relative_residual <= 1e-11


def block_dominant_system(g, n_blocks=12, d=3, n_other=4, coupling=1e-3):
    """Blocks of widely different scales, weakly coupled, plus a few 'other' coordinates."""
    scales = torch.logspace(-2, 2, n_blocks, dtype=F64)
    blocks = torch.stack([spd(g, d, torch.rand(d, generator=g) + 0.5) * s for s in scales])
    other = torch.logspace(-1, 1, n_other, dtype=F64)
    n = n_blocks * d + n_other
    noise = torch.randn(n, n, generator=g, dtype=F64)
    a = torch.block_diag(*blocks, torch.diag(other)) + coupling * (noise @ noise.T) / n
    return a, blocks, other


def test_block_preconditioner_is_the_exact_block_diagonal_inverse():
    g = gen(5)
    a, blocks, other = block_dominant_system(g)
    damping = 0.01
    m = BlockPreconditioner(blocks, damping, num_other=len(other), other_diagonal=other)
    dense = torch.block_diag(*blocks, torch.diag(other)) + damping * torch.eye(len(a), dtype=F64)
    v = torch.randn(len(a), generator=g, dtype=F64)
    torch.testing.assert_close(m(v), torch.linalg.solve(dense, v), rtol=1e-10, atol=1e-12)
    assert m.result.failed_blocks == 0 and m.size == len(a)
    with pytest.raises(ValueError, match="flat vector"):
        m(v[:-1])
    with pytest.raises(ValueError, match="damping"):
        BlockPreconditioner(blocks, 0.0)


def test_block_preconditioner_cuts_iterations_and_keeps_the_answer():
    g = gen(6)
    a, blocks, other = block_dominant_system(g)
    b = torch.randn(len(a), generator=g, dtype=F64)
    damping = 1e-3
    exact = torch.linalg.solve(a + damping * torch.eye(len(a), dtype=F64), b)
    m = BlockPreconditioner(blocks, damping, num_other=len(other), other_diagonal=other)
    x_plain, plain = conjugate_gradient(lambda v: a @ v, b, damping=damping, tol=1e-12, max_iter=1000)
    x_pre, pre = conjugate_gradient(lambda v: a @ v, b, damping=damping, tol=1e-12, max_iter=1000, preconditioner=m)
    for x, res in ((x_plain, plain), (x_pre, pre)):
        assert res.converged
        assert torch.linalg.vector_norm(x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)
    assert pre.iterations * 3 <= plain.iterations, (pre.iterations, plain.iterations)


def test_cg_max_iter_reports_the_true_residual():
    g = gen(12)
    a = spd(g, 30, torch.logspace(-2, 1, 30))
    b = torch.randn(30, generator=g, dtype=F64)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e-3, tol=1e-10, max_iter=3)
    true_residual = float(torch.linalg.vector_norm(b - a @ x - 1e-3 * x) / torch.linalg.vector_norm(b))
    assert (res.iterations, res.converged, res.stop_reason) == (3, False, "max_iter")
    assert res.relative_residual == pytest.approx(true_residual, rel=1e-12) and true_residual > 1e-3
    assert res.as_dict() == {"iterations": 3, "relative_residual": res.relative_residual, "converged": False,
                             "negative_curvature": False, "nonfinite": False, "stop_reason": "max_iter"}


def test_cg_never_claims_a_tolerance_below_attainable_accuracy():
    """CG's recursive residual keeps falling past what rounding allows; the true one does not."""
    g = gen(11)
    a = spd(g, 30, torch.logspace(-4, 0, 30))
    b = torch.randn(30, generator=g, dtype=F64)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e-6, tol=1e-15, max_iter=500)
    true_residual = float(torch.linalg.vector_norm(b - a @ x - 1e-6 * x) / torch.linalg.vector_norm(b))
    assert not res.converged and res.stop_reason == "residual_drift" and res.iterations < 500
    assert res.relative_residual > 1e-15 and res.relative_residual == pytest.approx(true_residual, rel=1e-2)


def test_cg_stops_at_negative_curvature_without_stepping_into_it():
    g = gen(13)
    a = spd(g, 20, torch.linspace(-1, 1, 20))  # indefinite, as the joint user-item Hessian of MF
    b = torch.randn(20, generator=g, dtype=F64)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e-3, tol=1e-10, max_iter=200)
    assert res.negative_curvature and res.stop_reason == "negative_curvature" and not res.converged
    assert torch.isfinite(x).all() and math.isfinite(res.relative_residual)
    true_residual = float(torch.linalg.vector_norm(b - a @ x - 1e-3 * x) / torch.linalg.vector_norm(b))
    assert res.relative_residual == pytest.approx(true_residual, rel=1e-12)
    # the very first direction is a negative eigenvector: CG returns the start point untouched
    eigenvalues, vectors = torch.linalg.eigh(a)
    x, res = conjugate_gradient(lambda v: a @ v, vectors[:, 0], damping=1e-3)
    assert eigenvalues[0] < -0.5 and res.negative_curvature and res.iterations == 0
    assert torch.equal(x, torch.zeros(20, dtype=F64)) and res.relative_residual == 1.0


@pytest.mark.parametrize("damping", [0.0, -1e-3, float("nan"), float("inf")])
def test_cg_requires_positive_damping(damping):
    with pytest.raises(ValueError, match="damping must be a finite number > 0.*over-correct"):
        conjugate_gradient(lambda v: v, torch.ones(3), damping=damping)


def test_cg_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        conjugate_gradient(lambda v: v, torch.ones(2, 2), damping=1.0)
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(lambda v: v, torch.ones(3), damping=1.0, x0=torch.ones(2))
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: v, torch.ones(3), damping=1.0, max_iter=-1)


def test_cg_zero_rhs_returns_zero():
    calls = []
    x, res = conjugate_gradient(lambda v: calls.append(1) or v, torch.zeros(4, dtype=F64), damping=0.1,
                                x0=torch.ones(4, dtype=F64))
    assert torch.equal(x, torch.zeros(4, dtype=F64)) and not calls
    assert res == CGResult(iterations=0, relative_residual=0.0, converged=True, stop_reason="zero_rhs")


def test_cg_warm_start_at_the_solution_takes_no_iteration():
    g = gen(14)
    a = spd(g, 10, torch.linspace(1, 3, 10))
    b = torch.randn(10, generator=g, dtype=F64)
    exact = torch.linalg.solve(a + 0.5 * torch.eye(10, dtype=F64), b)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=0.5, tol=1e-10, x0=exact)
    assert res.converged and res.iterations == 0
    torch.testing.assert_close(x, exact)


def test_cg_non_finite_rhs_is_reported_not_raised():
    b = torch.tensor([1.0, float("nan"), 2.0], dtype=F64)
    x, res = conjugate_gradient(lambda v: v, b, damping=1.0)
    assert torch.equal(x, torch.zeros(3, dtype=F64))
    assert res.nonfinite and not res.converged and res.stop_reason == "nonfinite" and math.isnan(res.relative_residual)


def test_cg_non_finite_product_stops_with_the_last_finite_iterate():
    g = gen(15)
    a = spd(g, 12, torch.linspace(1, 100, 12))
    b = torch.randn(12, generator=g, dtype=F64)
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v if len(calls) <= 2 else torch.full_like(v, float("nan"))

    x, res = conjugate_gradient(matvec, b, damping=0.1, tol=1e-12)
    assert res.nonfinite and res.stop_reason == "nonfinite" and not res.converged and res.iterations == 2
    assert torch.isfinite(x).all()
    x2, _ = conjugate_gradient(lambda v: a @ v, b, damping=0.1, tol=1e-12, max_iter=2)
    torch.testing.assert_close(x, x2)  # exactly the iterate CG had before the NaN


def test_cg_indefinite_preconditioner_stops():
    x, res = conjugate_gradient(lambda v: v, torch.ones(3, dtype=F64), damping=1.0, preconditioner=lambda v: -v)
    assert res.stop_reason == "indefinite_preconditioner" and not res.converged and torch.equal(x, torch.zeros(3, dtype=F64))


def test_cg_composes_with_hessian_matvec():
    """An influence-style solve ``(H + lambda I) x = g`` on a convex loss, end to end."""
    g = gen(16)
    params = random_params(g, ((4, 3), (4,)))
    x = torch.randn(6, 3, generator=g, dtype=F64)
    labels = (torch.rand(6, 4, generator=g) > 0.5).to(F64)
    loss = lambda ps: F.binary_cross_entropy_with_logits(x @ ps[0].T + ps[1], labels, reduction="sum")  # noqa: E731
    rhs = torch.randn(16, generator=g, dtype=F64)
    sol, res = conjugate_gradient(hessian_matvec(loss, params), rhs, damping=0.05, tol=1e-12)
    exact = torch.linalg.solve(dense_hessian(loss, params) + 0.05 * torch.eye(16, dtype=F64), rhs)
    assert res.converged
    torch.testing.assert_close(sol, exact, rtol=1e-8, atol=1e-10)


# --- curvature blocks ---------------------------------------------------------------------

def loop_scatter_outer(jac, weights, index, num_blocks):
    out = torch.zeros(num_blocks, jac.shape[-1], jac.shape[-1], dtype=jac.dtype)
    for r in range(len(jac)):
        rows_j = jac[r].reshape(-1, jac.shape[-1])
        for k, w in enumerate(weights[r].reshape(-1)):
            out[index[r]] += w * torch.outer(rows_j[k], rows_j[k])
    return out


@pytest.mark.parametrize("outputs", [None, 3], ids=["one_output", "three_outputs"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_scatter_outer_equals_loop(outputs, chunk_size):
    g = gen(20)
    shape = (40, 4) if outputs is None else (40, outputs, 4)
    jac = torch.randn(*shape, generator=g, dtype=F64)
    weights = torch.rand(*shape[:-1], generator=g, dtype=F64)
    index = torch.randint(0, 6, (40,), generator=g)
    index[index == 3] = 2  # block 3 stays empty
    out = scatter_outer(jac, weights, index, 6, chunk_size=chunk_size)
    torch.testing.assert_close(out, loop_scatter_outer(jac, weights, index, 6), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[3], torch.zeros(4, 4, dtype=F64))


def test_scatter_outer_defaults_downdates_and_validates():
    g = gen(21)
    jac = torch.randn(10, 3, generator=g, dtype=F64)
    index = torch.randint(0, 4, (10,), generator=g)
    blocks = scatter_outer(jac, None, index, 4)
    torch.testing.assert_close(blocks, loop_scatter_outer(jac, torch.ones(10, dtype=F64), index, 4))
    cached = blocks.clone()
    scatter_outer(jac[:4], -torch.ones(4, dtype=F64), index[:4], 4, out=cached)  # downdate: forget rows 0..3
    torch.testing.assert_close(cached, scatter_outer(jac[4:], None, index[4:], 4))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        scatter_outer(jac, None, index + 1, 4)
    with pytest.raises(ValueError, match="weights"):
        scatter_outer(jac, torch.ones(9, dtype=F64), index, 4)


@pytest.mark.parametrize("weighted", [True, False])
def test_solve_low_rank_equals_the_direct_solve_of_the_formed_blocks(weighted):
    """Blocks of 0 to 9 rows of width 6 (below, at and above full rank), some weights 0: Woodbury gives the direct solve."""
    g = gen(22)
    counts = torch.tensor([0, 1, 2, 3, 5, 6, 9, 1])
    index = torch.repeat_interleave(torch.arange(len(counts)), counts)[torch.randperm(int(counts.sum()), generator=g)]
    jac = torch.randn(len(index), 6, generator=g, dtype=F64)
    weights = torch.rand(len(index), generator=g, dtype=F64).masked_fill(torch.arange(len(index)) % 4 == 0, 0.0) if weighted else None
    alpha = torch.rand(len(counts), generator=g, dtype=F64) + 0.05
    rhs = torch.randn(len(counts), 6, generator=g, dtype=F64)
    x, failed = solve_low_rank(jac, weights, index, alpha, rhs)
    blocks = scatter_outer(jac, weights, index, len(counts)) + torch.diag_embed(alpha.unsqueeze(1).expand(-1, 6))
    torch.testing.assert_close(x, torch.linalg.solve(blocks, rhs), rtol=1e-10, atol=1e-12)
    assert not failed.any()
    torch.testing.assert_close(x[0], rhs[0] / alpha[0])  # no rows: alpha I


def test_solve_low_rank_validates_and_flags_what_it_cannot_trust():
    jac, index, rhs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([0, 0, 1]), torch.ones(2, 2, dtype=F64)
    x, failed = solve_low_rank(jac * 1e4, None, index, torch.tensor([1e-20, 1.0], dtype=F64), rhs)  # block 0: two equal rows, alpha ~ 0
    assert failed.tolist() == [True, False] and torch.equal(x[0], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(x[1], torch.linalg.solve(torch.tensor([[1.0, 0.0], [0.0, 1e8 + 1.0]], dtype=F64), rhs[1]))
    with pytest.raises(ValueError, match="weight >= 0"):
        solve_low_rank(jac, torch.tensor([1.0, -1.0, 1.0], dtype=F64), index, torch.ones(2, dtype=F64), rhs)
    with pytest.raises(ValueError, match="alpha > 0"):
        solve_low_rank(jac, None, index, torch.tensor([1.0, 0.0], dtype=F64), rhs)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        solve_low_rank(jac, None, index + 1, torch.ones(2, dtype=F64), rhs)
    with pytest.raises(ValueError, match="rhs"):
        solve_low_rank(jac, None, index, torch.ones(2, dtype=F64), rhs[:, :1])


def random_spd_blocks(g, n=6, d=4):
    return torch.stack([spd(g, d, torch.rand(d, generator=g) + 0.1) for _ in range(n)])


def per_block_solve(blocks, rhs, damping):
    eye = torch.eye(blocks.shape[1], dtype=blocks.dtype)
    return torch.stack([torch.linalg.solve(b + lam * eye, r) for b, r, lam in zip(blocks, rhs, damping)])


@pytest.mark.parametrize("k", [None, 3], ids=["vector_rhs", "k_columns"])
def test_solve_blocks_equals_per_block_solve(k):
    g = gen(22)
    blocks = random_spd_blocks(g)
    rhs = torch.randn(6, 4, generator=g, dtype=F64) if k is None else torch.randn(6, 4, k, generator=g, dtype=F64)
    x, res = solve_blocks(blocks, rhs, damping=0.01)
    torch.testing.assert_close(x, per_block_solve(blocks, rhs, [0.01] * 6), rtol=1e-10, atol=1e-12)
    assert res.as_dict() == {"num_blocks": 6, "damped_blocks": 0, "failed_blocks": 0, "max_damping": 0.01}


def test_solve_blocks_escalates_damping_only_for_non_pd_blocks():
    g = gen(23)
    blocks = random_spd_blocks(g)
    blocks[2] = spd(g, 4, torch.tensor([-0.5, 0.2, 1.0, 2.0]))  # indefinite
    rhs = torch.randn(6, 4, generator=g, dtype=F64)
    x, res = solve_blocks(blocks, rhs, damping=1e-3)
    used = [1e-3] * 6
    used[2] = 1.0  # 1e-3 -> 1e-2 -> 1e-1 -> 1: the first that makes the block positive definite
    torch.testing.assert_close(res.block_damping, torch.tensor(used, dtype=F64))
    torch.testing.assert_close(x, per_block_solve(blocks, rhs, used), rtol=1e-10, atol=1e-12)
    assert (res.damped_blocks, res.failed_blocks, res.max_damping) == (1, 0, pytest.approx(1.0))


def test_solve_blocks_with_zero_damping_rescues_singular_blocks():
    g = gen(24)
    blocks = random_spd_blocks(g)
    u = torch.randn(4, 1, generator=g, dtype=F64)
    blocks[0] = u @ u.T  # rank one: singular
    blocks[1] = 0.0  # a user with no rows
    rhs = torch.randn(6, 4, generator=g, dtype=F64)
    x, res = solve_blocks(blocks, rhs, damping=0.0)
    assert res.damped_blocks == 2 and res.failed_blocks == 0 and torch.isfinite(x).all()
    assert (res.block_damping[:2] > 0).all() and (res.block_damping[2:] == 0).all()
    torch.testing.assert_close(x, per_block_solve(blocks, rhs, res.block_damping.tolist()), rtol=1e-6, atol=1e-6)


def test_solve_blocks_fails_non_finite_and_hopeless_blocks_without_nan():
    g = gen(25)
    blocks = random_spd_blocks(g)
    blocks[3, 1, 2] = float("nan")
    blocks[4] = -1e6 * torch.eye(4, dtype=F64)  # not rescued within 3 tries
    rhs = torch.randn(6, 4, generator=g, dtype=F64)
    rhs[5, 0] = float("inf")
    x, res = solve_blocks(blocks, rhs, damping=1e-3, max_tries=3)
    assert torch.isfinite(x).all() and (x[3:] == 0).all()
    assert res.failed_mask.tolist() == [False, False, False, True, True, True] and res.failed_blocks == 3
    torch.testing.assert_close(x[:3], per_block_solve(blocks[:3], rhs[:3], [1e-3] * 3), rtol=1e-10, atol=1e-12)
    assert res.max_damping == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [(1, 2, 1, float("nan")), (1, 3, 0, float("inf")), (1, 2, 2, float("inf")), (1, 3, 3, float("nan"))])
def test_factor_blocks_fails_a_block_non_finite_in_the_triangle_it_factors(bad):
    """No scan for non-finite entries precedes the factorisation: one in a lower triangle reaches a diagonal factor."""
    g = gen(28)
    blocks = random_spd_blocks(g)
    b, i, j, value = bad
    blocks[b, i, j] = value
    factors, result = factor_blocks(blocks, damping=1e-3)
    assert result.failed_mask.tolist() == [False, True, False, False, False, False]
    assert torch.isfinite(factors).all()
    keep = torch.tensor([0, 2, 3, 4, 5])
    torch.testing.assert_close(factors[keep] @ factors[keep].mT, blocks[keep] + 1e-3 * torch.eye(4, dtype=F64), rtol=1e-10, atol=1e-12)


def test_solve_blocks_per_block_damping_and_validation():
    g = gen(26)
    blocks = random_spd_blocks(g, n=3)
    rhs = torch.randn(3, 4, generator=g, dtype=F64)
    damping = torch.tensor([0.0, 0.1, 2.0], dtype=F64)
    x, _ = solve_blocks(blocks, rhs, damping=damping)
    torch.testing.assert_close(x, per_block_solve(blocks, rhs, damping.tolist()), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        solve_blocks(blocks, rhs, damping=-1.0)
    with pytest.raises(ValueError, match="rhs"):
        solve_blocks(blocks, rhs[:2], damping=0.1)
    with pytest.raises(ValueError, match="growth"):
        solve_blocks(blocks, rhs, damping=0.1, growth=1.0)


def test_block_preconditioner_falls_back_to_scaled_identity_for_failed_blocks():
    g = gen(27)
    blocks = random_spd_blocks(g, n=3)
    blocks[1, 0, 0] = float("nan")
    m = BlockPreconditioner(blocks, 0.5)
    v = torch.randn(12, generator=g, dtype=F64)
    out = m(v)
    torch.testing.assert_close(out[4:8], v[4:8] / 0.5)
    torch.testing.assert_close(out[:4], torch.linalg.solve(blocks[0] + 0.5 * torch.eye(4, dtype=F64), v[:4]))
    assert m.result.failed_blocks == 1


def test_pcg_blocks_from_stale_inverses_equals_a_direct_solve_and_flags_indefinite_blocks():
    torch.manual_seed(0)
    n, d = 50, 6
    a = torch.randn(n, 3 * d, d, dtype=F64)
    old = a.mT @ a + 0.1 * torch.eye(d, dtype=F64)
    new = old - a[:, :2].mT @ a[:, :2]  # lost two of its rank-one terms, as a block after a deletion
    rhs = torch.randn(n, d, dtype=F64)
    x, converged, iterations = pcg_blocks(new, torch.linalg.inv(old), rhs, max_iter=d + 2)
    assert bool(converged.all()) and iterations <= d + 2
    torch.testing.assert_close(x, torch.linalg.solve(new, rhs), rtol=1e-7, atol=1e-10)
    low, converged, _ = pcg_blocks(new, torch.linalg.inv(old).float(), rhs, tol=1e-10, max_iter=d + 4)
    assert bool(converged.all())  # a float32 preconditioner steers; the float64 residual decides
    torch.testing.assert_close(low, torch.linalg.solve(new, rhs), rtol=1e-7, atol=1e-10)
    exact, converged, iterations = pcg_blocks(new, torch.linalg.inv(new), rhs, max_iter=3)
    assert bool(converged.all()) and iterations == 1  # the exact inverse: one step
    indefinite = new.clone()
    indefinite[0] = -torch.eye(d, dtype=F64)
    _, converged, _ = pcg_blocks(indefinite, torch.linalg.inv(old), rhs, max_iter=d + 2)
    assert not converged[0] and bool(converged[1:].all())  # left for a direct solve, the others unharmed
    zero = rhs.clone()
    zero[1] = 0.0
    x, converged, _ = pcg_blocks(new, torch.linalg.inv(old), zero)
    assert converged[1] and bool((x[1] == 0).all())
    with pytest.raises(ValueError, match="max_iter"):
        pcg_blocks(new, old, rhs, max_iter=0)
    with pytest.raises(ValueError, match="shift"):
        pcg_blocks(new, old, rhs, shift=-1.0)
    with pytest.raises(ValueError, match=r"\(n, d, d\)"):
        pcg_blocks(new, old[:1], rhs)


def test_pcg_blocks_shift_solves_the_damped_blocks_without_touching_them():
    torch.manual_seed(1)
    n, d = 20, 5
    a = torch.randn(n, 2 * d, d, dtype=F64)
    blocks = a.mT @ a
    original, eye = blocks.clone(), torch.eye(d, dtype=F64)
    rhs = torch.randn(n, d, dtype=F64)
    x, converged, _ = pcg_blocks(blocks, torch.linalg.inv(blocks + 0.7 * eye), rhs, shift=0.3, tol=1e-12, max_iter=d + 4)
    assert bool(converged.all()) and torch.equal(blocks, original)
    torch.testing.assert_close(x, torch.linalg.solve(blocks + 0.3 * eye, rhs), rtol=1e-8, atol=1e-12)


def test_pcg_blocks_tolerance_is_relative_to_a_small_right_hand_side():
    """Right-hand sides of norm ~1e-4 (a few deleted rows' gradients / n) and a stale diagonal preconditioner: each block
    reported converged has reached the relative residual of the default tol, not an absolute residual of tol."""
    g = gen(29)
    n, d = 50, 16  # blocks large enough that CG stops on its tolerance, before it is exact (after d iterations)
    a = torch.randn(n, d, d, generator=g, dtype=F64)
    old = a @ a.mT + 0.1 * torch.eye(d, dtype=F64)
    u = torch.randn(n, d, 1, generator=g, dtype=F64)
    new = old - 0.5 * (u @ u.mT) / (u.mT @ torch.linalg.solve(old, u))  # a rank-one downdate, still positive definite
    rhs = 1e-4 * torch.randn(n, d, generator=g, dtype=F64)
    stale = torch.diag_embed(1.0 / torch.diagonal(old, dim1=1, dim2=2))  # steers the iteration poorly: several iterations
    x, converged, iterations = pcg_blocks(new, stale, rhs, max_iter=100)
    tol = math.sqrt(torch.finfo(F64).eps)
    assert bool(converged.all()) and iterations > 3
    residual = torch.linalg.vector_norm(rhs - (new @ x.unsqueeze(2)).squeeze(2), dim=1) / torch.linalg.vector_norm(rhs, dim=1)
    assert float(residual.max()) <= 1.01 * tol  # the iteration's own residual reached tol; the true one, up to rounding
    exact = torch.linalg.solve(new, rhs)
    condition = torch.linalg.cond(new)  # relative error <= condition number x relative residual
    error = torch.linalg.vector_norm(x - exact, dim=1) / torch.linalg.vector_norm(exact, dim=1)
    assert bool((error <= condition * 1.01 * tol).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_symmetric_matvec_is_each_matrix_times_its_vector(dtype):
    torch.manual_seed(2)
    a = torch.randn(300, 9, 9, dtype=dtype)
    matrices, vectors = a + a.mT, torch.randn(300, 9, dtype=dtype)
    expected = torch.stack([m @ v for m, v in zip(matrices, vectors)])
    torch.testing.assert_close(symmetric_matvec(matrices, vectors), expected)
    assert symmetric_matvec(matrices[:0], vectors[:0]).shape == (0, 9)


def test_inverse_factored_is_the_inverse_and_leaves_the_thread_count_as_it_was():
    torch.manual_seed(0)
    a = torch.randn(50, 6, 6, dtype=torch.float64)
    blocks = a @ a.mT + 0.5 * torch.eye(6, dtype=torch.float64)
    threads = torch.get_num_threads()
    inverse = inverse_factored(torch.linalg.cholesky(blocks))
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(inverse, torch.linalg.inv(blocks), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("columns", [1, 3])
def test_cholesky_solve_is_torchs_on_one_thread_and_leaves_the_thread_count_as_it_was(columns):
    torch.manual_seed(1)
    a = torch.randn(40, 7, 7, dtype=torch.float64)
    blocks = a @ a.mT + 0.3 * torch.eye(7, dtype=torch.float64)
    factors, rhs = torch.linalg.cholesky(blocks), torch.randn(40, 7, columns, dtype=torch.float64)
    threads = torch.get_num_threads()
    x = cholesky_solve(rhs, factors)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(x, torch.cholesky_solve(rhs, factors), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocks @ x, rhs, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="inside"):
        with one_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads
