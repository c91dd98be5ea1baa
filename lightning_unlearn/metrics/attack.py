"""A membership-inference attack: how well a model's outputs tell member rows from non-members.

:func:`membership_inference_auc` fits a small cross-fitted logistic regression on per-row
features (the completeness metrics use each row's score and rank percentile, see
:func:`~lightning_unlearn.metrics.completeness.deleted_row_statistics`) and returns the AUC of
its held-out scores. Float64, CPU and deterministic for a given ``seed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["membership_inference_auc"]


def membership_inference_auc(members: Tensor, nonmembers: Tensor, seed: int = 0, l2: float = 1e-3) -> float:
    """AUC of a cross-fitted logistic-regression attack telling members from non-members.

    Each class is shuffled (generator seeded by ``seed``) and cut in two halves; fold A holds
    the first half of both classes, fold B the second. A logistic regression on the
    standardised features (mean and standard deviation of the training fold) with an
    intercept and a small ridge ``l2/2 * ||w||^2`` is fitted by Newton's method with
    backtracking (float64, deterministic) on fold A and scores fold B, then the other way
    round. The AUC is computed over all held-out scores at once, ties counting 1/2. 0.5 means
    the features carry no membership signal; 1 means every member scores above every
    non-member. The attack learns the direction: members pushed far *below* the non-members
    (over-forgetting) are as visible to it as members far above them.

    Args:
        members: ``(n, f)`` features of member rows (label 1).
        nonmembers: ``(m, f)`` features of non-member rows (label 0).
        seed: seeds the fold split.
        l2: ridge weight (keeps the fit finite when the classes are separable).

    Returns:
        The AUC, or ``nan`` when either class has fewer than two rows.

    Raises:
        ValueError: if the two feature tensors are not 2-d with the same number of columns.

    Example:
        >>> members = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
        >>> nonmembers = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> membership_inference_auc(members, nonmembers)
        1.0
    """
    if members.dim() != 2 or nonmembers.dim() != 2 or members.shape[1] != nonmembers.shape[1]:
        raise ValueError(
            f"membership_inference_auc needs (n, f) and (m, f) features, got {tuple(members.shape)} and "
            f"{tuple(nonmembers.shape)}."
        )
    if len(members) < 2 or len(nonmembers) < 2:
        return math.nan
    g = torch.Generator().manual_seed(seed)
    folds = []
    for features in (members.double().cpu(), nonmembers.double().cpu()):
        shuffled = features[torch.randperm(len(features), generator=g)]
        folds.append((shuffled[: len(features) // 2], shuffled[len(features) // 2 :]))
    (pos_a, pos_b), (neg_a, neg_b) = folds
    predictions, labels = [], []
    for (train_pos, train_neg), (test_pos, test_neg) in (((pos_a, neg_a), (pos_b, neg_b)), ((pos_b, neg_b), (pos_a, neg_a))):
        x = torch.cat([train_pos, train_neg])
        y = torch.cat([torch.ones(len(train_pos)), torch.zeros(len(train_neg))]).double()
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        w = _fit_logistic((x - mean) / std, y, l2)
        test = torch.cat([test_pos, test_neg])
        predictions.append(_with_intercept((test - mean) / std) @ w)
        labels.append(torch.cat([torch.ones(len(test_pos)), torch.zeros(len(test_neg))]))
    return _binary_auc(torch.cat(predictions), torch.cat(labels).bool())


def _with_intercept(x: Tensor) -> Tensor:
    return torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], 1)


def _fit_logistic(x: Tensor, y: Tensor, l2: float, steps: int = 100, tol: float = 1e-10) -> Tensor:
    """Weights (intercept first) minimising mean log-loss + ``l2/2 * ||w||^2``, by damped Newton."""
    x = _with_intercept(x)
    w = torch.zeros(x.shape[1], dtype=x.dtype)
    eye = torch.eye(x.shape[1], dtype=x.dtype)

    def objective(v: Tensor) -> Tensor:
        z = x @ v
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * l2 * v.square().sum()

    value = objective(w)
    for _ in range(steps):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / len(x) + l2 * w
        hess = (x.T * (p * (1 - p))) @ x / len(x) + l2 * eye
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # backtracking: Newton is only locally quadratic
            candidate = objective(w - t * step)
            if candidate <= value:
                break
            t /= 2
        else:
            break
        w, value = w - t * step, candidate
        if (t * step).abs().max() < tol:
            break
    return w


def _binary_auc(scores: Tensor, labels: Tensor) -> float:
    """Mann-Whitney AUC of ``scores`` for bool ``labels``, ties 1/2, from mid-ranks."""
    unique, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts
    midrank = below.double() + (counts.double() + 1) / 2  # 1-based rank, ties averaged
    ranks = midrank[inverse]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return ((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()
