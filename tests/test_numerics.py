"""Solver numerics at the edges: extreme damping, ill-conditioned curvature, tiny and huge steps.

The rule every solver and method must keep: a correct result, or a clear error (or a
diagnostic that says the answer is not converged) -- never NaN parameters, never a wrecked
answer presented as a solution. "Correct" is checked against exact answers computed in
float64: the dense damped solve for the linear solvers, and the three IFRU solvers against
each other where their systems coincide.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.linalg import conjugate_gradient, solve_blocks
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning.methods import IFRU, AltEraser, FineTune, UnlearningError

F32, F64 = torch.float32, torch.float64
DAMPINGS = [1e-12, 1e-6, 1.0, 1e6]
STOP_REASONS = {"converged", "zero_rhs", "max_iter", "negative_curvature", "lost_precision", "nonfinite",
                "indefinite_preconditioner", "residual_drift"}


def matrix(eigenvalues, dtype, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues (built in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q @ torch.diag(torch.as_tensor(eigenvalues, dtype=F64)) @ q.T).to(dtype)


SPECTRA = {
    "well": [1.0, 2.0, 3.0, 5.0, 8.0, 10.0],
    "singular": [0.0, 0.0, 1.0, 2.0, 3.0, 4.0],   # positive semi-definite, two null directions
    "ill": [1e-8, 1e-5, 1e-2, 1e2, 1e5, 1e8],      # condition number 1e16
    "indefinite": [-1.0, -0.1, 0.5, 1.0, 2.0, 3.0],  # as the joint user-item Hessian of MF
    "huge": [1e30, 2e30, 5e30, 1e31, 1e32, 1e33],  # products overflow float32
    "tiny": [1e-30, 2e-30, 3e-30, 1e-29, 1e-28, 1e-27],
}


# ----------------------------------------------------------------------------- conjugate gradient


@pytest.mark.parametrize("damping", [0.0, -1e-3, math.nan, math.inf, -math.inf])
def test_cg_refuses_damping_that_is_not_finite_and_positive(damping):
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0, got .*over-correct"):
        conjugate_gradient(lambda v: v, torch.ones(3), damping=damping)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("damping", DAMPINGS)
def test_cg_answer_is_correct_or_flagged_and_never_worse_than_zero(spectrum, damping, dtype):
    eigenvalues = torch.tensor(SPECTRA[spectrum], dtype=F64)
    a = matrix(eigenvalues, dtype)
    b = torch.randn(len(eigenvalues), generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    tol = 1e-6
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=damping, tol=tol, max_iter=60)
    assert torch.isfinite(x).all() and x.dtype == dtype
    assert res.stop_reason in STOP_REASONS
    # The true residual, in float64, of what came back: never worse than returning 0.
    m = matrix(eigenvalues, F64) + damping * torch.eye(len(eigenvalues), dtype=F64)
    x64, b64 = x.double(), b.double()
    true = float(torch.linalg.vector_norm(b64 - m @ x64) / torch.linalg.vector_norm(b64))
    rounding = 50 * len(b) * torch.finfo(dtype).eps * (float(torch.linalg.matrix_norm(m, 2)) * float(x64.norm()) + float(b64.norm())) / float(b64.norm())
    assert true <= 1.0 + rounding
    assert res.relative_residual <= 1.0
    # Negative curvature is reported only where the damped matrix really has it.
    if res.negative_curvature:
        assert float(eigenvalues.min()) + damping < 0
    # A converged answer is the solution: within the condition number times the residual.
    if res.converged:
        assert true <= tol + rounding
        exact = torch.linalg.solve(m, b64)
        shifted = (eigenvalues + damping).abs()
        condition = float(shifted.max() / shifted.min())
        assert float((x64 - exact).norm() / exact.norm()) <= condition * (true + 1e-15) * 1.01


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_cg_with_huge_damping_returns_b_over_damping(dtype):
    a = matrix(SPECTRA["well"], dtype)
    b = torch.arange(1.0, 7.0, dtype=dtype)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e6, tol=1e-6)
    assert res.converged and res.stop_reason == "converged"
    torch.testing.assert_close(x, b / 1e6, rtol=2e-5, atol=0)  # ||A|| / damping = 1e-5


def test_cg_damping_below_float32_precision_says_so_instead_of_stepping_wild():
    """A singular PSD matrix, damping 1e-12, float32: the damped curvature of the null directions
    is below rounding. Before the fix CG reported "negative_curvature" on this positive
    semi-definite matrix and returned an iterate with 3,700 times the residual of x = 0."""
    a = matrix(SPECTRA["singular"], F32)
    b = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=F64).to(F32)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e-12, tol=1e-6, max_iter=60)
    assert res.stop_reason == "lost_precision" and not res.negative_curvature and not res.converged
    assert res.relative_residual <= 1.0 and torch.isfinite(x).all()
    # The same system in float64 is solved: its null-direction components are divided by 1e-12.
    x64, res64 = conjugate_gradient(lambda v: a.double() @ v, b.double(), damping=1e-12, tol=1e-6, max_iter=60)
    exact = torch.linalg.solve(a.double() + 1e-12 * torch.eye(6, dtype=F64), b.double())
    assert res64.relative_residual < 1e-3 and float((x64 - exact).norm() / exact.norm()) < 1e-3


@pytest.mark.parametrize("max_iter", [5, 50, 60])
def test_cg_that_goes_astray_returns_its_best_iterate_or_the_start(max_iter):
    """Condition 1e16 in float64 with 1e-12 damping: rounding drives the recursive residual away
    from the true one. Before the fix CG returned an iterate with 300 times the residual of 0."""
    a = matrix(SPECTRA["ill"], F64)
    b = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=F64)
    x, res = conjugate_gradient(lambda v: a @ v, b, damping=1e-12, tol=1e-10, max_iter=max_iter)
    assert not res.converged and res.relative_residual <= 1.0
    true = float(torch.linalg.vector_norm(b - a @ x - 1e-12 * x) / torch.linalg.vector_norm(b))
    assert res.relative_residual == pytest.approx(true, rel=1e-6)


# ----------------------------------------------------------------------------- block solves

BLOCK_KINDS = {
    "spd": [1.0, 2.0, 3.0, 4.0],
    "singular": [0.0, 0.0, 1.0, 2.0],
    "ill": [1e-9, 1e-3, 1.0, 1e9],
    "indefinite": [-1.0, 1.0, 2.0, 3.0],
    "zero": [0.0, 0.0, 0.0, 0.0],
    "large": [1e20, 2e20, 3e20, 4e20],
}


def blocks_and_rhs(dtype):
    blocks = torch.stack([matrix(v, dtype, seed=i) for i, v in enumerate(BLOCK_KINDS.values())])
    rhs = torch.randn(len(BLOCK_KINDS), 4, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype)
    return blocks, rhs


@pytest.mark.parametrize("damping", [-1.0, math.nan, math.inf, torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0, 1.0])])
def test_solve_blocks_refuses_bad_damping(damping):
    blocks, rhs = blocks_and_rhs(F64)
    with pytest.raises(ValueError, match="damping must be a finite number or"):
        solve_blocks(blocks, rhs, damping=damping)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("damping", [0.0, 1e-12, 1e6])
def test_solve_blocks_is_finite_backward_stable_and_reports_failures(damping, dtype):
    blocks, rhs = blocks_and_rhs(dtype)
    x, res = solve_blocks(blocks, rhs, damping=damping)
    assert torch.isfinite(x).all() and x.shape == rhs.shape
    assert res.failed_blocks == int(res.failed_mask.sum()) and res.num_blocks == len(BLOCK_KINDS)
    eps = torch.finfo(dtype).eps
    for i, kind in enumerate(BLOCK_KINDS):
        if res.failed_mask[i]:
            assert torch.equal(x[i], torch.zeros(4, dtype=dtype)), kind
            continue
        lam = float(res.block_damping[i])
        assert lam >= damping * (1 - 1e-6)  # damping as the block's dtype holds it
        m = blocks[i].double() + lam * torch.eye(4, dtype=F64)
        residual = float((m @ x[i].double() - rhs[i].double()).norm())
        bound = 100 * 4 * eps * (float(torch.linalg.matrix_norm(m, 2)) * float(x[i].double().norm()) + float(rhs[i].double().norm()))
        assert residual <= bound, (kind, residual, bound)  # the exact solution of a nearby system
    # The indefinite block is never "solved" with less damping than its negative eigenvalue needs.
    indefinite = list(BLOCK_KINDS).index("indefinite")
    assert res.failed_mask[indefinite] or float(res.block_damping[indefinite]) > 1.0


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_solve_blocks_with_huge_damping_returns_rhs_over_damping(dtype):
    blocks, rhs = blocks_and_rhs(dtype)
    keep = [i for i, k in enumerate(BLOCK_KINDS) if k not in ("large", "ill")]  # ||B|| <= 4 for the others
    x, res = solve_blocks(blocks[keep], rhs[keep], damping=1e6)
    assert res.failed_blocks == 0 and res.damped_blocks == 0
    torch.testing.assert_close(x, rhs[keep] / 1e6, rtol=1e-5, atol=0)


def test_a_block_reported_as_solved_solves_its_damped_system():
    """A float32 singular block with 1e-12 damping is 'solved' with a residual of about 100% of
    the right-hand side: the factorisation succeeds, the solve is inaccurate."""
    dtype = F32
    blocks, rhs = blocks_and_rhs(dtype)
    x, res = solve_blocks(blocks, rhs, damping=1e-12)
    limit = math.sqrt(torch.finfo(dtype).eps)
    for i in torch.nonzero(~res.failed_mask).flatten().tolist():
        m = blocks[i].double() + float(res.block_damping[i]) * torch.eye(4, dtype=F64)
        assert float((m @ x[i].double() - rhs[i].double()).norm()) <= limit * float(rhs[i].double().norm()), list(BLOCK_KINDS)[i]


# ----------------------------------------------------------------------------- IFRU


def unlearning_problem(l2: float, dim: int, dtype=F64, seed: int = 0):
    """A small MF with frozen items (so user blocks are its exact curvature), one row of each of
    three users deleted (no user loses all its rows)."""
    torch.manual_seed(seed)
    dm = RecDataModule(Synthetic(num_users=10, num_items=20, density=0.3, seed=2), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=dim, l2=l2, init_std=0.5).to(dtype)
    model.item_embedding.weight.requires_grad_(False)
    first_rows = dm.train.by_user.rows[dm.train.by_user.indptr[:3]]
    deleted = dm.remove(first_rows)
    return model, dm.train_rows(), deleted


def run(method, model, retained, deleted):
    model = copy.deepcopy(model)
    report = method.unlearn(model, retained, deleted)
    return model, report


@pytest.mark.parametrize("damping", [0.0, -1e-7, math.nan, math.inf])
def test_ifru_refuses_damping_that_is_not_positive(damping):
    with pytest.raises(ValueError, match=r"IFRU\(damping=...\) must be a finite number > 0"):
        IFRU(damping=damping)


SOLVERS = [{"solver": "block"}, {"solver": "cg", "tol": 1e-12, "max_iter": 200}, {"solver": "direct"}]


@pytest.mark.parametrize("damping", [1e-12, 1e-7, 1e6])
def test_ifru_solvers_agree_at_extreme_damping_on_a_well_posed_problem(damping):
    """Strong L2 makes every user block positive definite: all three solvers solve the same system."""
    model, retained, deleted = unlearning_problem(l2=1.0, dim=3)
    results = [run(IFRU(damping=damping, **options), model, retained, deleted) for options in SOLVERS]
    steps = [m.user_embedding.weight - model.user_embedding.weight for m, _ in results]
    for (m, report), step in zip(results, steps):
        assert torch.isfinite(m.user_embedding.weight).all()
        assert torch.equal(m.item_embedding.weight, model.item_embedding.weight)  # frozen
        torch.testing.assert_close(step, steps[2], rtol=1e-7, atol=1e-14)  # the direct dense solve
    assert results[0][1].diagnostics["solver/failed_blocks"] == 0
    assert results[1][1].diagnostics["solver/converged"] is True
    if damping == 1e6:  # the step is the influence gradient over the damping
        probe = copy.deepcopy(model)
        probe.user_embedding.weight.requires_grad_(True)
        gradient = torch.autograd.grad(probe.loss(deleted[:], "sum") / len(retained), probe.user_embedding.weight)[0]
        torch.testing.assert_close(steps[2], gradient / damping, rtol=1e-5, atol=1e-20)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", SOLVERS + [{"solver": "cg", "curvature": "hessian", "max_iter": 200},
                                               {"solver": "direct", "curvature": "hessian"}],
                         ids=["block", "cg", "direct", "cg-hessian", "direct-hessian"])
def test_ifru_on_singular_curvature_is_finite_and_honest(options, dtype):
    """No L2 and more dimensions than a user's rows: the user blocks are singular, damping 1e-12.
    Every solver gives finite parameters (or a clear error with the model restored), and an
    iterative solve that did not converge says so."""
    model, retained, deleted = unlearning_problem(l2=0.0, dim=8, dtype=dtype)
    before = copy.deepcopy(model.state_dict())
    target = copy.deepcopy(model)
    try:
        report = IFRU(damping=1e-12, **options).unlearn(target, retained, deleted)
    except UnlearningError as err:
        assert "restored" in str(err) and "Try: more damping" in str(err)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
        return
    assert all(torch.isfinite(p).all() for p in target.parameters())
    diagnostics = report.diagnostics
    if options["solver"] == "cg":
        true_residual_small = diagnostics["solver/relative_residual"] <= options.get("tol", 1e-6)
        assert diagnostics["solver/converged"] == true_residual_small
        assert diagnostics["solver/stop_reason"] in STOP_REASONS
    if options["solver"] == "block":
        assert diagnostics["solver/failed_blocks"] == 0


def test_ifru_with_a_nan_gradient_fails_clearly_and_restores_the_model():
    model, retained, deleted = unlearning_problem(l2=1.0, dim=3, dtype=F32)
    with torch.no_grad():
        model.item_embedding.weight[int(deleted.items[0]), 0] = math.nan  # e.g. a corrupted checkpoint
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnlearningError, match="failed and the model was restored: the right-hand side .* is not finite"):
        IFRU(damping=1e-7).unlearn(model, retained, deleted)
    for k, v in before.items():  # bit for bit, NaN where it was
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- AltEraser


@pytest.mark.parametrize("damping", [0.0, -1e-7, math.nan, math.inf])
def test_alteraser_refuses_damping_that_is_not_finite_and_positive(damping):
    with pytest.raises(ValueError, match=r"AltEraser\(damping=...\) must be a finite number > 0"):
        AltEraser(damping=damping)


def retained_objective(model, rows) -> float:
    with torch.no_grad():
        return float(model.loss(rows[:], "sum") / len(rows) + model.dense_penalty())


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("blocks", ["cached", "fresh"])
@pytest.mark.parametrize(("l2", "dim"), [(1.0, 3), (0.0, 8)], ids=["regularised", "singular"])
@pytest.mark.parametrize("damping", [1e-12, 1e6])
def test_alteraser_at_extreme_damping_never_raises_the_objective_or_makes_nan(damping, l2, dim, blocks, dtype):
    """Singular blocks (no L2, more dimensions than a user's rows) get more damping or a rejected
    step; the retained objective never goes up and every parameter stays finite."""
    model, retained, deleted = unlearning_problem(l2=l2, dim=dim, dtype=dtype)
    model.item_embedding.weight.requires_grad_(True)
    tuned, report = run(AltEraser(objective="retained", rounds=2, damping=damping, blocks=blocks), model, retained, deleted)
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
    before, after = retained_objective(model, retained), retained_objective(tuned, retained)
    assert after <= before + 10 * torch.finfo(dtype).eps * abs(before)
    change = max(float((tuned.state_dict()[k] - v).abs().max()) for k, v in model.state_dict().items())
    if damping == 1e6:  # the step is the gradient over the damping: almost nothing moves
        assert change < 1e-5
    else:
        assert after < before and change > 0
    assert report.diagnostics["rejected_blocks"] >= 0 and report.diagnostics["damped_blocks"] >= 0


def test_alteraser_with_a_nan_parameter_fails_clearly_and_restores_the_model():
    model, retained, deleted = unlearning_problem(l2=1.0, dim=3, dtype=F32)
    model.item_embedding.weight.requires_grad_(True)
    with torch.no_grad():
        model.item_embedding.weight[int(deleted.items[0]), 0] = math.nan
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnlearningError, match=r"AltEraser\(rounds=1\) failed and the model was restored: .*Try: more damping"):
        AltEraser().unlearn(model, retained, deleted)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- FineTune


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": -1e-3}, {"lr": math.nan}, {"lr": math.inf}, {"lr": True},
                                    {"epochs": 0}, {"epochs": 1.5}, {"batch_size": 0}, {"batch_size": 2.0}])
def test_finetune_refuses_bad_numbers(kwargs):
    with pytest.raises(ValueError, match="FineTune needs integers epochs >= 1 and batch_size >= 1 and a finite lr > 0; got"):
        FineTune(**kwargs)


def finetune_problem():
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=16, density=0.3, seed=2), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    deleted = dm.remove(torch.tensor([0, 1, 2]))
    return model, dm.train_rows(), deleted


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_finetune_with_a_tiny_learning_rate_changes_almost_nothing(optimizer):
    model, retained, deleted = finetune_problem()
    tuned, report = run(FineTune(epochs=2, lr=1e-30, optimizer=optimizer, batch_size=8), model, retained, deleted)
    for name, value in model.state_dict().items():
        assert torch.allclose(tuned.state_dict()[name], value, rtol=0, atol=1e-20), name
    losses = report.diagnostics["loss_per_epoch"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize(("lr", "match"), [
    (1e3, "fine-tuning diverged: the retained loss rose from .* \\(first batch\\) to .* with lr=1000.0"),
    (1e10, "(the retained loss became (nan|inf)|fine-tuning diverged).* with lr=10000000000.0"),
    (1e30, "the retained loss became (nan|inf) in epoch 0 with lr=1e\\+30"),
    (1e300, "lr=1e\\+300 does not fit the model's torch.float32"),
])
def test_finetune_with_a_huge_learning_rate_fails_clearly_and_restores_the_model(optimizer, lr, match):
    model, retained, deleted = finetune_problem()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnlearningError, match=f"FineTune\\(epochs=2\\) failed and the model was restored: {match}"):
        FineTune(epochs=2, lr=lr, optimizer=optimizer, batch_size=8).unlearn(model, retained, deleted)
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name


# ----------------------------------------------------------------------------- the parameters' fingerprint
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fingerprint_sees_one_entry_changed_entries_swapped_and_tables_negated_or_scaled(dtype):
    """Caches key on it: a change of one bit of one entry, two entries swapped in a row or a column, a table (or some
    of its rows, or a block) negated or doubled must show; the thread count must not."""
    from lightning_unlearn.models.functional import fingerprint

    g = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(37, 6, generator=g).to(dtype))
    model = torch.nn.ParameterList([table, torch.nn.Parameter(torch.randn(3, generator=g).to(dtype))])
    before = fingerprint(model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(before, fingerprint(model)) and before.shape == (2, 4)
    finally:
        torch.set_num_threads(threads)
    bits = table.data.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[table.element_size()])
    for row, column in ((0, 0), (36, 5), (17, 3)):
        # the sign bit, and the lowest bit of a narrower float (float64 sums do not resolve a float64's last bit)
        for flip in (1 << (8 * table.element_size() - 1), *([1] if table.element_size() < 8 else [])):
            bits[row, column] ^= flip
            assert not torch.equal(before, fingerprint(model)), (row, column, flip)
            bits[row, column] ^= flip
            assert torch.equal(before, fingerprint(model))
    for a, b in (((2, 1), (2, 4)), ((5, 0), (30, 0)), ((1, 1), (9, 2))):  # in a row, in a column, neither
        with torch.no_grad():
            table[a], table[b] = table[b].clone(), table[a].clone()
        assert not torch.equal(before, fingerprint(model)), (a, b)
        with torch.no_grad():
            table[a], table[b] = table[b].clone(), table[a].clone()
    def negate_rows(x):
        x[[3, 20]] = -x[[3, 20]]

    def negate_block(x):
        x[4:6, 1:3] = -x[4:6, 1:3]

    for change in (torch.Tensor.neg_, negate_rows, negate_block, lambda x: x.mul_(2)):
        saved = table.data.clone()
        change(table.data)
        assert not torch.equal(before, fingerprint(model)), change
        table.data.copy_(saved)
    from lightning_unlearn.models.functional import _checksum  # read a few rows at a time, as a large table is

    pieces = _checksum(table.data, piece_elements=12)
    with torch.no_grad():
        table[[0, 35]] = table[[35, 0]]  # rows in different pieces swapped
    assert not torch.equal(pieces, _checksum(table.data, piece_elements=12))
    with torch.no_grad():
        table[[0, 35]] = table[[35, 0]]
    assert torch.equal(pieces, _checksum(table.data, piece_elements=12))
    view = torch.randn(8, 10, generator=g)[:, ::2]  # not contiguous, and an empty tensor: read in place
    assert fingerprint(torch.nn.Linear(1, 1), view, torch.zeros(0, 3)).shape == (4, 4)
