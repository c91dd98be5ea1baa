"""``Retrain``: the exact answer every other method is judged against."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningReport

__all__ = ["Retrain"]


class Retrain(Unlearner):
    """Re-initialise from a seed and fit on the retained rows with the original recipe.

    With ``seed=None`` it uses the original's seed (``context.seed``): the same
    initialisation and the same negatives for the rows that remain, so it is the reference.
    Another seed gives the seed noise that every completeness figure is read against.

    Args:
        seed: initialisation seed; ``None`` means the original's.

    Raises:
        ValueError: ``seed`` is not ``None`` or an integer in ``[0, 2**32)``; (from :meth:`unlearn`)
            when the context has no ``fit`` recipe.

    Example:
        >>> Retrain().name, Retrain(seed=1).name
        ('Retrain', 'Retrain(seed=1)')
    """

    hint = "check that the original recipe (trainer settings) can fit the retained data"

    def __init__(self, seed: int | None = None):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
            raise ValueError(f"Retrain(seed=...) must be None (the original's seed) or an integer in [0, 2**32), got {seed!r}.")
        self.seed = seed

    @property
    def name(self) -> str:
        return "Retrain" if self.seed is None else f"Retrain(seed={self.seed})"

    def unlearn(self, model: Recommender, retained: TrainRows, deleted: TrainRows,
                context: UnlearningContext | None = None) -> UnlearningReport:
        """:meth:`Unlearner.unlearn`, refused before anything runs when ``context`` has no ``fit``."""
        _require_fit(context)
        return super().unlearn(model, retained, deleted, context)

    def update(self, model: Recommender, retained: TrainRows, deleted: TrainRows, context: UnlearningContext) -> dict[str, Any]:
        _require_fit(context)
        seed = context.seed if self.seed is None else self.seed
        pl.seed_everything(seed, verbose=False)
        fresh = model.fresh()
        context.fit(fresh)
        model.load_state_dict(fresh.state_dict())
        return {"seed": seed}


def _require_fit(context: UnlearningContext | None) -> None:
    if context is None or context.fit is None:
        raise ValueError(
            "Retrain refits the model, so it needs context.fit: a function that fits a fresh model on the retained rows "
            "with the original recipe, e.g. UnlearningContext(fit=lambda fresh: FitRecipe(max_epochs=10)(fresh, datamodule)) "
            "(the UnlearningCallback and compare give one)."
        )
