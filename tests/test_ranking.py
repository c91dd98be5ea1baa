"""Full-ranking metrics against torchmetrics' retrieval metrics (the oracle), to 1e-6."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG, RetrievalRecall

from lightning_unlearn.metrics import FullRankingMetrics, ranking_metrics

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
