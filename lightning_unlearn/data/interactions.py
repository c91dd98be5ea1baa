"""The immutable table of user-item interactions that every other layer reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CSR", "Interactions", "sorted_isin"]


class CSR(NamedTuple):
    """Compressed rows of an :class:`Interactions` table, grouped by user or by item.

    ``rows[indptr[k]:indptr[k + 1]]`` are the row indices of the table that belong to
    user (or item) ``k``, and ``cols`` holds the other side of those rows.
    """

    indptr: Tensor
    rows: Tensor
    cols: Tensor

    def lengths(self) -> Tensor:
        """Number of rows per user (or item)."""
        return self.indptr[1:] - self.indptr[:-1]

    def gather(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Vectorised gather of the segments of ``keys``.

        Returns:
            ``(segment, position)``: for every row of the selected segments, which entry of
            ``keys`` it belongs to and its index into ``rows``/``cols``.
        """
        starts = self.indptr[keys]
        counts = self.indptr[keys + 1] - starts
        segment = torch.repeat_interleave(torch.arange(len(keys), device=keys.device), counts)
        offsets = torch.arange(int(counts.sum()), device=keys.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return segment, starts[segment] + offsets


def sorted_isin(sorted_values: Tensor, values: Tensor) -> Tensor:
    """Boolean mask: is each of ``values`` (any shape) among ``sorted_values`` (1-d, ascending)? One binary search each.

    Example:
        >>> sorted_isin(torch.tensor([2, 5, 9]), torch.tensor([[5, 6], [9, -1]])).tolist()
        [[True, False], [True, False]]
    """
    if not len(sorted_values):
        return torch.zeros_like(values, dtype=torch.bool)
    pos = torch.searchsorted(sorted_values, values).clamp_max(len(sorted_values) - 1)
    return sorted_values[pos] == values


def _csr(keys: Tensor, other: Tensor, size: int) -> CSR:
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=size)
    indptr = torch.zeros(size + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=indptr[1:])
    return CSR(indptr, order, other[order])


