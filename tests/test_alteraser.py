"""AltEraser against exact answers: Newton steps from torch.func, Hessian blocks, and the retrained optimum."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models import MF, LightGCN, NeuMF
from lightning_unlearn.models.functional import call_with
from lightning_unlearn.unlearning.methods import AltEraser, Retrain, UnlearningContext, UnlearningError, alteraser
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache, cache_bytes, curvature_blocks, exact_hessian_blocks
from lightning_unlearn.unlearning.methods.subproblems import Engine, RowScores, Side, slot_changes


def lbfgs(params, objective, rounds: int = 8) -> None:
    """Minimise ``objective()`` over ``params`` to a tight optimum (full batch, double precision)."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)


def mean_objective(model, rows) -> torch.Tensor:
    return model.loss(rows[:], "sum") / len(rows) + model.dense_penalty()


def tiny(num_users=8, num_items=20, density=0.5, seed=2, negatives=2) -> RecDataModule:
    dm = RecDataModule(Synthetic(num_users=num_users, num_items=num_items, density=density, seed=seed), val_fraction=0.0,
                       num_negatives=negatives)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def users_only():
    """MF with the item side frozen and strong L2: each user's sub-problem is strictly convex, and
    the deletion moves its optimum a lot."""
    torch.manual_seed(0)
    dm = tiny()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=1.0, init_std=0.5).double()
    model.item_embedding.weight.requires_grad_(False)
    lbfgs([model.user_embedding.weight], lambda: mean_objective(model, dm.train_rows()))
    deleted = dm.remove(dm.train.by_user.rows[dm.train.by_user.indptr[:3]])  # one row of each of users 0, 1, 2
    retained = dm.train_rows()
    reference = copy.deepcopy(model)
    lbfgs([reference.user_embedding.weight], lambda: mean_objective(reference, retained))
    return model, retained, deleted, reference


def relative_error(model, reference) -> float:
    diff = model.user_embedding.weight - reference.user_embedding.weight
    return (diff.norm() / reference.user_embedding.weight.norm()).item()


def test_one_user_step_is_the_newton_step_of_each_users_subproblem(users_only):
    """With items fixed, one round is, for every affected user, u - H_u^-1 g_u with H_u and g_u from torch.func
    on that user's own objective; one Newton step is not the minimiser, iterating it converges to it."""
    model, retained, deleted, reference = users_only
    stepped = copy.deepcopy(model)
    report = AltEraser(objective="retained", rounds=1, blocks="fresh", damping=1e-14, line_search=False).unlearn(stepped, retained, deleted)
    assert report.diagnostics["kept_users"] == 3 and report.diagnostics["kept_items"] == 0

    def user_objective(u, user):
        table = model.user_embedding.weight.detach().index_copy(0, torch.tensor([user]), u.unsqueeze(0))
        mine = retained.select(retained.users == user)
        return call_with(model, {"user_embedding.weight": table}, lambda: model.loss(mine[:], "sum"))

    for user in range(3):
        u = model.user_embedding.weight[user].detach()
        g, h = torch.func.grad(user_objective)(u, user), torch.func.hessian(user_objective)(u, user)
        torch.testing.assert_close(stepped.user_embedding.weight[user], u - torch.linalg.solve(h, g), rtol=1e-10, atol=1e-12)
    untouched = torch.arange(3, 8)
    assert torch.equal(stepped.user_embedding.weight[untouched], model.user_embedding.weight[untouched])
    one_step = relative_error(stepped, reference)
    assert relative_error(model, reference) > 0.05 and one_step > 1e-5  # far from the optimum, and one step does not land on it

    converged = copy.deepcopy(model)
    report = AltEraser(objective="retained", rounds=6, tol=0.0, blocks="fresh", damping=1e-14).unlearn(converged, retained, deleted)
    assert relative_error(converged, reference) < 1e-5 < one_step
    assert report.diagnostics["rounds"] > 1


def test_cached_blocks_converge_to_the_same_minimiser(users_only):
    """Cached blocks (taken at the trained model, downdated) make later steps chord-Newton steps:
    the first equals the fresh Newton step, and the iteration still reaches the exact minimiser."""
    model, retained, deleted, reference = users_only
    fresh, cached = copy.deepcopy(model), copy.deepcopy(model)
    AltEraser(rounds=1, blocks="fresh", damping=1e-14).unlearn(fresh, retained, deleted)
    report = AltEraser(rounds=1, blocks="cached", damping=1e-14, refactor_tolerance=0.0).unlearn(cached, retained, deleted)
    torch.testing.assert_close(cached.user_embedding.weight, fresh.user_embedding.weight, rtol=1e-10, atol=1e-12)
    assert report.precompute_seconds > 0
    many = copy.deepcopy(model)
    AltEraser(rounds=25, tol=0.0, blocks="cached", damping=1e-14).unlearn(many, retained, deleted)
    assert relative_error(many, reference) < 1e-5


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_gauss_newton_blocks_of_mf_are_the_exact_hessian_blocks(loss):
    """MF scores are linear in each side, so Gauss-Newton and exact blocks agree with torch.func.hessian."""
    torch.manual_seed(0)
    dm = tiny(num_users=5, num_items=6, density=0.4, seed=3)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.3, loss=loss, init_std=0.7).double()
    rows = dm.train_rows()
    users, items = torch.arange(dm.num_users), torch.arange(dm.num_items)
    exact, gauss_newton = exact_hessian_blocks(model, rows, users, items, chunk_size=3), curvature_blocks(model, rows)

    def objective(u, v):
        return call_with(model, {"user_embedding.weight": u, "item_embedding.weight": v}, lambda: model.loss(rows[:], "sum"))

    h_uu = torch.func.hessian(objective, argnums=0)(model.user_embedding.weight, model.item_embedding.weight)
    h_ii = torch.func.hessian(objective, argnums=1)(model.user_embedding.weight, model.item_embedding.weight)
    torch.testing.assert_close(exact.users, torch.stack([h_uu[u, :, u, :] for u in users]))
    torch.testing.assert_close(exact.items, torch.stack([h_ii[i, :, i, :] for i in items]))
    torch.testing.assert_close(gauss_newton.users, exact.users)
    torch.testing.assert_close(gauss_newton.items, exact.items)


