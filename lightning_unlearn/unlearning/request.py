"""Deletion requests: what to forget, in the raw ids of the source files.

A :class:`DeletionRequest` lists interactions ``(user, item)``, whole users and whole items
by their *raw* ids. :meth:`DeletionRequest.resolve` validates it against one
:class:`~lightning_unlearn.data.Interactions` table and returns a :class:`ResolvedDeletion`:
the row indices to remove, the whole-user and whole-item indices, and a stable SHA-256
digest for audit logs. Bad input raises :class:`InvalidDeletionRequest` before anything
changes.

Privacy: the raw ids of deleted data never appear in ``repr()``/``str()`` or in
:meth:`~DeletionRequest.summary` -- only counts and the digest. Error messages *do* name
the offending ids (that is their purpose), so do not forward them to shared logs verbatim.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from lightning_unlearn.data.interactions import CSR, Interactions

__all__ = ["DeletionRequest", "InvalidDeletionRequest", "ResolvedDeletion"]

RawId = Union[int, str]
"""A raw id as stored in a request: a Python ``int`` or a non-empty ``str``."""

MISSING_MODES = ("error", "ignore")
SHOWN = 5
"""How many offending ids an error message names."""

_ACCEPTED = (
    "A deletion request accepts interaction pairs (user, item) that are rows of the table, "
    "whole users and whole items, each given by the raw ids of the source files "
    "(integers or non-empty strings)."
)
_DIGEST_TAG = b"lightning_unlearn/deletion/v1\x00"
_INTEGER = re.compile(r"([+-]?[0-9]+)(?:\.0*)?")
_INT64 = (-(2**63), 2**63 - 1)


class InvalidDeletionRequest(ValueError):
    """A deletion request that cannot be applied; nothing was changed.

    The message names the offending ids (the first few and how many there are) or, for
    a requests file, the path and line number, and says what is accepted.
    """


# --------------------------------------------------------------------------- helpers


def _show(values: Sequence[Any]) -> str:
    """``"a, b, c (and 4 more)"``: the first :data:`SHOWN` values of a list, for messages."""
    shown = (f"({v[0]!r}, {v[1]!r})" if isinstance(v, tuple) and len(v) == 2 else repr(v) for v in values[:SHOWN])
    head = ", ".join(shown)
    rest = len(values) - SHOWN
    return head + (f" (and {rest} more)" if rest > 0 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _is_not(n: int, thing: str) -> str:
    """``"is not a row"`` / ``"are not rows"``."""
    return f"is not {thing}" if n == 1 else f"are not {thing.removeprefix('a ')}s"


def _canonical(value: Any) -> RawId | None:
    """``value`` as a raw id (``int`` or a non-empty ``str`` without control characters), or ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, (str, np.str_)):
        text = str(value)
        return text if text.strip() and not any(unicodedata.category(c) == "Cc" for c in text) else None
    return None


def canonical_id(value: RawId, kind: str) -> RawId | None:
    """The one form a raw id takes in an id map of ``kind``: the function every reader shares.

    Integer maps (``kind="int"``) take integers, and strings that spell one (surrounding spaces,
    a sign, leading zeros and a zero fraction allowed: ``" 0196"``, ``"196.0"``); string maps
    take strings as they are and integers as their decimal string. So ``196``, ``196.0``,
    ``"196"`` and ``"0196"`` are one id of an integer map, whether they come from Python, a CSV
    file or a JSON line.

    Args:
        value: a raw id as a request stores it (``int`` or ``str``).
        kind: ``"int"`` or ``"str"``, the id map's kind (:func:`id_kind`).

    Returns:
        The canonical id, or ``None`` if ``value`` cannot be an id of such a map.

    Example:
        >>> canonical_id("0196", "int"), canonical_id("196.0", "int"), canonical_id("1e3", "int")
        (196, 196, None)
        >>> canonical_id(196, "str")
        '196'
    """
    if kind == "str":
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str):
        match = _INTEGER.fullmatch(value.strip())
        if match is None:
            return None
        value = int(match.group(1))
    return value if _INT64[0] <= value <= _INT64[1] else None