@dataclass(frozen=True, eq=False)
class Interactions:
    """An immutable table of ``(user, item[, rating][, timestamp])`` rows.

    Users and items are contiguous indices ``0..num_users-1`` and ``0..num_items-1``;
    ``user_ids[k]`` / ``item_ids[k]`` are the raw ids the source files used. Splits of one
    data set share the same maps, so an index means the same user in train and test.

    Args:
        users: ``(n,)`` long tensor of user indices.
        items: ``(n,)`` long tensor of item indices.
        user_ids: raw user id of each index (a numpy array, length ``num_users``).
        item_ids: raw item id of each index (a numpy array, length ``num_items``).
        ratings: optional ``(n,)`` float tensor (explicit ratings or labels).
        timestamps: optional ``(n,)`` long tensor.

    Raises:
        ValueError: if the columns differ in length, or an index is outside the maps.

    Example:
        >>> data = Interactions.from_raw(["a", "a", "b"], [10, 20, 10])
        >>> data.num_users, data.num_items, len(data)
        (2, 2, 3)
        >>> data.user_index(["b"]).tolist()
        [1]
        >>> kept, removed = data.without(torch.tensor([0]))
        >>> len(kept), len(removed)
        (2, 1)
    """

    users: Tensor
    items: Tensor
    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: Tensor | None = None
    timestamps: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.users)
        for name in ("items", "ratings", "timestamps"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"Interactions column `{name}` has {len(col)} rows, expected {n} like `users`.")
        for name in ("user_ids", "item_ids"):
            ids = getattr(self, name)
            if ids.dtype.kind not in "iuUSO":
                raise ValueError(f"Interactions `{name}` must hold integer or string ids, got dtype {ids.dtype}.")
            if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
                raise ValueError(f"Interactions `{name}` must be sorted and unique (as from_raw builds them).")
        for name, idx, size in (("users", self.users, self.num_users), ("items", self.items, self.num_items)):
            if idx.dtype != torch.long:
                raise ValueError(f"Interactions `{name}` must be a torch.long tensor, got {idx.dtype}.")
            if n and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise ValueError(f"Interactions `{name}` has indices outside [0, {size}).")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_raw(
        cls,
        users: Sequence | np.ndarray,
        items: Sequence | np.ndarray,
        ratings: Sequence | np.ndarray | None = None,
        timestamps: Sequence | np.ndarray | None = None,
    ) -> Interactions:
        """Build a table from raw ids; indices follow the sorted order of the raw ids."""
        user_ids, u = np.unique(np.asarray(users), return_inverse=True)
        item_ids, i = np.unique(np.asarray(items), return_inverse=True)
        return cls(
            users=torch.as_tensor(u.reshape(-1), dtype=torch.long),
            items=torch.as_tensor(i.reshape(-1), dtype=torch.long),
            user_ids=user_ids,
            item_ids=item_ids,
            ratings=None if ratings is None else torch.as_tensor(np.asarray(ratings), dtype=torch.float32),
            timestamps=None if timestamps is None else torch.as_tensor(np.asarray(timestamps), dtype=torch.long),
        )

    # ----------------------------------------------------------------- shape
    def __len__(self) -> int:
        return len(self.users)

    def __repr__(self) -> str:
        return f"Interactions(rows={len(self)}, users={self.num_users}, items={self.num_items})"

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def keys(self) -> Tensor:
        """``user * num_items + item``: one integer per row, for fast membership tests."""
        return self.users * self.num_items + self.items

    # ----------------------------------------------------------------- views (built once)
    @cached_property
    def by_user(self) -> CSR:
        """CSR view grouping rows by user (``cols`` are items)."""
        return _csr(self.users, self.items, self.num_users)

    @cached_property
    def by_item(self) -> CSR:
        """CSR view grouping rows by item (``cols`` are users)."""
        return _csr(self.items, self.users, self.num_items)

    @cached_property
    def sorted_keys(self) -> Tensor:
        """Sorted :attr:`keys`, for ``torch.searchsorted`` membership tests."""
        return torch.sort(self.keys).values

    def contains(self, users: Tensor, items: Tensor) -> Tensor:
        """Boolean mask: is each ``(user, item)`` pair a row of this table?"""
        return sorted_isin(self.sorted_keys, users * self.num_items + items)

    # ----------------------------------------------------------------- raw id maps
    def user_index(self, raw: Sequence | np.ndarray) -> Tensor:
        """Indices of raw user ids; ``-1`` where an id is unknown."""
        return _lookup(self.user_ids, raw)

    def item_index(self, raw: Sequence | np.ndarray) -> Tensor:
        """Indices of raw item ids; ``-1`` where an id is unknown."""
        return _lookup(self.item_ids, raw)

    # ----------------------------------------------------------------- subsets
    def select(self, rows: Tensor) -> Interactions:
        """The rows at ``rows`` (indices or a boolean mask), with the same id maps.

        Args:
            rows: a 1-D integer tensor of row indices in ``[0, len(self))`` (repeats allowed,
                order kept) or a boolean mask of length ``len(self)``.

        Raises:
            IndexError: if an index is outside ``[0, len(self))`` (negative indices are refused,
                never read from the end), or a mask has the wrong length, or ``rows`` is not 1-D.
            TypeError: if ``rows`` is neither integer nor boolean.
        """
        rows = self.check_rows(rows)
        return Interactions(
            users=self.users[rows],
            items=self.items[rows],
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            ratings=None if self.ratings is None else self.ratings[rows],
            timestamps=None if self.timestamps is None else self.timestamps[rows],
        )

    def without(self, rows: Tensor) -> tuple[Interactions, Interactions]:
        """Split off ``rows`` (indices or a boolean mask); this table is not changed.

        Args:
            rows: row indices in ``[0, len(self))`` (repeats are folded) or a boolean mask of
                length ``len(self)``.

        Returns:
            ``(retained, removed)``, both in this table's row order and with its id maps.

        Raises:
            IndexError: if an index is outside ``[0, len(self))`` (a negative index never means
                "from the end": ``-1`` is what lookups return for unknown ids), a mask has the
                wrong length, or ``rows`` is not 1-D.
            TypeError: if ``rows`` is neither integer nor boolean.
        """
        rows = self.check_rows(rows)
        if rows.dtype == torch.bool:
            mask = rows
        else:
            mask = torch.zeros(len(self), dtype=torch.bool, device=rows.device)
            mask[rows] = True
        return self.select(~mask), self.select(mask)

    def check_rows(self, rows: Tensor | Sequence[int]) -> Tensor:
        """``rows`` as a tensor of valid row indices or a valid boolean mask, or an error.

        Raises:
            IndexError: an index outside ``[0, len(self))``, a mask not of length ``len(self)``,
                or not 1-D.
            TypeError: neither integer nor boolean.
        """
        rows = torch.as_tensor(rows)
        if rows.numel() == 0 and rows.dtype != torch.bool:
            rows = rows.long()  # `[]` arrives as a float tensor
        n = len(self)
        if rows.dtype == torch.bool:
            if rows.shape != (n,):
                raise IndexError(f"a boolean row mask must be 1-D of length {n} (the table's rows), got shape {tuple(rows.shape)}.")
            return rows
        if rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise TypeError(f"rows must be integer indices or a boolean mask, got a {rows.dtype} tensor.")
        if rows.dim() != 1:
            raise IndexError(f"row indices must be a 1-D tensor, got shape {tuple(rows.shape)}.")
        rows = rows.long()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
            bad = rows[(rows < 0) | (rows >= n)]
            raise IndexError(
                f"row indices must be in [0, {n}) (the table's rows; negative indices are not accepted), "
                f"got {len(bad)} outside: {bad[:5].tolist()}."
            )
        return rows

    def binarize(self, threshold: float) -> Interactions:
        """Keep rows whose rating is at least ``threshold`` (implicit positives)."""
        if self.ratings is None:
            raise ValueError("binarize(threshold) needs ratings, but this table has none.")
        return self.select(self.ratings >= threshold)


