"""Full-ranking metrics against torchmetrics' retrieval metrics (the oracle), to 1e-6."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG, RetrievalRecall

from lightning_unlearn import ranking
from lightning_unlearn.metrics import FullRankingMetrics, ranking_metrics
from lightning_unlearn.ranking import _count_below, candidate_layout, metric_prefix, sparse_ranking_metrics

KS = (1, 3, 5, 10)


def random_case(seed: int, users: int = 25, items: int = 30):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(users, items, generator=g)
    exclude = torch.rand(users, items, generator=g) < 0.3
    target = (torch.rand(users, items, generator=g) < 0.15) & ~exclude
    target[:3] = False  # users with no test items
    return scores, target, exclude


def oracle(scores, target, exclude, k: int, empty_target_action: str) -> dict[str, float]:
    """torchmetrics on the non-excluded items of each user (the retrieval 'documents').

    torchmetrics' recall counts only documents with a positive score as retrieved, so the
    scores go through a sigmoid first (ranking metrics are invariant to monotone maps).
    """
    keep = ~exclude
    indexes = torch.arange(len(scores)).unsqueeze(1).expand_as(scores)[keep]
    preds, labels = scores.sigmoid()[keep], target[keep]
    out = {}
    for name, cls in (("recall", RetrievalRecall), ("ndcg", RetrievalNormalizedDCG), ("hit", RetrievalHitRate)):
        metric = cls(top_k=k, empty_target_action=empty_target_action)
        out[f"{name}@{k}"] = metric(preds, labels, indexes=indexes).item()
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("empty_target_action", ["skip", "neg"])
def test_matches_torchmetrics(seed, empty_target_action):
    scores, target, exclude = random_case(seed)
    metric = FullRankingMetrics(KS, auc=False, empty_target_action=empty_target_action)
    for chunk in torch.arange(len(scores)).split(7):  # several updates, like evaluation batches
        metric.update(scores[chunk], target[chunk], exclude[chunk])
    ours = {k: v.item() for k, v in metric.compute().items()}
    for k in KS:
        for name, value in oracle(scores, target, exclude, k, empty_target_action).items():
            assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_auc_matches_per_user_binary_auroc():
    scores, target, exclude = random_case(7)
    per_user = ranking_metrics(scores, target, exclude, ks=(5,), auc=True)["auc"]
    for u in range(len(scores)):
        keep = ~exclude[u]
        if target[u].any():
            expected = binary_auroc(scores[u][keep], target[u][keep].long()).item()
            assert per_user[u].item() == pytest.approx(expected, abs=1e-6)
        else:
            assert per_user[u].item() == 0.0


def test_k_larger_than_items_and_all_relevant():
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    target = torch.tensor([[True, True, False]])
    out = ranking_metrics(scores, target, ks=(2, 50))
    assert out["recall@2"].item() == 1.0 and out["ndcg@2"].item() == pytest.approx(1.0)
    assert out["recall@50"].item() == 1.0 and out["auc"].item() == 1.0


def test_worst_ranking_gives_zero():
    scores = torch.tensor([[0.9, 0.8, 0.1]])
    target = torch.tensor([[False, False, True]])
    out = ranking_metrics(scores, target, ks=(2,))
    assert out["recall@2"].item() == 0.0 and out["hit@2"].item() == 0.0 and out["auc"].item() == 0.0


def test_reset_and_state_sum():
    scores, target, exclude = random_case(1)
    whole = FullRankingMetrics((5,))
    whole.update(scores, target, exclude)
    parts = [FullRankingMetrics((5,)) for _ in range(2)]
    parts[0].update(scores[:10], target[:10], exclude[:10])
    parts[1].update(scores[10:], target[10:], exclude[10:])
    merged = parts[0]
    merged.merge_state(parts[1])  # what a multi-device sum-reduce does
    for name, value in whole.compute().items():
        assert merged.compute()[name].item() == pytest.approx(value.item(), abs=1e-6)
    whole.reset()
    assert whole.users.item() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ks": ()}, "cut-offs"), ({"ks": (0,)}, "cut-offs"), ({"empty_target_action": "pos"}, "empty_target_action")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FullRankingMetrics(**kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        ranking_metrics(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------- sparse path vs. the dense one
def dense_reference(scores, target, exclude=None, ks=(10, 20), auc=True):
    """The former dense-mask implementation, kept as the oracle of the sparse path."""
    scores = scores.float()
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    kmax = min(max(ks), scores.shape[1])
    top = torch.topk(scores, kmax, dim=1).indices
    hits = (target if exclude is None else target & ~exclude).gather(1, top).float()  # an excluded item never hits
    cum_hits = hits.cumsum(1)
    n_rel = target.sum(1)
    denom = n_rel.clamp_min(1).float()
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float32))
    cum_gain = (hits * discount).cumsum(1)
    ideal = discount.cumsum(0)
    out = {}
    for k in ks:
        kk = min(k, kmax)
        out[f"recall@{k}"] = cum_hits[:, kk - 1] / denom
        out[f"ndcg@{k}"] = cum_gain[:, kk - 1] / ideal[(n_rel.clamp(1, kk) - 1)]
        out[f"hit@{k}"] = (cum_hits[:, kk - 1] > 0).float()
    if auc:
        rows, cols = torch.nonzero(target, as_tuple=True)
        n_pos = target.sum(1)
        starts = torch.cumsum(n_pos, 0) - n_pos
        width = max(int(n_pos.max()) if len(n_pos) else 0, 1)
        relevant = scores.new_full((len(scores), width), float("inf"))
        relevant[rows, torch.arange(len(rows)) - starts[rows]] = scores[rows, cols]
        relevant = torch.sort(relevant, dim=1).values
        not_below = torch.searchsorted(relevant, scores.contiguous(), right=True, out_int32=True)
        negative = ~target if exclude is None else ~target & ~exclude
        above = (n_pos.unsqueeze(1).int() - not_below).masked_fill(~negative, 0)
        pairs = (n_pos * negative.sum(1)).float()
        out["auc"] = torch.where(pairs > 0, above.sum(1).float() / pairs.clamp_min(1), torch.zeros_like(pairs))
    return out


def sparse_case(seed: int, users: int, items: int, p_target: float, p_exclude: float, ties: bool):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(users, items, generator=g)
    if ties:  # few distinct values: many ties between relevant and candidate items
        scores = (scores * 2).round()
    exclude = torch.rand(users, items, generator=g) < p_exclude
    target = torch.rand(users, items, generator=g) < p_target
    target[0] = False  # a user with no target
    if users > 2:
        exclude[1] = True  # every item excluded (targets included)
        target[2] = True  # every item relevant
    return scores, target, exclude


def coords(mask):
    rows, items = torch.nonzero(mask, as_tuple=True)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    return rows[order], items[order]  # any order


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("users", "items", "p_target", "p_exclude"),
                         [(1, 1, 0.5, 0.0), (6, 5, 0.4, 0.3), (30, 57, 0.1, 0.2), (17, 400, 0.02, 0.1), (9, 300, 0.3, 0.1)])
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_matches_dense_reference(seed, users, items, p_target, p_exclude, ties):
    scores, target, exclude = sparse_case(seed, users, items, p_target, p_exclude, ties)
    ks = (1, 3, 10, 50)
    expected = dense_reference(scores, target, exclude, ks)
    for chunk_bytes in (1, 6 * items * 4, 2**28, None):  # one user, four users, all users per chunk, the default
        got = sparse_ranking_metrics(scores, *coords(target), *coords(exclude), ks=ks, chunk_bytes=chunk_bytes)
        for name, value in expected.items():
            if ties and name != "auc":  # topk orders tied scores arbitrarily: compare only without ties
                continue
            torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)  # the same counts: exactly equal
    torch.testing.assert_close(ranking_metrics(scores, target, None, ks)["auc"], dense_reference(scores, target, None, ks)["auc"],
                               atol=0, rtol=0)


def test_sparse_many_targets_and_duplicates():
    """Users with more than 128 targets take the binary-search branch, the others of their chunk the
    counting one; duplicate coordinates count once."""
    scores, target, exclude = sparse_case(3, 8, 400, 0.4, 0.2, ties=True)
    target[3:6, 100:] = False  # fewer than 128
    rows, items = coords(target)
    e_rows, e_items = coords(exclude)
    got = sparse_ranking_metrics(scores, torch.cat([rows, rows[:20]]), torch.cat([items, items[:20]]),
                                 torch.cat([e_rows, e_rows[:30]]), torch.cat([e_items, e_items[:30]]), ks=(5,))
    assert torch.equal(got["auc"], dense_reference(scores, target, exclude, (5,))["auc"])


def test_metric_sparse_update_equals_dense_update():
    scores, target, exclude = random_case(11, users=40, items=90)
    dense, sparse = FullRankingMetrics(KS), FullRankingMetrics(KS)
    for chunk in torch.arange(len(scores)).split(9):
        dense.update(scores[chunk], target[chunk], exclude[chunk])
        t_rows, t_items = coords(target[chunk])
        e_rows, e_items = coords(exclude[chunk])
        sparse.update(scores[chunk], target_rows=t_rows, target_items=t_items, exclude_rows=e_rows, exclude_items=e_items)
    for name, value in dense.compute().items():
        assert sparse.compute()[name].item() == pytest.approx(value.item(), abs=1e-6), name
    with pytest.raises(ValueError, match="targets"):
        sparse.update(scores)


def test_scores_are_not_modified():
    scores, target, exclude = random_case(2)
    before = scores.clone()
    sparse_ranking_metrics(scores, *coords(target), *coords(exclude))
    assert torch.equal(scores, before)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tile", [1, 5000, 9 * 2100 * 5, 2**20])
def test_count_below_tiles(ties, tile):
    """Every tiling (column tiles of 1024 cells with a partial last one, row blocks of 5, one tile) counts exactly."""
    g = torch.Generator().manual_seed(tile)
    values = torch.randn(13, 2100, generator=g)
    thresholds = torch.randn(13, 9, generator=g)
    if ties:
        values, thresholds = values.round(), thresholds.round()
    values[0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    thresholds[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    thresholds[1] = values[1, :9]  # thresholds equal to cells: ties are not below
    expected = (values.unsqueeze(1) < thresholds.unsqueeze(2)).sum(2)
    assert torch.equal(_count_below(values, thresholds, tile=tile), expected)
    widths = torch.randint(0, 10, (13,), generator=g)
    thresholds[torch.arange(9) >= widths.unsqueeze(1)] = float("-inf")  # what the widths promise
    expected = (values.unsqueeze(1) < thresholds.unsqueeze(2)).sum(2)
    assert torch.equal(_count_below(values, thresholds, widths, tile=tile), expected)


def test_compiled_auc_count_equals_the_tiled_counter(monkeypatch):
    """The compiled count (rows grouped by width, blocks and a partial last block, ties, infinities, NaN,
    rows without thresholds) equals the tiled one, and so does ``_total_below`` run eagerly, as it
    is where ``torch.compile`` is off."""
    monkeypatch.setattr(ranking, "FUSED_MIN_ITEMS", 1)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(11, 3000, generator=g).round()
    values[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    widths = torch.tensor([1, 0, 2, 3, 4, 5, 9, 16, 17, 33, 1])
    thresholds = torch.randn(11, 33, generator=g).round()
    thresholds[0, 0] = float("inf")
    thresholds[torch.arange(33) >= widths.unsqueeze(1)] = float("-inf")
    expected = _count_below(values, thresholds, widths).sum(1)
    assert torch.equal(ranking._wins(values, thresholds, widths), expected)
    whole_blocks = _count_below(values[:, :2048], thresholds).sum(1)  # two blocks of 1,024 cells
    assert torch.equal(ranking._total_below(values, thresholds), whole_blocks)
    for rows, width, cells in [(1, 3, 2048), (5, 5, 4100)]:  # one row; sizes that coincide
        values, thresholds = torch.randn(rows, cells, generator=g), torch.randn(rows, width, generator=g)
        widths = torch.full((rows,), width)
        assert torch.equal(ranking._wins(values, thresholds, widths), _count_below(values, thresholds).sum(1))
    assert ranking._fused["total_below"] is not False  # compiled, not fallen back


def test_a_failed_compilation_falls_back_to_the_tiled_counter(monkeypatch):
    def broken(values, thresholds):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ranking, "FUSED_MIN_ITEMS", 1)
    monkeypatch.setitem(ranking._fused, "total_below", broken)
    values, thresholds = torch.randn(3, 50), torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="tiled comparisons: torch.compile failed .*no C\\+\\+ compiler"):
        wins = ranking._wins(values, thresholds, torch.tensor([2, 2, 2]))
    assert torch.equal(wins, _count_below(values, thresholds).sum(1))
    assert ranking._fused["total_below"] is False


@pytest.mark.parametrize("trained", [False, True])
def test_sparse_auc_across_tiles(trained):
    """Catalogs of several column tiles and row blocks, targets anywhere or among the top scores, with
    ties, infinite scores, users without targets and wholly excluded users, equal the dense reference."""
    g = torch.Generator().manual_seed(int(trained))
    users, items = 7, 120_000
    scores = (torch.randn(users, items, generator=g) * 8).round()  # many ties
    scores[3, :500] = float("-inf")
    scores[4, :500] = float("inf")
    key = torch.rand(users, items, generator=g) + (scores.clamp(-40, 40) / 4 if trained else 0)
    target = torch.zeros(users, items, dtype=torch.bool)
    target.scatter_(1, torch.topk(key, 40, dim=1).indices, True)
    target[0] = False
    exclude = torch.rand(users, items, generator=g) < 0.01
    exclude[1] = True
    got = sparse_ranking_metrics(scores, *coords(target), *coords(exclude), ks=(5,))
    assert torch.equal(got["auc"], dense_reference(scores, target, exclude, (5,))["auc"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_overwrite(dtype, contiguous):
    """``overwrite=True`` gives the same values; it works in float32 contiguous scores only, else in a copy."""
    scores, target, exclude = sparse_case(5, 30, 57, 0.1, 0.2, ties=False)
    scores = scores.to(dtype) if contiguous else scores.to(dtype).T.contiguous().T
    args = (*coords(target), *coords(exclude))
    expected = sparse_ranking_metrics(scores, *args, ks=(1, 3, 10))
    before = scores.clone()
    got = sparse_ranking_metrics(scores, *args, ks=(1, 3, 10), overwrite=True, chunk_bytes=6 * 57 * 4)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    assert torch.equal(scores, before) != (dtype == torch.float32 and contiguous)
    metric = FullRankingMetrics((3,))
    metric.update(before.clone(), target, exclude, overwrite=True)
    reference = FullRankingMetrics((3,))
    reference.update(before, target, exclude)
    for name, value in reference.compute().items():
        assert torch.equal(metric.compute()[name], value), name


# ----------------------------------------------------------------------------- sampled candidates


def sampled_case(seed: int, users: int, items: int, count: int):
    """Scores, relevant items, exclusions and each user's candidates (distinct, neither relevant nor
    excluded); some relevant items are excluded too (a row in two splits), as full ranking allows."""
    scores, target, exclude = sparse_case(seed, users, items, 0.15, 0.3, ties=False)
    g = torch.Generator().manual_seed(100 + seed)
    key = torch.rand(users, items, generator=g).masked_fill(target | exclude, 2.0)
    order = torch.argsort(key, dim=1)[:, :count]
    num = (~(target | exclude)).sum(1).clamp_max(count)
    candidates = torch.where(torch.arange(order.shape[1]) < num.unsqueeze(1), order, -1)
    return scores, target, exclude, candidates, num


def dense_sampled_reference(scores, target, exclude, candidates, num, ks):
    """Full ranking of the dense scores with every item but the candidates and the relevant ones
    excluded (their scores set to -inf, and left out of AUC's candidates), and the excluded relevant ones."""
    keep = target & ~exclude
    valid = torch.arange(candidates.shape[1]) < num.unsqueeze(1)
    rows = torch.arange(len(scores)).unsqueeze(1).expand_as(candidates)
    keep[rows[valid], candidates[valid]] = True
    masked = scores.masked_fill(~keep, float("-inf"))
    return sparse_ranking_metrics(masked, *coords(target), *coords(~keep), ks=ks)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("users", "items", "count"), [(1, 1, 1), (6, 12, 3), (30, 57, 10), (17, 400, 25), (9, 60, 100)])
