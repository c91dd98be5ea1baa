"""IFRU against exact answers: the retrained optimum of a tiny convex problem, and the solvers against each other."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.linalg import factor_blocks
from lightning_unlearn.models import MF, LightGCN, NeuMF
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.methods import IFRU, SCIF, AltEraser, FineTune, UnlearningContext, UnlearningError
from lightning_unlearn.unlearning.methods import curvature as curvature_module
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache, FreshCurvature, cache_bytes, curvature_blocks
from lightning_unlearn.unlearning.methods.restricted import RestrictedParameters
from lightning_unlearn.unlearning.methods.scope import Scope, graph_of, occurrences, reset_to_initialisation, touched


def optimise(model, rows, tables) -> float:
    """Minimise ``model.loss(rows)`` over ``tables`` (full batch, L-BFGS) to a tight optimum; the final gradient norm."""
    opt = torch.optim.LBFGS(tables, lr=1, max_iter=1000, tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = model.loss(rows[:])
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(model.loss(rows[:]), tables)]).norm())


@pytest.fixture(scope="module")
def convex():
    """MF with the item side fixed and strong L2: each user's problem is strictly convex."""
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=8, num_items=20, density=0.5, seed=2), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=1.0, init_std=0.5).double()
    model.item_embedding.weight.requires_grad_(False)
    assert optimise(model, dm.train_rows(), [model.user_embedding.weight]) < 1e-8
    first_rows = dm.train.by_user.rows[dm.train.by_user.indptr[:3]]  # one row of each of users 0, 1, 2
    deleted = dm.remove(first_rows)
    retained = dm.train_rows()
    reference = copy.deepcopy(model)
    assert optimise(reference, retained, [reference.user_embedding.weight]) < 1e-8
    return model, retained, deleted, reference


def relative_error(model, reference) -> float:
    diff = model.user_embedding.weight - reference.user_embedding.weight
    return (diff.norm() / reference.user_embedding.weight.norm()).item()


@pytest.mark.parametrize(
    "options",
    [
        {"solver": "direct", "curvature": "hessian"},
        {"solver": "direct", "curvature": "gauss_newton"},
        {"solver": "cg", "curvature": "gauss_newton", "tol": 1e-12},
        {"solver": "cg", "curvature": "hessian", "tol": 1e-12},
        {"solver": "direct", "gradient": "retained"},
    ],
    ids=["direct-hessian", "direct-gn", "cg-gn", "cg-hessian", "retained"],
)
def test_lands_on_the_retrained_optimum(convex, options):
    model, retained, deleted, reference = convex
    unlearned = copy.deepcopy(model)
    report = IFRU(damping=1e-10, **options).unlearn(unlearned, retained, deleted)
    assert relative_error(model, reference) > 0.05  # deleting changed the optimum a lot ...
    assert relative_error(unlearned, reference) < 1e-3  # ... and one Newton correction lands on it
    assert report.diagnostics["kept_users"] == 3 and report.diagnostics["solver/converged"]
    untouched = torch.arange(3, 8)
    assert torch.equal(unlearned.user_embedding.weight[untouched], model.user_embedding.weight[untouched])


def test_retained_gradient_step_on_neumf_is_the_newton_step_of_the_objective_with_its_dense_penalty():
    """gradient="retained" with the dense weights: -(H + damping I)^-1 g, g and H the gradient and Hessian from torch.func
    of the mean retained loss plus the dense weights' own penalty (dense_l2 > 0), both terms in the gradient and in H."""
    from lightning_unlearn.models.functional import call_with

    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.6, seed=2), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=2, mlp_dim=2, mlp_layers=(4,), l2=0.2, dense_l2=0.05, init_std=0.5).double()
    rows, params = dm.train_rows(), list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=1000, tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = model.loss(rows[:]) + model.dense_penalty()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    deleted = dm.remove(torch.tensor([0, 5]))
    retained = dm.train_rows()
    names, shapes = [name for name, _ in model.named_parameters()], [p.shape for p in params]
    theta = torch.cat([p.detach().flatten() for p in params])

    def at(flat, function):  # function() with the model's parameters taken from the flat vector
        return call_with(model, {name: t.view(shape) for name, t, shape in zip(names, flat.split([s.numel() for s in shapes]), shapes)},
                         function)

    def objective(flat):
        return at(flat, lambda: model.loss(retained[:], "sum") / len(retained) + model.dense_penalty())

    damping = 1e-4
    gradient, hessian = torch.func.grad(objective)(theta), torch.func.hessian(objective)(theta)
    expected = torch.linalg.solve(hessian + damping * torch.eye(len(theta), dtype=theta.dtype), -gradient)
    unlearned = copy.deepcopy(model)
    report = IFRU(damping=damping, solver="direct", curvature="hessian", gradient="retained", k_hop=2).unlearn(unlearned, retained, deleted)
    assert report.diagnostics["coordinates"] == len(theta)  # two hops reach every user and item: the step is on every weight
    step = torch.cat([p.detach().flatten() for p in unlearned.parameters()]) - theta
    torch.testing.assert_close(step, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))  # rounding of two direct solves
    penalty = torch.func.grad(lambda flat: at(flat, model.dense_penalty))(theta)
    assert float(penalty.norm()) > float(gradient.norm())  # the dense weights' penalty is a large part of the gradient ...
    assert float(torch.func.grad(objective)(theta + step).norm()) < 0.2 * float(gradient.norm())  # ... which a Newton step cuts


def test_cg_reports_non_convergence(convex):
    model, retained, deleted, _ = convex
    coupled = copy.deepcopy(model)
    coupled.item_embedding.weight.requires_grad_(True)  # user-item coupling: the block preconditioner is not exact
    report = IFRU(damping=1e-10, solver="cg", tol=1e-14, max_iter=1).unlearn(coupled, retained, deleted)
    assert report.diagnostics["solver/iterations"] == 1 and not report.diagnostics["solver/converged"]
    assert report.diagnostics["solver/relative_residual"] > 1e-14


def test_nan_gradient_raises_and_leaves_the_model_unchanged(convex, monkeypatch):
    from lightning_unlearn.unlearning.methods import subproblems

    model, retained, deleted, _ = convex
    broken = copy.deepcopy(model)
    # every data term is NaN, in the model's loss and on the dot-product path alike: so is every gradient
    loss, data_loss = broken.loss, subproblems.data_loss
    broken.loss = lambda batch, reduction="mean": loss(batch, reduction) * float("nan")
    monkeypatch.setattr(subproblems, "data_loss", lambda z, name: data_loss(z, name) * float("nan"))
    before = broken.user_embedding.weight.clone()
    with pytest.raises(UnlearningError, match="not finite.*Try: more damping"):
        IFRU().unlearn(broken, retained, deleted)
    assert torch.equal(broken.user_embedding.weight, before)


@pytest.mark.parametrize("method", [IFRU(), SCIF(), AltEraser(), FineTune(epochs=1, lr=0.1)], ids=lambda m: type(m).__name__)
def test_users_left_without_rows_are_reset_to_their_initialisation(method):
    """A deleted user's row holds what it learned: every method resets it (FineTune's steps never reach it)."""
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=10, num_items=12, density=0.3, seed=1), val_fraction=0.0)
    dm.setup()
    torch.manual_seed(5)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    init = model.user_embedding.weight[4].clone()
    with torch.no_grad():
        model.user_embedding.weight.add_(1.0)  # "training" moved every user
    deleted = dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([4]))
    report = method.unlearn(model, dm.train_rows(), deleted, UnlearningContext(seed=5))
    assert report.diagnostics["reset_users"] == 1
    torch.testing.assert_close(model.user_embedding.weight[4], init)


def test_finetune_trains_on_the_retained_rows_only(convex):
    """One full-batch SGD epoch is one gradient step on the retained rows' loss; from the optimum of every row, a FineTune
    that also trained on the deleted rows would take (almost) no step and keep what they taught."""
    model, retained, deleted, _ = convex
    lr, everything = 0.5, retained.concat(deleted)
    tuned = copy.deepcopy(model)
    report = FineTune(epochs=1, lr=lr, optimizer="sgd", batch_size=len(everything)).unlearn(tuned, retained, deleted)
    assert report.diagnostics["steps"] == 1 and report.diagnostics["reset_users"] == 0
    users = model.user_embedding.weight
    step = -lr * torch.autograd.grad(model.loss(retained[:]) + model.dense_penalty(), users)[0]
    assert float(step.norm()) > 1e-2  # a real step: the deleted rows held the trained users where they were ...
    assert float(torch.autograd.grad(model.loss(everything[:]), users)[0].norm()) < 1e-7  # ... at the optimum of every row
    torch.testing.assert_close(tuned.user_embedding.weight - users, step, rtol=1e-9, atol=1e-12)
    assert torch.equal(tuned.item_embedding.weight, model.item_embedding.weight)  # frozen