def _lookup(ids: np.ndarray, raw: Sequence | np.ndarray) -> Tensor:
    raw = np.asarray(raw).reshape(-1)
    if ids.dtype.kind in "iu":
        raw, exact = _as_integers(raw)
    else:
        raw, exact = raw.astype(str), np.ones(len(raw), dtype=bool)
    if len(ids) == 0 or len(raw) == 0:
        return torch.full((len(raw),), -1, dtype=torch.long)
    pos = np.searchsorted(ids, raw).clip(max=len(ids) - 1)
    found = exact & (ids[pos] == raw)
    return torch.as_tensor(np.where(found, pos, -1), dtype=torch.long)


_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


def _as_integers(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` as int64 and a mask of the entries that are exactly integers (``"7"``, ``7.0``)."""
    if raw.dtype.kind == "b":
        return np.zeros(len(raw), dtype=np.int64), np.zeros(len(raw), dtype=bool)
    if raw.dtype.kind == "i":
        return raw.astype(np.int64), np.ones(len(raw), dtype=bool)
    if raw.dtype.kind == "u":
        exact = raw <= np.iinfo(np.int64).max
        return np.where(exact, raw, 0).astype(np.int64), exact
    if raw.dtype.kind in "US":  # parsing request-sized input: a loop over the ids asked about
        text = [s.strip() for s in raw.astype(str).tolist()]
        exact = np.array([_INTEGER.fullmatch(s) is not None for s in text], dtype=bool)
        return np.array([int(s) if ok else 0 for s, ok in zip(text, exact)], dtype=np.int64), exact
    try:
        as_float = raw.astype(np.float64)
    except (TypeError, ValueError):
        return np.zeros(len(raw), dtype=np.int64), np.zeros(len(raw), dtype=bool)
    exact = np.isfinite(as_float) & (np.floor(as_float) == as_float)
    return np.where(exact, as_float, 0).astype(np.int64), exact
