"""Fitting through a plain Trainer: bit-for-bit reproducible, and it learns the planted structure."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF, LightGCN, NeuMF

SOURCE = dict(num_users=80, num_items=50, rank=3, density=0.2, seed=0)


def fit(cls, epochs=8, **model_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = RecDataModule(Synthetic(**SOURCE), batch_size=64, num_negatives=2, seed=0)
    model = cls(dm.num_users, dm.num_items, lr=0.05, l2=0.1, **model_kwargs)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, accelerator="cpu",
    )
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    return model, metrics


@pytest.mark.parametrize("cls", [MF, LightGCN, NeuMF])
def test_fit_is_bit_for_bit_reproducible(cls):
    first, _ = fit(cls, epochs=2)
    second, _ = fit(cls, epochs=2)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("cls", "kwargs"), [(MF, {"embedding_dim": 8}), (LightGCN, {"embedding_dim": 8, "num_layers": 2})])
def test_fit_learns_planted_structure(cls, kwargs):
    _, trained = fit(cls, epochs=40, **kwargs)
    # Each user has 43 unseen items: a random ranking gives recall@10 = 10/43 = 0.23 and AUC 0.5;
    # ranking by the planted affinity itself gives recall@10 0.79 and AUC 0.86.
    assert trained["test/auc"] > 0.7
    assert trained["test/recall@10"] > 0.45


def test_a_validation_before_the_fit_leaves_the_metrics_usable_by_the_fit(tmp_path):
    """Trainer.validate resets the metrics' states inside inference mode: the fit's own validation, outside it, used to
    fail updating them in place ("Inplace update to inference tensor outside InferenceMode")."""
    dm = RecDataModule(Synthetic(num_users=30, num_items=20, seed=0), batch_size=64, val_fraction=0.2)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.validate(model, dm, verbose=False)[0]
    trainer.fit(model, dm)
    assert set(trainer.callback_metrics) >= set(before)