def test_a_reset_draws_the_initialisation_of_its_own_seed_and_model():
    """The kept fresh model serves only the same class, hyper-parameters and seed."""
    import pytorch_lightning as pl

    none = torch.zeros(0, dtype=torch.long)
    for dim, seed in ((3, 1), (3, 2), (3, 1), (4, 1)):
        model = MF(6, 5, embedding_dim=dim)
        reset_to_initialisation(model, torch.tensor([2]), torch.tensor([0, 4]), seed)
        pl.seed_everything(seed, verbose=False)
        expected = MF(6, 5, embedding_dim=dim)
        assert torch.equal(model.user_embedding.weight[2], expected.user_embedding.weight[2])
        assert torch.equal(model.item_embedding.weight[[0, 4]], expected.item_embedding.weight[[0, 4]])
        reset_to_initialisation(model, none, none, seed + 10)  # nothing to reset: nothing drawn, nothing changed
        assert torch.equal(model.user_embedding.weight[2], expected.user_embedding.weight[2])


def test_prepare_draws_the_initialisation_so_a_request_with_orphans_draws_none(monkeypatch):
    """The fresh model the orphans are reset to is drawn by prepare (precomputation), with every RNG left as it was."""
    import random

    import numpy as np

    from lightning_unlearn.unlearning.methods import scope

    dm = RecDataModule(Synthetic(num_users=10, num_items=8, density=0.4, seed=3), val_fraction=0.0)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, init_std=0.3)
    deleted = dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([4]))
    retained = dm.train_rows()
    scope._INITIAL.clear()
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    method, context = IFRU(), UnlearningContext(seed=7)
    method.prepare(model, retained.concat(deleted), context)
    assert torch.equal(torch.random.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    drawn = []
    monkeypatch.setattr(MF, "fresh", lambda self: drawn.append(self) or Recommender.fresh(self))
    report = method.unlearn(model, retained, deleted, context)
    assert report.diagnostics["reset_users"] == 1 and drawn == []
    torch.manual_seed(7)
    torch.testing.assert_close(model.user_embedding.weight[4], MF(dm.num_users, dm.num_items, embedding_dim=3, init_std=0.3).user_embedding.weight[4])


@pytest.mark.parametrize("cls", [MF, NeuMF, LightGCN])
def test_runs_on_every_model_and_moves_only_kept_rows(cls):
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=20, num_items=15, density=0.3, seed=1), val_fraction=0.0)
    dm.setup()
    kwargs = {"gmf_dim": 4, "mlp_dim": 4, "mlp_layers": (8,)} if cls is NeuMF else {"embedding_dim": 4}
    model = cls(dm.num_users, dm.num_items, **kwargs)
    deleted = dm.remove(torch.tensor([0, 1]))
    model.set_graph(dm.train)
    before = copy.deepcopy(model.state_dict())
    report = IFRU(damping=1e-2, k_hop=1 if cls is MF else 0).unlearn(model, dm.train_rows(), deleted)
    assert report.diagnostics["solver"] == "block"  # "auto"; on LightGCN: PCG through the propagation
    moved = (model.user_embedding.weight if cls is not NeuMF else model.gmf_user.weight) != (
        before["user_embedding.weight"] if cls is not NeuMF else before["gmf_user.weight"])
    moved_users = torch.nonzero(moved.any(1)).flatten()
    assert 0 < len(moved_users) <= report.diagnostics["kept_users"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"damping": 0.0}, "damping"), ({"solver": "lbfgs"}, "solver"), ({"curvature": "fisher"}, "curvature"),
     ({"gradient": "all"}, "gradient"), ({"k_hop": -1}, "k_hop"), ({"keep_fraction": 0.0}, "keep_fraction")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IFRU(**kwargs)


def test_block_solver_is_exact_when_the_curvature_is_block_diagonal(convex):
    """Items fixed: the user blocks are the whole (Gauss-Newton = exact) curvature."""
    model, retained, deleted, reference = convex
    unlearned = copy.deepcopy(model)
    method = IFRU(damping=1e-10, solver="block")
    report = method.unlearn(unlearned, retained, deleted)
    assert relative_error(unlearned, reference) < 1e-3
    assert report.precompute_seconds > 0 and report.diagnostics["solver/failed_blocks"] == 0


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_curvature_blocks_equal_the_hessian_blocks_of_mf(loss):
    """For MF a score is linear in the user vector (items fixed) and vice versa, so the
    Gauss-Newton blocks are the exact Hessian's diagonal blocks."""
    from lightning_unlearn.unlearning.methods.curvature import curvature_blocks

    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=5, num_items=6, density=0.4, seed=3), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.3, loss=loss, init_std=0.7).double()
    rows = dm.train_rows()
    blocks = curvature_blocks(model, rows)

    def objective(users, items):
        return _loss_with(model, users, items, rows)

    h_uu, h_ii = (torch.func.hessian(objective, argnums=a)(model.user_embedding.weight, model.item_embedding.weight) for a in (0, 1))
    for u in range(dm.num_users):
        torch.testing.assert_close(blocks.users[u], h_uu[u, :, u, :])
    for i in range(dm.num_items):
        torch.testing.assert_close(blocks.items[i], h_ii[i, :, i, :])


def _loss_with(model, users, items, rows):
    from lightning_unlearn.models.functional import call_with

    return call_with(model, {"user_embedding.weight": users, "item_embedding.weight": items}, lambda: model.loss(rows[:], "sum"))


def test_cg_preconditioner_and_block_solver_agree_with_direct_on_mf():
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.4, seed=4), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.5, init_std=0.5).double()
    deleted = dm.remove(torch.tensor([0, 7]))
    retained = dm.train_rows()
    steps = {}
    for solver in ("direct", "cg"):
        copy_ = copy.deepcopy(model)
        IFRU(damping=1e-6, solver=solver, tol=1e-12, max_iter=500).unlearn(copy_, retained, deleted)
        steps[solver] = torch.cat([copy_.user_embedding.weight - model.user_embedding.weight,
                                   copy_.item_embedding.weight - model.item_embedding.weight])
    torch.testing.assert_close(steps["cg"], steps["direct"], rtol=1e-6, atol=1e-9)
    block = copy.deepcopy(model)
    IFRU(damping=1e-6, solver="block").unlearn(block, retained, deleted)
    block_step = torch.cat([block.user_embedding.weight - model.user_embedding.weight, block.item_embedding.weight - model.item_embedding.weight])
    # The block-diagonal approximation drops the user-item coupling: close to, not equal to, the full solve.
    cosine = torch.nn.functional.cosine_similarity(block_step.reshape(-1), steps["direct"].reshape(-1), dim=0)
    assert 0.5 < cosine < 1.0 - 1e-6


# ---------------------------------------------------------------------- LightGCN: the solve through the propagation
@pytest.fixture(scope="module")
def graph_problem():
    """A two-layer LightGCN trained to a tight optimum, 3 interactions deleted, and the retrained optimum.

    The objective is not convex (any rotation of both tables gives the same scores), so the
    retrain starts from the original: it finds the optimum of the retained rows in the
    original's basin, the one an influence correction aims at.
    """
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.35, seed=3), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = LightGCN(dm.num_users, dm.num_items, embedding_dim=3, num_layers=2, l2=0.3, init_std=0.5).double()
    model.set_graph(dm.train)
    assert optimise(model, dm.train_rows(), list(model.parameters())) < 1e-8
    every, rows = dm.train_rows(), torch.tensor([0, 7, 15])
    tables = {"deleted": dm.train.select(rows)}
    deleted = dm.remove(rows)
    tables.update(retained=dm.train, test=dm.test)
    retained = dm.train_rows()
    reference = copy.deepcopy(model)
    reference.set_graph(dm.train)
    assert optimise(reference, retained, list(reference.parameters())) < 1e-8
    model.set_graph(dm.train)  # as the callback leaves it: the data (and the graph) without the deleted rows
    return model, every, retained, deleted, reference, tables