def id_kind(ids: np.ndarray) -> str:
    """``"int"`` for an integer id map, else ``"str"``."""
    return "int" if ids.dtype.kind in "iu" else "str"


def _as_list(values: Any, what: str) -> list:
    """A request column as a plain list; refuses scalars and strings (which would split into characters)."""
    if isinstance(values, (Tensor, np.ndarray)):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidDeletionRequest(
            f"Deletion request `{what}` must be a sequence of ids, got a {type(values).__name__}. {_ACCEPTED}"
        )
    return list(values)


def _ids(values: Any, what: str) -> tuple[RawId, ...]:
    """Canonical, duplicate-free ids (first occurrence order) of one request column."""
    values = _as_list(values, what)
    ids = [_canonical(v) for v in values]
    bad = [v for v, c in zip(values, ids) if c is None]
    if bad:
        raise InvalidDeletionRequest(
            f"Deletion request `{what}` has {_plural(len(bad), 'invalid id')}: {_show(bad)}. {_ACCEPTED}"
        )
    return tuple(dict.fromkeys(ids))


def _pairs(values: Any) -> tuple[tuple[RawId, RawId], ...]:
    """Canonical, duplicate-free ``(user, item)`` pairs."""
    values = _as_list(values, "pairs")
    bad_shape = [p for p in values if isinstance(p, (str, bytes)) or not isinstance(p, Iterable) or len(tuple(p)) != 2]
    if bad_shape:
        raise InvalidDeletionRequest(
            f"Deletion request `pairs` has {_plural(len(bad_shape), 'entry')} that "
            f"{_is_not(len(bad_shape), 'a (user, item) pair')}: {_show(bad_shape)}. {_ACCEPTED}"
        )
    pairs = [tuple(p) for p in values]
    canon = [(_canonical(u), _canonical(i)) for u, i in pairs]
    bad = [p for p, c in zip(pairs, canon) if c[0] is None or c[1] is None]
    if bad:
        raise InvalidDeletionRequest(
            f"Deletion request `pairs` has {_plural(len(bad), 'pair')} with invalid ids: {_show(bad)}. {_ACCEPTED}"
        )
    return tuple(dict.fromkeys(canon))  # type: ignore[arg-type]


def _lookup(raw_map: np.ndarray, index: Callable[[Any], Tensor], raw: Sequence[RawId]) -> Tensor:
    """Indices of raw ids in one id map (by :func:`canonical_id`), ``-1`` where unknown."""
    if not raw:
        return torch.zeros(0, dtype=torch.long)
    kind = id_kind(raw_map)
    canon = [canonical_id(r, kind) for r in raw]
    if kind == "int":
        valid = torch.tensor([c is not None for c in canon], dtype=torch.bool)
        found = index(np.array([0 if c is None else c for c in canon], dtype=np.int64))
        return torch.where(valid, found, torch.full_like(found, -1))
    return index(np.array(canon))


