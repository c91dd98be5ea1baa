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
the model may legitimately have learned); a deleted item is a candidate. How the figures are
computed, under ``torch.no_grad()`` and with no Python loop over users or rows:

- Scores are computed for chunks of users at once (``users x all items``, one
  ``representations()`` call per model, in :func:`completeness_report` one per report). A
  user's excluded items are written into the chunk as ``-inf`` at their coordinates (from the
  table's CSR view), so no dense ``users x items`` mask is built; how many candidates a user
  has, and whether an item is one, comes from the table, not from the scores (a model may
  score ``-inf`` itself).
- A rank counts the candidates scored above and tied with an item. For a user with a few rows
  to rank (up to ``_COUNT_ROWS``: the deleted rows of most users, whole-user deletions
  included) the chunk's row is compared with each value directly, ``O(items)`` per value, tile
  by tile so that each score is read once; for a user with more (and for the many items of
  :func:`item_side_statistics`) the row is sorted once and searched, ``O(items log items)``.
  Both give the same counts.
- :func:`score_distance_rel` of models that score with the plain dot product of their vectors
  (:class:`~lightning_unlearn.models.MF` and :class:`~lightning_unlearn.models.LightGCN`) is
  computed exactly, in float64, from ``d x d`` Gram matrices, ``O((users + items) d^2)``; other
  models (NeuMF) are scored chunk by chunk.
- :func:`completeness_report` keeps what depends only on the original and the reference in its
  ``cache``: their statistics, the reference's top-k lists and its score distance to the
  original. A second method compared with them scores only itself.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.metrics.attack import membership_inference_auc  # re-exported: its home before the attack had a module
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import fingerprint
from lightning_unlearn.models.mf import MF
from lightning_unlearn.ranking import count_compared

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
    return _deleted_row_statistics(model, _representations(model), deleted, retained, nonmembers, k, seed, chunk_size)


def _deleted_row_statistics(
    model: Recommender,
    reps: tuple[Tensor, Tensor],
    deleted: Interactions,
    retained: Interactions,
    nonmembers: Interactions,
    k: int,
    seed: int,
    chunk_size: int,
) -> dict[str, float]:
    """:func:`deleted_row_statistics` of checked arguments, from the model's representations ``reps``."""
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
    return _item_side_statistics(model, _representations(model), deleted, retained, k, chunk_size)


