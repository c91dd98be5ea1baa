"""The Recommender contract, checked against direct computations for MF, LightGCN and NeuMF."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_unlearn.data import Interactions, planted_low_rank
from lightning_unlearn.losses import item_slots
from lightning_unlearn.models import MF, LightGCN, NeuMF, Recommender, lightgcn, normalized_adjacency
from lightning_unlearn.unlearning.methods import Retrain

N_USERS, N_ITEMS = 7, 9


def graph() -> Interactions:
    return planted_low_rank(N_USERS, N_ITEMS, rank=2, density=0.3, seed=1)


def make(cls, loss="bpr", **kwargs) -> Recommender:
    torch.manual_seed(0)
    kwargs = {"l2": 0.1, **kwargs}
    if cls is NeuMF:
        model = NeuMF(N_USERS, N_ITEMS, gmf_dim=3, mlp_dim=4, mlp_layers=(6, 3), loss=loss, **kwargs)
    else:
        model = cls(N_USERS, N_ITEMS, embedding_dim=4, loss=loss, **kwargs)
    model.set_graph(graph())
    return model.double()


def batch(seed=0, size=6, k=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "users": torch.randint(N_USERS, (size,), generator=g),
        "items": torch.randint(N_ITEMS, (size,), generator=g),
        "negatives": torch.randint(N_ITEMS, (size, k), generator=g),
    }


MODELS = [MF, LightGCN, NeuMF]


@pytest.mark.parametrize("cls", MODELS)
def test_full_scores_equal_pairwise_scores(cls):
    model = make(cls)
    users = torch.tensor([0, 3, 6])
    full = model.full_scores(users)
    pairs = model.score(users.unsqueeze(1).expand(-1, N_ITEMS), torch.arange(N_ITEMS).expand(3, -1))
    torch.testing.assert_close(full, pairs)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_loss_is_the_documented_finite_sum(cls, loss):
    model = make(cls, loss=loss)
    b = batch()
    users, items, negs = b["users"], b["items"], b["negatives"]
    pos = model.score(users, items)
    neg = model.score(users.unsqueeze(1).expand_as(negs), negs)
    if loss == "bpr":
        data = -F.logsigmoid(pos.unsqueeze(1) - neg).sum(1)
    else:
        data = -F.logsigmoid(pos) - F.logsigmoid(-neg).sum(1)
    user_tables = model.parameter_groups()["user_embedding"]
    item_tables = model.parameter_groups()["item_embedding"]
    sq = sum(t[users].square().sum(1) for t in user_tables)
    sq = sq + sum(t[items].square().sum(1) + t[negs].square().sum((1, 2)) for t in item_tables)
    expected = data + 0.5 * model.l2 * sq
    torch.testing.assert_close(model.loss(b, reduction="none"), expected)
    torch.testing.assert_close(model.loss(b, reduction="sum"), expected.sum())
    torch.testing.assert_close(model.loss(b), expected.mean())


@pytest.mark.parametrize("cls", MODELS)
def test_parameter_groups_cover_every_parameter_once(cls):
    model = make(cls)
    groups = model.parameter_groups()
    assert set(groups) == {"user_embedding", "item_embedding", "dense"}
    listed = [id(p) for ps in groups.values() for p in ps]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    for name in ("user_embedding", "item_embedding"):
        rows = N_USERS if name == "user_embedding" else N_ITEMS
        assert all(p.shape[0] == rows for p in groups[name])


def test_row_loss_touches_only_its_rows_in_mf():
    model = make(MF)
    b = {k: v[:1] for k, v in batch().items()}
    model.loss(b, reduction="sum").backward()
    touched_users = model.user_embedding.weight.grad.abs().sum(1) > 0
    touched_items = model.item_embedding.weight.grad.abs().sum(1) > 0
    assert touched_users.nonzero().flatten().tolist() == b["users"].tolist()
    assert set(touched_items.nonzero().flatten().tolist()) == set(b["items"].tolist() + b["negatives"][0].tolist())


def test_normalized_adjacency_matches_dense_formula():
    data = graph()
    a = torch.zeros(N_USERS + N_ITEMS, N_USERS + N_ITEMS)
    a[data.users, N_USERS + data.items] = 1
    a[N_USERS + data.items, data.users] = 1
    d = a.sum(1).clamp_min(1).rsqrt()
    torch.testing.assert_close(normalized_adjacency(data).to_dense(), d[:, None] * a * d[None, :])


def test_lightgcn_representations_match_dense_propagation():
    model = make(LightGCN, num_layers=2)
    a = model.adjacency.to_dense()
    e0 = torch.cat([model.user_embedding.weight, model.item_embedding.weight])
    final = (e0 + a @ e0 + a @ a @ e0) / 3
    users, items = model.representations()
    torch.testing.assert_close(torch.cat([users, items]), final)


def test_lightgcn_gradient_and_hessian_vector_product_match_plain_autograd(monkeypatch):
    """The propagation's own backward (A is symmetric) against autograd's backward of A @ x."""
    model, b = make(LightGCN, num_layers=2), batch(size=12)
    v = [torch.randn_like(p) for p in model.parameters()]

    def grad_and_hvp():
        params = list(model.parameters())
        grads = torch.autograd.grad(model.loss(b), params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v)), params)
        return [g.detach() for g in grads] + list(hvp)

    got = grad_and_hvp()
    monkeypatch.setattr(lightgcn._Propagate, "apply", lambda adjacency, x: adjacency.to_dense() @ x)
    for g, w in zip(got, grad_and_hvp(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_lightgcn_without_graph_and_wrong_graph():
    model = LightGCN(N_USERS, N_ITEMS, embedding_dim=2)
    with pytest.raises(RuntimeError, match="set_graph"):
        model.full_scores(torch.tensor([0]))
    with pytest.raises(ValueError, match="users x"):
        model.set_graph(Interactions.from_raw([0], [0]))


@pytest.mark.parametrize("layers", [(), (5,), (6, 3)])
def test_neumf_scores_split_the_first_layer_exactly(layers):
    """interact, full_scores and row_scores (without gradients, over repeated items) take each side's half of the first
    MLP layer apart; each must equal the paper's network, the MLP over the concatenated embeddings, on every pair."""
    torch.manual_seed(0)
    model = NeuMF(N_USERS, N_ITEMS, gmf_dim=3, mlp_dim=4, mlp_layers=layers).double()
    for p in model.parameters():
        torch.nn.init.normal_(p)  # non-zero biases and large weights: every term counts
    users = torch.arange(N_USERS)
    user_vectors, item_vectors = (2.0 * v for v in model.representations())  # scores from given vectors too
    u, i = user_vectors.unsqueeze(1).expand(-1, N_ITEMS, -1), item_vectors.unsqueeze(0).expand(N_USERS, -1, -1)
    fused = torch.cat([u[..., :3] * i[..., :3], model.mlp(torch.cat([u[..., 3:], i[..., 3:]], dim=-1))], dim=-1)
    paper = model.predict(fused).squeeze(-1)
    pairs = model.interact(user_vectors[users].unsqueeze(1), item_vectors.unsqueeze(0))
    torch.testing.assert_close(pairs, paper, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.full_scores(users, (user_vectors, item_vectors)), paper, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    batch = {"users": torch.randint(0, N_USERS, (40,), generator=g), "items": torch.randint(0, N_ITEMS, (40,), generator=g),
             "negatives": torch.randint(0, N_ITEMS, (40, 3), generator=g)}
    expected = paper[batch["users"].unsqueeze(1), item_slots(batch)]
    with torch.no_grad():  # 160 slots over a few items: each distinct item's first-layer half once
        torch.testing.assert_close(model.row_scores(batch, (user_vectors, item_vectors)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.row_scores(batch, (user_vectors, item_vectors)), expected, rtol=1e-12, atol=1e-12)


def test_neumf_dense_penalty_and_chunked_scores():
    model = make(NeuMF, dense_l2=0.5)
    weights = [model.mlp[0].weight, model.mlp[2].weight, model.predict.weight]
    torch.testing.assert_close(model.dense_penalty(), 0.25 * sum(w.square().sum() for w in weights))
    full = model.full_scores(torch.arange(N_USERS))
    model.max_pairs_per_chunk = N_ITEMS  # one user per chunk
    torch.testing.assert_close(model.full_scores(torch.arange(N_USERS)), full)


def test_neumf_pretraining_trains_each_branch_on_its_own_loss(monkeypatch):
    """Pre-training epochs: each branch scored alone (its half of the output layer, doubled, plus the bias)."""
    from lightning_unlearn.losses import data_loss

    model = make(NeuMF, loss="bce", dense_l2=0.5, pretrain_epochs=2)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    rows = batch()
    slots = torch.cat([rows["items"].unsqueeze(1), rows["negatives"]], dim=1)
    w, b = model.predict.weight[0], model.predict.bias[0]
    gmf = (model.gmf_user.weight[rows["users"]].unsqueeze(1) * model.gmf_item.weight[slots]) @ w[:3]
    mlp_in = torch.cat([model.mlp_user.weight[rows["users"]].unsqueeze(1).expand(-1, slots.shape[1], -1), model.mlp_item.weight[slots]], -1)
    mlp = model.mlp(mlp_in) @ w[3:]
    penalty = 0.5 * model.l2 * model.embedding_penalty(rows["users"], slots)
    expected = (data_loss(2 * gmf + b, "bce") + data_loss(2 * mlp + b, "bce") + penalty).mean() + model.dense_penalty()
    monkeypatch.setattr(NeuMF, "log", lambda *args, **kwargs: None)
    torch.testing.assert_close(model.training_step(rows, 0), expected)
    # the fused score is the alpha = 0.5 mix of the two branches' predictions
    torch.testing.assert_close(model.row_scores(rows), 0.5 * ((2 * gmf + b) + (2 * mlp + b)))
    monkeypatch.setattr(NeuMF, "current_epoch", property(lambda self: 2))  # past pre-training: the fused objective
    torch.testing.assert_close(model.training_step(rows, 0), model.loss(rows) + model.dense_penalty())
    assert model.fresh().pretrain_epochs == 2
    with pytest.raises(ValueError, match="pretrain_epochs"):
        NeuMF(3, 3, pretrain_epochs=-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"loss": "hinge"}, "loss"), ({"optimizer": "lbfgs"}, "optimizer"), ({"l2": -1.0}, "l2"), ({"num_users": 0}, "num_users")],
)
def test_bad_arguments(kwargs, match):
    args = {"num_users": 3, "num_items": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        MF(**args)


@pytest.mark.parametrize("cls", MODELS)
def test_deepcopy_gives_an_independent_model(cls):
    import copy

    model = make(cls)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone.full_scores(torch.arange(N_USERS)), model.full_scores(torch.arange(N_USERS)))
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(model.parameters()))


