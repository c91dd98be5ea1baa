"""How completely a model forgot deleted rows, measured against retraining on the remaining rows.

The primary figure is the **forgetting gap closed** (see ``DESIGN.md``, "Measuring unlearning
honestly"): for a statistic ``s`` of the deleted rows,

    gap_closed = (s_original - s_method) / (s_original - s_reference)

where *original* was trained on all rows, *method* is the unlearned model and *reference* is
``Retrain`` on the retained rows from the original's seed. 1 is "like retraining", 0 is
"nothing forgotten", above 1 is over-forgetting. A second retrain with another seed (the
*noise* model) measured the same way tells how much of the figure is seed noise.

Statistics of the deleted rows (:func:`deleted_row_statistics`): mean rank percentile of the
deleted item among its user's candidates, mean score, share still in the top-K, and the AUC of
a small membership-inference attack (:mod:`lightning_unlearn.metrics.attack`). Secondary
figures: top-K overlap with the reference (:func:`topk_overlap`) and relative distances of the
score matrices and of the parameters (:func:`score_distance_rel`, :func:`param_distance_rel`).
For whole-user deletions the deleted users' own scores are seed noise after retraining, so
:func:`item_side_statistics` measures what their rows did to the items, as seen by the other
users. :func:`completeness_report` puts it all together.

The *candidates* of a user are all items except the user's retained training items (the items
the model may legitimately have learned); a deleted item is a candidate. Scores are computed
for chunks of users at once (``users x all items``, one ``representations()`` call per model)
under ``torch.no_grad()``; there is no Python loop over users or rows.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.metrics.attack import membership_inference_auc  # re-exported: its home before the attack had a module
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import fingerprint

__all__ = [
    "completeness_report",
    "deleted_row_statistics",
    "gap_closed",
    "item_side_statistics",
    "param_distance_rel",
    "score_distance_rel",
    "topk_overlap",
]

_DEFAULT_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# the primary figure
# ---------------------------------------------------------------------------------------------
def gap_closed(original: float, method: float, reference: float, eps: float = 1e-9) -> float:
    """Share of the original-to-reference gap that the method closed.

    ``(original - method) / (original - reference)``: 1 is like retraining, 0 is nothing
    forgotten, above 1 over-forgetting, below 0 moved away from the reference.

    Args:
        original: the statistic for the model trained on all rows.
        method: the statistic for the unlearned model.
        reference: the statistic for the retrained model.
        eps: the gap counts as zero when ``|original - reference| <= eps * max(1, |original|,
            |reference|)``.

    Returns:
        The ratio, or ``nan`` when the gap is zero (there was nothing to forget, as measured by
        this statistic, so no share of it can be closed) or any input is not finite.

    Example:
        >>> gap_closed(0.25, 0.5, 0.75)
        0.5
        >>> gap_closed(0.3, 0.1, 0.3)
        nan
    """
    original, method, reference = float(original), float(method), float(reference)
    if not all(math.isfinite(v) for v in (original, method, reference)):
        return math.nan
    gap = original - reference
    if abs(gap) <= eps * max(1.0, abs(original), abs(reference)):
        return math.nan
    return (original - method) / gap + 0.0  # + 0.0 turns -0.0 into 0.0


def _gaps(original: dict, method: dict, reference: dict, keys: dict[str, str]) -> dict[str, float]:
    return {f"gap_closed_{name}": gap_closed(original[s], method[s], reference[s]) for name, s in keys.items()}


def _deleted_gap_keys(k: int) -> dict[str, str]:
    return {"rank": "rank_pct", "score": "score", f"top{k}": f"in_top{k}", "mia": "mia_auc"}


_ITEM_GAP_KEYS = {"item_score": "item_score", "item_rank": "item_rank_pct"}


# ---------------------------------------------------------------------------------------------
# statistics of the deleted rows
# ---------------------------------------------------------------------------------------------
def deleted_row_statistics(
    model: Recommender,
    deleted: Interactions,
    retained: Interactions,
    nonmembers: Interactions,
    k: int = 20,
    seed: int = 0,
    chunk_size: int = _DEFAULT_CHUNK,
) -> dict[str, float]:
    """How visible the deleted rows still are in ``model``.

    For a deleted row ``(u, i)`` the candidates of ``u`` are all items except ``u``'s retained
    items (``i`` itself and ``u``'s other deleted items are candidates). With ``higher`` the
    number of other candidates scored strictly above ``i`` and ``ties`` the number scored
    exactly the same:

    - ``rank_pct``: mean over rows of ``(higher + ties / 2) / (candidates - 1)``; 0 is ranked
      first, 1 ranked last (0 when ``i`` is the only candidate).
    - ``score``: mean predicted score of the deleted rows.
    - ``in_top{k}``: share of rows with ``higher < k`` (``i`` is in the top-k, ties in its favour).
    - ``mia_auc``: AUC of a membership-inference attack that separates the deleted rows from
      non-member rows, see :func:`~lightning_unlearn.metrics.attack.membership_inference_auc`.
      The attack sees, per row, the score and the rank percentile (computed the same way for
      both kinds of rows); the classes are balanced by sampling ``min(len(deleted), usable
      non-members)`` rows of each with a generator seeded by ``seed``. Non-member rows that
      are retained or deleted training rows are not non-members and are left out before
      sampling. ``nan`` when fewer than two rows of either class remain.

    Args:
        model: a recommender; it is only read.
        deleted: the deleted training rows (several per user allowed; their users may have no
            retained rows left).
        retained: the remaining training rows.
        nonmembers: user-item pairs the model never trained on (e.g. test rows).
        k: the top-K cut-off.
        seed: seeds the non-member sample and the attack's folds.
        chunk_size: users scored at once.

    Returns:
        ``{"rank_pct", "score", f"in_top{k}", "mia_auc"}`` as floats.

    Raises:
        ValueError: on an empty ``deleted``, ``k < 1``, tables whose sizes differ from the
            model's, or deleted rows that are also retained.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> model = MF(num_users=1, num_items=3, embedding_dim=1)  # scores 3, 2, 1
        >>> _ = model.load_state_dict({"user_embedding.weight": torch.ones(1, 1),
        ...                            "item_embedding.weight": torch.tensor([[3.0], [2.0], [1.0]])})
        >>> rows = lambda items: Interactions(torch.zeros(len(items), dtype=torch.long),
        ...     torch.tensor(items), user_ids=np.arange(1), item_ids=np.arange(3))
        >>> stats = deleted_row_statistics(model, rows([1]), rows([0]), rows([2]), k=1)
        >>> stats["rank_pct"], stats["score"], stats["in_top1"]
        (0.0, 2.0, 1.0)
    """
    _check_k(k, chunk_size)
    _check_tables(model, deleted=deleted, retained=retained, nonmembers=nonmembers)
    _check_disjoint(deleted, retained)
    reps = _representations(model)
    score, rank, higher = _row_ranks(model, reps, deleted.users, deleted.items, retained, chunk_size)

    usable = ~retained.contains(nonmembers.users, nonmembers.items) & ~deleted.contains(nonmembers.users, nonmembers.items)
    pool = torch.nonzero(usable).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    m = min(len(deleted), len(pool))
    members = torch.randperm(len(deleted), generator=g)[:m].sort().values
    sample = pool[torch.randperm(len(pool), generator=g)[:m].sort().values]
    non_score, non_rank, _ = _row_ranks(model, reps, nonmembers.users[sample], nonmembers.items[sample], retained, chunk_size)
    auc = membership_inference_auc(
        torch.stack([score[members], rank[members]], 1), torch.stack([non_score, non_rank], 1), seed=seed
    )
    return {
        "rank_pct": rank.mean().item(),
        "score": score.mean().item(),
        f"in_top{k}": (higher < k).double().mean().item(),
        "mia_auc": auc,
    }


# ---------------------------------------------------------------------------------------------
# whole-user deletions: what the deleted rows did to their items, seen by the other users
# ---------------------------------------------------------------------------------------------
def item_side_statistics(
    model: Recommender, deleted: Interactions, retained: Interactions, k: int = 20, chunk_size: int = _DEFAULT_CHUNK
) -> dict[str, float]:
    """How the items of the deleted rows look to the users who remain.

    After a whole-user deletion a retrained model knows nothing of the deleted users, so their
    own scores are seed noise; what retraining does remove is the deleted rows' pull on their
    items. This measures it on the pairs ``(v, j)`` where ``j`` is an item of a deleted row
    (each distinct item once), ``v`` a *remaining* user (at least one retained row, no deleted
    row) and ``(v, j)`` not a retained row. Over these pairs, with candidates and ranks as in
    :func:`deleted_row_statistics`:

    - ``item_score``: mean score,
    - ``item_rank_pct``: mean rank percentile of ``j`` among ``v``'s candidates,
    - ``item_in_top{k}``: share of pairs where ``j`` is in ``v``'s top-k.

    Args:
        model: a recommender; it is only read.
        deleted: the deleted training rows.
        retained: the remaining training rows.
        k: the top-K cut-off.
        chunk_size: users scored at once.

    Returns:
        ``{"item_score", "item_rank_pct", f"item_in_top{k}"}`` as floats; ``nan`` when there is
        no such pair.

    Raises:
        ValueError: on an empty ``deleted``, ``k < 1`` or tables whose sizes differ from the model's.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> model = MF(num_users=2, num_items=3, embedding_dim=1)  # both users score 3, 2, 1
        >>> _ = model.load_state_dict({"user_embedding.weight": torch.ones(2, 1),
        ...                            "item_embedding.weight": torch.tensor([[3.0], [2.0], [1.0]])})
        >>> table = lambda users, items: Interactions(torch.tensor(users), torch.tensor(items),
        ...     user_ids=np.arange(2), item_ids=np.arange(3))
        >>> # user 0 deleted item 1; user 1 keeps item 2, so its candidates are items 0 and 1
        >>> item_side_statistics(model, table([0], [1]), table([1], [2]), k=1)
        {'item_score': 2.0, 'item_rank_pct': 1.0, 'item_in_top1': 0.0}
    """
    _check_k(k, chunk_size)
    _check_tables(model, deleted=deleted, retained=retained)
    if len(deleted) == 0:
        raise ValueError("item_side_statistics needs at least one deleted row, got an empty table.")
    has_deleted = torch.bincount(deleted.users, minlength=deleted.num_users) > 0
    users = torch.nonzero((retained.by_user.lengths() > 0) & ~has_deleted).squeeze(1)
    reps = _representations(model)
    items = torch.unique(deleted.items).to(reps[0].device)
    total = torch.zeros(3, dtype=torch.float64)
    pairs = 0
    for chunk, scores, excluded, ordered in _scored_chunks(model, reps, users, retained, chunk_size):
        values = scores[:, items].contiguous()
        higher, ties = _above_and_equal(ordered, values)
        valid = ~excluded[:, items]  # (v, j) is a candidate pair
        others = ((~excluded).sum(1, keepdim=True) - 1).clamp_min(1)
        rank = (higher + 0.5 * (ties - 1)) / others
        total += torch.stack([values[valid].double().sum(), rank[valid].double().sum(), (higher[valid] < k).double().sum()]).cpu()
        pairs += int(valid.sum())
    mean = (total / pairs).tolist() if pairs else [math.nan] * 3
    return {"item_score": mean[0], "item_rank_pct": mean[1], f"item_in_top{k}": mean[2]}


# ---------------------------------------------------------------------------------------------
# secondary figures
# ---------------------------------------------------------------------------------------------
def topk_overlap(
    model_a: Recommender,
    model_b: Recommender,
    users: Tensor,
    exclude: Interactions,
    k: int = 20,
    chunk_size: int = _DEFAULT_CHUNK,
) -> float:
    """Mean Jaccard similarity of two models' top-k lists.

    For each user the top-k items among the items not in ``exclude`` for that user are taken
    from each model, and ``|A & B| / |A | B|`` is averaged over ``users``. Users with no
    candidate item are left out. Which of several tied items makes a list is up to
    ``torch.topk``.

    Args:
        model_a: a recommender.
        model_b: another recommender over the same users and items.
        users: ``(n,)`` user indices.
        exclude: rows whose items are not ranked for their user (e.g. the retained training rows).
        k: list length (capped by the number of candidates).
        chunk_size: users scored at once.

    Returns:
        The mean Jaccard similarity in ``[0, 1]``; ``nan`` when no user has a candidate.

    Raises:
        ValueError: if ``k < 1`` or the table or models differ in size.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> def mf(item_scores):
        ...     model = MF(num_users=1, num_items=len(item_scores), embedding_dim=1)
        ...     _ = model.load_state_dict({"user_embedding.weight": torch.ones(1, 1),
        ...                                "item_embedding.weight": torch.tensor(item_scores).unsqueeze(1)})
        ...     return model
        >>> a, b = mf([3.0, 2.0, 1.0]), mf([1.0, 2.0, 3.0])
        >>> no_rows = Interactions(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
        ...     user_ids=np.arange(1), item_ids=np.arange(3))
        >>> topk_overlap(a, b, torch.tensor([0]), no_rows, k=2)  # {0, 1} vs {2, 1}
        0.3333333333333333
    """
    _check_k(k, chunk_size)
    _check_tables(model_a, exclude=exclude)
    _check_same_size(model_a, model_b)
    users = torch.as_tensor(users, dtype=torch.long).cpu()
    reps_a, reps_b = _representations(model_a), _representations(model_b)
    kk = min(k, exclude.num_items)
    total, counted = 0.0, 0
    for chunk in users.split(chunk_size):
        excluded = _exclusion_mask(exclude, chunk, reps_a[0].device)
        tops = []
        for model, reps in ((model_a, reps_a), (model_b, reps_b)):
            scores = _scores(model, reps, chunk).to(excluded.device)
            top = torch.topk(scores.masked_fill(excluded, float("-inf")), kk, dim=1).indices
            tops.append((top, ~excluded.gather(1, top)))
        (top_a, valid_a), (top_b, valid_b) = tops
        in_a = torch.zeros_like(excluded).scatter_(1, top_a, valid_a)
        inter = (in_a.gather(1, top_b) & valid_b).sum(1)
        union = valid_a.sum(1) + valid_b.sum(1) - inter
        has = union > 0
        total += (inter[has].double() / union[has]).sum().item()
        counted += int(has.sum())
    return total / counted if counted else math.nan


def score_distance_rel(
    method: Recommender, reference: Recommender, original: Recommender, users: Tensor, chunk_size: int = _DEFAULT_CHUNK
) -> float:
    """``||S_method - S_reference||_F / ||S_original - S_reference||_F`` over ``users``' score rows.

    ``S`` is the ``(users, all items)`` score matrix. Unlike parameters, scores do not change
    when the latent space is rotated, so this compares what the models predict. 0 is the
    reference's predictions, 1 as far from them as the original.

    Args:
        method: the unlearned model.
        reference: the retrained model.
        original: the model trained on all rows.
        users: ``(n,)`` user indices.
        chunk_size: users scored at once.

    Returns:
        The ratio; ``nan`` when the original and the reference score these users identically.

    Raises:
        ValueError: if the models differ in size.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> def mf(user_scale):
        ...     model = MF(num_users=1, num_items=2, embedding_dim=1)
        ...     _ = model.load_state_dict({"user_embedding.weight": torch.full((1, 1), user_scale),
        ...                                "item_embedding.weight": torch.ones(2, 1)})
        ...     return model
        >>> score_distance_rel(mf(1.0), mf(0.0), mf(4.0), users=torch.tensor([0]))  # |1 - 0| / |4 - 0|
        0.25
    """
    _check_same_size(method, reference)
    _check_same_size(method, original)
    users = torch.as_tensor(users, dtype=torch.long).cpu()
    reps = [_representations(m) for m in (method, reference, original)]
    num = den = 0.0
    for chunk in users.split(chunk_size):
        s_m, s_r, s_o = (_scores(m, r, chunk).double().cpu() for m, r in zip((method, reference, original), reps))
        num += (s_m - s_r).square().sum().item()
        den += (s_o - s_r).square().sum().item()
    return math.sqrt(num / den) if den > 0 else math.nan


def param_distance_rel(method: Recommender, reference: Recommender, original: Recommender) -> float:
    """``||theta_method - theta_reference|| / ||theta_original - theta_reference||``.

    ``theta`` is every tensor of ``parameters()`` flattened and concatenated. This depends on
    the basis of the latent space (two equally good models can differ by a rotation), so it is
    a secondary figure; prefer :func:`score_distance_rel`.

    Args:
        method: the unlearned model.
        reference: the retrained model.
        original: the model trained on all rows.

    Returns:
        The ratio; ``nan`` when the original and the reference have equal parameters.

    Raises:
        ValueError: if the models' parameters differ in number or shape.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> def mf(value):
        ...     model = MF(num_users=1, num_items=1, embedding_dim=1)
        ...     _ = model.load_state_dict({"user_embedding.weight": torch.full((1, 1), value),
        ...                                "item_embedding.weight": torch.full((1, 1), value)})
        ...     return model
        >>> param_distance_rel(mf(2.0), mf(1.0), mf(3.0))
        0.5
    """
    flat = [_flat_parameters(m) for m in (method, reference, original)]
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in (method, reference, original)]
    if not shapes[0] == shapes[1] == shapes[2]:
        raise ValueError(f"param_distance_rel needs models with the same parameter shapes, got {shapes}.")
    den = torch.linalg.vector_norm(flat[2] - flat[1]).item()
    return torch.linalg.vector_norm(flat[0] - flat[1]).item() / den if den > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def completeness_report(
    original: Recommender,
    method: Recommender,
    reference: Recommender,
    deleted: Interactions,
    retained: Interactions,
    nonmembers: Interactions,
    k: int = 20,
    noise: Recommender | None = None,
    seed: int = 0,
    whole_users: bool = False,
    cache: dict | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
) -> dict[str, dict[str, float]]:
    """Every completeness figure of ``method`` against ``reference``.

    Args:
        original: the model trained on all rows.
        method: the unlearned model (a different object from ``original``: methods change
            models in place, so unlearn a copy).
        reference: ``Retrain`` on ``retained`` from the original's seed.
        deleted: the deleted training rows.
        retained: the remaining training rows.
        nonmembers: pairs no model trained on (e.g. test rows), for the membership attack.
        k: the top-K cut-off (it appears in key names).
        noise: optionally ``Retrain`` on ``retained`` from another seed; its gaps closed are the
            seed noise to read the method's against.
        seed: seeds the membership attack (:func:`deleted_row_statistics`).
        whole_users: also measure the deleted rows' effect on their items
            (:func:`item_side_statistics`), the figure to read for whole-user deletions.
        cache: a dict kept between calls that compare several methods against one original,
            reference and noise model on the same rows: their statistics are stored in it and
            reused. Entries carry a fingerprint of the model's parameters and representations,
            the rows, ``k`` and ``seed``, and are recomputed when it no longer matches.
        chunk_size: users scored at once.

    Returns:
        ``{"deleted", "original", "reference", "completeness"[, "items"][, "noise"]}``:

        - ``deleted``, ``original``, ``reference``: :func:`deleted_row_statistics` of the method,
          the original and the reference;
        - ``completeness``: ``gap_closed_rank``, ``gap_closed_score``, ``gap_closed_top{k}``,
          ``gap_closed_mia`` (:func:`gap_closed` of ``rank_pct``, ``score``, ``in_top{k}``,
          ``mia_auc``), ``overlap@{k}`` (method vs reference, all users),
          ``overlap@{k}_affected`` (the users of the deleted rows), ``score_distance_rel`` (all
          users), ``param_distance_rel``; with ``whole_users`` also ``gap_closed_item_score``
          and ``gap_closed_item_rank``;
        - ``items`` (with ``whole_users``): :func:`item_side_statistics` of the method;
        - ``noise`` (with ``noise``): the same ``gap_closed_*`` figures for the noise model.

    Raises:
        ValueError: if ``method`` is ``original``, or on the errors of
            :func:`deleted_row_statistics`.

    Example:
        >>> import numpy as np
        >>> from lightning_unlearn.models import MF
        >>> def mf(item_scores):
        ...     model = MF(num_users=1, num_items=4, embedding_dim=1)
        ...     _ = model.load_state_dict({"user_embedding.weight": torch.ones(1, 1),
        ...                                "item_embedding.weight": torch.tensor(item_scores).unsqueeze(1)})
        ...     return model
        >>> rows = lambda items: Interactions(torch.zeros(len(items), dtype=torch.long),
        ...     torch.tensor(items), user_ids=np.arange(1), item_ids=np.arange(4))
        >>> original, method, reference = mf([0.0, 4.0, 1.0, 2.0]), mf([0.0, 3.0, 1.0, 2.0]), mf([0.0, 2.0, 1.0, 2.5])
        >>> report = completeness_report(original, method, reference, rows([1]), rows([0]), rows([2]), k=1)
        >>> report["completeness"]["gap_closed_score"], report["completeness"]["gap_closed_top1"]
        (0.5, 0.0)
    """
    if method is original:
        raise ValueError("completeness_report(method=...) is the `original` object; unlearn a copy of the original.")
    cache = {} if cache is None else cache
    data_key = (_table_fingerprint(deleted), _table_fingerprint(retained), _table_fingerprint(nonmembers), k, seed)

    def compute(model: Recommender, items: bool) -> dict[str, float]:
        if items:
            return item_side_statistics(model, deleted, retained, k, chunk_size)
        return deleted_row_statistics(model, deleted, retained, nonmembers, k, seed, chunk_size)

    def stats(role: str, model: Recommender, items: bool = False) -> dict[str, float]:
        if role == "method":  # never cached: the method's model changes between calls
            return compute(model, items)
        # what the model predicts from: its class, parameters and representations (a graph model's graph too)
        model_key = type(model).__name__, tuple(fingerprint(model, *_representations(model)).reshape(-1).tolist())
        name, key = f"{role}_items" if items else role, (model_key, data_key)
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, compute(model, items))
        return cache[name][1]

    gap_keys = _deleted_gap_keys(k)
    s_o, s_m, s_r = stats("original", original), stats("method", method), stats("reference", reference)
    affected = torch.unique(deleted.users)
    everyone = torch.arange(deleted.num_users)
    completeness = _gaps(s_o, s_m, s_r, gap_keys)
    completeness[f"overlap@{k}"] = topk_overlap(method, reference, everyone, retained, k, chunk_size)
    completeness[f"overlap@{k}_affected"] = topk_overlap(method, reference, affected, retained, k, chunk_size)
    completeness["score_distance_rel"] = score_distance_rel(method, reference, original, everyone, chunk_size)
    completeness["param_distance_rel"] = param_distance_rel(method, reference, original)
    report: dict[str, dict[str, float]] = {"deleted": s_m, "original": s_o, "reference": s_r, "completeness": completeness}
    if whole_users:
        i_o, i_m, i_r = stats("original", original, True), stats("method", method, True), stats("reference", reference, True)
        completeness.update(_gaps(i_o, i_m, i_r, _ITEM_GAP_KEYS))
        report["items"] = i_m
    if noise is not None:
        report["noise"] = _gaps(s_o, stats("noise", noise), s_r, gap_keys)
        if whole_users:
            report["noise"].update(_gaps(i_o, stats("noise", noise, True), i_r, _ITEM_GAP_KEYS))
    return report


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _representations(model: Recommender) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return tuple(r.detach() for r in model.representations())  # type: ignore[return-value]


def _scores(model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor) -> Tensor:
    with torch.no_grad():
        return model.full_scores(users.to(reps[0].device), reps)


def _exclusion_mask(exclude: Interactions, users: Tensor, device: torch.device) -> Tensor:
    """``(len(users), num_items)`` bool: ``True`` at each user's items in ``exclude``."""
    segment, position = exclude.by_user.gather(users.cpu())
    mask = torch.zeros(len(users), exclude.num_items, dtype=torch.bool)
    mask[segment, exclude.by_user.cols[position]] = True
    return mask.to(device)


def _scored_chunks(
    model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor, exclude: Interactions, chunk_size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per chunk of users: ``(users, scores, excluded, ascending sorted scores with excluded = -inf)``."""
    device = reps[0].device
    for chunk in users.split(chunk_size):
        scores = _scores(model, reps, chunk)
        excluded = _exclusion_mask(exclude, chunk, device)
        ordered = torch.sort(scores.masked_fill(excluded, float("-inf")), dim=1).values
        yield chunk, scores, excluded, ordered


def _above_and_equal(ordered: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """For ``(C, m)`` values and ``(C, I)`` ascending rows: how many entries are ``>`` and ``==``."""
    not_above = torch.searchsorted(ordered, values, right=True)
    below = torch.searchsorted(ordered, values)
    return ordered.shape[1] - not_above, not_above - below


def _row_ranks(
    model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor, items: Tensor, exclude: Interactions, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row ``(u, i)``: score, rank percentile and number of candidates scored above ``i``.

    Candidates of ``u`` are the items not in ``exclude`` for ``u``; ``i`` itself is left out of
    the "other candidates" whether or not it is one. Rows are grouped by user so each user is
    scored once; a user's rows are laid out in a ``(users, max rows per user)`` block so one
    batched ``searchsorted`` serves them all. Returns float64 / long CPU tensors in row order.
    """
    n = len(users)
    score, rank = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    higher = torch.zeros(n, dtype=torch.long)
    if n == 0:
        return score, rank, higher
    order = torch.argsort(users, stable=True)
    sorted_users, sorted_items = users[order], items[order]
    unique, counts = torch.unique_consecutive(sorted_users, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    owner = torch.repeat_interleave(torch.arange(len(unique)), counts)
    slot = torch.arange(n) - starts[owner]
    device = reps[0].device
    for first, (chunk, scores, excluded, ordered) in zip(
        range(0, len(unique), chunk_size), _scored_chunks(model, reps, unique, exclude, chunk_size)
    ):
        last = first + len(chunk)
        r0, r1 = int(starts[first]), int(starts[last - 1] + counts[last - 1])
        local, item, place = (owner[r0:r1] - first).to(device), sorted_items[r0:r1].to(device), slot[r0:r1].to(device)
        block = scores.new_zeros(len(chunk), int(counts[first:last].max()))
        block[local, place] = scores[local, item]
        above, equal = (t[local, place] for t in _above_and_equal(ordered, block))
        candidate = (~excluded[local, item]).long()
        others = (~excluded).sum(1)[local] - candidate
        dest = order[r0:r1]
        score[dest] = scores[local, item].double().cpu()
        rank[dest] = ((above + 0.5 * (equal - candidate)) / others.clamp_min(1)).double().cpu()
        higher[dest] = above.cpu()
    return score, rank, higher


def _flat_parameters(model: Recommender) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


def _table_fingerprint(table: Interactions) -> tuple:
    keys = table.keys
    return len(table), table.num_users, table.num_items, int(keys.sum()), int((keys % 1_000_003).square().sum())


def _check_k(k: int, chunk_size: int = 1) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer cut-off, got {k!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of users, got {chunk_size!r}.")


def _check_tables(model: Recommender, **tables: Interactions) -> None:
    for name, table in tables.items():
        if (table.num_users, table.num_items) != (model.num_users, model.num_items):
            raise ValueError(
                f"`{name}` has {table.num_users} users x {table.num_items} items, but the model has "
                f"{model.num_users} x {model.num_items}."
            )


def _check_same_size(a: Recommender, b: Recommender) -> None:
    if (a.num_users, a.num_items) != (b.num_users, b.num_items):
        raise ValueError(f"The models differ in size: {a.num_users} x {a.num_items} vs {b.num_users} x {b.num_items}.")


def _check_disjoint(deleted: Interactions, retained: Interactions) -> None:
    if len(deleted) == 0:
        raise ValueError("deleted_row_statistics needs at least one deleted row, got an empty table.")
    overlap = retained.contains(deleted.users, deleted.items)
    if overlap.any():
        users, items = deleted.users[overlap][:5].tolist(), deleted.items[overlap][:5].tolist()
        raise ValueError(
            f"{int(overlap.sum())} deleted rows are also retained rows, e.g. (user, item) {list(zip(users, items))}."
        )
