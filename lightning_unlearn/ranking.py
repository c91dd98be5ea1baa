"""Full-ranking top-K metrics (Recall, NDCG, HitRate @K) and AUC, vectorised over users.

The functional :func:`ranking_metrics` scores a batch of users against all items at once:
targets and exclusions come as ``(row, item)`` coordinates (:func:`sparse_ranking_metrics`; the
dense-mask :func:`ranking_metrics` converts to them), exclusions are scattered as ``-inf`` into
the score chunk, one ``topk`` for the largest K serves every K, and AUC counts, for each of the
user's few relevant scores, the candidates below it: on CPU catalogs from :data:`FUSED_MIN_ITEMS`
items in one compiled pass (``torch.compile``), elsewhere a cache-sized tile of scores at a time.
:class:`FullRankingMetrics` is the thin ``torchmetrics.Metric`` over it, so state, reset and
multi-device sync come from torchmetrics.

Sampled evaluation ranks each user's relevant items against a few candidate items instead of
the whole catalog: :func:`candidate_layout` lays out one compact ``(users, targets + candidates)``
score matrix with its own coordinates, so the same :func:`sparse_ranking_metrics` (and
:class:`FullRankingMetrics`) computes the metrics over those columns only. Such metrics are not
comparable with full-ranking ones and are reported under :func:`metric_prefix`'s ``sampled``
names.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_unlearn.data.interactions import sorted_isin

__all__ = ["CandidateLayout", "FullRankingMetrics", "candidate_layout", "metric_prefix", "ranking_metrics", "sparse_ranking_metrics"]

#: The part of a metric's name that marks it as computed on sampled candidates: ``val/sampled/ndcg@20``.
SAMPLED = "sampled"
_ITEM_BITS = 31  # item indices are below 2**31: keys row << 31 | item need no catalog size


def metric_prefix(split: str, candidates: int | None) -> str:
    """The prefix of a split's ranking metrics: ``split`` for full ranking, ``split/sampled`` for sampled.

    Example:
        >>> metric_prefix("val", None), metric_prefix("val", 100)
        ('val', 'val/sampled')
    """
    return split if candidates is None else f"{split}/{SAMPLED}"


class CandidateLayout(NamedTuple):
    """The columns of a compact score matrix for sampled ranking (see :func:`candidate_layout`)."""

    #: ``(users, width)`` long: the item scored in each column, ``-1`` for padding.
    items: Tensor
    #: coordinates ``(row, column)`` of the relevant items, for :func:`sparse_ranking_metrics`.
    target_rows: Tensor
    target_cols: Tensor
    #: coordinates of the cells to leave out: padding, candidates that are relevant items, excluded relevant items.
    exclude_rows: Tensor
    exclude_cols: Tensor


def candidate_layout(target_rows: Tensor, target_items: Tensor, candidate_items: Tensor, num_candidates: Tensor,
                     exclude_rows: Tensor | None = None, exclude_items: Tensor | None = None) -> CandidateLayout:
    """Lay out each user's relevant items and candidates as the columns of one compact score matrix.

    Column ``j < T`` of row ``b`` holds the ``j``-th relevant item of user ``b`` (``T`` the
    largest number of relevant items in the batch; duplicates count once), the next ``N``
    columns its candidates. Scoring ``items`` (e.g. with ``interact`` on gathered vectors) and
    passing the returned coordinates to :func:`sparse_ranking_metrics` gives exactly the metrics
    of full ranking with every item outside the candidates and the relevant items excluded.

    Args:
        target_rows, target_items: coordinates ``(row, item)`` of the relevant items.
        candidate_items: ``(users, N)`` candidate items (any integer dtype), distinct per row.
        num_candidates: ``(users,)`` how many leading candidates of each row count (the rest is padding).
        exclude_rows, exclude_items: the excluded items' coordinates: a relevant item among them
            is left out of the ranking (it still counts as relevant), as in full ranking.

    Returns:
        A :class:`CandidateLayout`.

    Example:
        >>> layout = candidate_layout(torch.tensor([0, 0, 1]), torch.tensor([4, 2, 3]),
        ...                           torch.tensor([[7, 5], [6, -1]]), torch.tensor([2, 1]))
        >>> layout.items.tolist(), layout.exclude_rows.tolist(), layout.exclude_cols.tolist()
        ([[2, 4, 7, 5], [3, -1, 6, -1]], [1, 1], [1, 3])
    """
    rows_n, width = candidate_items.shape
    device = candidate_items.device
    key = torch.unique((target_rows.long() << _ITEM_BITS) | target_items.long())  # sorted by row, then item
    t_rows = key >> _ITEM_BITS
    n_rel = torch.bincount(t_rows, minlength=rows_n)
    t_cols = torch.arange(len(key), device=device) - (torch.cumsum(n_rel, 0) - n_rel)[t_rows]
    relevant = int(n_rel.max()) if rows_n else 0
    valid = torch.arange(width, device=device) < num_candidates.to(device).unsqueeze(1)
    candidates = torch.where(valid, candidate_items.long(), -1)
    items = torch.full((rows_n, relevant + width), -1, dtype=torch.long, device=device)
    items[t_rows, t_cols] = key & ((1 << _ITEM_BITS) - 1)
    items[:, relevant:] = candidates
    left_out = items < 0
    if exclude_rows is not None and len(key) and len(exclude_rows):
        excluded = torch.unique((exclude_rows.long() << _ITEM_BITS) | exclude_items.long())
        hit = sorted_isin(excluded, key)
        left_out[t_rows[hit], t_cols[hit]] = True
    rows = torch.arange(rows_n, device=device).unsqueeze(1)
    # a candidate that is a relevant item of its user would count as a non-relevant one too (padding, -1, matches no key)
    left_out[:, relevant:] |= valid & sorted_isin(key, (rows << _ITEM_BITS) | candidates)
    exclude_rows, exclude_cols = torch.nonzero(left_out, as_tuple=True)
    return CandidateLayout(items, t_rows, t_cols, exclude_rows, exclude_cols)


def ranking_metrics(
    scores: Tensor, target: Tensor, exclude: Tensor | None = None, ks: Sequence[int] = (10, 20), auc: bool = True
) -> dict[str, Tensor]:
    """Per-user ranking metrics over all items, from dense boolean masks.

    Args:
        scores: ``(users, items)`` predicted scores.
        target: ``(users, items)`` bool, the held-out relevant items.
        exclude: ``(users, items)`` bool, items removed from the ranking (e.g. seen in training).
        ks: cut-offs.
        auc: also compute per-user AUC (relevant vs. other non-excluded items).

    Returns:
        ``{"recall@K", "ndcg@K", "hit@K", ["auc"]}`` -> ``(users,)`` tensors; users with no
        relevant item get 0 (filter them with ``target.any(1)``). The masks are turned into
        coordinates for :func:`sparse_ranking_metrics`, which gives the same values.

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
    t_rows, t_items = torch.nonzero(target, as_tuple=True)
    e_rows, e_items = (None, None) if exclude is None else torch.nonzero(exclude, as_tuple=True)
    return sparse_ranking_metrics(scores, t_rows, t_items, e_rows, e_items, ks, auc)