def test_exact_blocks_of_neumf_are_hessian_blocks_over_both_tables():
    """NeuMF: a user's vector is its GMF and MLP rows concatenated; the exact blocks are the diagonal blocks
    of torch.func.hessian over both tables. With ReLU the score is piecewise linear in each side, so
    Gauss-Newton is exact too; with a smooth activation (tanh) the two differ."""
    torch.manual_seed(0)
    dm = tiny(num_users=5, num_items=6, density=0.4, seed=3)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=2, mlp_dim=2, mlp_layers=(4,), l2=0.3, init_std=0.7).double()
    rows = dm.train_rows()
    users, items = torch.arange(dm.num_users), torch.arange(dm.num_items)

    def objective(u, v):
        tables = {"gmf_user.weight": u[:, :2], "mlp_user.weight": u[:, 2:], "gmf_item.weight": v[:, :2], "mlp_item.weight": v[:, 2:]}
        return call_with(model, tables, lambda: model.loss(rows[:], "sum"))

    for activation in (torch.nn.ReLU(), torch.nn.Tanh()):
        model.mlp[1] = activation
        exact = exact_hessian_blocks(model, rows, users, items)
        u, v = (t.detach() for t in model.representations())
        h_uu, h_ii = (torch.func.hessian(objective, argnums=a)(u, v) for a in (0, 1))
        torch.testing.assert_close(exact.users, torch.stack([h_uu[i, :, i, :] for i in users]))
        torch.testing.assert_close(exact.items, torch.stack([h_ii[i, :, i, :] for i in items]))
        gap = (curvature_blocks(model, rows).users - exact.users).abs().max()
        assert gap < 1e-12 if isinstance(activation, torch.nn.ReLU) else gap > 1e-3


def test_rounds_reach_the_objective_of_a_tightly_trained_retrain():
    """Alternating rounds over every user and item land on the retained objective's minimum, the value a
    Retrain (same seed, L-BFGS to a tight optimum) reaches."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.4, seed=4)
    torch.manual_seed(7)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.2, init_std=0.5).double()

    def fit(fresh):
        fresh.double()
        lbfgs(list(fresh.parameters()), lambda: mean_objective(fresh, dm.train_rows()))

    fit(model)
    deleted = dm.remove(torch.tensor([0, 5, 9, 20]))
    retained = dm.train_rows()
    original_value = mean_objective(model, retained).item()
    retrained = copy.deepcopy(model)
    Retrain().unlearn(retrained, retained, deleted, UnlearningContext(seed=7, fit=fit))
    target = mean_objective(retrained, retained).item()
    unlearned = copy.deepcopy(model)
    report = AltEraser(rounds=60, tol=1e-12, scope="all", blocks="fresh").unlearn(unlearned, retained, deleted)
    value = mean_objective(unlearned, retained).item()
    assert abs(original_value - target) / target > 1e-2  # the deletion moved the optimum ...
    assert abs(value - target) / target < 1e-3  # ... and the rounds reach it
    history = report.diagnostics["objective"]
    assert history[0] == pytest.approx(original_value) and history[-1] == pytest.approx(value)
    assert all(b <= a + 1e-12 for a, b in zip(history, history[1:]))  # the line search never lets it rise


def test_blocks_that_are_not_positive_definite_get_more_damping_and_are_reported(users_only, monkeypatch):
    model, retained, deleted, _ = users_only

    def indefinite(*args, **kwargs):
        blocks = curvature_blocks(*args, **kwargs)
        blocks.users -= 1e3 * torch.eye(blocks.users.shape[-1], dtype=blocks.users.dtype)
        return blocks

    monkeypatch.setattr(alteraser, "curvature_blocks", indefinite)
    unlearned = copy.deepcopy(model)
    report = AltEraser(rounds=1, blocks="fresh").unlearn(unlearned, retained, deleted)
    diagnostics = report.diagnostics
    assert diagnostics["damped_blocks"] == diagnostics["solved_blocks"] == 3 and diagnostics["max_damping"] > 1e3
    assert diagnostics["objective"][1] < diagnostics["objective"][0]  # the damped steps still descend


def test_a_nan_block_fails_the_request_and_restores_the_model(users_only, monkeypatch):
    model, retained, deleted, reference = users_only

    def broken(*args, **kwargs):
        blocks = curvature_blocks(*args, **kwargs)
        blocks.users[1, 0, 0] = float("nan")
        return blocks

    monkeypatch.setattr(alteraser, "curvature_blocks", broken)
    unlearned = copy.deepcopy(model)
    with pytest.raises(UnlearningError, match="1 user curvature blocks could not be factored.*Try: more damping"):
        AltEraser(rounds=1, blocks="fresh").unlearn(unlearned, retained, deleted)
    assert torch.equal(unlearned.user_embedding.weight, model.user_embedding.weight)


def test_non_finite_parameters_from_a_step_are_rolled_back(users_only, monkeypatch):
    model, retained, deleted, _ = users_only
    solve = alteraser.solve_blocks

    def exploding(blocks, rhs, **kwargs):
        step, result = solve(blocks, rhs, **kwargs)
        return torch.full_like(step, float("inf")), result

    monkeypatch.setattr(alteraser, "solve_blocks", exploding)
    unlearned = copy.deepcopy(model)
    with pytest.raises(UnlearningError, match="non-finite parameters|became nan"):
        AltEraser(blocks="fresh", line_search=False).unlearn(unlearned, retained, deleted)
    assert torch.equal(unlearned.user_embedding.weight, model.user_embedding.weight)


def test_a_nan_parameter_is_refused_and_left_as_it_was(users_only):
    model, retained, deleted, _ = users_only
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.item_embedding.weight[0, 0] = float("nan")
    before = copy.deepcopy(broken.state_dict())
    with pytest.raises(UnlearningError, match="not finite"):
        AltEraser().unlearn(broken, retained, deleted)
    for key, value in broken.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True, rtol=0, atol=0)


def test_a_failed_request_does_not_leave_a_downdated_cache(users_only, monkeypatch):
    model, retained, deleted, reference = users_only
    method = AltEraser(rounds=25, tol=0.0, damping=1e-14)
    with monkeypatch.context() as patch:
        patch.setattr(CurvatureCache, "solve_factored", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("solver crashed")))
        with pytest.raises(UnlearningError, match="solver crashed"):
            method.unlearn(copy.deepcopy(model), retained, deleted)
    retried = copy.deepcopy(model)
    method.unlearn(retried, retained, deleted)
    assert relative_error(retried, reference) < 1e-5


def test_the_line_search_backtracks_each_users_own_loss(users_only, monkeypatch):
    """Blocks that understate the curvature 100-fold overshoot; each user's step is halved until that
    user's own loss decreases, so every sub-problem improves (and without the search the objective rises)."""
    model, retained, deleted, _ = users_only

    def weak(*args, **kwargs):
        blocks = curvature_blocks(*args, **kwargs)
        blocks.users /= 100
        return blocks

    monkeypatch.setattr(alteraser, "curvature_blocks", weak)
    searched, blind = copy.deepcopy(model), copy.deepcopy(model)
    report = AltEraser(blocks="fresh", damping=1e-14).unlearn(searched, retained, deleted)
    assert report.diagnostics["backtracked_blocks"] == 3 and report.diagnostics["rejected_blocks"] == 0
    for user in range(3):
        mine = retained.select(retained.users == user)
        assert searched.loss(mine[:], "sum") < model.loss(mine[:], "sum")
    report = AltEraser(blocks="fresh", damping=1e-14, line_search=False).unlearn(blind, retained, deleted)
    assert report.diagnostics["objective"][1] > report.diagnostics["objective"][0]