def _item_side_statistics(
    model: Recommender, reps: tuple[Tensor, Tensor], deleted: Interactions, retained: Interactions, k: int, chunk_size: int
) -> dict[str, float]:
    """:func:`item_side_statistics` of checked arguments, from the model's representations ``reps``."""
    has_deleted = torch.bincount(deleted.users, minlength=deleted.num_users) > 0
    users = torch.nonzero((retained.by_user.lengths() > 0) & ~has_deleted).squeeze(1)
    device = reps[0].device
    items = torch.unique(deleted.items)
    items_here = items.to(device)
    column = torch.full((deleted.num_items,), -1, dtype=torch.long)  # item -> its column among `items`, -1 if none
    column[items] = torch.arange(len(items))
    candidates = _candidate_counts(retained)
    total = torch.zeros(3, dtype=torch.float64)
    pairs = 0
    for chunk in users.split(chunk_size):
        scores = _scores(model, reps, chunk)
        segment, excluded_items = _exclude_(scores, retained, chunk)
        values = scores[:, items_here].contiguous()  # -inf at excluded pairs, which `valid` leaves out
        valid = torch.ones(len(chunk), len(items), dtype=torch.bool)  # (v, j) is a candidate pair
        hit = column[excluded_items]
        valid[segment[hit >= 0], hit[hit >= 0]] = False
        valid = valid.to(device)
        higher, ties = _count_above_and_equal(scores, values, torch.full((len(chunk),), len(items)))
        del scores
        others = (candidates[chunk] - 1).clamp_min(1).unsqueeze(1).to(device)
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
    kk = min(k, exclude.num_items)
    lists = [_top_lists(model, _representations(model), users, exclude, kk, chunk_size) for model in (model_a, model_b)]
    return _mean_jaccard(*lists[0], *lists[1], chunk_size)


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

    Models that score with the plain dot product of their vectors (MF, LightGCN: ``interact``
    and ``full_scores`` are MF's) are not scored: ``||U_a V_a^T - U_b V_b^T||_F^2`` is computed
    exactly in float64 from ``d x d`` Gram matrices, in ``O((users + items) d^2)``. Other models
    are scored ``chunk_size`` users at a time and the squared differences summed in float64.

    Returns:
        The ratio; ``nan`` when the original and the reference score these users identically.

    Raises:
        ValueError: if the models differ in size, or ``chunk_size < 1``.

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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of users, got {chunk_size!r}.")
    users = torch.as_tensor(users, dtype=torch.long).cpu()
    models = (method, reference, original)
    num, den = _squared_distances(models, [_representations(m) for m in models], [(0, 1), (2, 1)], users, chunk_size)
    return _distance_ratio(num, den)


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
            reference and noise model on the same rows: their statistics, the reference's
            top-k lists and the original's score distance to the reference are stored in it
            and reused. Entries carry a fingerprint of the models' parameters and
            representations and of the rows they depend on (and ``k``, ``seed``), and are
            recomputed when it no longer matches.
        chunk_size: users scored at once.

    Returns:
        ``{"deleted", "original", "reference", "completeness", "baseline"[, "items"][, "noise"]}``:

        - ``deleted``, ``original``, ``reference``: :func:`deleted_row_statistics` of the method,
          the original and the reference;
        - ``completeness``: ``gap_closed_rank``, ``gap_closed_score``, ``gap_closed_top{k}``,
          ``gap_closed_mia`` (:func:`gap_closed` of ``rank_pct``, ``score``, ``in_top{k}``,
          ``mia_auc``), ``overlap@{k}`` (method vs reference, all users),
          ``overlap@{k}_affected`` (the users of the deleted rows), ``score_distance_rel`` (all
          users), ``param_distance_rel``; with ``whole_users`` also ``gap_closed_item_score``
          and ``gap_closed_item_rank``;
        - ``baseline``: ``overlap@{k}`` and ``overlap@{k}_affected`` of the original against the
          reference (how close doing nothing already is; kept in the cache);
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
    _check_k(k, chunk_size)
    _check_tables(original, deleted=deleted, retained=retained, nonmembers=nonmembers)
    _check_disjoint(deleted, retained)
    for model in (method, reference) if noise is None else (method, reference, noise):
        _check_tables(model, deleted=deleted, retained=retained, nonmembers=nonmembers)
    cache = {} if cache is None else cache
    data_key = (_table_fingerprint(deleted), _table_fingerprint(retained), _table_fingerprint(nonmembers), k, seed)
    known_reps: dict[int, tuple[Tensor, Tensor]] = {}
    known_keys: dict[int, tuple] = {}

    def reps(model: Recommender) -> tuple[Tensor, Tensor]:  # once per model and call
        if id(model) not in known_reps:
            known_reps[id(model)] = _representations(model)
        return known_reps[id(model)]

    def model_key(model: Recommender) -> tuple:
        # what the model predicts from: its class, parameters and representations (a graph model's graph too)
        if id(model) not in known_keys:
            known_keys[id(model)] = type(model).__name__, tuple(fingerprint(model, *reps(model)).reshape(-1).tolist())
        return known_keys[id(model)]

    def cached(name: str, key: tuple, compute):
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, compute())
        return cache[name][1]

    def compute(model: Recommender, items: bool) -> dict[str, float]:
        if items:
            return _item_side_statistics(model, reps(model), deleted, retained, k, chunk_size)
        return _deleted_row_statistics(model, reps(model), deleted, retained, nonmembers, k, seed, chunk_size)

    def stats(role: str, model: Recommender, items: bool = False) -> dict[str, float]:
        if role == "method":  # never cached: the method's model changes between calls
            return compute(model, items)
        return cached(f"{role}_items" if items else role, (model_key(model), data_key), lambda: compute(model, items))

    gap_keys = _deleted_gap_keys(k)
    s_o, s_m, s_r = stats("original", original), stats("method", method), stats("reference", reference)
    affected = torch.unique(deleted.users)
    everyone = torch.arange(deleted.num_users)
    completeness = _gaps(s_o, s_m, s_r, gap_keys)
    # top-k lists of every user; the affected users' lists are rows of them, the reference's are kept in the cache
    kk = min(k, retained.num_items)
    top_m = _top_lists(method, reps(method), everyone, retained, kk, chunk_size)
    top_r = cached(
        "reference_topk", (model_key(reference), _table_fingerprint(retained), kk),
        lambda: _top_lists(reference, reps(reference), everyone, retained, kk, chunk_size),
    )
    completeness.update(_overlaps(top_m, top_r, affected, k, chunk_size))
    baseline = cached(  # how close doing nothing already is: the same overlaps for the original
        "baseline", (model_key(original), model_key(reference), _table_fingerprint(retained), _table_fingerprint(deleted), kk),
        lambda: _overlaps(_top_lists(original, reps(original), everyone, retained, kk, chunk_size), top_r, affected, k, chunk_size),
    )
    # ||S_original - S_reference|| does not depend on the method: kept in the cache
    models = (method, reference, original)
    distance_key = (model_key(original), model_key(reference), len(everyone))
    if "score_distance" in cache and cache["score_distance"][0] == distance_key:
        (num,) = _squared_distances(models, [reps(m) for m in models], [(0, 1)], everyone, chunk_size)
        den = cache["score_distance"][1]
    else:
        num, den = _squared_distances(models, [reps(m) for m in models], [(0, 1), (2, 1)], everyone, chunk_size)
        cache["score_distance"] = (distance_key, den)
    completeness["score_distance_rel"] = _distance_ratio(num, den)
    completeness["param_distance_rel"] = param_distance_rel(method, reference, original)
    report: dict[str, dict[str, float]] = {"deleted": s_m, "original": s_o, "reference": s_r, "completeness": completeness,
                                           "baseline": baseline}
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
def _overlaps(top_a: tuple[Tensor, Tensor], top_b: tuple[Tensor, Tensor], affected: Tensor, k: int, chunk_size: int) -> dict[str, float]:
    """``overlap@{k}`` (every user) and ``overlap@{k}_affected`` of two models' top-k lists."""
    return {f"overlap@{k}": _mean_jaccard(*top_a, *top_b, chunk_size),
            f"overlap@{k}_affected": _mean_jaccard(*(t[affected] for t in (*top_a, *top_b)), chunk_size)}