def sparse_ranking_metrics(
    scores: Tensor, target_rows: Tensor, target_items: Tensor, exclude_rows: Tensor | None = None,
    exclude_items: Tensor | None = None, ks: Sequence[int] = (10, 20), auc: bool = True, chunk_bytes: int | None = None,
    overwrite: bool = False, blocked_items: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-user ranking metrics over all items, with targets and exclusions as ``(row, item)`` coordinates.

    No ``(users, items)`` mask is built: users are processed in chunks of about ``chunk_bytes``
    of working memory; in each, exclusions are scattered as ``-inf`` into the scores (a copy,
    unless ``overwrite``), one ``topk`` serves every K, and the target scores are gathered. AUC
    counts, for every relevant item, the candidates scoring strictly below it: on CPU, from
    :data:`FUSED_MIN_ITEMS` items on, a compiled kernel compares each block of 1,024 scores with all
    of its user's relevant scores while the block stays in L1 (compiled once per process; where
    ``torch.compile`` fails, a warning and the tiled path); otherwise one broadcast comparison of
    each cache-sized tile of the chunk with all of its users' relevant scores. A user with more
    than 128 relevant items is counted by binary search. Duplicate coordinates count once.
    A relevant item that is also excluded counts as relevant but is never a hit, even when K
    exceeds the items left to rank (``topk`` then reaches into the ``-inf`` cells).

    Args:
        scores: ``(users, items)`` predicted scores.
        target_rows, target_items: coordinates of the held-out relevant items.
        exclude_rows, exclude_items: coordinates of the items removed from the ranking.
        ks: cut-offs.
        auc: also compute per-user AUC (relevant vs. non-relevant candidates; ties count as losses).
        chunk_bytes: working-memory budget of one chunk of users (about 6 bytes per score; default
            16 MiB on CPU for a copy, where the allocator then reuses one chunk's memory for the
            next, and 256 MiB when working in place or on other devices: fewer, larger chunks).
        overwrite: work in ``scores`` itself (when float32 and contiguous) instead of a copy, for a
            caller that owns them and needs them no more: their values are then undefined. Saves
            a copy of every chunk; otherwise ``scores`` is not modified.
        blocked_items: items removed from every user's ranking (e.g. deleted items), as one list
            of columns instead of a coordinate per user and item.

    Returns:
        As :func:`ranking_metrics`.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
        >>> out = sparse_ranking_metrics(scores, torch.tensor([0, 0]), torch.tensor([2, 3]),
        ...                              torch.tensor([0]), torch.tensor([0]), ks=(1, 2))
        >>> out["recall@1"].item(), out["hit@1"].item(), out["recall@2"].item(), out["auc"].item()
        (0.5, 1.0, 1.0, 1.0)
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}.")
    if scores.dim() != 2 or target_rows.shape != target_items.shape or (exclude_rows is None) != (exclude_items is None) \
            or (exclude_rows is not None and exclude_rows.shape != exclude_items.shape):
        raise ValueError("scores must be (users, items) and each pair of row and item coordinates of one length.")
    users, items = scores.shape
    device = scores.device
    t_key = torch.unique(target_rows.long() * items + target_items.long())  # sorted, deduplicated
    n_rel = torch.bincount(t_key // items, minlength=users)
    if exclude_rows is None:
        e_key = t_key.new_empty(0)
    else:
        e_key = torch.unique(exclude_rows.long() * items + exclude_items.long())
    out_key = torch.unique(torch.cat([e_key, t_key]))
    n_out = torch.bincount(out_key // items, minlength=users)
    blocked = None if blocked_items is None or not len(blocked_items) else torch.unique(blocked_items.long().to(device))
    if blocked is not None:  # every user loses these columns, less those already out for that user
        n_out = n_out + len(blocked) - torch.bincount(out_key[torch.isin(out_key % items, blocked)] // items, minlength=users)
    n_neg = items - n_out
    kmax = min(max(ks), items)
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=device, dtype=torch.float32))
    hits = torch.zeros(users, kmax, device=device)
    auc_values = torch.zeros(users, device=device)
    in_place = overwrite and scores.dtype == torch.float32 and scores.is_contiguous()
    chunk_bytes = chunk_bytes or (2**24 if device.type == "cpu" and not in_place else 2**28)
    step = max(1, int(chunk_bytes) // max(6 * items, 1))
    for start in range(0, users, step):
        stop = min(start + step, users)
        lo, hi = start * items, stop * items
        t_local = t_key[torch.searchsorted(t_key, lo):torch.searchsorted(t_key, hi)] - lo
        e_local = e_key[torch.searchsorted(e_key, lo):torch.searchsorted(e_key, hi)] - lo
        work = scores[start:stop].float().contiguous()
        if not overwrite and work.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr():  # a view
            work = work.clone()
        flat = work.view(-1)
        flat.index_fill_(0, e_local, float("-inf"))
        if blocked is not None:
            work.index_fill_(1, blocked, float("-inf"))
        top = torch.topk(work, kmax, dim=1).indices
        top_key = top + torch.arange(stop - start, device=device).unsqueeze(1) * items
        hit = torch.isin(top_key, t_local) & ~torch.isin(top_key, e_local)  # an excluded item never hits
        hits[start:stop] = (hit & ~torch.isin(top, blocked) if blocked is not None else hit).float()
        if auc:
            auc_values[start:stop] = _sparse_auc(work, t_local, n_rel[start:stop], n_neg[start:stop], e_local, blocked)
    cum_hits = hits.cumsum(1)
    denom = n_rel.clamp_min(1).float()
    cum_gain = (hits * discount).cumsum(1)
    ideal = discount.cumsum(0)
    out: dict[str, Tensor] = {}
    for k in ks:
        kk = min(k, kmax)
        out[f"recall@{k}"] = cum_hits[:, kk - 1] / denom
        out[f"ndcg@{k}"] = cum_gain[:, kk - 1] / ideal[(n_rel.clamp(1, kk) - 1)]
        out[f"hit@{k}"] = (cum_hits[:, kk - 1] > 0).float()
    if auc:
        out["auc"] = auc_values
    return out


def _sparse_auc(work: Tensor, t_local: Tensor, n_pos: Tensor, n_neg: Tensor, e_local: Tensor,
                blocked: Tensor | None = None) -> Tensor:
    """Per-user AUC of one chunk of users.

    Args:
        work: ``(users, items)`` float scores of the chunk, ``-inf`` at exclusions; overwritten
            (``+inf`` at relevant and excluded cells, so that they are below no relevant score).
        t_local, e_local: flat indices into ``work`` of the relevant and the excluded cells.
        n_pos, n_neg: ``(users,)`` numbers of relevant items and of non-relevant candidates.
        blocked: columns excluded for every user (or ``None``).

    Returns:
        ``(users,)`` AUC: the share of (relevant, candidate) pairs where the relevant item scores
        strictly higher (ties are losses); 0 for users without a pair.
    """
    rows_n, items = work.shape
    flat = work.view(-1)
    rows = t_local // items
    starts = torch.cumsum(n_pos, 0) - n_pos
    width = max(int(n_pos.max()) if rows_n else 0, 1)
    relevant = work.new_full((rows_n, width), float("-inf"))  # padding: no candidate is below -inf
    relevant[rows, torch.arange(len(rows), device=work.device) - starts[rows]] = flat[t_local]
    flat.index_fill_(0, t_local, float("inf"))
    flat.index_fill_(0, e_local, float("inf"))
    if blocked is not None:
        work.index_fill_(1, blocked, float("inf"))
    heavy = n_pos > 128  # a binary search among the sorted relevant scores costs about as much as 128 comparisons
    wins = _wins(work, relevant.masked_fill(heavy.unsqueeze(1), float("-inf")), n_pos.masked_fill(heavy, 0))
    if heavy.any():
        heavy = torch.nonzero(heavy).squeeze(1)
        ordered = torch.sort(relevant[heavy], dim=1).values
        not_above = torch.searchsorted(ordered, work[heavy], right=True, out_int32=True)
        wins[heavy] = (width - not_above).sum(1, dtype=torch.int64)
    pairs = (n_pos * n_neg).float()
    return torch.where(pairs > 0, wins.float() / pairs.clamp_min(1), torch.zeros_like(pairs))


#: Catalogs from this size on count AUC's comparisons in one compiled pass (on CPU), which costs a
#: compilation once per process (seconds) and then runs about 4x faster than the tiled counter.
FUSED_MIN_ITEMS = 2**13
_BLOCK = 1024  # cells compared with all of a row's thresholds at a time: 4 KB, which stay in L1
_fused: dict[str, object] = {}


def _wins(values: Tensor, thresholds: Tensor, widths: Tensor) -> Tensor:
    """Per row, how many (cell, threshold) pairs among its first ``widths`` thresholds have the cell strictly below.

    ``thresholds`` past a row's width must be ``-inf``. On CPU, from :data:`FUSED_MIN_ITEMS` cells
    on, the rows are grouped by width (rounded up to a multiple of 4 above 8) and each group's
    blocks of ``_BLOCK`` cells are counted by the compiled :func:`_total_below`; the last partial
    block, and everything elsewhere or where ``torch.compile`` fails (warned once), by the tiled
    :func:`count_compared`.
    """
    counter = _fused.get("total_below")
    cells = values.shape[1]
    if values.device.type != "cpu" or cells < FUSED_MIN_ITEMS or counter is False:
        return _count_below(values, thresholds, widths).sum(1)
    if counter is None:
        counter = _fused["total_below"] = torch.compile(_total_below, dynamic=True)
    wins = _count_below(values[:, cells - cells % _BLOCK:], thresholds, widths).sum(1)
    thresholds = torch.nn.functional.pad(thresholds, (0, 1), value=float("-inf"))  # width >= 2: one compiled variant fewer
    try:
        grouped = torch.where(widths > 8, (widths + 3) // 4 * 4, widths)  # the widths compared: few groups, little padding
        for width in torch.unique(grouped[grouped > 0]).tolist():
            rows = torch.nonzero(grouped == width).squeeze(1)
            part = values.contiguous() if len(rows) == len(values) else values.index_select(0, rows)
            with _shapes_apart():
                wins[rows] += counter(part, thresholds[rows, :max(width, 2)].contiguous())
    except Exception as error:  # noqa: BLE001 - compiling is an acceleration, never a requirement
        _fused["total_below"] = False
        warnings.warn(f"AUC counts with tiled comparisons: torch.compile failed ({type(error).__name__}: {error}).",
                      RuntimeWarning, stacklevel=2)
        return _count_below(values, thresholds, widths).sum(1)
    return wins


def _shapes_apart():
    """Compile without duck sizing: sizes that happen to be equal (rows and thresholds) get no
    guard that would recompile the counter for every other shape."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


def _total_below(values: Tensor, thresholds: Tensor) -> Tensor:
    """Per row, the (cell, threshold) pairs with the cell strictly below, over the whole blocks of ``_BLOCK`` cells.

    Compiled, it is one fused pass counting each block in float32 (exact: a block has fewer than
    ``2**24`` cells). Run eagerly (``torch.compile`` disabled) it is the tiled counter, rather
    than a ``(rows, blocks, thresholds, cells)`` comparison in memory.
    """
    rows, blocks = values.shape[0], values.shape[1] // _BLOCK
    values = values[:, :blocks * _BLOCK].view(rows, blocks, _BLOCK)
    if not torch.compiler.is_compiling():
        return _count_below(values.flatten(1), thresholds).sum(1)
    below = torch.where(values.unsqueeze(2) < thresholds[:, None, :, None], 1.0, 0.0)
    return below.sum(3).long().sum((1, 2))


def _count_below(values: Tensor, thresholds: Tensor, widths: Tensor | None = None, tile: int | None = None) -> Tensor:
    """For each row, the number of its cells strictly below each of its thresholds (:func:`count_compared` with ``<``)."""
    return count_compared(values, thresholds, (torch.lt,), widths, tile)[0]


def count_compared(values: Tensor, thresholds: Tensor, compare: Sequence = (torch.lt,), widths: Tensor | None = None,
                   tile: int | None = None, min_cols: int = 1024) -> tuple[Tensor, ...]:
    """For each row and each of its thresholds, how many of the row's cells ``op(cell, threshold)`` holds, per ``op``.

    The rows are cut into tiles of about ``tile`` comparisons; each tile is compared with its
    rows' thresholds in one broadcast comparison per op, written as ``float32`` (vectorised; a
    ``bool`` result is not) and summed over its cells, exactly (a tile row has fewer than
    ``2**24`` cells). On CPU a tile (8 MB) stays in cache, so the values are read from memory
    once for all thresholds and ops. A block of rows is compared with as many thresholds as its
    widest row uses.

    Args:
        values: ``(rows, cells)`` float.
        thresholds: ``(rows, width)`` float.
        compare: elementwise comparisons with an ``out`` argument (``torch.lt``, ``torch.gt``, ``torch.eq``, ...).
        widths: ``(rows,)`` how many leading thresholds of each row count (default: all). The
            others are compared only where a row of the same tile uses that many (pad them with
            a threshold no cell passes, e.g. ``-inf`` for ``<``, to count 0 there), and count 0
            past the widest row of their tile.
        tile: comparisons per tile (default ``2**21`` on CPU, ``2**24`` on other devices).
        min_cols: cells of a row in a tile, at least.

    Returns:
        One ``(rows, width)`` int64 tensor of counts per op.

    Example:
        >>> count_compared(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([[2.0]]), (torch.gt, torch.eq))
        (tensor([[1]]), tensor([[2]]))
    """
    (rows_n, cells), device = values.shape, values.device
    width = thresholds.shape[1]
    counts = tuple(torch.zeros(rows_n, width, dtype=torch.int64, device=device) for _ in compare)
    widths = torch.full((rows_n,), width) if widths is None else widths.cpu().clamp(0, width)
    width = int(widths.max()) if rows_n else 0
    if width == 0 or cells == 0:
        return counts
    tile = tile or (2**21 if device.type == "cpu" else 2**24)
    block = max(1, min(rows_n, tile // (width * min(cells, max(tile // width, min_cols)))))  # rows per tile
    block_widths = torch.nn.functional.pad(widths, (0, -rows_n % block)).view(-1, block).amax(1).tolist()
    buffer = torch.empty(0, dtype=torch.float32, device=device)
    for r0, w in zip(range(0, rows_n, block), block_widths):  # a loop over tiles, not rows
        rows = min(block, rows_n - r0)
        cols = min(cells, max(tile // (rows * w), min_cols), 1 << 24) if w else cells
        if buffer.numel() < rows * w * cols:
            buffer = torch.empty(rows * w * cols, dtype=torch.float32, device=device)
        out = buffer[: rows * w * cols].view(rows, w, cols)
        limits = thresholds[r0:r0 + rows, :w].unsqueeze(2)
        for c0 in range(0, cells if w else 0, cols):
            part = values[r0:r0 + rows, c0:c0 + cols].unsqueeze(1)
            hits = out[:, :, :part.shape[2]]
            for op, count in zip(compare, counts):
                count[r0:r0 + rows, :w] += op(part, limits, out=hits).sum(2).long()
    return counts


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

    def update(
        self, scores: Tensor, target: Tensor | None = None, exclude: Tensor | None = None, *,
        target_rows: Tensor | None = None, target_items: Tensor | None = None,
        exclude_rows: Tensor | None = None, exclude_items: Tensor | None = None, overwrite: bool = False,
        blocked_items: Tensor | None = None,
    ) -> None:
        """Add a batch of users.

        Args:
            scores: ``(users, items)`` predicted scores.
            target, exclude: bool ``(users, items)`` masks of the relevant and the excluded items.
            target_rows, target_items, exclude_rows, exclude_items: or their ``(row, item)``
                coordinates instead, which need no dense mask (see :func:`sparse_ranking_metrics`).
            overwrite: let the metric work in ``scores`` and leave them undefined, for a caller that
                computed them for this call only (saves a copy).
            blocked_items: items excluded for every user (e.g. deleted items), as columns.
        """
        if target is not None:
            if target_rows is not None or exclude_rows is not None:
                raise ValueError("give the targets either as a mask or as coordinates, not both.")
            if scores.shape != target.shape or (exclude is not None and exclude.shape != scores.shape):
                raise ValueError(f"scores, target and exclude must have one shape; got {scores.shape}, "
                                 f"{target.shape}, {None if exclude is None else exclude.shape}.")
            target_rows, target_items = torch.nonzero(target, as_tuple=True)
            if exclude is not None:
                exclude_rows, exclude_items = torch.nonzero(exclude, as_tuple=True)
        elif target_rows is None or target_items is None:
            raise ValueError("update needs the targets, as a mask or as target_rows and target_items.")
        values = sparse_ranking_metrics(scores, target_rows, target_items, exclude_rows, exclude_items, self.ks, self.auc,
                                        overwrite=overwrite, blocked_items=blocked_items)
        if self.empty_target_action == "skip":
            keep = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
            keep[target_rows] = True
        else:
            keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        stacked = torch.stack([values[name] for name in self.names], dim=1)[keep]
        # out of place: a state reset inside inference mode (Trainer.validate) is an inference tensor, which a later
        # fit's validation, outside that mode, may not update in place
        self.sums = self.sums + stacked.sum(0).double()
        self.users = self.users + keep.sum()

    def compute(self) -> dict[str, Tensor]:
        mean = self.sums / self.users.clamp_min(1)
        return {name: mean[i].float() for i, name in enumerate(self.names)}