def test_the_graph_line_search_backtracks_until_the_whole_objective_decreases(monkeypatch):
    """LightGCN: base-row blocks that understate the curvature 100-fold overshoot; each side's one step length is
    halved until the whole retained objective decreases enough, so the round decreases it (without the search it rises)."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.35, seed=3)
    model = LightGCN(dm.num_users, dm.num_items, embedding_dim=3, num_layers=2, l2=0.3, init_std=0.5).double()
    model.set_graph(dm.train)
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()))
    deleted = dm.remove(torch.tensor([0, 7, 15]))
    model.set_graph(dm.train)
    retained = dm.train_rows()
    base_row_blocks = alteraser.base_row_blocks
    monkeypatch.setattr(alteraser, "base_row_blocks", lambda *args: base_row_blocks(*args) / 100)
    searched, blind = copy.deepcopy(model), copy.deepcopy(model)
    report = AltEraser(objective="retained", blocks="fresh", damping=1e-14).unlearn(searched, retained, deleted)
    diagnostics, history = report.diagnostics, report.diagnostics["objective"]
    assert diagnostics["backtracked_blocks"] == diagnostics["kept_users"] + diagnostics["kept_items"] > 0  # one length per side
    assert diagnostics["rejected_blocks"] == 0 and history[1] < history[0]
    assert history[1] == pytest.approx(mean_objective(searched, retained).item(), rel=1e-12)
    report = AltEraser(objective="retained", blocks="fresh", damping=1e-14, line_search=False).unlearn(blind, retained, deleted)
    assert report.diagnostics["objective"][1] > 10 * report.diagnostics["objective"][0]


def test_the_dense_line_search_backtracks_until_the_objective_decreases(monkeypatch):
    """NeuMF: dense curvature products that understate the curvature 100-fold overshoot; the dense step is halved
    until the retained objective decreases enough, so the round decreases it (without the search it rises)."""

    def weakened(make):
        def make_weak(*args, **kwargs):
            product = make(*args, **kwargs)
            return lambda v: product(v) / 100
        return make_weak

    torch.manual_seed(0)
    dm = tiny(num_users=20, num_items=15, density=0.3, seed=1)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=4, mlp_dim=4, mlp_layers=(8,), l2=0.05).double()
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()))
    deleted = dm.remove(torch.tensor([0, 4, 8]))
    retained = dm.train_rows()
    for name in ("gauss_newton_matvec", "hessian_matvec"):  # the dense step's data and penalty products
        monkeypatch.setattr(alteraser, name, weakened(getattr(alteraser, name)))
    searched, blind = copy.deepcopy(model), copy.deepcopy(model)
    report = AltEraser(objective="retained", blocks="fresh").unlearn(searched, retained, deleted)
    history = report.diagnostics["objective"]
    assert report.diagnostics["rejected_blocks"] == 0 and history[1] < history[0]
    assert not torch.equal(searched.predict.weight, model.predict.weight)  # the dense step was taken, shortened
    assert history[1] == pytest.approx(mean_objective(searched, retained).item(), rel=1e-12)
    report = AltEraser(objective="retained", blocks="fresh", line_search=False).unlearn(blind, retained, deleted)
    assert report.diagnostics["objective"][1] > 2 * report.diagnostics["objective"][0]


def test_users_left_without_rows_are_reset_to_their_initialisation():
    torch.manual_seed(0)
    dm = tiny(num_users=10, num_items=12, density=0.3, seed=1, negatives=1)
    torch.manual_seed(5)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    init = model.user_embedding.weight[4].clone()
    with torch.no_grad():
        model.user_embedding.weight.add_(1.0)  # "training" moved every user
    deleted = dm.remove(torch.zeros(0, dtype=torch.long), users=torch.tensor([4]))
    report = AltEraser().unlearn(model, dm.train_rows(), deleted, UnlearningContext(seed=5))
    assert report.diagnostics["reset_users"] == 1 and report.diagnostics["kept_users"] == 0
    assert report.diagnostics["kept_items"] > 0  # the items the user touched still take a step
    torch.testing.assert_close(model.user_embedding.weight[4], init)


@pytest.mark.parametrize("cls", [MF, NeuMF, LightGCN])
def test_every_model_descends_and_only_the_scope_moves(cls):
    torch.manual_seed(0)
    dm = tiny(num_users=20, num_items=15, density=0.3, seed=1)
    kwargs = {"gmf_dim": 4, "mlp_dim": 4, "mlp_layers": (8,)} if cls is NeuMF else {"embedding_dim": 4}
    model = cls(dm.num_users, dm.num_items, l2=0.05, **kwargs).double()
    model.set_graph(dm.train)
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()), rounds=1)
    deleted = dm.remove(torch.tensor([0, 4, 8]))  # one row of each of three users
    model.set_graph(dm.train)
    retained = dm.train_rows()
    before = copy.deepcopy(model)
    report = AltEraser(objective="retained", rounds=3, tol=0.0).unlearn(model, retained, deleted)
    assert report.diagnostics["reset_users"] == report.diagnostics["reset_items"] == 0
    history = report.diagnostics["objective"]
    assert len(history) == 4 and history[-1] < history[0] and all(b <= a + 1e-12 for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(mean_objective(model, retained).item(), rel=1e-9)
    users = before.parameter_groups()["user_embedding"][0]
    moved = torch.nonzero((model.parameter_groups()["user_embedding"][0] != users).any(1)).flatten()
    assert set(moved.tolist()) <= set(deleted.users.tolist()) and len(moved) > 0
    if cls is NeuMF:  # the dense step moved the shared weights
        assert not torch.equal(model.predict.weight, before.predict.weight) and report.diagnostics["dense_cg_iterations"] > 0


def test_first_dense_step_from_the_touched_rows_is_the_full_pass_step(monkeypatch):
    """At the trained model (anchored): the cached dense gradient minus the deleted rows', plus its change over the
    rows touching the moved users and items, and the line search on the sample: with samples that hold every row,
    the same step as the exact gradient and line search over every retained row."""
    torch.manual_seed(0)
    dm = tiny(num_users=20, num_items=15, density=0.3, seed=1)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=4, mlp_dim=4, mlp_layers=(8,), l2=0.05).double()
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()), rounds=1)
    deleted = dm.remove(torch.tensor([0, 4, 8]))
    retained = dm.train_rows()
    full = copy.deepcopy(model)
    before = copy.deepcopy(model.predict.weight)
    report = AltEraser(dense_sample=len(retained)).unlearn(model, retained, deleted)
    assert report.diagnostics["sampled_dense_steps"] == 1 and not torch.equal(model.predict.weight, before)
    monkeypatch.setattr(alteraser._DenseStart, "take", classmethod(lambda cls, *args: None))  # the full passes
    reference = AltEraser(dense_sample=len(retained)).unlearn(full, retained, deleted)
    assert reference.diagnostics["sampled_dense_steps"] == 0
    for got, want in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert report.diagnostics["objective"] == pytest.approx(reference.diagnostics["objective"], rel=1e-10)


def test_frozen_dense_weights_stay_and_a_partly_frozen_side_is_refused():
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.3, seed=1)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=2, mlp_dim=2, mlp_layers=(4,))
    deleted = dm.remove(torch.tensor([0, 1]))
    before = copy.deepcopy(model)
    report = AltEraser(dense_steps=0).unlearn(model, dm.train_rows(), deleted)
    assert torch.equal(model.predict.weight, before.predict.weight) and report.diagnostics["dense_cg_iterations"] == 0
    model.gmf_user.weight.requires_grad_(False)
    with pytest.raises(UnlearningError, match="every user embedding table trainable"):
        AltEraser().unlearn(model, dm.train_rows(), deleted)


def test_scopes_grow_from_affected_to_all():
    torch.manual_seed(0)
    dm = tiny(num_users=30, num_items=25, density=0.15, seed=1, negatives=1)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3)
    deleted = dm.remove(torch.tensor([0]))
    kept = {}
    for scope in ("affected", "affected+k-hop", "all"):
        report = AltEraser(scope=scope).unlearn(copy.deepcopy(model), dm.train_rows(), deleted)
        kept[scope] = (report.diagnostics["kept_users"], report.diagnostics["kept_items"])
    assert kept["affected"] == (1, 2)  # the row's user, its positive and its negative
    assert kept["affected"] < kept["affected+k-hop"] < kept["all"] == (dm.num_users, dm.num_items)


def test_stops_when_a_round_no_longer_decreases_the_objective_enough(users_only):
    model, retained, deleted, _ = users_only
    report = AltEraser(rounds=50, tol=1e-6).unlearn(copy.deepcopy(model), retained, deleted)
    diagnostics = report.diagnostics
    assert diagnostics["stopped"] == "tol" and 1 < diagnostics["rounds"] < 50
    history = diagnostics["objective"]
    assert (history[-2] - history[-1]) < 1e-6 * abs(history[-1]) <= (history[-3] - history[-2])


def test_row_scores_and_the_loss_from_given_representations_agree_with_score_on_every_model():
    torch.manual_seed(0)
    dm = tiny(num_users=10, num_items=12, density=0.3, seed=1)
    batch = dm.train_rows()[:]
    for model in (MF(10, 12, embedding_dim=3, loss="bce"), NeuMF(10, 12, gmf_dim=2, mlp_dim=2, mlp_layers=(4,)), LightGCN(10, 12, embedding_dim=3)):
        model.set_graph(dm.train)
        z = model.row_scores(batch)
        k = batch["negatives"].shape[1]
        torch.testing.assert_close(z[:, 0], model.score(batch["users"], batch["items"]))
        torch.testing.assert_close(z[:, 1:], model.score(batch["users"].repeat_interleave(k), batch["negatives"].reshape(-1)).view(-1, k))
        torch.testing.assert_close(model.loss(batch, "none", model.representations()), model.loss(batch, "none"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rounds": 0}, "rounds"), ({"tol": -1.0}, "tol"), ({"scope": "touched"}, "scope"), ({"k_hop": 0}, "k_hop"),
     ({"curvature": "fisher"}, "curvature"), ({"blocks": "stale"}, "blocks"), ({"damping": 0.0}, "damping"),
     ({"curvature": "hessian"}, "blocks='fresh'"), ({"max_backtracks": -1}, "max_backtracks"), ({"dense_steps": 1.5}, "dense_steps"),
     ({"chunk_size": 0}, "chunk_size"), ({"refactor_tolerance": 1.0}, "refactor_tolerance")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AltEraser(**kwargs)


def test_compare_reports_the_rounds_and_objectives(tmp_path):
    """AltEraser's diagnostics (rounds, objective per round, damped blocks) reach the comparison document."""
    from lightning_unlearn.unlearning.compare import compare
    from lightning_unlearn.unlearning.deletion import DeletionSpec
    from lightning_unlearn.unlearning.recipe import FitRecipe

    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=40, num_items=30, density=0.2, seed=1), num_negatives=2, batch_size=64)
    dm.setup()
    recipe = FitRecipe(max_epochs=2, monitor=None)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    recipe(model, dm)
    result = compare(model, dm, [Retrain(), AltEraser(rounds=2, tol=0.0)], DeletionSpec(fraction=0.05), recipe, progress=lambda _: None)
    entry = next(m for m in result["methods"] if m["name"].startswith("AltEraser"))
    diagnostics = entry["diagnostics"]
    assert diagnostics["rounds"] == 2 and len(diagnostics["objective"]) == 3 and "damped_blocks" in diagnostics
    assert entry["precompute_seconds"] > 0 and entry["completeness"]["gap_closed_rank"] == entry["completeness"]["gap_closed_rank"]