def _segments(csr: CSR, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(segment, rows, cols)`` of every table row in the CSR segments of ``keys``."""
    segment, position = csr.gather(keys)
    return segment, csr.rows[position], csr.cols[position]


def _digest(num_users: int, num_items: int, row_keys: Tensor, users: Tensor, items: Tensor) -> str:
    """SHA-256 over a fixed layout: tag, the two map sizes, then each section as count + int64 LE values."""
    h = hashlib.sha256(_DIGEST_TAG)
    h.update(struct.pack("<qq", num_users, num_items))
    for section in (row_keys, users, items):
        h.update(struct.pack("<q", len(section)))
        h.update(section.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _splits_holding(elsewhere: Mapping[str, Interactions], values: Callable[[Interactions], Tensor], wanted: Tensor) -> str:
    """`` (only in the test split)``: which other splits hold ``wanted`` (and how many of them none does), for messages."""
    held, names = torch.zeros(len(wanted), dtype=torch.bool), []
    for name, table in elsewhere.items():
        here = torch.isin(wanted, values(table))
        if bool(here.any()):
            held |= here
            names.append(name)
    if not names:
        return ""
    splits = f"the {' and '.join(names)} split{'s' if len(names) > 1 else ''}"
    return f" (only in {splits})" if bool(held.all()) else f" ({int(held.sum())} of them only in {splits}, the others in no split)"


def _kind(pairs: int, users: int, items: int) -> str:
    present = [name for name, n in (("interactions", pairs), ("users", users), ("items", items)) if n]
    return present[0] if len(present) == 1 else ("mixed" if present else "empty")


# --------------------------------------------------------------------------- the resolved result


@dataclass(frozen=True, eq=False, repr=False)
class ResolvedDeletion:
    """A deletion request checked against one table: which rows go, and an audit digest.

    Attributes:
        rows: sorted unique ``long`` row indices into the table to remove (the listed
            pairs' rows, all occurrences, plus every row of the whole users and items).
        users: sorted unique user indices deleted as a whole (they may have no rows here).
        items: sorted unique item indices deleted as a whole.
        kind: ``"interactions"``, ``"users"``, ``"items"`` or ``"mixed"``.
        num_pairs: distinct ``(user, item)`` pairs that were found in the table.
        num_ignored: distinct pairs dropped because they are not rows (``missing="ignore"``).
        digest: SHA-256 hex digest of the resolved content, independent of input order
            and duplicates. It is not keyed: anyone with the data can recompute it for every
            user, so it is never stored or logged as it is; the callback stores
            :meth:`Journal.keyed(digest) <lightning_unlearn.unlearning.journal.Journal.keyed>`.
            Layout: ``b"lightning_unlearn/deletion/v1\\0"``, the table's
            ``num_users`` and ``num_items``, then for the sorted keys
            ``user * num_items + item`` of the removed rows, the sorted whole-user indices
            and the sorted whole-item indices in turn: the length and the values, all as
            little-endian int64. It depends on the id maps (not on the table's rows order).

    Example:
        >>> data = Interactions.from_raw([1, 1, 2], [10, 20, 10])
        >>> done = DeletionRequest(users=[1]).resolve(data)
        >>> done.rows.tolist(), done.users.tolist(), done.kind
        ([0, 1], [0], 'users')
        >>> done
        ResolvedDeletion(kind='users', rows=2, pairs=0, users=1, items=0, ignored=0)
    """

    rows: Tensor
    users: Tensor
    items: Tensor
    kind: str
    num_pairs: int
    num_ignored: int
    digest: str

    @property
    def num_rows(self) -> int:
        """Number of table rows removed."""
        return len(self.rows)

    @property
    def num_users(self) -> int:
        """Number of users deleted as a whole (not the size of the user map)."""
        return len(self.users)

    @property
    def num_items(self) -> int:
        """Number of items deleted as a whole (not the size of the item map)."""
        return len(self.items)

    def summary(self) -> dict[str, int | str]:
        """Plain values that are safe to log: kind and counts, never an id nor the unkeyed digest.

        Returns:
            ``{"kind", "num_rows", "num_pairs", "num_users", "num_items", "num_ignored"}``.

        Example:
            >>> data = Interactions.from_raw([1, 2], [10, 10])
            >>> s = DeletionRequest(pairs=[(1, 10)]).resolve(data).summary()
            >>> s["kind"], s["num_rows"]
            ('interactions', 1)
        """
        return {
            "kind": self.kind,
            "num_rows": self.num_rows,
            "num_pairs": self.num_pairs,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_ignored": self.num_ignored,
        }

    def __repr__(self) -> str:
        return (
            f"ResolvedDeletion(kind={self.kind!r}, rows={self.num_rows}, pairs={self.num_pairs}, "
            f"users={self.num_users}, items={self.num_items}, ignored={self.num_ignored})"
        )

    __str__ = __repr__


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True, init=False, repr=False)
class DeletionRequest:
    """What to forget: interaction pairs, whole users and whole items, in raw ids.

    Ids are Python/numpy integers, integral floats or non-empty strings; they are matched
    against the table's raw ids when the request is resolved (``"7"`` matches the integer
    id ``7``). Duplicates are folded. ``repr()`` shows only counts.

    Args:
        pairs: ``(user, item)`` pairs: an iterable of 2-tuples, or an ``(n, 2)`` array or
            tensor. For two parallel sequences use :meth:`from_columns`.
        users: users to delete as a whole (every row of each user).
        items: items to delete as a whole (every row of each item).

    Raises:
        InvalidDeletionRequest: if the request is empty, a pair is not a 2-tuple, or an id
            is not an integer or a non-empty string (``None``, ``bool``, ``2.5``, ``""``).

    Example:
        >>> data = Interactions.from_raw([196, 196, 186, 5], [242, 302, 242, 302])
        >>> request = DeletionRequest(pairs=[(196, 242)], users=[5])
        >>> request
        DeletionRequest(kind='mixed', pairs=1, users=1, items=0)
        >>> request.resolve(data).rows.tolist()
        [0, 3]
    """

    pairs: tuple[tuple[RawId, RawId], ...]
    users: tuple[RawId, ...]
    items: tuple[RawId, ...]

    def __init__(self, pairs: Any = (), users: Any = (), items: Any = ()) -> None:
        object.__setattr__(self, "pairs", _pairs(pairs))
        object.__setattr__(self, "users", _ids(users, "users"))
        object.__setattr__(self, "items", _ids(items, "items"))
        if not (self.pairs or self.users or self.items):
            raise InvalidDeletionRequest(f"Deletion request is empty: nothing to delete. {_ACCEPTED}")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_columns(
        cls, pair_users: Sequence | np.ndarray | Tensor, pair_items: Sequence | np.ndarray | Tensor,
        users: Any = (), items: Any = (),
    ) -> DeletionRequest:
        """A request whose pairs are given as two parallel sequences.

        Args:
            pair_users: raw user id of each pair.
            pair_items: raw item id of each pair (same length as ``pair_users``).
            users: users to delete as a whole.
            items: items to delete as a whole.

        Returns:
            The request.

        Raises:
            InvalidDeletionRequest: if the two sequences differ in length, or as the constructor.

        Example:
            >>> DeletionRequest.from_columns([1, 2, 1], [10, 10, 10])
            DeletionRequest(kind='interactions', pairs=2, users=0, items=0)
        """
        pu, pi = _as_list(pair_users, "pair_users"), _as_list(pair_items, "pair_items")
        if len(pu) != len(pi):
            raise InvalidDeletionRequest(
                f"Deletion request columns differ in length: {len(pu)} pair users, {len(pi)} pair items. {_ACCEPTED}"
            )
        return cls(pairs=list(zip(pu, pi)), users=users, items=items)

    @classmethod
    def from_file(cls, path: str | Path) -> DeletionRequest:
        """Read a requests file: CSV (``.csv``) or JSON lines (``.jsonl``/``.json``).

        CSV needs a header, ``user,item`` (pairs, in either order), ``user`` (whole users) or
        ``item`` (whole items); JSON lines hold one object per line, ``{"user": u, "item": i}``,
        ``{"user": u}`` or ``{"item": i}``. The file is read by
        :func:`~lightning_unlearn.unlearning.request_files.read_requests_file`, which says more.

        Args:
            path: the requests file.

        Returns:
            The request.

        Raises:
            InvalidDeletionRequest: for an unknown extension, a missing or unknown header
                column, a line with the wrong number of fields, invalid JSON, a line that is
                not an object or has unknown keys, an empty or invalid id, or a file with no
                requests; the message names the path and the line number.
            OSError: if the file cannot be read.

        Example:
            >>> import os, tempfile
            >>> f = os.path.join(tempfile.mkdtemp(), "forget.jsonl")
            >>> _ = open(f, "w").write('{"user": 196, "item": 242}\\n{"user": 5}\\n')
            >>> DeletionRequest.from_file(f)
            DeletionRequest(kind='mixed', pairs=1, users=1, items=0)
        """
        # request_files builds on this module (the error, the raw-id check): import it when used
        from lightning_unlearn.unlearning.request_files import read_requests_file

        pairs, users, items = read_requests_file(path)
        return cls(pairs=pairs, users=users, items=items)

    @classmethod
    def from_indices(cls, interactions: Interactions, indices: Mapping[str, Tensor]) -> DeletionRequest:
        """The request that :meth:`indices` stored, in the raw ids of ``interactions``' maps.

        Args:
            interactions: a table with the same id maps as the one the indices were taken on.
            indices: ``{"pairs": (n, 2), "users": (u,), "items": (i,)}`` long tensors.

        Returns:
            The request.

        Raises:
            InvalidDeletionRequest: an index is outside the id maps.

        Example:
            >>> data = Interactions.from_raw([196, 186], [242, 302])
            >>> stored = DeletionRequest(pairs=[(186, 302)], users=[196]).indices(data)
            >>> DeletionRequest.from_indices(data, stored).pairs
            ((186, 302),)
        """
        users, items = data_ids = (interactions.user_ids, interactions.item_ids)
        pairs = torch.as_tensor(indices.get("pairs", torch.zeros(0, 2, dtype=torch.long))).reshape(-1, 2)
        columns = (pairs[:, 0], pairs[:, 1], torch.as_tensor(indices.get("users", [])), torch.as_tensor(indices.get("items", [])))
        sizes = (len(users), len(items), len(users), len(items))
        if any(len(c) and (int(c.min()) < 0 or int(c.max()) >= n) for c, n in zip(columns, sizes)):
            raise InvalidDeletionRequest("Stored deletion request indices are outside the id maps of this data.")
        raw = [data_ids[k % 2][c.long().numpy()].tolist() for k, c in enumerate(columns)]
        return cls(pairs=list(zip(raw[0], raw[1])), users=raw[2], items=raw[3])

    def indices(self, interactions: Interactions) -> dict[str, Tensor] | None:
        """The request as sorted, unique indices into ``interactions``' id maps: its canonical content.

        What a checkpoint stores for a pending request (never raw ids), and what its fingerprint
        hashes: two requests with the same indices are the same request, whatever form or order
        their ids took. ``None`` when an id is not in the maps (such a request is refused when
        it is resolved).

        Args:
            interactions: the table whose id maps to use.

        Returns:
            ``{"pairs": (n, 2), "users": (u,), "items": (i,)}`` long tensors, or ``None``.

        Example:
            >>> data = Interactions.from_raw([196, 186], [242, 302])
            >>> DeletionRequest(users=["0196", 196.0]).indices(data)["users"].tolist()
            [1]
        """
        pair_users = _lookup(interactions.user_ids, interactions.user_index, [u for u, _ in self.pairs])
        pair_items = _lookup(interactions.item_ids, interactions.item_index, [i for _, i in self.pairs])
        users = _lookup(interactions.user_ids, interactions.user_index, list(self.users))
        items = _lookup(interactions.item_ids, interactions.item_index, list(self.items))
        if any(bool((t < 0).any()) for t in (pair_users, pair_items, users, items)):
            return None
        pairs = torch.unique(torch.stack([pair_users, pair_items], dim=1).reshape(-1, 2), dim=0)
        return {"pairs": pairs, "users": torch.unique(users), "items": torch.unique(items)}

    def canonical(self, interactions: Interactions) -> bytes:
        """Bytes that identify the request's content for ``interactions``' id maps (what fingerprints hash).

        The sorted indices of :meth:`indices`, or, for a request with ids outside the maps, its
        ids in the maps' canonical form (:func:`canonical_id`).

        Example:
            >>> data = Interactions.from_raw([196, 186], [242, 302])
            >>> DeletionRequest(users=[196]).canonical(data) == DeletionRequest(users=["0196"]).canonical(data)
            True
        """
        found = self.indices(interactions)
        if found is not None:
            content: Any = {k: v.tolist() for k, v in found.items()}
        else:
            ku, ki = id_kind(interactions.user_ids), id_kind(interactions.item_ids)

            def form(value: RawId, kind: str) -> str:
                canon = canonical_id(value, kind)
                return repr(value if canon is None else canon)

            content = {
                "raw_pairs": sorted({(form(u, ku), form(i, ki)) for u, i in self.pairs}),
                "raw_users": sorted({form(u, ku) for u in self.users}),
                "raw_items": sorted({form(i, ki) for i in self.items}),
            }
        return json.dumps(content, sort_keys=True).encode("utf-8")

    # ----------------------------------------------------------------- shape
    @property
    def kind(self) -> str:
        """``"interactions"``, ``"users"``, ``"items"`` or ``"mixed"`` (as listed, before resolution)."""
        return _kind(len(self.pairs), len(self.users), len(self.items))

    def summary(self) -> dict[str, int | str]:
        """Plain values that are safe to log: kind and counts, never an id.

        Returns:
            ``{"kind", "num_pairs", "num_users", "num_items"}``.

        Example:
            >>> DeletionRequest(items=["x", "y", "x"]).summary()
            {'kind': 'items', 'num_pairs': 0, 'num_users': 0, 'num_items': 2}
        """
        counts = {"num_pairs": len(self.pairs), "num_users": len(self.users), "num_items": len(self.items)}
        return {"kind": self.kind, **counts}

    def __repr__(self) -> str:
        return (
            f"DeletionRequest(kind={self.kind!r}, pairs={len(self.pairs)}, users={len(self.users)}, "
            f"items={len(self.items)})"
        )

    __str__ = __repr__

    # ----------------------------------------------------------------- resolution
    def resolve(
        self, interactions: Interactions, missing: str = "error", elsewhere: Mapping[str, Interactions] | None = None,
        removed: Tensor | None = None,
    ) -> ResolvedDeletion:
        """Check the request against ``interactions`` and find the rows it removes.

        Whole users and items that are in the id maps but have no rows in this table are
        accepted (they may have rows in another split, where the datamodule removes them too);
        only unknown ids are errors. Nothing is changed: apply the result with
        ``interactions.without(resolved.rows)``.

        Args:
            interactions: the table (e.g. the training split) whose rows to find.
            missing: ``"error"`` (default) to refuse pairs that are not rows of the table,
                ``"ignore"`` to drop them (counted in ``num_ignored``).
            elsewhere: other splits by name (e.g. ``{"validation": val, "test": test}``): an
                error about an id or pair that is not in ``interactions`` names the splits it
                is in.
            removed: sorted keys ``user * num_items + item`` of the rows earlier deletions removed
                from ``interactions`` (:attr:`RecDataModule.removed_keys`): a pair among them is
                deleted already, so it is satisfied (it removes no row), not missing.

        Returns:
            The :class:`ResolvedDeletion`.

        Raises:
            InvalidDeletionRequest: for an invalid ``missing``, unknown user or item ids
                (whatever ``missing`` says), pairs that are not rows (with
                ``missing="error"``), or nothing left to delete after dropping them.

        Example:
            >>> data = Interactions.from_raw([1, 1, 2], [10, 20, 10])
            >>> DeletionRequest(pairs=[(2, 20)]).resolve(data)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
              ...
            lightning_unlearn.unlearning.request.InvalidDeletionRequest: Deletion request has 1 pair that is not a row of this table: (2, 20). ...
            >>> done = DeletionRequest(pairs=[(2, 20), (1, 20)]).resolve(data, missing="ignore")
            >>> done.rows.tolist(), done.num_ignored
            ([1], 1)
        """
        if missing not in MISSING_MODES:
            raise InvalidDeletionRequest(f"missing must be 'error' or 'ignore', got {missing!r}.")
        data = interactions
        pair_users = [u for u, _ in self.pairs]
        pair_items = [i for _, i in self.pairs]
        user_raw = list(self.users) + pair_users
        item_raw = list(self.items) + pair_items
        user_idx = _lookup(data.user_ids, data.user_index, user_raw)
        item_idx = _lookup(data.item_ids, data.item_index, item_raw)
        self._refuse_unknown(user_raw, user_idx, item_raw, item_idx)

        users = torch.unique(user_idx[: len(self.users)])
        items = torch.unique(item_idx[: len(self.items)])
        pu, pi = user_idx[len(self.users):], item_idx[len(self.items):]

        # Pairs: look only at the rows of the users named in pairs (CSR segments, no table scan).
        wanted = torch.unique(pu * data.num_items + pi)
        pair_rows = torch.zeros(0, dtype=torch.long)
        found = torch.zeros(0, dtype=torch.bool)
        if len(wanted):
            owners = torch.unique(pu)
            segment, rows, cols = _segments(data.by_user, owners)
            keys = owners[segment] * data.num_items + cols
            slot = torch.searchsorted(wanted, keys).clamp_max(len(wanted) - 1)  # `wanted` is sorted
            hit = wanted[slot] == keys
            pair_rows = rows[hit]
            found = torch.zeros(len(wanted), dtype=torch.bool)
            found[slot[hit]] = True
        gone = torch.isin(wanted, removed) & ~found if removed is not None else torch.zeros_like(found)
        found |= gone  # deleted by an earlier request: satisfied, nothing left to remove
        num_missing = int((~found).sum())
        nothing_here = ("nothing of it is a row here, so there is nothing to remove or unlearn: take the request away (or "
                        "give it with the data that holds these pairs).")
        if num_missing and missing == "error":
            absent = set(wanted[~found].tolist())
            named: dict[int, tuple[RawId, RawId]] = {}
            for pair, key in zip(self.pairs, (pu * data.num_items + pi).tolist()):
                if key in absent:
                    named.setdefault(key, pair)
            shown = list(named.values())
            where = _splits_holding(elsewhere or {}, lambda t: t.keys, torch.tensor(sorted(absent)))
            raise InvalidDeletionRequest(
                f"Deletion request has {_plural(num_missing, 'pair')} that {_is_not(num_missing, 'a row')} "
                f"of this table{' (the training split)' if elsewhere else ''}: {_show(shown)}{where}. "
                + (nothing_here[0].upper() + nothing_here[1:] if num_missing == len(wanted) and not (len(users) or len(items))
                   else "Pass missing='ignore' to drop such pairs.") + f" {_ACCEPTED}"
            )
        num_pairs = len(wanted) - num_missing
        if not (num_pairs or len(users) or len(items)):
            raise InvalidDeletionRequest(
                f"Deletion request is empty after dropping {_plural(num_missing, 'pair')} that "
                f"{_is_not(num_missing, 'a row')} of this table (missing='ignore'): {nothing_here} {_ACCEPTED}"
            )

        user_rows = _segments(data.by_user, users)[1]
        item_rows = _segments(data.by_item, items)[1]
        chosen = torch.unique(torch.cat([pair_rows, user_rows, item_rows]))
        row_keys = torch.sort(torch.cat([data.users[chosen] * data.num_items + data.items[chosen], wanted[gone]])).values
        return ResolvedDeletion(
            rows=chosen,
            users=users,
            items=items,
            kind=_kind(num_pairs, len(users), len(items)),
            num_pairs=num_pairs,
            num_ignored=num_missing,
            digest=_digest(data.num_users, data.num_items, row_keys, users, items),
        )

    @staticmethod
    def _refuse_unknown(user_raw: list, user_idx: Tensor, item_raw: list, item_idx: Tensor) -> None:
        """Raise one error naming the unknown user ids and the unknown item ids, if any."""
        problems = []
        for what, raw, idx in (("user", user_raw, user_idx), ("item", item_raw, item_idx)):
            unknown = list(dict.fromkeys(r for r, k in zip(raw, idx.tolist()) if k < 0))
            if unknown:
                problems.append(f"{_plural(len(unknown), f'unknown {what} id')}: {_show(unknown)}")
        if problems:
            raise InvalidDeletionRequest(
                f"Deletion request names {'; '.join(problems)}. Ids must be raw ids of the data set's "
                f"id maps. {_ACCEPTED}"
            )