def test_candidate_layout_equals_full_ranking_of_the_candidates(seed, users, items, count):
    """Compact scores of the relevant items and candidates give exactly the full-ranking metrics of a
    dense matrix where everything else is excluded; with room for every item, exactly full ranking."""
    scores, target, exclude, candidates, num = sampled_case(seed, users, items, count)
    ks = (1, 3, 10, 50)
    t_rows, t_items = coords(target)
    layout = candidate_layout(t_rows, t_items, candidates.to(torch.int32), num, *coords(exclude))
    assert layout.items.shape == (users, int(target.sum(1).max()) + candidates.shape[1])
    compact = scores.gather(1, layout.items.clamp_min(0))
    got = sparse_ranking_metrics(compact, layout.target_rows, layout.target_cols, layout.exclude_rows, layout.exclude_cols, ks=ks)
    expected = dense_sampled_reference(scores, target, exclude, candidates, num, ks)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    if count >= items:  # every eligible item is a candidate: the full ranking itself
        for name, value in sparse_ranking_metrics(scores, t_rows, t_items, *coords(exclude), ks=ks).items():
            torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)


def test_candidate_layout_drops_relevant_candidates_and_duplicate_targets():
    """A candidate that is also a relevant item is left out (once as relevant, never as a negative);
    a duplicated relevant coordinate counts once; rows without candidates or targets are padding."""
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8], [0.0, 0.1, 0.2, 0.3]])
    layout = candidate_layout(torch.tensor([0, 0, 1]), torch.tensor([2, 2, 3]),
                              torch.tensor([[1, 2], [0, -1], [-1, -1]]), torch.tensor([2, 1, 0]))
    assert layout.items.tolist() == [[2, 1, 2], [3, 0, -1], [-1, -1, -1]]
    assert sorted(zip(layout.exclude_rows.tolist(), layout.exclude_cols.tolist())) == [(0, 2), (1, 2), (2, 0), (2, 1), (2, 2)]
    got = sparse_ranking_metrics(scores.gather(1, layout.items.clamp_min(0)), layout.target_rows, layout.target_cols,
                                 layout.exclude_rows, layout.exclude_cols, ks=(1,))
    assert got["auc"].tolist() == [0.0, 1.0, 0.0] and got["hit@1"].tolist() == [0.0, 1.0, 0.0]