def test_graph_solve_equals_the_direct_solve_of_the_same_damped_system(graph_problem):
    from lightning_unlearn.unlearning.methods import ifru

    model, _, retained, deleted, _, _ = graph_problem
    damping, n = 1e-3, len(retained)
    unlearned = copy.deepcopy(model)
    report = IFRU(damping=damping, tol=1e-12, max_iter=500).unlearn(unlearned, retained, deleted)
    assert report.diagnostics["solver"] == "block" and report.diagnostics["solver/converged"]
    assert report.diagnostics["solver/relative_residual"] <= 1e-12

    scope = Scope.of(model, retained, deleted)
    restricted = RestrictedParameters(model, scope)
    rhs = ifru._influence_with_spillover(model, restricted, retained, deleted, n, UnlearningContext())
    matvec = restricted.curvature_matvec(scope.rows(retained, model), n, UnlearningContext())
    matrix = torch.stack([matvec(column) for column in torch.eye(restricted.numel, dtype=torch.float64)], dim=1)
    expected = torch.linalg.solve(matrix + damping * torch.eye(restricted.numel, dtype=torch.float64), rhs)
    got = RestrictedParameters(unlearned, scope).values()
    got = torch.cat([(a - b).flatten() for a, b in zip(got, restricted.values())])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert float(expected.norm()) > 1e-3  # a real step


@pytest.mark.parametrize("path", ["one matmul per chunk", "gathered pairs"])
@pytest.mark.parametrize("cls", [MF, LightGCN])
def test_dot_product_curvature_and_gradient_equal_autograd_through_every_row(cls, path, monkeypatch):
    """The matrix-product curvature products (Gauss-Newton and Hessian) and gradient of MF and LightGCN against
    generic autograd, chunked."""
    from lightning_unlearn.unlearning.methods import restricted as module
    from lightning_unlearn.unlearning.methods import subproblems

    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.35, seed=3), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = cls(dm.num_users, dm.num_items, embedding_dim=3, l2=0.3, loss="bce" if cls is MF else "bpr").double()
    model.set_graph(dm.train)
    rows = dm.train_rows()
    restricted = RestrictedParameters(model, Scope(torch.tensor([1, 4, 5]), torch.tensor([0, 2, 9]), torch.tensor([], dtype=torch.long),
                                                   torch.tensor([], dtype=torch.long)))
    monkeypatch.setattr(module, "_CHUNK", 7)  # several chunks, users split across them
    if path == "gathered pairs":
        monkeypatch.setattr(subproblems, "_MATMUL_ADVANTAGE", 0)
    fast = {c: restricted.curvature_matvec(rows, len(rows), UnlearningContext(), c) for c in ("gauss_newton", "hessian")}
    assert isinstance(fast["hessian"], module._DotProductCurvature)
    fast_gradient = restricted.loss_gradient(rows, len(rows), UnlearningContext())
    monkeypatch.setattr(RestrictedParameters, "_dot_engine", lambda *args: None)
    for curvature, product in fast.items():
        generic = restricted.curvature_matvec(rows, len(rows), UnlearningContext(), curvature)
        for v in torch.randn(3, restricted.numel, dtype=torch.float64):
            torch.testing.assert_close(product(v), generic(v), rtol=1e-10, atol=1e-12)
    v = torch.randn(restricted.numel, dtype=torch.float64)
    assert not torch.allclose(fast["hessian"](v), fast["gauss_newton"](v))  # the scores' own curvature counts
    torch.testing.assert_close(fast_gradient, restricted.loss_gradient(rows, len(rows), UnlearningContext()), rtol=1e-10, atol=1e-12)


def test_graph_solve_with_fresh_blocks_gives_the_cached_step(graph_problem):
    """The preconditioner only changes the iterations: from the cache or computed per request, one step."""
    model, _, retained, deleted, _, _ = graph_problem
    steps = {}
    for blocks in ("auto", "fresh"):
        unlearned = copy.deepcopy(model)
        report = IFRU(damping=1e-3, tol=1e-12, max_iter=500, blocks=blocks).unlearn(unlearned, retained, deleted)
        assert report.diagnostics["blocks"] == ("cached" if blocks == "auto" else "fresh")
        steps[blocks] = (unlearned.user_embedding.weight - model.user_embedding.weight).detach()
    torch.testing.assert_close(steps["fresh"], steps["auto"], rtol=1e-8, atol=1e-10)
    assert float(steps["auto"].abs().max()) > 1e-3


@pytest.mark.parametrize("method", [lambda: IFRU(damping=1e-3, tol=1e-12, max_iter=500), lambda: FineTune(epochs=2, lr=0.01)],
                         ids=["IFRU", "FineTune"])
def test_a_graph_model_still_holding_the_deleted_edges_is_unlearned_over_the_retained_graph(graph_problem, method):
    """A caller of unlearn() in Python who did not give the model the graph without the deleted rows: the method runs
    over the retained rows' graph (the same step as from the right graph), and the unlearned model keeps it, never the
    deleted edges. A graph of other data is refused, and a failed request gives the model its graph back."""
    model, every, retained, deleted, _, _ = graph_problem
    right, stale = copy.deepcopy(model), copy.deepcopy(model)
    stale.adjacency = graph_of(model, every)  # the graph it was trained with
    for unlearned in (right, stale):
        torch.manual_seed(0)  # FineTune's batches
        method().unlearn(unlearned, retained, deleted)
    torch.testing.assert_close(stale.state_dict(), right.state_dict(), rtol=0, atol=1e-12)
    assert torch.equal(stale.adjacency.to_dense(), model.adjacency.to_dense())
    other = copy.deepcopy(model)
    swapped = retained.select(torch.arange(len(retained)) > 0).concat(deleted.select(torch.arange(len(deleted)) == 0))
    for rows in (retained.select(torch.arange(len(retained)) % 2 == 0), swapped):  # fewer edges; as many, one deleted kept
        other.adjacency = graph_of(model, rows)
        with pytest.raises(ValueError, match=r"the model.s graph \(\d+ edges\) is neither the retained rows."):
            IFRU().unlearn(other, retained, deleted)
        torch.testing.assert_close(other.state_dict(), model.state_dict(), rtol=0, atol=0)
    failing = copy.deepcopy(model)
    failing.adjacency = graph = graph_of(model, every)
    with pytest.raises(UnlearningError):
        IFRU(max_iter=1, solver="direct", direct_max=1).unlearn(failing, retained, deleted)
    assert failing.adjacency is graph


def test_a_graph_model_that_builds_its_own_graph_is_left_with_it():
    """A model whose set_graph builds another graph (self-loops here; docs/own_model.rst) has edges that cannot be counted
    as LightGCN's: its retained graph was refused as another data's."""

    class SelfLoops(LightGCN):
        def set_graph(self, interactions):
            super().set_graph(interactions)
            self.adjacency = (self.adjacency.to_dense() + torch.eye(self.adjacency.shape[0])).to_sparse_csr()

    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.35, seed=3), val_fraction=0.0, num_negatives=2)
    dm.setup()
    deleted = dm.remove(torch.tensor([0, 7]))
    model = SelfLoops(dm.num_users, dm.num_items, embedding_dim=3, num_layers=2)
    model.set_graph(dm.train)
    graph = model.adjacency
    FineTune(epochs=1).unlearn(model, dm.train_rows(), deleted)
    assert model.adjacency is graph


def test_graph_preconditioner_blocks_are_the_base_rows_curvature_through_the_propagation(graph_problem):
    """LightGCN's base-row blocks: c^2 x the propagated vectors' data blocks + the L2 of the base row,
    c = diag(I + A + A^2) / 3, the base row's weight in its own propagated vector (two layers)."""
    from lightning_unlearn.unlearning.methods.curvature import base_row_blocks, self_weights

    model, _, retained, _, _, _ = graph_problem
    ids = torch.tensor([1, 4])
    propagated = FreshCurvature(model, retained).block("users", ids)
    torch.testing.assert_close(propagated, curvature_blocks(model, retained, users=ids, items=ids[:0]).users)
    counts = torch.bincount(retained.users, minlength=model.num_users)[ids].double()
    penalty = model.l2 * counts.view(-1, 1, 1) * torch.eye(3, dtype=torch.float64)
    a = model.adjacency.to_dense()
    c = (1 + (a @ a).diagonal()[ids]) / 3  # A is bipartite: diag(A) = 0
    torch.testing.assert_close(self_weights(model)[ids], c)
    blocks = base_row_blocks(model, "users", ids, propagated, counts)
    torch.testing.assert_close(blocks, c.square().view(-1, 1, 1) * (propagated - penalty) + penalty)