def test_the_cached_gradient_gives_the_same_first_steps_as_a_pass_over_the_rows():
    """The gradient cached with the blocks (every row's, minus the deleted rows') is the retained gradient:
    with the users fixed the item step starts from the trained model, and the cached path (no pass over
    the retained rows for the gradient) equals the fresh one."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.4, seed=4)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.2, init_std=0.5).double()
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()), rounds=1)
    model.user_embedding.weight.requires_grad_(False)
    deleted = dm.remove(torch.tensor([0, 5, 9]))
    retained = dm.train_rows()
    fresh, cached = copy.deepcopy(model), copy.deepcopy(model)
    AltEraser(objective="retained", blocks="fresh").unlearn(fresh, retained, deleted)
    method = AltEraser(objective="retained", blocks="cached", refactor_tolerance=0.0)
    assert method.prepare(model, retained.concat(deleted)) > 0
    report = method.unlearn(cached, retained, deleted)
    assert report.precompute_seconds == 0 and report.diagnostics["reset_items"] == 0  # prepared ahead: nothing left to pay
    torch.testing.assert_close(cached.item_embedding.weight, fresh.item_embedding.weight, rtol=1e-10, atol=1e-12)
    assert not torch.equal(cached.item_embedding.weight, model.item_embedding.weight)
    assert report.diagnostics["objective"] == pytest.approx([mean_objective(m, retained).item() for m in (model, cached)], rel=1e-12)


def test_requests_one_after_another_reach_the_optimum_of_what_remains(users_only):
    """The callback's flow: a second request reuses the (adopted, downdated) blocks and computes its gradients."""
    model, retained, deleted, reference = users_only
    first, second = deleted.select(torch.tensor([True, False, False])), deleted.select(torch.tensor([False, True, True]))
    method = AltEraser(rounds=25, tol=0.0, damping=1e-14)
    unlearned = copy.deepcopy(model)
    reports = [method.unlearn(unlearned, retained.concat(second), first), method.unlearn(unlearned, retained, second)]
    assert reports[0].precompute_seconds > 0 and reports[1].precompute_seconds == 0
    assert relative_error(unlearned, reference) < 1e-5