@pytest.mark.parametrize(("build", "named"), [
    (lambda: MF(5, 4, embedding_dim=0), r"MF\(embedding_dim=...\) must be an integer >= 1"),
    (lambda: MF(5, 4, embedding_dim=2.5), "embedding_dim"),
    (lambda: MF(5, 4, lr=float("nan")), "finite lr"),
    (lambda: MF(5, 4, l2=float("nan")), "finite l2"),
    (lambda: LightGCN(5, 4, num_layers=2.5), "num_layers"),
    (lambda: NeuMF(5, 4, gmf_dim=0), "gmf_dim"),
    (lambda: NeuMF(5, 4, mlp_layers=(8, 0)), r"mlp_layers\[1\]"),
    (lambda: NeuMF(5, 4, dense_l2=-1.0), "dense_l2"),
    (lambda: Retrain(seed=1.5), r"Retrain\(seed=...\)"),
    (lambda: Retrain(seed=2**40), "2\\*\\*32"),
])
def test_nonsense_sizes_and_rates_are_refused_when_built(build, named):
    with pytest.raises(ValueError, match=named):
        build()


def test_the_model_digest_is_of_the_exact_parameters_whatever_the_thread_count():
    """A record journals it to know a checkpoint of an older state: it must not depend on how the sums are taken."""
    from lightning_unlearn.models.functional import model_digest

    model = MF(300, 200, embedding_dim=16)
    threads = torch.get_num_threads()
    try:
        digests = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            digests.add(model_digest(model))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        model.item_embedding.weight[7, 3] = torch.nextafter(model.item_embedding.weight[7, 3], torch.tensor(2.0))
    assert len(digests) == 1 and model_digest(model) not in digests


def test_neumf_given_an_embedding_dim_names_its_widths():
    with pytest.raises(TypeError, match="NeuMF has no embedding_dim: its embeddings are gmf_dim"):
        NeuMF(5, 4, embedding_dim=8)
