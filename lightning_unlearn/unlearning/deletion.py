"""``DeletionSpec``: a seeded recipe for a deletion (random rows, whole users or items, or a file)."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.unlearning.request import DeletionRequest

__all__ = ["DeletionSpec"]

_KINDS = ("interactions", "users", "items")
_SELECTIONS = ("random", "most_active", "least_active")


@dataclass(frozen=True)
class DeletionSpec:
    """What ``compare`` deletes: a fraction or a count of rows, users or items, or a requests file.

    Args:
        kind: ``"interactions"`` (random training rows), ``"users"`` or ``"items"`` (whole ones).
        fraction: share of training rows (or of users/items with training rows) to delete.
        count: how many to delete (overrides ``fraction``).
        selection: for users/items: ``"random"``, ``"most_active"`` or ``"least_active"``.
        requests_file: a requests file (CSV or JSON lines): the deletion itself (the options above,
            and ``seed``, are then not used: :meth:`unused` names those given).
        seed: seeds the random choice.

    Raises:
        ValueError: on an unknown kind or selection, or (in :meth:`build`) a fraction/count that
            selects nothing, or every row, user or item there is.

    Example:
        >>> data = Interactions.from_raw([1, 1, 2, 3], [7, 8, 7, 9])
        >>> DeletionSpec(kind="users", count=1, selection="most_active").build(data).users
        (1,)
    """

    kind: Literal["interactions", "users", "items"] = "interactions"
    fraction: float = 0.01
    count: int | None = None
    selection: Literal["random", "most_active", "least_active"] = "random"
    requests_file: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"DeletionSpec(kind=...) must be one of {_KINDS}, got {self.kind!r}.")
        if self.selection not in _SELECTIONS:
            raise ValueError(f"DeletionSpec(selection=...) must be one of {_SELECTIONS}, got {self.selection!r}.")
        if self.count is None and not 0 < self.fraction < 1:
            raise ValueError(f"DeletionSpec(fraction=...) must be in (0, 1), got {self.fraction}.")
        if self.count is not None and self.count < 1:
            raise ValueError(f"DeletionSpec(count=...) must be >= 1, got {self.count}.")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not -2**63 <= int(self.seed) < 2**64:
            raise ValueError(f"DeletionSpec(seed=...) must be an integer from -2**63 to 2**64 - 1 (a torch seed), got {self.seed!r}.")
        object.__setattr__(self, "seed", int(self.seed))  # a numpy integer: torch's generator takes a Python int
        if self.kind == "interactions" and self.selection != "random" and self.requests_file is None:
            raise ValueError("DeletionSpec(selection=...) applies to users and items; interactions are chosen at random.")

    def unused(self) -> dict[str, Any]:
        """The options that draw a deletion, given (not at their defaults) beside ``requests_file``, which is the deletion itself.

        Example:
            >>> DeletionSpec(kind="users", requests_file="forget.csv").unused()
            {'kind': 'users'}
        """
        if self.requests_file is None:
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "requests_file" and getattr(self, f.name) != f.default}

    def build(self, train: Interactions) -> DeletionRequest:
        """The request, in raw ids, chosen among the rows of ``train``."""
        if self.requests_file is not None:
            return DeletionRequest.from_file(self.requests_file)
        g = torch.Generator().manual_seed(self.seed)
        if self.kind == "interactions":
            rows = torch.randperm(len(train), generator=g)[: self._how_many(len(train))]
            return DeletionRequest.from_columns(train.user_ids[train.users[rows].numpy()], train.item_ids[train.items[rows].numpy()])
        csr = train.by_user if self.kind == "users" else train.by_item
        degree = csr.lengths()
        present = torch.nonzero(degree > 0).flatten()
        if self.selection == "random":
            order = present[torch.randperm(len(present), generator=g)]
        else:
            order = present[torch.argsort(degree[present], descending=self.selection == "most_active", stable=True)]
        chosen = order[: self._how_many(len(present))].numpy()
        ids = (train.user_ids if self.kind == "users" else train.item_ids)[chosen]
        return DeletionRequest(users=ids) if self.kind == "users" else DeletionRequest(items=ids)

    def _how_many(self, available: int) -> int:
        n = self.count if self.count is not None else round(self.fraction * available)
        if n < 1:
            raise ValueError(f"DeletionSpec selects nothing: fraction {self.fraction} of {available} {self.kind} rounds to 0.")
        if n >= available:
            asked = f"count={self.count}" if self.count is not None else f"fraction={self.fraction}"
            raise ValueError(f"DeletionSpec({asked}) deletes every one of the {available} {self.kind} with training rows "
                             f"(or more), which leaves nothing to train on: choose fewer.")
        return n