def test_reused_factors_change_the_path_not_the_destination(users_only):
    """Factors kept from the trained model (within refactor_tolerance) make the first step slightly inexact;
    the exact gradient still leads the rounds to the minimiser."""
    model, retained, deleted, reference = users_only
    method = AltEraser(rounds=40, tol=0.0, damping=1e-14, refactor_tolerance=0.5)
    method.prepare(model, retained.concat(deleted))
    unlearned = copy.deepcopy(model)
    report = method.unlearn(unlearned, retained, deleted)
    assert report.diagnostics["refactored_blocks"] < report.diagnostics["solved_blocks"]  # some factors were reused
    assert relative_error(unlearned, reference) < 1e-5


def test_the_anchored_first_step_is_the_influence_function_step(users_only):
    """objective="anchored" counts the trained model as stationary: with the item side fixed its first
    step is IFRU's block step on the deleted rows' gradient (the influence function)."""
    from lightning_unlearn.unlearning.methods import IFRU

    model, retained, deleted, _ = users_only
    anchored, influence = copy.deepcopy(model), copy.deepcopy(model)
    AltEraser(objective="anchored", damping=1e-10, refactor_tolerance=0.0, line_search=False).unlearn(anchored, retained, deleted)
    IFRU(damping=1e-10, solver="block", tol=1e-12).unlearn(influence, retained, deleted)
    torch.testing.assert_close(anchored.user_embedding.weight, influence.user_embedding.weight, rtol=1e-9, atol=1e-12)


