"""The base of second-order methods: a curvature cache paid once per trained model, and rolled back with a failed request.

A method built on the kit (:class:`~lightning_unlearn.unlearning.methods.scope.Scope`,
:class:`~lightning_unlearn.unlearning.methods.restricted.RestrictedParameters`,
:class:`~lightning_unlearn.unlearning.methods.curvature.CurvatureCache`) subclasses
:class:`SecondOrderUnlearner` and implements :meth:`~SecondOrderUnlearner.step`; the base
builds the cache in :meth:`~SecondOrderUnlearner.prepare`, downdates it by each request's
deleted rows before the step, keeps it for the updated model after it, and drops it when the
step fails (the request is rolled back, so its downdate must not persist).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any, Literal

import torch

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import fingerprints_by_version
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningReport
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache, RowsMismatch
from lightning_unlearn.unlearning.methods.scope import initialisation, is_graph

__all__ = ["SecondOrderUnlearner"]


class SecondOrderUnlearner(Unlearner):
    """An :class:`~lightning_unlearn.unlearning.methods.base.Unlearner` whose steps use cached curvature blocks.

    Subclasses implement :meth:`step` and, where they differ from the defaults,
    :meth:`uses_cache` (which models the cache serves), :meth:`after_build` (work on the fresh
    cache, e.g. factorisations) and :meth:`clear` (more state to drop with the cache).

    Args:
        blocks: ``"cached"`` (keep the blocks of every user and item, built once per trained
            model), ``"fresh"`` (no cache: a method computes its scope's blocks per request,
            e.g. with :class:`~lightning_unlearn.unlearning.methods.curvature.FreshCurvature`) or
            ``"auto"`` (a cache within ``cache_budget_gb``: every block while
            :func:`~lightning_unlearn.unlearning.methods.curvature.cache_bytes` fits, else the
            blocks of the users and items with the most rows, in float32, with the rest computed
            when a request needs them and kept in place of the least recently used).
        cache_budget_gb: the most the cache of ``"auto"`` holds, in GiB (``> 0``).

    Raises:
        ValueError: on another ``blocks`` or a budget that is not a number > 0.

    Example:
        >>> from lightning_unlearn.models import MF
        >>> class Nothing(SecondOrderUnlearner):
        ...     def step(self, model, retained, deleted, cache, context):
        ...         return {"blocks": None if cache is None else tuple(cache.block("users", torch.tensor([0])).shape)}
        >>> rows = TrainRows(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([[2], [0]]))
        >>> kept, gone = rows.select(torch.tensor([True, False])), rows.select(torch.tensor([False, True]))
        >>> method = Nothing()
        >>> method.unlearn(MF(2, 3, embedding_dim=2), kept, gone).diagnostics
        {'blocks': (1, 2, 2), 'cache_hits': 1, 'cache_misses': 0}
    """

    def __init__(self, blocks: Literal["auto", "cached", "fresh"] = "auto", cache_budget_gb: float = 4.0) -> None:
        name = type(self).__name__
        if blocks not in ("auto", "cached", "fresh"):
            raise ValueError(f"{name}(blocks=...) must be one of ('auto', 'cached', 'fresh'), got {blocks!r}.")
        if isinstance(cache_budget_gb, bool) or not isinstance(cache_budget_gb, (int, float)) or not cache_budget_gb > 0:
            raise ValueError(f"{name}(cache_budget_gb=...) must be a number > 0, got {cache_budget_gb!r}.")
        self.blocks, self.cache_budget_gb = blocks, float(cache_budget_gb)
        self.cache = CurvatureCache(None if blocks == "cached" else self.cache_budget_gb * 2**30)

    def keeps_cache(self, model: Recommender) -> bool:
        """Whether ``blocks`` asks for a cache (``"cached"`` or ``"auto"``)."""
        return self.blocks != "fresh"

    def uses_cache(self, model: Recommender) -> bool:
        """Whether requests on ``model`` read the cached blocks (default: a kept cache, on a model without a graph)."""
        return not is_graph(model) and self.keeps_cache(model)

    def prepared_for(self, model: Recommender) -> bool:
        """Whether :meth:`prepare` has nothing left to do for ``model``'s parameters."""
        return not self.uses_cache(model) or self.cache.holds(model)

    def prepare(self, model: Recommender, rows: TrainRows, context: UnlearningContext | None = None) -> float:
        """Build the curvature cache for ``model`` trained on ``rows`` (then :meth:`after_build`); the seconds it took.

        It also draws the initialisation a request's orphans are reset to
        (:func:`~lightning_unlearn.unlearning.methods.scope.initialisation`, from ``context.seed``),
        a pass over the catalog that would otherwise fall on the first request with orphans.
        0 s when the cache holds ``model``'s parameters already or the model does not use it.

        Args:
            model: the trained model.
            rows: every training row it was trained on.
            context: on several processes, each sums the curvature of its shard of the rows.

        Returns:
            The seconds it took.
        """
        if not self.uses_cache(model) or self.cache.holds(model):  # (a subclass's prepared_for may ask for more than the cache)
            return 0.0
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                self.cache.build(model, rows, context)
                self.after_build(model, rows)
            initialisation(model, (context or UnlearningContext()).seed)  # what a request's orphans are reset to: drawn now
        except Exception:
            self.clear()  # half built
            raise
        return time.perf_counter() - start

    def share(self, cache: CurvatureCache, model: Recommender, rows: TrainRows) -> float | None:
        """Read ``cache``, built for ``model`` by another method, instead of building one; the seconds :meth:`after_build` took.

        ``compare`` builds one cache for the trained model and hands it from method to method
        (:meth:`~lightning_unlearn.unlearning.methods.curvature.CurvatureCache.mark` and
        ``rollback`` undo each request's changes). ``None`` (and nothing taken) when this method
        does not read a cache on ``model``, or would hold other blocks (another budget).

        Args:
            cache: a cache that holds ``model``'s parameters.
            model: the trained model.
            rows: every training row it was trained on.
        """
        if not (self.uses_cache(model) and cache.holds(model)
                and (cache.budget_bytes == self.cache.budget_bytes or cache.fits(model) and self.cache.fits(model))):
            return None
        start = time.perf_counter()
        self.cache = cache
        with torch.enable_grad():
            self.after_build(model, rows)
        return time.perf_counter() - start

    def after_build(self, model: Recommender, rows: TrainRows) -> None:
        """Work on the freshly built (or shared) cache, paid once per trained model (default: none).

        A shared cache may already hold another method's work: keep what is there.
        """

    def clear(self) -> None:
        """Drop what is cached for the trained model (after a failed request or a half-built cache)."""
        self.cache.clear()

    def unlearn(self, model: Recommender, retained: TrainRows, deleted: TrainRows,
                context: UnlearningContext | None = None) -> UnlearningReport:
        """:meth:`Unlearner.unlearn`; the model's fingerprint, asked for by several checks, is taken once per state of its parameters."""
        with fingerprints_by_version():
            return super().unlearn(model, retained, deleted, context)

    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        """Downdate the cache by ``deleted``, run :meth:`step`, keep the cache for the result; on failure drop it."""
        try:
            if not self.prepared_for(model):  # unlearn() prepares first: only a direct call of update() gets here
                self.prepare(model, retained.concat(deleted), context)
            # a model with a non-finite parameter never matches its fingerprint: no blocks, and the step names the fault
            cache = self.cache if self.uses_cache(model) and self.cache.holds(model) else None
            if cache is not None:
                cache.downdate(model, retained, deleted, context)
            diagnostics = self.step(model, retained, deleted, cache, context)
            if cache is None:
                return diagnostics
            cache.adopt(model)  # the step is small: later requests reuse these blocks as they are
            return {**diagnostics, "cache_hits": cache.hits, "cache_misses": cache.misses}
        except RowsMismatch:  # refused before the downdate: the cache still holds the trained model's rows
            raise
        except BaseException:  # Ctrl-C too: the same object is often asked again (a notebook, compare --resume)
            self.clear()  # a failed request is rolled back: the cache may hold its downdate
            raise

    @abstractmethod
    def step(self, model: Recommender, retained: TrainRows, deleted: TrainRows, cache: CurvatureCache | None,
             context: UnlearningContext) -> dict[str, Any]:
        """Change ``model`` in place to forget ``deleted``; return diagnostics (plain values).

        Args:
            model: the trained model.
            retained: the rows that remain.
            deleted: the rows to forget.
            cache: the curvature cache, downdated to the retained rows, taken at ``model``
                (``None`` when :meth:`uses_cache` is false).
            context: device, seed, reduce and sharding.
        """