def test_graph_ifru_keeps_the_base_rows_inverses_of_the_trained_model_and_requests_use_them(graph_problem, monkeypatch):
    """Built once: (B' + n damping I)^-1 for every user and item, B' the base rows' blocks; a request
    factors none (it takes no block from the cache) and its step is the one a fresh preconditioner gives."""
    from lightning_unlearn.unlearning.methods.curvature import base_row_blocks
    from lightning_unlearn.unlearning.methods.scope import graph_of

    model, every, retained, deleted, _, _ = graph_problem
    trained = copy.deepcopy(model)
    trained.adjacency = graph_of(model, every)  # the graph it was trained on
    method = IFRU(damping=1e-3, tol=1e-12, max_iter=500)
    method.prepare(trained, every)
    for side, size in (("users", model.num_users), ("items", model.num_items)):
        ids = torch.arange(size)
        kept, have = method.cache.kept_inverses(side, ids)
        assert bool(have.all())
        blocks = getattr(curvature_blocks(trained, every), side)
        expected = torch.linalg.inv(base_row_blocks(trained, side, ids, blocks, occurrences(every, side, trained)[ids].double())
                                    + 1e-3 * len(every) * torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(kept.double(), expected, rtol=1e-5, atol=1e-8)
    monkeypatch.setattr(method.cache, "block", lambda *args: pytest.fail("a request read a block: the kept inverses were not used"))
    unlearned = copy.deepcopy(model)
    assert method.unlearn(unlearned, retained, deleted).diagnostics["solver/converged"]
    monkeypatch.undo()
    fresh = copy.deepcopy(model)
    IFRU(damping=1e-3, tol=1e-12, max_iter=500, blocks="fresh").unlearn(fresh, retained, deleted)
    torch.testing.assert_close(unlearned.user_embedding.weight, fresh.user_embedding.weight, rtol=1e-8, atol=1e-10)


def test_spillover_right_hand_side_is_the_derivative_of_the_loss_change_between_graphs(graph_problem):
    """Finite differences of [sum_deleted loss(A) + sum_affected (loss(A) - loss(A'))] / n, A the graph before."""
    from lightning_unlearn.unlearning.methods import ifru
    from lightning_unlearn.unlearning.methods.scope import graph_of

    model, every, retained, deleted, _, _ = graph_problem
    n = len(retained)
    scope = Scope.of(model, retained, deleted)
    restricted = RestrictedParameters(model, scope)
    rhs = ifru._influence_with_spillover(model, restricted, retained, deleted, n, UnlearningContext())
    old, new = graph_of(model, every), model.adjacency
    changed = torch.isin(retained.users, torch.unique(deleted.users)) | torch.isin(retained.items, torch.unique(deleted.items))
    affected = retained.select(changed)

    def objective(values):
        before = restricted.call(values, lambda: model.loss(deleted.concat(affected)[:], "sum"), {"adjacency": old})
        return float((before - restricted.call(values, lambda: model.loss(affected[:], "sum"), {"adjacency": new})) / n)

    theta = restricted.values()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta]
        h = 1e-5
        plus = objective([t + h * d for t, d in zip(theta, direction)])
        minus = objective([t - h * d for t, d in zip(theta, direction)])
        flat = torch.cat([d.flatten() for d in direction])
        assert (plus - minus) / (2 * h) == pytest.approx(float(rhs @ flat), rel=1e-6, abs=1e-10)
    assert not torch.allclose(rhs, restricted.loss_gradient(deleted, n, UnlearningContext()))  # the graph change matters


def test_graph_update_is_closer_to_the_retrain_than_the_original_on_every_completeness_figure(graph_problem):
    """IFRU's defaults (Gauss-Newton, the touched rows only) on LightGCN. The membership attack is left
    out: on 3 deleted rows it scores the original and the retrain alike, so its gap is 0/0."""
    from lightning_unlearn.metrics import completeness_report

    model, _, retained, deleted, reference, tables = graph_problem
    unlearned = copy.deepcopy(model)
    report = IFRU(damping=1e-6, tol=1e-10).unlearn(unlearned, retained, deleted)
    assert report.diagnostics["solver/converged"] and report.diagnostics["kept_users"] < model.num_users
    for m in (model, unlearned, reference):
        m.set_graph(tables["retained"])
    figures = completeness_report(model, unlearned, reference, tables["deleted"], tables["retained"], tables["test"], k=3)
    closed, original = figures["completeness"], figures["baseline"]
    for gap in ("gap_closed_rank", "gap_closed_score", "gap_closed_top3"):
        assert 0.25 < closed[gap] <= 1.2, (gap, closed)
    for overlap in ("overlap@3", "overlap@3_affected"):
        assert closed[overlap] > original[overlap], (overlap, closed, original)
    assert closed["score_distance_rel"] < 0.8 and closed["param_distance_rel"] < 0.8, closed


def test_spillover_is_the_loss_change_of_affected_rows_through_the_new_graph():
    """For LightGCN the influence right-hand side adds, to the deleted rows' gradient under the old
    graph, the gradient of the affected retained rows' loss under the old minus the new graph."""
    from lightning_unlearn.unlearning.methods import ifru

    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.3, seed=1), val_fraction=0.0)
    dm.setup()
    model = LightGCN(dm.num_users, dm.num_items, embedding_dim=4, num_layers=2).double()
    model.set_graph(dm.train)
    old = copy.deepcopy(model)
    deleted = dm.remove(torch.tensor([0, 3]))
    retained = dm.train_rows()
    model.set_graph(dm.train)
    users, items = touched(deleted)
    scope = Scope(users, items, users[:0], items[:0])
    restricted = RestrictedParameters(model, scope, include_dense=True)
    rhs = ifru._influence_with_spillover(model, restricted, retained, deleted, len(retained), UnlearningContext())

    affected = retained.select(torch.isin(retained.users, torch.unique(deleted.users)) | torch.isin(retained.items, torch.unique(deleted.items)))
    old_restricted = RestrictedParameters(old, scope, include_dense=True)
    expected = old_restricted.gradient(lambda: (old.loss(deleted[:], "sum") + old.loss(affected[:], "sum")) / len(retained))
    expected = expected - restricted.gradient(lambda: model.loss(affected[:], "sum") / len(retained))
    torch.testing.assert_close(rhs, expected)
    direct_only = restricted.gradient(lambda: model.loss(deleted[:], "sum") / len(retained))
    assert not torch.allclose(rhs, direct_only)  # the graph change matters


def test_curvature_blocks_of_a_subset_equal_those_rows_of_all_blocks():
    from lightning_unlearn.unlearning.methods.curvature import curvature_blocks

    dm = RecDataModule(Synthetic(num_users=9, num_items=7, density=0.4, seed=5), val_fraction=0.0, num_negatives=2)
    dm.setup()
    torch.manual_seed(1)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3)
    every = curvature_blocks(model, dm.train_rows())
    users, items = torch.tensor([7, 2]), torch.tensor([0, 5, 6])
    some = curvature_blocks(model, dm.train_rows(), users=users, items=items, chunk_size=5)
    torch.testing.assert_close(some.users, every.users[users])
    torch.testing.assert_close(some.items, every.items[items])


def test_a_failed_request_does_not_leave_a_downdated_cache(convex, monkeypatch):
    """A failure after the cached curvature was downdated rolls model and data back; the cache must not
    keep the downdate, or retrying the same request would subtract the deleted rows twice."""
    model, retained, deleted, reference = convex
    method = IFRU(damping=1e-10, solver="block")

    def boom(*args, **kwargs):
        raise RuntimeError("solver crashed")

    with monkeypatch.context() as patch:
        patch.setattr(RestrictedParameters, "block_solve", boom)
        with pytest.raises(UnlearningError, match="solver crashed"):
            method.unlearn(copy.deepcopy(model), retained, deleted)
    retried = copy.deepcopy(model)
    method.unlearn(retried, retained, deleted)
    assert relative_error(retried, reference) < 1e-3