def test_anchored_rounds_keep_the_trained_models_residual_instead_of_training_on():
    """From a model stopped early, retained rounds converge to a stationary point of the retained objective
    (they go on training); anchored rounds to the point where the retained gradient equals the trained
    model's own gradient over every row (its stationarity residual): only the deletion's effect is removed."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.4, seed=4)
    torch.manual_seed(3)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.2, init_std=0.5).double()
    every = dm.train_rows()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):  # stopped early: far from stationary
        opt.zero_grad()
        mean_objective(model, every).backward()
        opt.step()
    residual = torch.cat([r.flatten() for r in torch.autograd.grad(model.loss(every[:], "sum"), list(model.parameters()))])
    assert residual.norm() > 1e-2
    deleted = dm.remove(torch.tensor([0, 5, 9, 20]))
    retained = dm.train_rows()
    anchored, trained_on = copy.deepcopy(model), copy.deepcopy(model)
    report = AltEraser(objective="anchored", rounds=60, tol=1e-13, scope="all", blocks="fresh").unlearn(anchored, retained, deleted)
    AltEraser(objective="retained", rounds=60, tol=1e-13, scope="all", blocks="fresh").unlearn(trained_on, retained, deleted)

    def retained_gradient(m):
        return torch.cat([g.flatten() for g in torch.autograd.grad(m.loss(retained[:], "sum"), list(m.parameters()))])

    assert (retained_gradient(anchored) - residual).norm() < 1e-6 * residual.norm()
    assert retained_gradient(trained_on).norm() < 1e-6 * residual.norm()
    assert report.diagnostics["objective_kind"] == "anchored"


def test_anchored_equals_retained_at_a_stationary_point():
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.4, seed=4)
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.2, init_std=0.5).double()
    lbfgs(list(model.parameters()), lambda: mean_objective(model, dm.train_rows()))
    deleted = dm.remove(torch.tensor([0, 5, 9, 20]))
    retained = dm.train_rows()
    results = {}
    for objective in ("retained", "anchored"):
        unlearned = copy.deepcopy(model)
        AltEraser(objective=objective, rounds=3, tol=0.0).unlearn(unlearned, retained, deleted)
        results[objective] = torch.cat([unlearned.user_embedding.weight, unlearned.item_embedding.weight])
    torch.testing.assert_close(results["anchored"], results["retained"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_slot_changes_equal_the_loss_with_one_score_moved(loss):
    """The line search's per-slot change: the row's data term with only slot s moved, minus as it was."""
    torch.manual_seed(0)
    old, new = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    one_moved = old.unsqueeze(1).repeat(1, 4, 1)  # [r, s, :] = old scores with slot s at its new value
    one_moved.diagonal(dim1=1, dim2=2).copy_(new)
    expected = data_loss(one_moved, loss) - data_loss(old, loss).unsqueeze(1)
    torch.testing.assert_close(slot_changes(old, new, loss), expected, rtol=1e-12, atol=1e-14)


def test_fresh_blocks_build_no_cache_and_still_prepare_the_anchor(users_only):
    model, retained, deleted, _ = users_only
    method = AltEraser(blocks="fresh")
    seconds = method.prepare(model, retained.concat(deleted))
    assert seconds > 0 and method.prepared_for(model)  # the anchored objective's gradient, paid once
    with pytest.raises(RuntimeError, match="empty"):
        _ = method.cache.blocks  # nothing was cached


def test_a_cache_past_its_budget_computes_the_blocks_it_does_not_hold(users_only):
    """AltEraser(blocks="auto") with a cache of about a third of the blocks reaches the full cache's result."""
    model, retained, deleted, reference = users_only
    full, bounded = copy.deepcopy(model), copy.deepcopy(model)
    AltEraser(rounds=5).unlearn(full, retained, deleted)
    budget = cache_bytes(model) / 3 / 2**30
    report = AltEraser(rounds=5, cache_budget_gb=budget).unlearn(bounded, retained, deleted)
    assert report.diagnostics["blocks"] == "cached" and report.diagnostics["cache_misses"] > 0
    torch.testing.assert_close(bounded.user_embedding.weight, full.user_embedding.weight, rtol=1e-5, atol=1e-6)
    assert relative_error(bounded, reference) < 1e-4


