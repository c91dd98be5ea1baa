"""Completeness metrics on tiny MF models whose embeddings are set by hand, so every answer is known."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lightning_unlearn.data import Interactions
from lightning_unlearn.metrics import completeness
from lightning_unlearn.metrics.completeness import (
    completeness_report,
    deleted_row_statistics,
    gap_closed,
    item_side_statistics,
    membership_inference_auc,
    param_distance_rel,
    score_distance_rel,
    topk_overlap,
)
from lightning_unlearn.models import MF


def mf(user_vectors, item_vectors) -> MF:
    """An MF whose score of (u, i) is ``user_vectors[u] . item_vectors[i]``."""
    users, items = torch.as_tensor(user_vectors, dtype=torch.float32), torch.as_tensor(item_vectors, dtype=torch.float32)
    users, items = users.reshape(len(users), -1), items.reshape(len(items), -1)
    model = MF(len(users), len(items), embedding_dim=users.shape[1])
    model.load_state_dict({"user_embedding.weight": users, "item_embedding.weight": items})
    return model


def table(pairs, num_users: int, num_items: int) -> Interactions:
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return Interactions(pairs[:, 0], pairs[:, 1], user_ids=np.arange(num_users), item_ids=np.arange(num_items))


# ------------------------------------------------------------------ statistics of the deleted rows
# 3 users, 6 items, one latent dimension: item values 6..1; user 2 has vector -1 (reversed order).
ITEMS = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
HAND = mf([1.0, 1.0, -1.0], ITEMS)
HAND_DELETED = table([(0, 1), (0, 4), (2, 2)], 3, 6)  # two rows of user 0; user 2 keeps nothing
HAND_RETAINED = table([(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)], 3, 6)
HAND_NONMEMBERS = table([(1, 3), (1, 5), (2, 0)], 3, 6)


def test_deleted_row_statistics_by_hand():
    # user 0: candidates {1, 3, 4, 5} (scores 5, 3, 2, 1): item 1 has 0 of 3 others above it, item 4 has 2 of 3.
    # user 2: candidates all six (scores -6..-1): item 2 (-4) has 3 of 5 others above it.
    stats = deleted_row_statistics(HAND, HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS, k=3)
    assert stats["rank_pct"] == pytest.approx((0 + 2 / 3 + 3 / 5) / 3)
    assert stats["score"] == pytest.approx((5 + 2 - 4) / 3)
    assert stats["in_top3"] == pytest.approx(2 / 3)  # 0 and 2 above: in; 3 above: out
    assert set(stats) == {"rank_pct", "score", "in_top3", "mia_auc"}
    assert deleted_row_statistics(HAND, HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS, k=1)["in_top1"] == pytest.approx(1 / 3)


def test_ties_count_half_and_favour_the_deleted_item_in_top_k():
    flat = mf([0.0, 0.0, 0.0], ITEMS)  # every score is 0
    stats = deleted_row_statistics(flat, HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS, k=1)
    assert stats["rank_pct"] == pytest.approx(0.5)
    assert stats["score"] == 0.0 and stats["in_top1"] == 1.0


def brute_force(model, deleted, retained, k):
    """Python loops over rows: the definitions in deleted_row_statistics' docstring, literally."""
    scores = model.full_scores(torch.arange(model.num_users)).detach()
    kept = set(zip(retained.users.tolist(), retained.items.tolist()))
    ranks, values, tops = [], [], []
    for u, i in zip(deleted.users.tolist(), deleted.items.tolist()):
        others = [j for j in range(model.num_items) if (u, j) not in kept and j != i]
        above = sum(scores[u, j] > scores[u, i] for j in others)
        tied = sum(scores[u, j] == scores[u, i] for j in others)
        ranks.append((above + tied / 2) / max(len(others), 1))
        values.append(scores[u, i].item())
        tops.append(float(above < k))
    return np.mean(ranks), np.mean(values), np.mean(tops)


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_random_model_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    items = torch.randn(9, 3, generator=g)
    items[5] = items[2]  # two items that always tie
    model = mf(torch.randn(7, 3, generator=g), items)
    keys = torch.randperm(7 * 9, generator=g)
    pairs = torch.stack([keys // 9, keys % 9], 1)
    deleted, retained, nonmembers = table(pairs[:15], 7, 9), table(pairs[15:40], 7, 9), table(pairs[40:], 7, 9)
    assert (torch.bincount(deleted.users, minlength=7) > 1).any()
    stats = deleted_row_statistics(model, deleted, retained, nonmembers, k=3, chunk_size=chunk_size)
    rank, score, top = brute_force(model, deleted, retained, k=3)
    assert stats["rank_pct"] == pytest.approx(rank) and stats["score"] == pytest.approx(score)
    assert stats["in_top3"] == pytest.approx(top)


def test_statistics_are_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(1)
    model = mf(torch.randn(40, 2, generator=g), torch.randn(30, 2, generator=g))
    keys = torch.randperm(40 * 30, generator=g)
    pairs = torch.stack([keys // 30, keys % 30], 1)
    args = table(pairs[:60], 40, 30), table(pairs[60:300], 40, 30), table(pairs[300:], 40, 30)
    first = deleted_row_statistics(model, *args, seed=3)
    assert deleted_row_statistics(model, *args, seed=3) == first
    assert deleted_row_statistics(model, *args, seed=3, chunk_size=7) == pytest.approx(first)
    assert deleted_row_statistics(model, *args, seed=4)["mia_auc"] != first["mia_auc"]  # the seed is used


# ------------------------------------------------------------------ membership inference
def test_attack_separates_far_apart_scores_in_either_direction():
    g = torch.Generator().manual_seed(0)
    high, low = torch.randn(50, 2, generator=g) + 10, torch.randn(50, 2, generator=g)
    assert membership_inference_auc(high, low) == pytest.approx(1.0)
    assert membership_inference_auc(low, high) == pytest.approx(1.0)  # the attack learns the direction


def test_attack_is_near_chance_on_exchangeable_rows():
    # members and non-members are random pairs off the retained rows of one random model: same distribution
    g = torch.Generator().manual_seed(2)
    model = mf(torch.randn(200, 4, generator=g), torch.randn(50, 4, generator=g))
    keys = torch.randperm(200 * 50, generator=g)
    pairs = torch.stack([keys // 50, keys % 50], 1)
    deleted, retained, nonmembers = table(pairs[:500], 200, 50), table(pairs[500:3000], 200, 50), table(pairs[3000:3500], 200, 50)
    auc = deleted_row_statistics(model, deleted, retained, nonmembers, seed=0)["mia_auc"]
    assert abs(auc - 0.5) < 0.15


def test_rows_that_were_trained_on_are_not_nonmembers():
    extra = torch.cat([HAND_NONMEMBERS.keys, HAND_DELETED.keys, HAND_RETAINED.keys])
    polluted = table(torch.stack([extra // 6, extra % 6], 1), 3, 6)
    clean = deleted_row_statistics(HAND, HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS)
    assert deleted_row_statistics(HAND, HAND_DELETED, HAND_RETAINED, polluted) == clean


def test_attack_auc_counts_ties_as_half():
    same = torch.zeros(10, 2)
    assert membership_inference_auc(same, same) == 0.5
    assert math.isnan(membership_inference_auc(same[:1], same))  # one member cannot be split in two folds


# ------------------------------------------------------------------ gap closed and the report
def scenario():
    """30 users x 60 items, one dimension, every user vector 1, so a score is the item's value.

    Deleted rows: (u, u) for users 0..19 and (u, 20 + u) for users 0..4, who keep nothing
    (whole-user deletions); users 5..29 keep two items of 25..39; non-members sit on items
    40..59. The reference gives items random values; the original adds 10 to every deleted
    item (it learned them), the halfway model 5, and the noise model is another random draw.
    """
    g = torch.Generator().manual_seed(0)
    base, other = torch.randn(60, generator=g), torch.randn(60, generator=g)
    boost = torch.zeros(60)
    boost[:25] = 10.0
    users = torch.ones(30)
    deleted = table([(u, u) for u in range(20)] + [(u, 20 + u) for u in range(5)], 30, 60)
    retained = table([(u, 25 + (u + s) % 15) for u in range(5, 30) for s in (0, 7)], 30, 60)
    nonmembers = table([(u, 40 + u % 20) for u in range(30)], 30, 60)
    models = {
        "original": mf(users, base + boost),
        "halfway": mf(users, base + boost / 2),
        "reference": mf(users, base),
        "noise": mf(users, other),
    }
    return models, deleted, retained, nonmembers


GAPS = ("gap_closed_rank", "gap_closed_score", "gap_closed_top5", "gap_closed_mia")


def test_original_closes_nothing_reference_everything_halfway_half_the_score_gap():
    models, deleted, retained, nonmembers = scenario()
    report = completeness_report(
        models["original"], models["halfway"], models["reference"], deleted, retained, nonmembers, k=5
    )
    s_o, s_r = report["original"], report["reference"]
    assert s_o["mia_auc"] == pytest.approx(1.0) and s_o["in_top5"] == pytest.approx(5 / 25)
    assert all(s_o[key] != s_r[key] for key in s_o)  # every gap is open
    assert report["completeness"]["gap_closed_score"] == pytest.approx(0.5)
    assert report["deleted"]["score"] == pytest.approx((s_o["score"] + s_r["score"]) / 2)
    for method, expected in ((copy.deepcopy(models["original"]), 0.0), (copy.deepcopy(models["reference"]), 1.0)):
        figures = completeness_report(models["original"], method, models["reference"], deleted, retained, nonmembers, k=5)
        for key in GAPS:
            assert figures["completeness"][key] == pytest.approx(expected, abs=1e-12), key


def test_report_keys_noise_and_whole_users():
    models, deleted, retained, nonmembers = scenario()
    report = completeness_report(
        models["original"], models["halfway"], models["reference"], deleted, retained, nonmembers,
        k=5, noise=models["noise"], whole_users=True,
    )
    assert set(report) == {"deleted", "original", "reference", "completeness", "baseline", "items", "noise"}
    assert set(report["completeness"]) == {
        *GAPS, "overlap@5", "overlap@5_affected", "score_distance_rel", "param_distance_rel",
        "gap_closed_item_score", "gap_closed_item_rank",
    }
    assert set(report["noise"]) == {*GAPS, "gap_closed_item_score", "gap_closed_item_rank"}
    # other users' scores of the deleted items moved halfway too
    assert report["completeness"]["gap_closed_item_score"] == pytest.approx(0.5)
    # another random draw is not the reference: its figures differ from 1
    assert report["noise"]["gap_closed_score"] != pytest.approx(1.0)
    same_as_reference = completeness_report(
        models["original"], copy.deepcopy(models["reference"]), models["reference"], deleted, retained, nonmembers,
        k=5, noise=copy.deepcopy(models["reference"]), whole_users=True,
    )
    for figures in (same_as_reference["completeness"], same_as_reference["noise"]):
        assert figures["gap_closed_item_score"] == pytest.approx(1.0) and figures["gap_closed_item_rank"] == pytest.approx(1.0)
        assert figures["gap_closed_score"] == pytest.approx(1.0)


def test_report_distances_are_the_methods_distance_to_the_reference_over_the_originals():
    """A method a quarter of the way from the original to the reference is at 0.25 of the original's distance, in
    parameters and in scores (0.75 would be its distance to the original: the reference and the original swapped)."""
    models, deleted, retained, nonmembers = scenario()
    original, reference = models["original"], models["reference"]
    quarter = mf(torch.ones(30), (3 * reference.item_embedding.weight + original.item_embedding.weight).detach() / 4)
    figures = completeness_report(original, quarter, reference, deleted, retained, nonmembers, k=5)["completeness"]
    assert figures["param_distance_rel"] == pytest.approx(0.25, rel=1e-6)  # float32 tables
    assert figures["param_distance_rel"] == param_distance_rel(quarter, reference, original)
    assert figures["score_distance_rel"] == pytest.approx(0.25, rel=1e-6)


def test_affected_overlap_looks_only_at_the_deleted_rows_users():
    models, deleted, retained, nonmembers = scenario()
    method = copy.deepcopy(models["reference"])
    with torch.no_grad():
        method.user_embedding.weight[29] = -1.0  # user 29 deleted nothing; its list is reversed
    report = completeness_report(models["original"], method, models["reference"], deleted, retained, nonmembers, k=5)
    assert report["completeness"]["overlap@5_affected"] == 1.0
    assert report["completeness"]["overlap@5"] == pytest.approx(29 / 30)  # user 29's top 5 share nothing


def test_nothing_to_forget_gives_nan():
    models, deleted, retained, nonmembers = scenario()
    original = models["original"]
    report = completeness_report(original, copy.deepcopy(original), original, deleted, retained, nonmembers, k=5)
    figures = report["completeness"]
    assert all(math.isnan(figures[key]) for key in (*GAPS, "score_distance_rel", "param_distance_rel"))
    assert figures["overlap@5"] == 1.0 and figures["overlap@5_affected"] == 1.0
    assert math.isnan(gap_closed(0.4, 0.1, 0.4)) and math.isnan(gap_closed(float("nan"), 0.1, 0.3))
    assert gap_closed(0.25, 1.0, 0.75) == 1.5  # over-forgetting


def test_cache_reuses_original_and_reference_until_they_change():
    models, deleted, retained, nonmembers = scenario()
    cache: dict = {}
    args = (deleted, retained, nonmembers)
    first = completeness_report(models["original"], models["halfway"], models["reference"], *args, k=5, cache=cache)
    assert {"original", "reference"} <= set(cache)
    fingerprint, stats = cache["original"]
    cache["original"] = (fingerprint, {**stats, "score": 123.0})  # a planted value proves the reuse
    second = completeness_report(models["original"], models["noise"], models["reference"], *args, k=5, cache=cache)
    assert second["original"]["score"] == 123.0 and second["reference"] == first["reference"]
    with torch.no_grad():
        models["original"].item_embedding.weight[0] += 1.0  # a changed model is measured again
    third = completeness_report(models["original"], models["noise"], models["reference"], *args, k=5, cache=cache)
    assert third["original"]["score"] == pytest.approx(first["original"]["score"] + 1 / 25)



def test_the_cache_tells_apart_deletions_whose_key_sums_agree():
    """Item sets {1, 5, 6} and {2, 3, 7} of one user have equal sums (and sums of squares): another deletion."""
    table = lambda items: Interactions(torch.zeros(len(items), dtype=torch.long), torch.tensor(items),  # noqa: E731
                                       user_ids=np.arange(1), item_ids=np.arange(10))
    first, second = table([1, 5, 6]), table([2, 3, 7])
    assert int(first.keys.sum()) == int(second.keys.sum()) and int(first.keys.square().sum()) == int(second.keys.square().sum())
    models = [MF(num_users=1, num_items=10, embedding_dim=1) for _ in range(3)]
    cache: dict = {}
    completeness_report(*models, first, table([0]), table([4, 8, 9]), k=2, cache=cache)
    shared = completeness_report(*models, second, table([0]), table([4, 8, 9]), k=2, cache=cache)
    alone = completeness_report(*models, second, table([0]), table([4, 8, 9]), k=2)
    assert shared["original"] == alone["original"] and shared["reference"] == alone["reference"]


# ------------------------------------------------------------------ whole-user deletions
def test_item_side_statistics_by_hand():
    # user 0 is deleted (items 1, 2); users 1 (vector 1) and 2 (vector -1) remain; user 3 lost
    # one row (item 1) and kept one, so it is not one of the "other" users that are measured.
    model = mf([1.0, 1.0, -1.0, 10.0], [4.0, 3.0, 2.0, 1.0])
    deleted = table([(0, 1), (0, 2), (3, 1)], 4, 4)
    retained = table([(1, 0), (2, 1), (2, 3), (3, 0)], 4, 4)
    # pairs: (1, 1): 3, first of {1, 2, 3}; (1, 2): 2, second of three; (2, 2): -2, first of {0, 2}. (2, 1) is retained.
    stats = item_side_statistics(model, deleted, retained, k=1)
    assert stats == pytest.approx({"item_score": (3 + 2 - 2) / 3, "item_rank_pct": (0 + 0.5 + 0) / 3, "item_in_top1": 2 / 3})


def test_item_side_without_remaining_users_is_nan():
    # the only user who keeps a row also lost one, so no "other" user remains
    stats = item_side_statistics(HAND, table([(0, 1), (1, 2)], 3, 6), table([(0, 0)], 3, 6))
    assert all(math.isnan(v) for v in stats.values())


# ------------------------------------------------------------------ secondary figures
def test_topk_overlap_skips_users_without_candidates_and_caps_k():
    a, b = mf([1.0, 1.0], [3.0, 2.0, 1.0]), mf([1.0, 1.0], [1.0, 2.0, 3.0])
    exclude = table([(1, 0), (1, 1), (1, 2)], 2, 3)  # user 1 has no candidate
    assert topk_overlap(a, b, torch.tensor([0, 1]), exclude, k=2) == pytest.approx(1 / 3)  # {0, 1} vs {2, 1}
    assert topk_overlap(a, b, torch.tensor([0]), exclude, k=5) == 1.0  # both lists are all three items
    assert math.isnan(topk_overlap(a, b, torch.tensor([1]), exclude, k=2))


def test_identical_and_rotated_models():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(6, 3, generator=g), torch.randn(8, 3, generator=g)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g)).Q
    reference, original = mf(users, items), mf(users + 1.0, items)
    rotated = mf(users @ rotation, items @ rotation)  # the same scores in another basis
    everyone, nobody = torch.arange(6), table([], 6, 8)
    assert topk_overlap(reference, copy.deepcopy(reference), everyone, nobody, k=3) == 1.0
    assert score_distance_rel(copy.deepcopy(reference), reference, original, everyone) == 0.0
    assert param_distance_rel(copy.deepcopy(reference), reference, original) == 0.0
    assert score_distance_rel(rotated, reference, original, everyone) == pytest.approx(0.0, abs=1e-6)
    assert param_distance_rel(rotated, reference, original) > 0.1
    assert score_distance_rel(original, reference, original, everyone) == pytest.approx(1.0)


# ------------------------------------------------------------------ argument checks
def test_bad_arguments():
    with pytest.raises(ValueError, match="also retained"):
        deleted_row_statistics(HAND, HAND_DELETED, table([(0, 1)], 3, 6), HAND_NONMEMBERS)
    with pytest.raises(ValueError, match="k must be"):
        deleted_row_statistics(HAND, HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS, k=0)
    with pytest.raises(ValueError, match="at least one deleted row"):
        deleted_row_statistics(HAND, table([], 3, 6), HAND_RETAINED, HAND_NONMEMBERS)
    with pytest.raises(ValueError, match="`retained` has 3 users x 7 items"):
        deleted_row_statistics(HAND, HAND_DELETED, table([], 3, 7), HAND_NONMEMBERS)
    with pytest.raises(ValueError, match="unlearn a copy"):
        completeness_report(HAND, HAND, copy.deepcopy(HAND), HAND_DELETED, HAND_RETAINED, HAND_NONMEMBERS)
    with pytest.raises(ValueError, match="same parameter shapes"):
        param_distance_rel(HAND, mf([[1.0, 0.0]] * 3, [[1.0, 0.0]] * 6), HAND)


# ------------------------------------------------------------------ the fast paths against dense references
# Straightforward dense versions of every figure: all users' scores at once, a dense
# (users, items) exclusion mask, ranks by comparing whole rows. The library's chunked code
# (in-place -inf exclusions, counting or sorting, Gram matrices) must give the same numbers.
def dense_scores(model) -> torch.Tensor:
    with torch.no_grad():
        return model.full_scores(torch.arange(model.num_users)).detach()


def dense_excluded(rows: Interactions) -> torch.Tensor:
    mask = torch.zeros(rows.num_users, rows.num_items, dtype=torch.bool)
    mask[rows.users, rows.items] = True
    return mask


def dense_ranks(scores, excluded, users, items):
    """Score, rank percentile and candidates above, with the rank's arithmetic of ``_row_ranks``."""
    masked = scores.masked_fill(excluded, float("-inf"))
    value = scores[users, items]
    rows = masked[users]
    above, equal = (rows > value[:, None]).sum(1), (rows == value[:, None]).sum(1)
    candidate = (~excluded[users, items]).long()
    others = (~excluded).sum(1)[users] - candidate
    return value.double(), ((above + 0.5 * (equal - candidate)) / others.clamp_min(1)).double(), above


def dense_deleted_row_statistics(model, deleted, retained, nonmembers, k, seed=0):
    scores, excluded = dense_scores(model), dense_excluded(retained)
    score, rank, higher = dense_ranks(scores, excluded, deleted.users, deleted.items)
    usable = ~excluded[nonmembers.users, nonmembers.items] & ~dense_excluded(deleted)[nonmembers.users, nonmembers.items]
    pool = torch.nonzero(usable).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    m = min(len(deleted), len(pool))
    members = torch.randperm(len(deleted), generator=g)[:m].sort().values
    sample = pool[torch.randperm(len(pool), generator=g)[:m].sort().values]
    non_score, non_rank, _ = dense_ranks(scores, excluded, nonmembers.users[sample], nonmembers.items[sample])
    auc = membership_inference_auc(
        torch.stack([score[members], rank[members]], 1), torch.stack([non_score, non_rank], 1), seed=seed
    )
    return {"rank_pct": rank.mean().item(), "score": score.mean().item(), f"in_top{k}": (higher < k).double().mean().item(),
            "mia_auc": auc}


def dense_item_side_statistics(model, deleted, retained, k):
    scores, excluded = dense_scores(model), dense_excluded(retained)
    has_deleted = torch.bincount(deleted.users, minlength=deleted.num_users) > 0
    users = torch.nonzero(excluded.any(1) & ~has_deleted).squeeze(1)
    items = torch.unique(deleted.items)
    masked = scores.masked_fill(excluded, float("-inf"))[users]
    values = scores[users][:, items]
    higher = (masked[:, None, :] > values[:, :, None]).sum(2)
    ties = (masked[:, None, :] == values[:, :, None]).sum(2)
    valid = ~excluded[users][:, items]
    others = ((~excluded[users]).sum(1, keepdim=True) - 1).clamp_min(1)
    rank = (higher + 0.5 * (ties - 1)) / others
    if not valid.any():
        return {"item_score": math.nan, "item_rank_pct": math.nan, f"item_in_top{k}": math.nan}
    return {"item_score": values[valid].double().mean().item(), "item_rank_pct": rank[valid].double().mean().item(),
            f"item_in_top{k}": (higher[valid] < k).double().mean().item()}


def dense_topk_overlap(model_a, model_b, users, exclude, k):
    excluded = dense_excluded(exclude)[users]
    kk = min(k, exclude.num_items)
    lists = []
    for model in (model_a, model_b):
        top = torch.topk(dense_scores(model)[users].masked_fill(excluded, float("-inf")), kk, dim=1).indices
        lists.append([set(t[v].tolist()) for t, v in zip(top, ~excluded.gather(1, top))])
    shares = [len(a & b) / len(a | b) for a, b in zip(*lists) if a | b]
    return sum(shares) / len(shares) if shares else math.nan


def dense_score_distance(method, reference, original, users):
    """The definition in float64: MF-like scores from float64 vectors, any other model's own scores."""
    def scores(model):
        if isinstance(model, MF) and type(model).full_scores is MF.full_scores:
            u, v = (r.detach().double() for r in model.representations())
            return u[users] @ v.T
        return dense_scores(model)[users].double()

    s_m, s_r, s_o = (scores(m) for m in (method, reference, original))
    den = (s_o - s_r).square().sum().item()
    return math.sqrt((s_m - s_r).square().sum().item() / den) if den > 0 else math.nan


def tied_case(seed: int, num_users: int = 12, num_items: int = 40, dim: int = 2):
    """Small integer embeddings (scores are small integers: many ties) and rows of every kind.

    User 0 deleted many rows (sorted under the "sort" and "mixed" ``count_rows``), users 1..3 a few, user 4
    keeps every item (no candidate), the last user has no row at all; some retained rows repeat.
    """
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(-2, 3, (num_users, dim), generator=g).float()
    items = torch.randint(-2, 3, (num_items, dim), generator=g).float()
    model = mf(users, items)
    pairs = [(0, i) for i in range(0, 30)]  # user 0: 30 deleted rows
    pairs += [(1, 3), (2, 5), (2, 6), (3, 7), (3, 8), (3, 9)]
    deleted = table(pairs, num_users, num_items)
    taken = {*pairs}
    kept = [(4, i) for i in range(num_items)]  # user 4: every item retained
    keys = torch.randperm((num_users - 1) * num_items, generator=g)
    kept += [(u, i) for u, i in zip((keys // num_items).tolist(), (keys % num_items).tolist()) if u != 4 and (u, i) not in taken][:150]
    retained = table(kept + kept[-20:] + [(4, 0)], num_users, num_items)
    rest = [(u, i) for u in range(num_users - 1) for i in range(num_items) if (u, i) not in taken and (u, i) not in set(kept)]
    nonmembers = table(rest[::7], num_users, num_items)
    return model, deleted, retained, nonmembers


@pytest.fixture(params=["default", "count", "sort", "mixed", "tiles"])
def count_rows(request, monkeypatch):
    """Run a test with the default count/sort threshold, with counting only, with sorting only, with
    users of 1 or 2 rows counted and the others sorted (in the same blocks of rows), and with tiny
    tiles (a tile per row and a few items)."""
    value = {"default": completeness._COUNT_ROWS, "count": 10**9, "sort": 0, "mixed": 2, "tiles": 10**9}[request.param]
    monkeypatch.setattr(completeness, "_COUNT_ROWS", value)
    if request.param == "tiles":
        monkeypatch.setattr(completeness, "_TILE", {"cpu": 16})
        monkeypatch.setattr(completeness, "_TILE_MIN_COLS", 7)
    return value


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_row_ranks_match_dense_reference_with_ties(count_rows, chunk_size):
    model, deleted, retained, _ = tied_case(0)
    # rows of every kind, excluded ones too (not candidates): the definition covers them
    users = torch.cat([deleted.users, retained.users[:20], torch.tensor([4, 4, 11])])
    items = torch.cat([deleted.items, retained.items[:20], torch.tensor([0, 39, 2])])
    expected = dense_ranks(dense_scores(model), dense_excluded(retained), users, items)
    got = completeness._row_ranks(model, completeness._representations(model), users, items, retained, chunk_size)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deleted_row_statistics_match_dense_reference(count_rows, seed):
    model, deleted, retained, nonmembers = tied_case(seed)
    expected = dense_deleted_row_statistics(model, deleted, retained, nonmembers, k=3, seed=seed)
    for chunk_size in (2, 1024):
        assert deleted_row_statistics(model, deleted, retained, nonmembers, k=3, seed=seed, chunk_size=chunk_size) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_item_side_statistics_match_dense_reference(count_rows, seed):
    model, _, retained, _ = tied_case(seed)
    few = table([(0, 1), (0, 2), (1, 2), (2, 7)], 12, 40)  # 3 items: counted unless sorting is forced
    many = table([(0, i) for i in range(0, 40, 2)] + [(1, 3)], 12, 40)  # 21 items: sorted
    for deleted in (few, many):
        expected = dense_item_side_statistics(model, deleted, retained, k=4)
        for chunk_size in (1, 5, 1024):
            assert item_side_statistics(model, deleted, retained, k=4, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-12)


def test_topk_overlap_matches_dense_reference():
    g = torch.Generator().manual_seed(3)
    model_a, _, retained, _ = tied_case(3)
    items = torch.randint(-2, 3, (40, 2), generator=g).float()
    model_b = mf(torch.randint(-2, 3, (12, 2), generator=g).float(), items)
    # every user (user 4 has no candidate), a repeated user, k above the number of candidates
    for users in (torch.arange(12), torch.tensor([4, 0, 0, 7])):
        for k in (1, 5, 40, 100):
            expected = dense_topk_overlap(model_a, model_b, users, retained, k)
            for chunk_size in (1, 3, 1024):
                assert topk_overlap(model_a, model_b, users, retained, k, chunk_size) == pytest.approx(expected, rel=1e-12, abs=0)
    assert math.isnan(topk_overlap(model_a, model_b, torch.tensor([4]), retained, 5))
    assert math.isnan(topk_overlap(model_a, model_b, torch.tensor([], dtype=torch.long), retained, 5))


def same(a: dict, b: dict) -> bool:
    """Equal dicts of floats, nan equal to nan."""
    return a.keys() == b.keys() and all(a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])) for key in a)


def test_a_model_that_scores_minus_infinity_is_ranked_as_before(monkeypatch):
    """-inf scores of the model itself: still candidates, tied with the excluded items' -inf."""

    class Floor(MF):  # scores -inf for items 0..4 of every user and +inf for item 5 (not a dot-product model)
        def full_scores(self, users, representations=None):
            scores = super().full_scores(users, representations)
            scores[:, :5] = float("-inf")
            scores[:, 5] = float("inf")
            return scores

    base, deleted, retained, nonmembers = tied_case(4)
    model = Floor(12, 40, embedding_dim=2)
    model.load_state_dict(base.state_dict())
    assert not completeness._scores_by_dot_product(model)
    users = torch.cat([deleted.users, torch.tensor([1, 2, 6])])
    items = torch.cat([deleted.items, torch.tensor([0, 5, 4])])
    expected = dense_ranks(dense_scores(model), dense_excluded(retained), users, items)
    for threshold in (0, 10**9):  # sorting and counting
        monkeypatch.setattr(completeness, "_COUNT_ROWS", threshold)
        got = completeness._row_ranks(model, completeness._representations(model), users, items, retained, 4)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        # the mean score is nan (-inf and +inf rows); the ranks are finite
        assert same(deleted_row_statistics(model, deleted, retained, nonmembers, k=3),
                    dense_deleted_row_statistics(model, deleted, retained, nonmembers, k=3))
    assert topk_overlap(model, base, torch.arange(12), retained, 7) == pytest.approx(
        dense_topk_overlap(model, base, torch.arange(12), retained, 7), rel=1e-12
    )


def test_counting_treats_nan_as_neither_above_nor_tied():
    # Documented difference: with nan scores a rank means nothing; the count path leaves nan out
    # of both counts, where binary search over a sorted row (the sort path, and the code before
    # the count path) puts it wherever the search ends.
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 1.0]])
    above, equal = completeness._count_above_and_equal(scores, torch.tensor([[1.0]]), torch.tensor([1]))
    assert above.tolist() == [[1]] and equal.tolist() == [[2]]


def test_exclusions_are_written_into_a_copy_when_the_model_returns_a_view():
    class Cached(MF):  # full_scores returns rows of one stored matrix
        def full_scores(self, users, representations=None):
            return self.stored[:len(users)]  # a view (users 0, 1 in order)

    model = Cached(2, 3, embedding_dim=1)
    model.stored = torch.arange(6.0).reshape(2, 3)
    before = model.stored.clone()
    topk_overlap(model, model, torch.tensor([0, 1]), table([(0, 1), (1, 2)], 2, 3), k=2)
    assert torch.equal(model.stored, before)


def test_score_distance_gram_path_matches_dense_float64():
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(30, 4, generator=g), torch.randn(50, 4, generator=g)
    reference = mf(u, v)
    method = mf(u + 0.01 * torch.randn(30, 4, generator=g), v + 0.01 * torch.randn(50, 4, generator=g))
    original = mf(u + torch.randn(30, 4, generator=g), v)
    wide = mf(torch.randn(30, 6, generator=g), torch.randn(50, 6, generator=g))  # another width: the [U_a | -U_b] form
    for users in (torch.arange(30), torch.tensor([3, 3, 7, 29]), torch.tensor([], dtype=torch.long)):
        for models in ((method, reference, original), (wide, reference, original), (method, wide, original)):
            expected = dense_score_distance(*models, users)
            got = score_distance_rel(*models, users)
            assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)
    # the float32 scores the code used before differ from the float64 definition by their rounding only
    s = [dense_scores(m).double() for m in (method, reference, original)]
    float32_figure = math.sqrt((s[0] - s[1]).square().sum().item() / (s[2] - s[1]).square().sum().item())
    assert score_distance_rel(method, reference, original, torch.arange(30)) == pytest.approx(float32_figure, rel=1e-5)


def test_score_distance_of_dot_product_models_scores_nothing(monkeypatch):
    from lightning_unlearn.models import LightGCN, NeuMF

    graph = table([(0, 0), (1, 1), (2, 1), (3, 4)], 4, 5)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = LightGCN(4, 5, embedding_dim=3, num_layers=2)
        model.set_graph(graph)
        models.append(model)
    assert all(completeness._scores_by_dot_product(m) for m in models)
    assert not completeness._scores_by_dot_product(NeuMF(4, 5, gmf_dim=2, mlp_dim=2, mlp_layers=(4,)))
    expected = dense_score_distance(*models, torch.arange(4))

    def forbidden(*args, **kwargs):
        raise AssertionError("the Gram path scores no model")

    monkeypatch.setattr(MF, "full_scores", forbidden)  # LightGCN's too: it inherits it
    assert score_distance_rel(*models, torch.arange(4)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_score_distance_generic_path_matches_dense_reference(chunk_size):
    from lightning_unlearn.models import NeuMF

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(NeuMF(7, 9, gmf_dim=3, mlp_dim=2, mlp_layers=(4, 2)).double())  # float32 rounding differs by path
    users = torch.tensor([0, 2, 2, 6, 5, 1])
    expected = dense_score_distance(*models, users)
    assert score_distance_rel(*models, users, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-12)
    assert score_distance_rel(models[1], models[1], models[2], users) == 0.0
    with pytest.raises(ValueError, match="chunk_size"):
        score_distance_rel(*models, users, chunk_size=0)


def test_report_matches_dense_references_and_caches_reference_work():
    model, deleted, retained, nonmembers = tied_case(6)
    g = torch.Generator().manual_seed(6)

    def nearby(scale):
        return mf(model.user_embedding.weight + scale * torch.randn(12, 2, generator=g), model.item_embedding.weight)
    original, reference, method, other = model, nearby(1.0), nearby(0.3), nearby(0.5)
    cache: dict = {}
    report = completeness_report(original, method, reference, deleted, retained, nonmembers, k=3, cache=cache, chunk_size=5)
    figures, everyone, affected = report["completeness"], torch.arange(12), torch.unique(deleted.users)
    for role, m in (("original", original), ("reference", reference), ("deleted", method)):
        assert report[role] == dense_deleted_row_statistics(m, deleted, retained, nonmembers, k=3)
    assert figures["overlap@3"] == pytest.approx(dense_topk_overlap(method, reference, everyone, retained, 3), rel=1e-12)
    assert figures["overlap@3_affected"] == pytest.approx(dense_topk_overlap(method, reference, affected, retained, 3), rel=1e-12)
    assert figures["score_distance_rel"] == pytest.approx(dense_score_distance(method, reference, original, everyone), rel=1e-12)
    for key, users in (("overlap@3", everyone), ("overlap@3_affected", affected)):  # the original's: doing nothing
        assert report["baseline"][key] == pytest.approx(dense_topk_overlap(original, reference, users, retained, 3), rel=1e-12)
    assert {"reference_topk", "score_distance", "baseline"} <= set(cache)
    # planted values prove the reuse: the reference's lists and ||S_original - S_reference||^2
    key, (top, valid) = cache["reference_topk"]
    cache["reference_topk"] = (key, (top, torch.zeros_like(valid)))  # no valid entry: every overlap 0
    key, den = cache["score_distance"]
    cache["score_distance"] = (key, 4 * den)
    again = completeness_report(original, method, reference, deleted, retained, nonmembers, k=3, cache=cache, chunk_size=5)
    assert again["completeness"]["overlap@3"] == 0.0
    assert again["completeness"]["score_distance_rel"] == pytest.approx(figures["score_distance_rel"] / 2, rel=1e-12)
    # another method is measured against the cached work; a changed reference is measured again
    cache["reference_topk"] = (cache["reference_topk"][0], (top, valid))
    cache["score_distance"] = (key, den)
    third = completeness_report(original, other, reference, deleted, retained, nonmembers, k=3, cache=cache, chunk_size=5)
    assert third["completeness"]["overlap@3"] == pytest.approx(dense_topk_overlap(other, reference, everyone, retained, 3), rel=1e-12)
    with torch.no_grad():
        reference.user_embedding.weight[0] += 1.0
    fourth = completeness_report(original, other, reference, deleted, retained, nonmembers, k=3, cache=cache, chunk_size=5)
    assert fourth["completeness"]["overlap@3"] == pytest.approx(dense_topk_overlap(other, reference, everyone, retained, 3), rel=1e-12)
    assert fourth["completeness"]["score_distance_rel"] == pytest.approx(
        dense_score_distance(other, reference, original, everyone), rel=1e-12
    )