def test_cached_factors_are_reused_while_fresh_and_exact_at_zero_tolerance():
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.6, seed=4), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.5, init_std=0.5).double()
    rows = dm.train_rows()
    cache, ids, eye = CurvatureCache(), torch.arange(dm.num_users), torch.eye(3, dtype=torch.float64)
    cache.build(model, rows)
    blocks, rhs = cache.blocks, torch.randn(dm.num_users, 3, dtype=torch.float64)
    first, result, refactored = cache.solve_factored("users", ids, rhs, 0.1, tolerance=0.5)
    assert refactored == len(ids) and result.failed_blocks == 0
    torch.testing.assert_close(first, torch.linalg.solve(blocks.users + 0.1 * eye, rhs), rtol=1e-10, atol=1e-12)
    # delete one row of user u: only u's block changes, by a known fraction of its trace
    u = int(rows.users[0])
    trace_before = torch.diagonal(blocks.users[u]).sum()
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[0] = False
    cache.downdate(model, rows.select(keep), rows.select(~keep))
    drift = float(1 - torch.diagonal(blocks.users[u]).sum() / trace_before)
    assert 0.01 < drift < 0.5
    reused, _, refactored = cache.solve_factored("users", ids, rhs, 0.1, tolerance=2 * drift)
    assert refactored == 0 and torch.equal(reused, first)  # stale by less than the tolerance: the old factors solve
    assert cache.refactor("users", ids, 0.1, tolerance=drift / 2) == 1  # only u drifted past it
    refreshed, _, refactored = cache.solve_factored("users", ids, rhs, 0.1, tolerance=drift / 2)
    assert refactored == 0 and not torch.equal(refreshed[u], first[u])
    others = torch.arange(len(ids)) != u
    assert torch.equal(refreshed[others], first[others])
    exact, _, refactored = cache.solve_factored("users", ids, rhs, 0.1, tolerance=0.0)
    assert refactored == len(ids)
    torch.testing.assert_close(exact, torch.linalg.solve(blocks.users + 0.1 * eye, rhs), rtol=1e-10, atol=1e-12)
    assert cache.refactor("users", ids, 0.3, tolerance=0.5) == len(ids)  # a new damping invalidates every factor
    assert cache.refactor("users", ids, 0.3, tolerance=0.5) == 0


@pytest.mark.parametrize("count", [2, 9, 10])  # a few blocks (gathered) and most of them (read in place)
def test_cached_solve_is_exact_for_few_and_for_most_blocks(count):
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.6, seed=4), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.5, init_std=0.5).double()
    rows, cache = dm.train_rows(), CurvatureCache()
    keep = torch.arange(len(rows)) >= 5
    cache.build(model, rows)
    cache.precondition("items", 0.1)
    cache.downdate(model, rows.select(keep), rows.select(~keep))  # the kept inverses are now stale
    blocks = cache.blocks
    before = blocks.items.clone()
    ids = torch.randperm(dm.num_items)[:count]
    rhs = torch.randn(count, 3, dtype=torch.float64)
    x, result, refactored, iterations = cache.solve("items", ids, rhs, 0.1, tol=1e-12)
    assert refactored == 0 and result.failed_blocks == 0 and iterations >= 1
    torch.testing.assert_close(x, torch.linalg.solve(before[ids] + 0.1 * torch.eye(3, dtype=torch.float64), rhs), rtol=1e-9, atol=1e-12)
    assert torch.equal(blocks.items, before)  # the cache is read, not damped in place


def test_a_shared_cache_is_preconditioned_for_the_damping_of_the_method_that_reads_it():
    """Inverses kept for another damping would precondition the block solve poorly (every block refactored, timed)."""
    dm, model = mf_30x25()
    rows = dm.train_rows()
    first, second = IFRU(damping=1e-4), IFRU(damping=1e-2)
    first.prepare(model, rows)
    sides, n = ("users", "items"), len(rows)
    assert all(first.cache.preconditioned(side, 1e-4 * n) and not first.cache.preconditioned(side, 1e-2 * n) for side in sides)
    assert second.share(first.cache, model, rows) is not None
    assert all(second.cache.preconditioned(side, 1e-2 * n) for side in sides)
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    report = second.unlearn(model, retained, deleted)
    assert report.diagnostics["solver/refactored_blocks"] == 0


def mf_30x25():
    """A random double-precision MF (d=4) on 30 users x 25 items of synthetic data, and its datamodule."""
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=30, num_items=25, density=0.4, seed=5), val_fraction=0.0, num_negatives=2)
    dm.setup()
    return dm, MF(dm.num_users, dm.num_items, embedding_dim=4, l2=0.1, init_std=0.3).double()


@pytest.mark.parametrize("budget", [None, 0.5])
def test_a_solve_by_the_cached_factors_equals_the_direct_solve_of_the_retained_blocks(budget, monkeypatch):
    """``solve_factored`` a few blocks at a time: every block, held (in float32 under a budget) or solved from its rows."""
    monkeypatch.setattr(curvature_module, "_PCG_PIECE_BYTES", 3 * 8 * 4 * 4)  # three blocks of d = 4 per piece
    dm, model = mf_30x25()
    cache = CurvatureCache(None if budget is None else budget * cache_bytes(model))
    cache.build(model, dm.train_rows())
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    retained = dm.train_rows()
    cache.downdate(model, retained, deleted)
    exact, eye = curvature_blocks(model, retained), torch.eye(4, dtype=torch.float64)
    for side, size in (("users", dm.num_users), ("items", dm.num_items)):
        ids = torch.randperm(size)
        rhs = torch.randn(size, 4, dtype=torch.float64)
        x, result, refactored = cache.solve_factored(side, ids, rhs, 0.1, tolerance=0.0)
        assert refactored == size and result.failed_blocks == 0
        rtol = 1e-10 if budget is None else 1e-5  # float32 blocks and factors
        torch.testing.assert_close(x, torch.linalg.solve(getattr(exact, side)[ids] + 0.1 * eye, rhs), rtol=rtol, atol=rtol)
    assert budget is None or cache.misses > 0


def test_later_requests_reuse_kept_inverses_and_still_solve_exactly():
    """A second request solves from the inverses kept at the first: a few CG iterations, no factorisation, exact steps."""
    dm, model = mf_30x25()
    method = IFRU(damping=1e-6, solver="block", tol=1e-12)
    method.prepare(model, dm.train_rows())
    first = dm.remove(torch.tensor([0, 40]))
    method.unlearn(model, dm.train_rows(), first)
    deleted = dm.remove(torch.tensor([3, 77, 120]))
    retained, n = dm.train_rows(), len(dm.train_rows())
    before = copy.deepcopy(model)
    report = method.unlearn(model, retained, deleted).diagnostics
    assert report["solver/refactored_blocks"] == 0 and 1 <= report["solver/cg_iterations"] <= 10  # (d=4: at most 4 + 1)
    users, items = touched(deleted)
    blocks = method.cache.blocks  # what the solve used: the cache, downdated by both requests
    eye = 1e-6 * torch.eye(4, dtype=torch.float64)
    for table, ids, side in (("user_embedding", users, blocks.users), ("item_embedding", items, blocks.items)):
        weights = getattr(before, table).weight
        gradient = torch.autograd.grad(before.loss(deleted[:], "sum") / n, weights)[0][ids]
        expected = torch.linalg.solve(side[ids] / n + eye, gradient)
        torch.testing.assert_close(getattr(model, table).weight[ids] - weights[ids], expected, rtol=1e-6, atol=1e-10)


def test_deleting_a_user_corrects_items_with_the_vectors_the_user_was_trained_with():
    """The influence of a deleted user's rows is taken at the trained parameters, before the user is reset."""
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=10, num_items=12, density=0.5, seed=1), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.5, init_std=0.5).double()
    with torch.no_grad():
        model.user_embedding.weight.mul_(3.0)  # "trained": away from the initialisation a reset restores
    deleted = dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([4]))
    retained, n = dm.train_rows(), len(dm.train_rows())
    items = torch.unique(deleted.all_items())
    weights = model.item_embedding.weight
    gradient = torch.autograd.grad(model.loss(deleted[:], "sum") / n, weights)[0][items]
    blocks = curvature_blocks(model, retained, users=torch.zeros(0, dtype=torch.long), items=items).items
    expected = torch.linalg.solve(blocks / n + 1e-6 * torch.eye(3, dtype=torch.float64), gradient)
    unlearned = copy.deepcopy(model)
    IFRU(damping=1e-6, solver="block").unlearn(unlearned, retained, deleted)
    torch.testing.assert_close(unlearned.item_embedding.weight[items] - weights[items], expected, rtol=1e-6, atol=1e-10)