def test_the_first_request_reuses_the_trained_models_row_scores(monkeypatch):
    """The first side step's line search starts from the row scores of the anchor's pass (no pass to score
    the rows again), and the request is the one that scores them afresh."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.5, seed=4)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=3, mlp_dim=2, mlp_layers=(4,), l2=0.1).double()
    deleted = dm.remove(torch.nonzero(dm.train_rows().users == 0).flatten())  # a whole user: the items' step comes first
    retained = dm.train_rows()
    found, of = [], RowScores.of

    def spy(self, rows):
        out = of(self, rows)
        found.append(out is not None)
        return out

    results = []
    for lookup in (spy, lambda self, rows: None):
        monkeypatch.setattr(RowScores, "of", lookup)
        updated, method = copy.deepcopy(model), AltEraser(dense_steps=0)
        method.prepare(updated, retained.concat(deleted))
        method.unlearn(updated, retained, deleted)
        results.append(updated)
    assert found == [True]
    for name, tensor in results[0].state_dict().items():
        torch.testing.assert_close(tensor, results[1].state_dict()[name], rtol=1e-12, atol=1e-14)
    assert not torch.equal(results[0].gmf_item.weight, model.gmf_item.weight)


def test_row_scores_are_found_by_row_and_refused_for_a_row_scored_otherwise():
    rows = TrainRows(torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 3, 2]), torch.tensor([[1, 3], [2, 1], [0, 2], [0, 1]]))
    scores = torch.arange(12.0).view(4, 3)
    known = RowScores(rows, scores, num_items=4)
    order = torch.tensor([3, 0, 2])
    torch.testing.assert_close(known.of(rows.select(order)), scores[order])
    assert known.of(rows.select(order[:0])).shape == (0, 3)
    assert known.of(TrainRows(torch.tensor([1]), torch.tensor([3]), torch.tensor([[0, 1]]))) is None  # other negatives
    assert known.of(TrainRows(torch.tensor([2]), torch.tensor([3]), torch.tensor([[0, 1]]))) is None  # never scored
    assert known.of(TrainRows(torch.tensor([3]), torch.tensor([0]), torch.tensor([[0, 1]]))) is None  # past every key
    assert known.of(TrainRows(torch.tensor([0]), torch.tensor([2]), torch.tensor([[1]]))) is None  # fewer negatives


@pytest.mark.parametrize("model_class", [MF, NeuMF])
def test_the_items_gradient_after_the_users_moved_is_brought_up_to_date_from_their_rows_only(model_class):
    """Engine.moved_gradient: the gradient w.r.t. the items before some users moved, plus its change over those users'
    rows, equals the gradient over every row at the moved users; their rows' scores are replaced, the move is kept; when
    most rows moved, it hands the gradient back to a pass over every row."""
    torch.manual_seed(0)
    dm = tiny(num_users=9, num_items=12)
    rows = dm.train_rows()
    options = {"embedding_dim": 3} if model_class is MF else {"gmf_dim": 2, "mlp_dim": 2, "mlp_layers": (4,), "loss": "bce"}
    model = model_class(dm.num_users, dm.num_items, l2=0.1, **options).double()
    engine = Engine(model, rows, len(rows), UnlearningContext(), chunk_size=7, graph=False)
    users, items, ids = Side(model, "user_embedding"), Side(model, "item_embedding"), torch.arange(dm.num_items)
    grad, scores = engine.gradient(items, ids, rows)
    known = RowScores(rows, scores, dm.num_items)
    moved = torch.tensor([1, 4, 6])
    before = users.gather(moved)
    users.set_(moved, before + torch.randn_like(before))
    after = users.gather(moved)
    updated, updated_scores = engine.moved_gradient(items, ids, rows, grad, known, (users, moved, before))
    exact, exact_scores = engine.gradient(items, ids, rows)
    assert not torch.allclose(grad, exact)  # the move changed the items' gradient
    torch.testing.assert_close(updated, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(updated_scores.of(rows), exact_scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(known.of(rows), scores) and torch.equal(users.gather(moved), after)
    everyone = torch.arange(dm.num_users)  # every row moved: a pass over them all is cheaper than two
    assert engine.moved_gradient(items, ids, rows, grad, known, (users, everyone, users.gather(everyone))) == (None, None)


def test_an_interactions_request_brings_the_items_gradient_up_to_date_from_the_moved_users_rows(monkeypatch):
    """After the users' step, the first request's items' step starts from the cached gradient brought up to date over
    the moved users' rows (Engine.moved_gradient), not from a pass over every row: the same update, to rounding."""
    torch.manual_seed(0)
    dm = tiny(num_users=12, num_items=10, density=0.5, seed=4)
    model = NeuMF(dm.num_users, dm.num_items, gmf_dim=3, mlp_dim=2, mlp_layers=(4,), l2=0.1).double()
    deleted = dm.remove(torch.tensor([0, 5, 9, 20]))  # rows of users who keep others: the users' step moves them
    retained = dm.train_rows()
    calls, moved_gradient = [], Engine.moved_gradient

    def spy(self, *args):
        out = moved_gradient(self, *args)
        calls.append(out[0] is not None)  # brought up to date (not handed back to a pass over every row)
        return out

    results = []
    for replacement in (spy, lambda self, *args: (None, None)):  # None: the items' gradient over every row
        monkeypatch.setattr(Engine, "moved_gradient", replacement)
        updated, method = copy.deepcopy(model), AltEraser(dense_steps=0)
        method.prepare(updated, retained.concat(deleted))
        report = method.unlearn(updated, retained, deleted)
        results.append(updated)
    assert calls == [True] and report.diagnostics["kept_users"] > 0
    for name, tensor in results[0].state_dict().items():
        torch.testing.assert_close(tensor, results[1].state_dict()[name], rtol=1e-10, atol=1e-12)
    assert not torch.equal(results[0].gmf_item.weight, model.gmf_item.weight)