def _representations(model: Recommender) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return tuple(r.detach() for r in model.representations())  # type: ignore[return-value]


def _scores(model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor) -> Tensor:
    """``(len(users), num_items)`` scores, a tensor of its own that the caller may write into."""
    with torch.no_grad():
        scores = model.full_scores(users.to(reps[0].device), reps)
    return scores.clone() if scores._base is not None else scores  # a view of another tensor is copied first


def _exclude_(scores: Tensor, exclude: Interactions, users: Tensor) -> tuple[Tensor, Tensor]:
    """Write ``-inf`` into ``(len(users), num_items)`` ``scores`` at each user's items in ``exclude``, in place.

    Returns the CPU coordinates written: ``(row of scores, item)``.
    """
    segment, position = exclude.by_user.gather(users.cpu())
    items = exclude.by_user.cols[position]
    scores[segment.to(scores.device), items.to(scores.device)] = float("-inf")
    return segment, items


def _candidate_counts(exclude: Interactions) -> Tensor:
    """``(num_users,)`` long CPU: how many items are not in ``exclude`` for each user (a repeated row counts once)."""
    distinct = torch.unique(exclude.keys)
    return exclude.num_items - torch.bincount(distinct // exclude.num_items, minlength=exclude.num_users)


def _above_and_equal(ordered: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """For ``(C, m)`` values and ``(C, I)`` ascending rows: how many entries are ``>`` and ``==``."""
    not_above = torch.searchsorted(ordered, values, right=True)
    below = torch.searchsorted(ordered, values)
    return ordered.shape[1] - not_above, not_above - below


#: A row with at most this many values to rank is compared with each of them (tile by tile,
#: see :func:`_count_above_and_equal`); one with more is sorted once. Measured on (1024 users,
#: 117,000 items) chunks on two CPU threads: sorting them takes 4.6 s, comparing them with one
#: value 0.015 to 0.03 s, so sorting pays from about 300 values a row.
_COUNT_ROWS = 256

#: Comparisons per tile when counting: a tile of scores (8 MB of float32 on CPU) stays in cache
#: while it is compared with all of its rows' values.
_TILE = {"cpu": 1 << 21}
_TILE_OTHER = 1 << 24
_TILE_MIN_COLS = 1024  # cells of a row in a tile, at least


def _count_above_and_equal(scores: Tensor, values: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """For ``(C, I)`` score rows and ``(C, m)`` values: how many entries of each row are ``>`` and ``==`` each value.

    Row ``c`` uses its first ``lengths[c]`` values; the counts of its other slots are left
    unspecified. Rows with more than ``_COUNT_ROWS`` values are sorted and searched
    (:func:`_above_and_equal`, ``O(I log I)``). The others are compared with their values
    directly, ``O(I)`` per value, by :func:`~lightning_unlearn.ranking.count_compared` (tiles of
    about ``_TILE`` comparisons, so each score is read from memory once for all values; blocks of
    sorted rows only are skipped).

    For scores and values without ``nan`` both ways give the same counts. With ``nan`` a rank
    means nothing: counting leaves a ``nan`` out of both counts, and binary search on a sorted
    row (the sort path, and the code before counting) puts it wherever the search ends.
    Long ``(C, m)`` tensors.
    """
    n = len(values)
    lengths = lengths.cpu()
    heavy = lengths > _COUNT_ROWS
    above, equal = count_compared(scores, values, (torch.gt, torch.eq), lengths.masked_fill(heavy, 0),
                                  _TILE.get(scores.device.type, _TILE_OTHER), _TILE_MIN_COLS)
    if bool(heavy.any()):  # after counting: a block may have counted garbage for its sorted rows
        rows = torch.nonzero(heavy).squeeze(1).to(scores.device)
        ordered = torch.sort(scores if len(rows) == n else scores[rows], dim=1).values
        above[rows], equal[rows] = _above_and_equal(ordered, values[rows].contiguous())
    return above, equal


def _row_ranks(
    model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor, items: Tensor, exclude: Interactions, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row ``(u, i)``: score, rank percentile and number of candidates scored above ``i``.

    Candidates of ``u`` are the items not in ``exclude`` for ``u``; ``i`` itself is left out of
    the "other candidates" whether or not it is one. Rows are grouped by user so each user is
    scored once; a user's rows are laid out in a ``(users, max rows per user)`` block and
    counted by :func:`_count_above_and_equal`. Returns float64 / long CPU tensors in row order.
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
    candidates = _candidate_counts(exclude)
    is_candidate = (~exclude.contains(sorted_users, sorted_items)).long()
    device = reps[0].device
    for first in range(0, len(unique), chunk_size):
        chunk = unique[first : first + chunk_size]
        last = first + len(chunk)
        r0, r1 = int(starts[first]), int(starts[last - 1] + counts[last - 1])
        local, item, place = (owner[r0:r1] - first).to(device), sorted_items[r0:r1].to(device), slot[r0:r1].to(device)
        scores = _scores(model, reps, chunk)
        values = scores[local, item]  # before the exclusions are written: a row's own score
        _exclude_(scores, exclude, chunk)
        block = scores.new_zeros(len(chunk), int(counts[first:last].max()))
        block[local, place] = values
        above, equal = (t[local, place] for t in _count_above_and_equal(scores, block, counts[first:last]))
        del scores
        candidate = is_candidate[r0:r1].to(device)
        others = candidates[chunk].to(device)[local] - candidate
        dest = order[r0:r1]
        score[dest] = values.double().cpu()
        rank[dest] = ((above + 0.5 * (equal - candidate)) / others.clamp_min(1)).double().cpu()
        higher[dest] = above.cpu()
    return score, rank, higher


def _top_lists(
    model: Recommender, reps: tuple[Tensor, Tensor], users: Tensor, exclude: Interactions, kk: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Each user's ``kk`` best items with ``exclude``'s items of the user scored ``-inf``, and which are candidates.

    ``(len(users), kk)`` long CPU item indices in ``torch.topk`` order and bool CPU ``valid``
    (``False`` for an excluded item, which fills the list of a user with fewer than ``kk``
    candidates).
    """
    tops, valid = [torch.zeros(0, kk, dtype=torch.long)], [torch.zeros(0, kk, dtype=torch.bool)]
    for chunk in users.split(chunk_size):
        scores = _scores(model, reps, chunk)
        _exclude_(scores, exclude, chunk)
        top = torch.topk(scores, kk, dim=1).indices.cpu()
        del scores
        tops.append(top)
        valid.append(~exclude.contains(chunk.unsqueeze(1), top))
    return torch.cat(tops), torch.cat(valid)


def _mean_jaccard(top_a: Tensor, valid_a: Tensor, top_b: Tensor, valid_b: Tensor, chunk_size: int) -> float:
    """Mean over users with a candidate of ``|A & B| / |A | B|``, from two :func:`_top_lists` of the same users.

    Summed chunk by chunk of ``chunk_size`` users, as :func:`topk_overlap` always has. A list
    holds distinct items, so ``|A & B|`` counts the pairs of equal valid entries (invalid ones
    are replaced by -1 in ``A`` and -2 in ``B``, which equal nothing on the other side).
    """
    total, counted = 0.0, 0
    kk = max(1, top_a.shape[1])
    step = max(1, (1 << 22) // (kk * kk))  # rows whose (rows, kk, kk) comparison is built at once
    for ta, va, tb, vb in zip(*(t.split(chunk_size) for t in (top_a, valid_a, top_b, valid_b))):
        a, b = ta.masked_fill(~va, -1), tb.masked_fill(~vb, -2)
        inter = torch.cat([(x.unsqueeze(2) == y.unsqueeze(1)).sum((1, 2)) for x, y in zip(a.split(step), b.split(step))])
        union = va.sum(1) + vb.sum(1) - inter
        has = union > 0
        total += (inter[has].double() / union[has]).sum().item()
        counted += int(has.sum())
    return total / counted if counted else math.nan


def _scores_by_dot_product(model: Recommender) -> bool:
    """Whether ``model``'s scores are the plain dot products of its representations: MF's ``interact`` and ``full_scores``."""
    cls = type(model)
    return (
        cls.interact is MF.interact and cls.full_scores is MF.full_scores
        and "interact" not in vars(model) and "full_scores" not in vars(model)
    )


#: Elements of a score chunk converted to float64 at once when summing squared differences.
_SLICE = 1 << 20


def _squared_distances(
    models: tuple[Recommender, ...], reps: list[tuple[Tensor, Tensor]], pairs: list[tuple[int, int]], users: Tensor, chunk_size: int
) -> list[float]:
    """``||S_a - S_b||_F^2`` over ``users``' score rows for each pair ``(a, b)`` of indices into ``models``.

    When every model of the pairs scores by the dot product, from Gram matrices
    (:func:`_gram_distance`); otherwise the models are scored ``chunk_size`` users at a time (each
    once per chunk) and the squared differences summed in float64, a slice of rows at a time so
    that no float64 copy of a whole chunk is made.
    """
    involved = sorted({i for pair in pairs for i in pair})
    if all(_scores_by_dot_product(models[i]) for i in involved):
        return [_gram_distance(reps[a], reps[b], users) for a, b in pairs]
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    for chunk in users.split(chunk_size):
        scores = {i: _scores(models[i], reps[i], chunk) for i in involved}
        for p, (a, b) in enumerate(pairs):
            s_a, s_b = scores[a], scores[b].to(scores[a].device)
            step = max(1, _SLICE // max(1, s_a.shape[1]))
            total = torch.zeros((), dtype=torch.float64, device=s_a.device)
            for r in range(0, len(s_a), step):  # slices of rows: a bounded float64 temporary
                total += (s_a[r : r + step].double() - s_b[r : r + step].double()).square().sum()
            totals[p] += total.cpu()
    return totals.tolist()


def _gram_distance(reps_a: tuple[Tensor, Tensor], reps_b: tuple[Tensor, Tensor], users: Tensor) -> float:
    """``||U_a V_a^T - U_b V_b^T||_F^2`` over the rows ``users`` of ``U``, in float64, without forming a score.

    ``||X Y^T||_F^2 = sum((X^T X) * (Y^T Y))``. With vectors of one width, ``X = [U_a - U_b | U_b]``
    and ``Y = [V_a | V_a - V_b]`` (``X Y^T = (U_a - U_b) V_a^T + U_b (V_a - V_b)^T``): every term
    shrinks with the models' difference, so close models lose no digits to cancellation and equal
    ones give exactly 0. Otherwise ``X = [U_a | -U_b]`` and ``Y = [V_a | V_b]``.
    """
    device = reps_a[0].device
    u_a, u_b = (reps[0][users.to(reps[0].device)] for reps in (reps_a, reps_b))
    u_a, v_a, u_b, v_b = (t.to(device=device, dtype=torch.float64) for t in (u_a, reps_a[1], u_b, reps_b[1]))
    if u_a.shape == u_b.shape and v_a.shape == v_b.shape:
        x, y = torch.cat([u_a - u_b, u_b], 1), torch.cat([v_a, v_a - v_b], 1)
    else:
        x, y = torch.cat([u_a, -u_b], 1), torch.cat([v_a, v_b], 1)
    value = ((x.T @ x) * (y.T @ y)).sum().item()
    return 0.0 if value < 0 else value  # rounding can leave a sum of squares just below 0


def _distance_ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else math.nan


def _flat_parameters(model: Recommender) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


def _table_fingerprint(table: Interactions) -> tuple:
    """The table's sizes and a SHA-256 of its sorted keys (sums of keys collide: {1, 5, 6} and {2, 3, 7})."""
    keys = torch.sort(table.keys).values.to(device="cpu", dtype=torch.int64).numpy()
    return len(table), table.num_users, table.num_items, hashlib.sha256(keys.tobytes()).hexdigest()


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
