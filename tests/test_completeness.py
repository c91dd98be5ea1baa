"""Completeness metrics on tiny MF models whose embeddings are set by hand, so every answer is known."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lightning_unlearn.data import Interactions
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
    assert set(report) == {"deleted", "original", "reference", "completeness", "items", "noise"}
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
