"""``Unlearner.prepare``: the work paid once per trained model, called by the callback and ``compare``, reported apart."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF, LightGCN
from lightning_unlearn.unlearning import IFRU, AltEraser, FineTune, Retrain, Unlearner, UnlearningCallback
from lightning_unlearn.unlearning.methods.curvature import fingerprint
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.request import DeletionRequest

RECIPE = FitRecipe(max_epochs=2, monitor=None)


def setting(cls=MF):
    """A fitted model, its datamodule, and the retained and deleted rows of 5% of the training rows (graph updated)."""
    pl.seed_everything(0, verbose=False)
    dm = RecDataModule(Synthetic(num_users=30, num_items=25, density=0.3, seed=3), batch_size=64, num_negatives=2, seed=0)
    dm.setup()
    model = cls(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    RECIPE(model, dm)
    deleted = dm.remove(torch.arange(0, len(dm.train), 20))
    model.set_graph(dm.train)
    return model, dm, dm.train_rows(), deleted


class Counting(Unlearner):
    """Prepares once per set of parameters (as IFRU and AltEraser do) and reports a fixed cost."""

    def __init__(self):
        self.built: list[int] = []  # the rows of each preparation
        self._for = None

    def prepare(self, model, rows, context=None) -> float:
        if self._for is not None and torch.equal(self._for, fingerprint(model)):
            return 0.0
        self._for = fingerprint(model)
        self.built.append(len(rows))
        return 0.25

    def update(self, model, retained, deleted, context):
        with torch.no_grad():
            model.user_embedding.weight[torch.unique(deleted.users)] *= 0.5
        self._for = fingerprint(model)  # a small step: keep what was prepared (IFRU's and AltEraser's adopt)
        return {"rows": len(deleted)}


def test_the_default_prepares_nothing():
    model, _, retained, deleted = setting()
    assert FineTune().prepare(model, retained.concat(deleted)) == 0.0
    report = FineTune(epochs=1).unlearn(model, retained, deleted)
    assert report.precompute_seconds == 0.0 and "precompute_seconds" not in report.diagnostics
    assert Unlearner.safe_deleted_fraction is None and FineTune.safe_deleted_fraction is None
    assert IFRU.safe_deleted_fraction == AltEraser.safe_deleted_fraction == 0.03


@pytest.mark.parametrize(
    ("cls", "make"),
    [(MF, lambda: IFRU()), (MF, lambda: IFRU(solver="cg")), (MF, lambda: AltEraser()), (MF, lambda: AltEraser(objective="retained")),
     (LightGCN, lambda: AltEraser()), (LightGCN, lambda: IFRU())],
    ids=["IFRU", "IFRU-cg", "AltEraser", "AltEraser-retained", "AltEraser-LightGCN", "IFRU-LightGCN"],
)
def test_preparing_ahead_changes_the_timing_not_the_numbers(cls, make):
    """prepare() then unlearn() gives the parameters unlearn() alone gives, bit for bit; the seconds move to prepare."""
    model, _, retained, deleted = setting(cls)
    alone, ahead = copy.deepcopy(model), copy.deepcopy(model)
    report = make().unlearn(alone, retained, deleted)
    method = make()
    seconds = method.prepare(ahead, retained.concat(deleted))
    assert method.prepare(ahead, retained.concat(deleted)) == 0.0  # once per trained model
    prepared = method.unlearn(ahead, retained, deleted)
    for name, value in alone.state_dict().items():
        assert torch.equal(ahead.state_dict()[name], value), name
    assert prepared.precompute_seconds == 0.0 and "precompute_seconds" not in prepared.diagnostics
    assert "precompute_seconds" not in report.diagnostics
    if cls is MF:  # IFRU caches nothing for a graph model
        assert seconds > 0 and report.precompute_seconds > 0


def test_the_callback_prepares_once_per_trained_model(tmp_path):
    """Before the method's first request, and again after a Retrain refit; the report carries the seconds."""
    model, dm, _, _ = setting()
    method = Counting()
    callback = UnlearningCallback(method, dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2, max_deleted_fraction=None)
    reports, rows = [], []
    for user in (3, 4, 5):
        rows.append(len(dm.train))
        callback.request(DeletionRequest(users=[int(dm.train.user_ids[user])]))
        reports += callback.apply_pending(model, dm, recipe=RECIPE, seed=0)
    assert [r.method for r in reports] == ["Counting", "Retrain", "Counting"]
    assert [r.precompute_seconds for r in reports] == [0.25, 0.0, 0.25]
    assert method.built == [rows[0], rows[2]]  # every row the model was trained on: retained and deleted


def test_compare_prepares_each_method_before_timing_it():
    from lightning_unlearn.unlearning.compare import compare
    from lightning_unlearn.unlearning.deletion import DeletionSpec

    pl.seed_everything(0, verbose=False)
    dm = RecDataModule(Synthetic(num_users=30, num_items=25, density=0.3, seed=3), batch_size=64, num_negatives=2, seed=0)
    dm.setup()
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    RECIPE(model, dm)
    total = len(dm.train)
    method = Counting()
    result = compare(model, dm, [Retrain(), method], DeletionSpec(fraction=0.05), RECIPE, progress=lambda _: None)
    entry = next(m for m in result["methods"] if m["name"] == "Counting")
    assert entry["precompute_seconds"] == 0.25 and entry["seconds"] < 0.25 and method.built == [total]
