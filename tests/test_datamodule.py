"""RecDataModule: seeded splits, fixed negatives, reproducible batches, ranking batches."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.data import AdjacencyLists, Interactions, RecDataModule, Synthetic


def dm(**kwargs) -> RecDataModule:
    kwargs = {"batch_size": 32, "eval_batch_size": 16, **kwargs}
    module = RecDataModule(Synthetic(num_users=40, num_items=30, density=0.3, seed=3), **kwargs)
    module.setup()
    return module


def keyset(table: Interactions) -> set[int]:
    return set(table.keys.tolist())


def test_splits_partition_the_data_and_are_reproducible():
    a, b = dm(seed=1), dm(seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 40 * 9
    assert not keyset(a.train) & keyset(a.test) and not keyset(a.train) & keyset(a.val) and not keyset(a.val) & keyset(a.test)
    assert keyset(a.test) == keyset(b.test) and keyset(a.val) == keyset(b.val)
    assert torch.equal(a.train_negatives, b.train_negatives)
    assert keyset(dm(seed=2).test) != keyset(a.test)


def test_negatives_are_never_training_positives():
    module = dm(num_negatives=3)
    users = module.train.users.unsqueeze(1).expand_as(module.train_negatives)
    assert module.train_negatives.shape == (len(module.train), 3)
    assert not module.train.contains(users, module.train_negatives).any()


def test_epoch_batches_are_seeded_by_epoch():
    module = dm()
    loader = module.train_dataloader()

    def epoch(e):
        loader.sampler.set_epoch(e)
        return torch.cat([b["users"] * 1000 + b["items"] for b in loader])

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert sorted(first.tolist()) == sorted(keyset_rows(module))


def keyset_rows(module):
    return (module.train.users * 1000 + module.train.items).tolist()


def test_ranking_batches_hold_targets_and_exclusions():
    module = dm()
    batches = list(module.test_dataloader())
    users = torch.cat([b["users"] for b in batches])
    assert users.tolist() == sorted(set(module.test.users.tolist()))
    for b in batches:
        for table, rows, items in ((module.test, "target_rows", "target_items"), (None, "exclude_rows", "exclude_items")):
            pairs = set(zip(b["users"][b[rows]].tolist(), b[items].tolist()))
            if table is not None:
                expected = {(u, i) for u, i in zip(table.users.tolist(), table.items.tolist()) if u in set(b["users"].tolist())}
            else:
                seen = [module.train, module.val]
                expected = {(u, i) for t in seen for u, i in zip(t.users.tolist(), t.items.tolist()) if u in set(b["users"].tolist())}
            assert pairs == expected


def test_leave_last_out_split_and_no_validation():
    module = dm(split="leave_last_out", val_fraction=0.0)
    assert len(module.val) == 0 and len(module.test) == 40
    assert len(list(module.val_dataloader())) == 0


def test_given_split_reads_the_pair(data_dir):
    module = RecDataModule(AdjacencyLists(root=str(data_dir)), split="given", val_fraction=0.1)
    assert (module.num_users, module.num_items) == (6040, 3695)
    assert len(module.train) + len(module.val) + len(module.test) == 648079 + 72073 + 200041


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "temporal"}, "split"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"k_core": -1}, "k_core"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecDataModule(Synthetic(), **kwargs)


def test_given_split_needs_a_source_with_a_test_split():
    with pytest.raises(ValueError, match="own test split"):
        RecDataModule(Synthetic(), split="given").setup()