def test_sampled_metric_over_batches_equals_dense_reference():
    """FullRankingMetrics fed compact matrices batch by batch (overwrite=True) averages what the dense reference gives."""
    scores, target, exclude, candidates, num = sampled_case(7, 40, 90, 12)
    metric = FullRankingMetrics(KS)
    for chunk in torch.arange(len(scores)).split(9):
        layout = candidate_layout(*coords(target[chunk]), candidates[chunk], num[chunk], *coords(exclude[chunk]))
        metric.update(scores[chunk].gather(1, layout.items.clamp_min(0)), target_rows=layout.target_rows,
                      target_items=layout.target_cols, exclude_rows=layout.exclude_rows, exclude_items=layout.exclude_cols,
                      overwrite=True)
    reference = dense_sampled_reference(scores, target, exclude, candidates, num, KS)
    counted = target.any(1)
    for name, value in metric.compute().items():
        assert value.item() == pytest.approx(reference[name][counted].double().mean().item(), abs=1e-6), name


def test_metric_prefix_marks_sampled_metrics():
    assert metric_prefix("val", None) == "val" and metric_prefix("test", 100) == "test/sampled"


@pytest.mark.parametrize("seed", range(6))
def test_blocked_columns_equal_an_exclusion_of_every_user(seed):
    """Deleted items as columns (one list) give what a coordinate per user and item gives, overlaps and ties included."""
    g = torch.Generator().manual_seed(seed)
    users, items = 9, 40
    scores = torch.randint(0, 6, (users, items), generator=g).float()  # ties
    t_rows, t_items = torch.randint(0, users, (30,), generator=g), torch.randint(0, items, (30,), generator=g)
    e_rows, e_items = torch.randint(0, users, (60,), generator=g), torch.randint(0, items, (60,), generator=g)
    blocked = torch.randint(0, items, (7,), generator=g)  # with repeats, and hitting some exclusions and targets
    columns = sparse_ranking_metrics(scores, t_rows, t_items, e_rows, e_items, ks=(1, 5, 50), blocked_items=blocked)
    rows = torch.arange(users).repeat_interleave(len(blocked))
    coordinates = sparse_ranking_metrics(scores, t_rows, t_items, torch.cat([e_rows, rows]), torch.cat([e_items, blocked.repeat(users)]),
                                         ks=(1, 5, 50))
    for name, value in coordinates.items():
        torch.testing.assert_close(columns[name], value, msg=name)