def test_fresh_blocks_equal_the_downdated_cache_to_rounding():
    """Blocks computed on demand from the rows that touch them equal the cache's (built on every row, downdated)."""
    dm, model = mf_30x25()
    cache = CurvatureCache()
    cache.build(model, dm.train_rows())
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    retained = dm.train_rows()
    cache.downdate(model, retained, deleted)
    fresh = FreshCurvature(model, retained)
    for side, size in (("users", dm.num_users), ("items", dm.num_items)):
        ids = torch.randperm(size)[:7]
        torch.testing.assert_close(fresh.block(side, ids), cache.block(side, ids), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget", [None, 0.5])
def test_a_cache_keeps_its_rows_occurrences_through_downdates_refuses_other_rows_and_rolls_them_back(budget):
    """The occurrences a cache keeps equal a count over the retained rows after each downdate (a request's orphans
    are read from them); rows that do not add up to the cache's are refused with nothing changed; a rollback
    restores the counts and forgets the rolled-back request's rows."""
    dm, model = mf_30x25()
    cache = CurvatureCache(None if budget is None else budget * cache_bytes(model))
    cache.build(model, dm.train_rows())
    built = {side: cache.occurrences(side).clone() for side in ("users", "items")}
    cache.mark()
    for rows, users in ((torch.zeros(0, dtype=torch.long), torch.tensor([2])), (torch.tensor([5, 9, 70]), None)):
        deleted, retained = dm.remove(rows, users=users), dm.train_rows()
        cache.downdate(model, retained, deleted)
        counts = {side: cache.occurrences(side) for side in ("users", "items")}
        for side in counts:
            assert torch.equal(counts[side], occurrences(retained, side, model))
        kept, counted = Scope.of(model, retained, deleted, counts=counts), Scope.of(model, retained, deleted)
        assert all(torch.equal(getattr(kept, f), getattr(counted, f)) for f in ("users", "items", "orphan_users", "orphan_items"))
        assert kept.orphan_users.tolist() == ([] if users is None else [2])
    blocks = getattr(cache.blocks, "users").clone()
    with pytest.raises(RuntimeError, match=r"retained \(\d+\) and deleted \(3\) rows add up to"):
        cache.downdate(model, dm.train_rows(), deleted)  # already downdated by these rows
    assert torch.equal(cache.blocks.users, blocks) and torch.equal(cache.occurrences("items"), counts["items"])
    cache.rollback()
    assert all(torch.equal(cache.occurrences(side), built[side]) for side in built)
    if budget is not None:  # a block not held has no rows to be computed from until the next downdate
        side = next(side for side in ("users", "items") if (cache._tables[side].slot < 0).any())
        missing = torch.nonzero(cache._tables[side].slot < 0).squeeze(1)[:1]
        rhs = torch.zeros(1, cache._tables[side].blocks.shape[1], dtype=torch.float64)
        for ask in (lambda: cache.block(side, missing), lambda: cache.solve(side, missing, rhs, 0.1),
                    lambda: cache.solve_factored(side, missing, rhs, 0.1, tolerance=0.0)):
            with pytest.raises(RuntimeError, match="no rows to compute them from"):
                ask()
    with pytest.raises(RuntimeError, match="empty"):
        CurvatureCache().occurrences("users")


def busy_and_sparse_rows(loss: str = "bpr") -> tuple[MF, TrainRows]:
    """A double MF (d=8) on 40 users x 60 items and 80 rows: user 0 and item 0 in many, most others in a few, item 59 in none."""
    torch.manual_seed(1)
    model = MF(40, 60, embedding_dim=8, loss=loss, l2=0.05, init_std=0.3).double()
    users = torch.cat([torch.zeros(30, dtype=torch.long), torch.randint(1, 40, (50,))])
    items = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, 59, (40,))])[torch.randperm(80)]
    return model, TrainRows(users, items, torch.randint(1, 59, (80, 2)))


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_fresh_solves_take_blocks_of_few_rows_from_their_rows_and_equal_the_direct_solve(loss, monkeypatch):
    """Blocks of few rows are solved from their rows (never formed), the others formed and factored: all exact (1e-10)."""
    model, rows = busy_and_sparse_rows(loss)
    formed = []
    monkeypatch.setattr(curvature_module, "factor_blocks", lambda b, **kw: formed.append(len(b)) or factor_blocks(b, **kw))
    fresh, exact = FreshCurvature(model, rows), curvature_blocks(model, rows)
    for side, size in (("users", 40), ("items", 60)):
        ids, shift = torch.randperm(size), 0.01
        few, formed[:] = fresh.few_rows(side, ids), []
        rhs = torch.randn(size, 8, dtype=torch.float64)
        x, result, solved, iterations = fresh.solve(side, ids, rhs, shift)
        expected = torch.linalg.solve(getattr(exact, side)[ids] + shift * torch.eye(8, dtype=torch.float64), rhs)
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
        assert 0 < int(few.sum()) < size and formed == [int((~few).sum())] and (solved, iterations, result.failed_blocks) == (size, 0, 0)
        assert not few[ids == 0].any()  # the busiest user and item are formed
    torch.testing.assert_close(fresh.solve("items", torch.tensor([59]), torch.ones(1, 8, dtype=torch.float64), 0.5)[0],
                               torch.full((1, 8), 2.0, dtype=torch.float64))  # no rows: shift I


def test_a_downdated_cache_solves_held_blocks_by_cg_and_the_others_from_their_rows(monkeypatch):
    """After a downdate under a budget, a cache solve reads the blocks it holds (CG from kept inverses) and solves the
    others from the retained rows, those of few rows without forming them: every solution exact (the held blocks are
    float32), the others counted as misses."""
    model, rows = busy_and_sparse_rows()
    cache = CurvatureCache(0.5 * cache_bytes(model))
    cache.build(model, rows)
    cache.precondition("items", 0.01)
    gone = torch.arange(len(rows)) % 7 == 0
    retained, ids = rows.select(~gone), torch.arange(60)
    cache.downdate(model, retained, rows.select(gone))
    held, few = torch.isin(ids, cache.held("items")), FreshCurvature(model, retained).few_rows("items", ids)
    assert held.any() and (few & ~held).any() and (few & held).any()
    formed = []
    monkeypatch.setattr(curvature_module, "factor_blocks", lambda b, **kw: formed.append(len(b)) or factor_blocks(b, **kw))
    rhs = torch.randn(60, 8, dtype=torch.float64)
    x, result, refactored, iterations = cache.solve("items", ids, rhs, 0.01, tol=1e-12, max_iter=50)
    exact = curvature_blocks(model, retained).items + 0.01 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(x, torch.linalg.solve(exact, rhs), rtol=1e-5, atol=1e-8)
    assert (cache.misses, cache.hits, refactored) == (int((~held).sum()), int(held.sum()), int((~held).sum())) and iterations > 0
    assert formed == []  # held blocks, of few rows or not, by CG; those not held here have few rows: never formed