@pytest.mark.parametrize("path", ["one matmul", "gathered pairs"])
def test_engine_gradients_of_mf_for_some_ids_are_the_rows_of_the_whole_gradient(path, monkeypatch):
    """Engine.gradients on MF sums the gradients of the ids asked for only (no table-sized cotangent): they are the rows
    of the whole tables' autograd gradient at those ids, in their order, repeated ids too; a frozen table's are zero."""
    from lightning_unlearn.unlearning.methods import subproblems

    torch.manual_seed(0)
    dm = tiny(num_users=9, num_items=12)
    rows = dm.train_rows()
    model = MF(dm.num_users, dm.num_items, embedding_dim=3, l2=0.1).double()
    if path == "gathered pairs":
        monkeypatch.setattr(subproblems, "_MATMUL_ADVANTAGE", 0)
    engine = Engine(model, rows, len(rows), UnlearningContext(), chunk_size=7, graph=False)
    sides, ids = [Side(model, "user_embedding"), Side(model, "item_embedding")], [torch.tensor([5, 0, 5, 8]), torch.tensor([11, 3, 3, 0, 7])]
    grads, _ = engine.gradients(sides, ids, rows)
    whole = torch.autograd.grad(model.loss(rows[:], "sum"), [model.user_embedding.weight, model.item_embedding.weight])
    for grad, expected, chosen in zip(grads, whole, ids):
        torch.testing.assert_close(grad, expected[chosen], rtol=1e-10, atol=1e-12)
    model.item_embedding.weight.requires_grad_(False)
    frozen, _ = engine.gradients(sides[1:], ids[1:], rows)
    torch.testing.assert_close(frozen[0], model.l2 * engine.counts(sides[1], ids[1], rows).unsqueeze(1) * sides[1].gather(ids[1]))


@pytest.mark.parametrize("Model", [MF, LightGCN, NeuMF])
def test_engine_penalty_from_occurrences_equals_the_rows_penalty(Model):
    """Engine.penalty: from each id's occurrences and squared norms when the rows' slots outnumber the ids, else row by row."""
    torch.manual_seed(0)
    dm = tiny(num_users=6, num_items=9, density=0.6, seed=3, negatives=3)
    options = {"gmf_dim": 3, "mlp_dim": 2, "mlp_layers": [4, 2]} if Model is NeuMF else {"embedding_dim": 3}
    model = Model(dm.num_users, dm.num_items, **options)
    if Model is LightGCN:
        model.set_graph(dm.train)
    rows = dm.train_rows()
    engine = Engine(model, rows, len(rows), UnlearningContext(), 64, graph=Model is LightGCN)
    for subset in (rows, rows.select(torch.arange(2))):  # the first outnumbers the 15 ids, 2 rows x 4 slots do not
        expected = model.embedding_penalty(subset.users, item_slots(subset[:])).double().sum()
        torch.testing.assert_close(engine.penalty(subset), expected, rtol=1e-6, atol=0)


def test_graph_blocks_solved_from_the_kept_inverses_are_the_direct_solve():
    """LightGCN: CG from the inverses kept at the build gives solve_blocks' answer; blocks without
    a kept inverse (none kept, or forgotten) are factorised, and counted."""
    from lightning_unlearn.unlearning.methods.curvature import base_row_blocks
    from lightning_unlearn.unlearning.methods.scope import occurrences

    torch.manual_seed(0)
    dm = tiny(num_users=20, num_items=15, density=0.3, seed=1)
    model = LightGCN(dm.num_users, dm.num_items, embedding_dim=4, l2=0.05).double()
    model.set_graph(dm.train)
    rows = dm.train_rows()
    method = AltEraser()
    method.prepare(model, rows)
    shift = method.damping * len(rows)
    assert method.cache.preconditioned("users", shift) and method.cache.preconditioned("items", shift)
    ids = torch.arange(dm.num_users)
    blocks = base_row_blocks(model, "users", ids, method.cache.block("users", ids), occurrences(rows, "users", model).double())
    jitter = torch.randn(dm.num_users, 4, 1, dtype=torch.float64)
    blocks = blocks + 0.05 * blocks.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1) * (jitter @ jitter.mT)  # as a request's deletion would
    rhs = torch.randn(dm.num_users, 4, dtype=torch.float64)
    expected, _ = alteraser.solve_blocks(blocks, rhs, damping=shift)
    x, result, factorised = alteraser._solve_from_kept(blocks, rhs, shift, method.cache, "users", ids)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-10)
    assert factorised == 0 and result.failed_blocks == 0
    method.cache._inverses["users"].forget(torch.tensor([3]))
    x, _, factorised = alteraser._solve_from_kept(blocks, rhs, shift, method.cache, "users", ids)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-10)
    assert factorised == 1
    assert alteraser._solve_from_kept(blocks, rhs, shift, None, "users", ids)[2] == dm.num_users
