"""Full-ranking top-K metrics (Recall, NDCG, HitRate @K) and AUC, vectorised over users.

The functional :func:`ranking_metrics` scores a batch of users against all items at once:
training items are masked with ``-inf``, one ``topk`` for the largest K serves every K, and
AUC from a binary search of each item among the user's few relevant scores. :class:`FullRankingMetrics` is the thin ``torchmetrics.Metric``
over it, so state, reset and multi-device sync come from torchmetrics.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["FullRankingMetrics", "ranking_metrics"]


def ranking_metrics(
    scores: Tensor, target: Tensor, exclude: Tensor | None = None, ks: Sequence[int] = (10, 20), auc: bool = True
) -> dict[str, Tensor]:
    """Per-user ranking metrics over all items.

    Args:
        scores: ``(users, items)`` predicted scores.
        target: ``(users, items)`` bool, the held-out relevant items.
        exclude: ``(users, items)`` bool, items removed from the ranking (e.g. seen in training).
        ks: cut-offs.
        auc: also compute per-user AUC (relevant vs. other non-excluded items).

    Returns:
        ``{"recall@K", "ndcg@K", "hit@K", ["auc"]}`` -> ``(users,)`` tensors; users with no
        relevant item get 0 (filter them with ``target.any(1)``).

    Example:
        >>> scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
        >>> target = torch.tensor([[False, False, True, True]])
        >>> exclude = torch.tensor([[True, False, False, False]])
        >>> out = ranking_metrics(scores, target, exclude, ks=(1, 2))
        >>> out["recall@1"].item(), out["hit@1"].item(), out["recall@2"].item(), out["auc"].item()
        (0.5, 1.0, 1.0, 1.0)
    """
    if scores.shape != target.shape or (exclude is not None and exclude.shape != scores.shape):
        raise ValueError(f"scores, target and exclude must have one shape; got {scores.shape}, {target.shape}, "
                         f"{None if exclude is None else exclude.shape}.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}.")
    scores = scores.float()
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    kmax = min(max(ks), scores.shape[1])
    top = torch.topk(scores, kmax, dim=1).indices
    hits = target.gather(1, top).float()
    cum_hits = hits.cumsum(1)
    n_rel = target.sum(1)
    denom = n_rel.clamp_min(1).float()
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=scores.device, dtype=torch.float32))
    cum_gain = (hits * discount).cumsum(1)
    ideal = discount.cumsum(0)
    out: dict[str, Tensor] = {}
    for k in ks:
        kk = min(k, kmax)
        out[f"recall@{k}"] = cum_hits[:, kk - 1] / denom
        out[f"ndcg@{k}"] = cum_gain[:, kk - 1] / ideal[(n_rel.clamp(1, kk) - 1)]
        out[f"hit@{k}"] = (cum_hits[:, kk - 1] > 0).float()
    if auc:
        out["auc"] = _auc(scores, target, exclude)
    return out


def _auc(scores: Tensor, target: Tensor, exclude: Tensor | None) -> Tensor:
    """Per-user AUC of relevant vs. non-relevant candidate items, without sorting all items.

    Only each user's few relevant scores are sorted (padded with ``+inf``); every candidate
    then finds by binary search how many relevant items score strictly above it. Exact for
    distinct scores (ties count as losses, not halves).
    """
    rows, cols = torch.nonzero(target, as_tuple=True)
    n_pos = target.sum(1)
    starts = torch.cumsum(n_pos, 0) - n_pos
    width = max(int(n_pos.max()) if len(n_pos) else 0, 1)
    relevant = scores.new_full((len(scores), width), float("inf"))
    relevant[rows, torch.arange(len(rows), device=scores.device) - starts[rows]] = scores[rows, cols]
    relevant = torch.sort(relevant, dim=1).values
    not_below = torch.searchsorted(relevant, scores.contiguous(), right=True, out_int32=True)  # relevant <= candidate
    negative = ~target if exclude is None else ~target & ~exclude
    above = (n_pos.unsqueeze(1).int() - not_below).masked_fill(~negative, 0)
    n_neg = negative.sum(1)
    pairs = (n_pos * n_neg).float()
    return torch.where(pairs > 0, above.sum(1).float() / pairs.clamp_min(1), torch.zeros_like(pairs))


class FullRankingMetrics(Metric):
    """Mean Recall@K, NDCG@K, HitRate@K (and AUC) over users, from full rankings.

    Args:
        ks: cut-offs (default 10 and 20).
        auc: also compute the mean per-user AUC.
        empty_target_action: users with no relevant item are skipped (``"skip"``, the default)
            or count as 0 (``"neg"``), as in torchmetrics' retrieval metrics.

    Raises:
        ValueError: on an unknown ``empty_target_action`` or a non-positive cut-off.

    Example:
        >>> metric = FullRankingMetrics(ks=(2,))
        >>> metric.update(torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[False, False, True]]))
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'recall@2': 1.0, 'ndcg@2': 0.631, 'hit@2': 1.0, 'auc': 0.5}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (10, 20), auc: bool = True, empty_target_action: Literal["skip", "neg"] = "skip", **kwargs):
        super().__init__(**kwargs)
        if empty_target_action not in ("skip", "neg"):
            raise ValueError(f"empty_target_action must be 'skip' or 'neg', got {empty_target_action!r}.")
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}.")
        self.ks, self.auc, self.empty_target_action = tuple(ks), auc, empty_target_action
        self.names = [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg", "hit")] + (["auc"] if auc else [])
        self.add_state("sums", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("users", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, target: Tensor, exclude: Tensor | None = None) -> None:
        """Add a batch of users: ``(users, items)`` scores, bool targets and bool exclusions."""
        values = ranking_metrics(scores, target, exclude, self.ks, self.auc)
        keep = target.any(1) if self.empty_target_action == "skip" else torch.ones_like(target[:, 0])
        stacked = torch.stack([values[name] for name in self.names], dim=1)[keep]
        self.sums += stacked.sum(0).double()
        self.users += keep.sum()

    def compute(self) -> dict[str, Tensor]:
        mean = self.sums / self.users.clamp_min(1)
        return {name: mean[i].float() for i, name in enumerate(self.names)}