@pytest.mark.parametrize("solver", ["block", "cg"])
def test_fresh_blocks_give_the_cached_step_and_need_no_precomputation(solver):
    dm, model = mf_30x25()
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    cached, fresh = copy.deepcopy(model), copy.deepcopy(model)
    IFRU(damping=1e-4, solver=solver, tol=1e-13).unlearn(cached, retained, deleted)
    method = IFRU(damping=1e-4, solver=solver, tol=1e-13, blocks="fresh")
    report = method.unlearn(fresh, retained, deleted)
    assert report.precompute_seconds == 0 and not method.cache.holds(model) and method.name == f"IFRU(k_hop=0, solver={solver}, blocks=fresh, damping=0.0001, tol=1e-13)"
    for a, b in zip(fresh.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


@pytest.mark.parametrize("blocks_per_sum", [None, 1, 3])
def test_a_cache_under_a_budget_holds_the_busiest_blocks_and_computes_the_rest(blocks_per_sum, monkeypatch):
    """Past its budget the cache holds the most-used blocks in float32; the others are computed from the retained rows
    on demand and take the least recently used slots; every block read equals the retained rows' block, whether its
    float64 sum is formed, and it is computed and factored, with every other block or a few blocks at a time."""
    if blocks_per_sum is not None:  # and blocks computed, copied and factored as many at a time
        monkeypatch.setattr(curvature_module, "_PIECE_BYTES", blocks_per_sum * 8 * 4 * 4)  # d = 4
    dm, model = mf_30x25()
    rows = dm.train_rows()
    cache = CurvatureCache(budget_bytes=cache_bytes(model) / 2)
    assert not cache.fits(model)
    cache.build(model, rows)
    assert cache.blocks.items.dtype == torch.float32 and cache.nbytes <= cache.budget_bytes
    # users and items ranked together (a user's block is as large as an item's): every held one occurs as often as any other
    occurs = {"users": torch.bincount(rows.users, minlength=dm.num_users), "items": torch.bincount(rows.all_items(), minlength=dm.num_items)}
    held = {side: torch.zeros(len(count), dtype=torch.bool).index_fill_(0, cache.held(side), True) for side, count in occurs.items()}
    assert 0 < sum(int(h.sum()) for h in held.values()) < dm.num_users + dm.num_items
    assert min(occurs[s][held[s]].min() for s in occurs) >= max(occurs[s][~held[s]].max() for s in occurs if (~held[s]).any())
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    retained = dm.train_rows()
    cache.downdate(model, retained, deleted)
    exact = curvature_blocks(model, retained)
    for side, size in (("users", dm.num_users), ("items", dm.num_items)):
        ids = torch.randperm(size)
        torch.testing.assert_close(cache.block(side, ids), getattr(exact, side)[ids], rtol=1e-6, atol=1e-6)
    assert cache.misses > 0 and cache.hits > 0
    side = next(side for side in held if not held[side].all())
    missing = torch.nonzero(~held[side]).squeeze(1)[:2]
    cache.block(side, missing)
    assert set(missing.tolist()) <= set(cache.held(side).tolist())  # now held, in the least recently used slots
    rhs = torch.randn(dm.num_items, 4, dtype=torch.float64)
    x, result, _, _ = cache.solve("items", torch.arange(dm.num_items), rhs, 0.1, tol=1e-12)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(x, torch.linalg.solve(exact.items + 0.1 * eye, rhs), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("blocks_per_solve", [None, 1, 3])
def test_cached_solves_a_few_blocks_at_a_time_equal_the_direct_solves(blocks_per_solve, monkeypatch):
    """CG on a cache's float32 blocks, preconditioned by the inverses of the blocks before a rank-one change,
    solves each asked-for block exactly whether they are copied out all at once or a few at a time."""
    if blocks_per_solve is not None:
        monkeypatch.setattr(curvature_module, "_PIECE_BYTES", blocks_per_solve * 8 * 5 * 5)  # d = 5
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 5, 5, generator=g, dtype=torch.float64)
    before = a @ a.mT + 0.5 * torch.eye(5, dtype=torch.float64)
    change = torch.randn(12, 5, 1, generator=g, dtype=torch.float64)
    blocks = (before - 0.1 * change @ change.mT).float()
    inverses = torch.linalg.inv(before + 0.01 * torch.eye(5, dtype=torch.float64)).float()
    ids, rhs = torch.tensor([7, 0, 3, 11, 5]), torch.randn(5, 5, generator=g, dtype=torch.float64)
    x, converged, _ = curvature_module._pcg_cached(blocks, inverses, ids, rhs, 0.01, 1e-10, 50)
    exact = torch.linalg.solve(blocks[ids].double() + 0.01 * torch.eye(5, dtype=torch.float64), rhs)
    assert converged.all()
    torch.testing.assert_close(x, exact, rtol=1e-5, atol=1e-6)  # products with float32 blocks


@pytest.mark.parametrize("blocks_per_solve", [None, 2])
def test_a_cache_solve_refactors_what_its_cg_leaves_and_keeps_those_inverses(blocks_per_solve, monkeypatch):
    """Blocks without a kept inverse and blocks whose CG stops unconverged are factored afresh (a few at a time or
    all at once): every solution is exact, and only the unconverged blocks keep their new inverse."""
    if blocks_per_solve is not None:
        monkeypatch.setattr(curvature_module, "_PIECE_BYTES", blocks_per_solve * 8 * 4 * 4)  # d = 4
    dm, model = mf_30x25()
    cache = CurvatureCache()
    cache.build(model, dm.train_rows())
    cache.precondition("items", 0.5)  # inverses for another damping: CG with max_iter=1 stops short
    cache._inverses["items"].valid[:5] = False  # no kept inverse
    ids, rhs = torch.arange(dm.num_items), torch.randn(dm.num_items, 4, dtype=torch.float64)
    x, result, refactored, _ = cache.solve("items", ids, rhs, 0.01, tol=1e-12, max_iter=1)
    exact = torch.linalg.solve(cache.block("items", ids).double() + 0.01 * torch.eye(4, dtype=torch.float64), rhs)
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-11)
    valid = cache._inverses["items"].valid
    assert refactored == dm.num_items and not valid[:5].any() and valid[5:].all()
    x, _, refactored, _ = cache.solve("items", ids[5:], rhs[5:], 0.01, tol=1e-12)  # the renewed (float32) inverses precondition well
    assert refactored == 0
    torch.testing.assert_close(x, exact[5:], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fraction", [0.2, 1e-9])
def test_auto_blocks_past_the_budget_give_the_full_cache_step(fraction):
    """IFRU(blocks="auto") with a cache of a fifth of the blocks (float32), or of none, takes the step of the full cache."""
    dm, model = mf_30x25()
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    budget = fraction * cache_bytes(model) / 2**30
    runs, reports = {}, {}
    for key, method in (("full", IFRU(damping=1e-4, tol=1e-13)), ("bounded", IFRU(damping=1e-4, tol=1e-13, cache_budget_gb=budget))):
        runs[key] = copy.deepcopy(model)
        reports[key] = method.unlearn(runs[key], retained, deleted)
    assert reports["full"].diagnostics["cache_misses"] == 0 < reports["bounded"].diagnostics["cache_misses"]
    assert reports["bounded"].diagnostics["blocks"] == "cached" and reports["bounded"].precompute_seconds > 0
    assert IFRU(cache_budget_gb=1e-9).name == "IFRU(k_hop=0, cache_budget_gb=1e-09)"
    tolerance = 1e-9 if fraction < 1e-6 else 1e-5  # no block held: every one computed in float64
    for a, b in zip(runs["full"].parameters(), runs["bounded"].parameters()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("budget", [None, 0.5])
def test_rollback_undoes_a_request_on_the_cache(budget, saved):
    """mark(), a request's downdate and lookups that evict blocks, rollback(): the blocks, slots and parameters are as built."""
    dm, model = mf_30x25()
    cache = CurvatureCache(None if budget is None else budget * cache_bytes(model))
    cache.build(model, dm.train_rows())
    built = {side: (cache.held(side).clone(), getattr(cache.blocks, side).clone()) for side in ("users", "items")}
    cache.mark()
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    if saved:  # compare keeps the touched blocks before it times the request: the downdate records nothing more
        cache.save(deleted)
        records = len(cache._undo)
    cache.downdate(model, dm.train_rows(), deleted)
    if saved:
        assert len(cache._undo) == records
    for side, size in (("users", dm.num_users), ("items", dm.num_items)):
        cache.block(side, torch.randperm(size))
    trained = copy.deepcopy(model)
    with torch.no_grad():
        model.user_embedding.weight.mul_(0.9)
    cache.adopt(model)
    assert not cache.holds(trained) and (budget is None or cache.misses > 0)
    cache.rollback()
    for side, (ids, blocks) in built.items():
        assert torch.equal(cache.held(side), ids) and torch.equal(getattr(cache.blocks, side), blocks)
    assert cache.holds(trained) and cache.marked
    with pytest.raises(RuntimeError, match="not marked"):
        CurvatureCache().rollback()
    with pytest.raises(RuntimeError, match="not marked"):
        CurvatureCache().save(deleted)


def test_rollback_restores_the_factors_inverses_and_reads_a_request_renewed():
    """``compare --repeats`` times each run from the prepared state: factors refactored and inverses renewed by a
    request (and the least-recently-used clock) are as built after rollback, so the next run redoes that work."""
    dm, model = mf_30x25()
    cache, shift = CurvatureCache(), 1e-3
    cache.build(model, dm.train_rows())
    for side in ("users", "items"):
        cache.refactor(side, cache.held(side), shift, 0.05)
        cache.precondition(side, shift)

    def state():
        return [t.clone() for side in ("users", "items") for t in (
            cache._factored[side].factors, cache._factored[side].trace, cache._factored[side].failed, cache._inverses[side].inverse,
            cache._inverses[side].valid, cache._tables[side].used)] + [torch.tensor(cache._reads)]

    built = state()
    cache.mark()
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    cache.downdate(model, dm.train_rows(), deleted)
    for side in ("users", "items"):
        ids = cache.held(side)
        rhs = torch.randn(len(ids), cache.blocks.users.shape[1], dtype=torch.float64)
        assert cache.solve_factored(side, ids, rhs, shift, 0.0)[2] == len(ids)  # tolerance 0: every block refactored
        assert cache.solve(side, ids, rhs, shift, tol=1e-300, max_iter=1)[2] > 0  # unconverged: inverses renewed
    assert any(not torch.equal(a, b) for a, b in zip(state(), built))
    cache.rollback()
    assert all(torch.equal(a, b) for a, b in zip(state(), built))


@pytest.mark.parametrize("second", [IFRU(damping=1e-1), AltEraser(damping=1e-1)])
def test_every_compare_run_of_a_method_sharing_the_cache_starts_from_its_prepared_cache(second, monkeypatch):
    """compare hands the cache one method built to a method of another damping, which keeps inverses (IFRU) or factors
    (AltEraser) for it before its runs: every run starts from them. Rolled back to the first method's state, the later
    runs redid that work inside the timed request (NeuMF's IFRU(damping=3e-5): 0.53 s, then 1.8-2.0 s)."""
    from lightning_unlearn.unlearning.compare import _requests, _SharedCurvature

    dm, model = mf_30x25()
    every = dm.train_rows()
    deleted = dm.remove(torch.tensor([0, 3, 40, 77]))
    retained, context, shared = dm.train_rows(), UnlearningContext(), _SharedCurvature()
    first = IFRU(damping=1e-3)
    prepared = copy.deepcopy(model)
    first.prepare(prepared, every, context)
    shared.offer(first, prepared)
    _requests(first, model, prepared, retained, deleted, context, 2)
    shared.release(first)
    solves = []
    for name in ("solve", "solve_factored"):
        real = getattr(CurvatureCache, name)
        monkeypatch.setattr(CurvatureCache, name, lambda self, *args, real=real, **kwargs: solves.append(real(self, *args, **kwargs)) or
                            solves[-1])
    prepared = copy.deepcopy(model)
    assert shared.take(second, prepared, every) is not None
    second.prepare(prepared, every, context)
    before = len(solves)  # AltEraser's prepare factors every block through solve_factored's helper, not solve_factored
    _requests(second, model, prepared, retained, deleted, context, 3)
    counts = [tuple(result[2:]) for result in solves[before:]]  # blocks refactored (and CG iterations, solve)
    assert len(counts) % 3 == 0 and counts == counts[: len(counts) // 3] * 3  # every run as the first


def test_an_interrupted_request_leaves_no_downdated_cache_behind(monkeypatch):
    dm, model = mf_30x25()
    method, original = IFRU(damping=1e-4), copy.deepcopy(model)
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    method.prepare(model, retained.concat(deleted))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(IFRU, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            method.unlearn(model, retained, deleted)
    assert not method.cache.holds(original)
    again, fresh = copy.deepcopy(original), IFRU(damping=1e-4)
    method.unlearn(again, retained, deleted)
    fresh.unlearn(model := copy.deepcopy(original), retained, deleted)
    for a, b in zip(again.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)


def test_a_request_fingerprints_the_model_once_per_state_and_sees_in_place_changes(monkeypatch):
    """Within one request the model is fingerprinted once before its step and once after (its caches and checks
    reuse them); an in-place change of a parameter is still seen there, and outside a request even a write through
    ``.data`` is."""
    import lightning_unlearn.models.functional as functional
    from lightning_unlearn.models.functional import fingerprints_by_version

    calls = []
    checksum = functional._checksum
    monkeypatch.setattr(functional, "_checksum", lambda table: calls.append(1) or checksum(table))
    for method in (IFRU(damping=1e-4), AltEraser(damping=1e-4, rounds=1)):
        dm, trained = mf_30x25()
        method.prepare(trained, dm.train_rows())
        deleted = dm.remove(torch.tensor([1, 10, 50]))
        calls.clear()
        report = method.unlearn(trained, dm.train_rows(), deleted)
        assert report.precompute_seconds == 0 and report.diagnostics["cache_misses"] == 0
        assert len(calls) == 2 * 2  # two tensors, before the step and after it
    cache = method.cache
    value = trained.item_embedding.weight[0, 0].item()
    with fingerprints_by_version():
        calls.clear()
        assert cache.holds(trained) and cache.holds(trained) and len(calls) == 2
        with torch.no_grad():
            trained.item_embedding.weight[0, 0] = value + 1.0
        assert not cache.holds(trained)
        with torch.no_grad():
            trained.item_embedding.weight[0, 0] = value
    assert cache.holds(trained)
    trained.item_embedding.weight.data[0, 0] += 1.0  # no new version: only a fingerprint sees it
    assert not cache.holds(trained)


def test_cache_options_are_checked():
    with pytest.raises(ValueError, match="cache_budget_gb"):
        IFRU(cache_budget_gb=0)
    with pytest.raises(ValueError, match="blocks"):
        IFRU(blocks="sometimes")


def test_names_tell_apart_every_option_compare_may_list():
    assert IFRU().name == "IFRU(k_hop=0)"
    assert IFRU(curvature="hessian", gradient="retained").name == "IFRU(k_hop=0, curvature=hessian, gradient=retained)"
    assert IFRU(solver="cg", k_hop=1).name == "IFRU(k_hop=1, solver=cg)"
    assert IFRU(damping=1e-6, keep_fraction=0.5).name == "IFRU(k_hop=0, damping=1e-06, keep_fraction=0.5)"
    assert IFRU(include_dense=False, tol=1e-8, max_iter=50).name == "IFRU(k_hop=0, include_dense=False, tol=1e-08, max_iter=50)"


@pytest.mark.parametrize(("options", "named"), [
    ({"tol": 2.0}, r"tol=...\) must be a number in \(0, 1\)"), ({"tol": float("nan")}, "tol"), ({"max_iter": 0}, "max_iter"),
    ({"k_hop": 1.5}, "k_hop"), ({"k_hop": "1"}, "k_hop"), ({"damping": "1e-3"}, "damping"), ({"damping": True}, "damping"),
    ({"include_dense": "no"}, "include_dense"), ({"direct_max": 0}, "direct_max"), ({"keep_fraction": 0}, "keep_fraction"),
])
def test_ifru_refuses_options_that_would_do_nothing_or_fail_later(options, named):
    with pytest.raises(ValueError, match=named):
        IFRU(**options)


@pytest.mark.parametrize("method", [IFRU(damping=1e-4), AltEraser(damping=1e-4)])
def test_rows_that_are_not_the_models_are_refused_before_anything_changes(method):
    dm, model = mf_30x25()
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        (TrainRows(deleted.users.float(), deleted.items, deleted.negatives), "int64"),
        (TrainRows(deleted.users + 1000, deleted.items, deleted.negatives), r"user indices outside \[0, 30\)"),
        (TrainRows(deleted.users, deleted.items, deleted.negatives[:, :1]), "as many negatives"),
    ]
    for rows, named in bad:
        with pytest.raises(ValueError, match=named):
            method.unlearn(model, retained, rows)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_same_rows_again_are_refused_every_time_not_applied_on_a_rebuilt_cache():
    """The second request with rows deleted already is refused before any downdate; the cache, kept, refuses the third."""
    dm, model = mf_30x25()
    deleted, retained = dm.remove(torch.tensor([1, 10, 50])), dm.train_rows()
    method = IFRU(damping=1e-4)
    method.unlearn(model, retained, deleted)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        with pytest.raises(UnlearningError, match="add up to"):
            method.unlearn(model, retained, deleted)
        assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
