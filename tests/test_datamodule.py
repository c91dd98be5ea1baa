"""RecDataModule: seeded splits, fixed negatives, reproducible batches, ranking batches."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.data import AdjacencyLists, CSVSource, DataNotFoundError, DataSource, Interactions, RecDataModule, Synthetic
from lightning_unlearn.data.datamodule import DataFingerprintMismatch


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


# ----------------------------------------------------------------------------- a given train/validation/test triple

TRAIN = "user,item\nu1,a\nu1,b\nu2,b\nu2,c\nu3,a\nu3,c\n"
VAL = "user,item\nu1,c\nu2,a\nu4,b\nu3,b\n"  # u4 only in the validation file
TEST = "user,item\nu1,d\nu2,d\nu4,a\n"  # d only in the test file


def triple(tmp_path, val: str = VAL, test: str = TEST) -> CSVSource:
    for name, text in (("train.csv", TRAIN), ("val.csv", val), ("test.csv", test)):
        (tmp_path / name).write_text(text)
    return CSVSource("train.csv", root=str(tmp_path), test_path="test.csv", val_path="val.csv")


def pairs(table: Interactions) -> list[tuple[str, str]]:
    """The rows as sorted ``(raw user, raw item)`` pairs."""
    return sorted((str(table.user_ids[u]), str(table.item_ids[i])) for u, i in zip(table.users.tolist(), table.items.tolist()))


def ranked(loader) -> tuple[list[int], set[tuple[int, int]], set[tuple[int, int]]]:
    """Users, target pairs and excluded pairs of ranking batches, as indices."""
    users, targets, excluded = [], set(), set()
    for b in loader:
        users += b["users"].tolist()
        targets |= set(zip(b["users"][b["target_rows"]].tolist(), b["target_items"].tolist()))
        excluded |= set(zip(b["users"][b["exclude_rows"]].tolist(), b["exclude_items"].tolist()))
    return users, targets, excluded


def test_a_given_validation_file_is_the_validation_split(tmp_path):
    module = RecDataModule(triple(tmp_path), split="given", num_negatives=1, eval_batch_size=2)
    module.setup()
    assert module.hparams.val_fraction is None
    for table in (module.train, module.val, module.test):
        assert table.user_ids.tolist() == ["u1", "u2", "u3", "u4"] and table.item_ids.tolist() == ["a", "b", "c", "d"]
    assert pairs(module.train) == [("u1", "a"), ("u1", "b"), ("u2", "b"), ("u2", "c"), ("u3", "a"), ("u3", "c")]  # nothing carved
    assert pairs(module.val) == [("u1", "c"), ("u2", "a"), ("u3", "b"), ("u4", "b")]
    assert pairs(module.test) == [("u1", "d"), ("u2", "d"), ("u4", "a")]
    train = {(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2)}
    assert ranked(module.val_dataloader()) == ([0, 1, 2, 3], {(0, 2), (1, 0), (3, 1), (2, 1)}, train)
    seen = {(u, i) for u, i in train | {(0, 2), (1, 0), (3, 1), (2, 1)} if u != 2}  # u3 has no test row: not ranked
    assert ranked(module.test_dataloader()) == ([0, 1, 3], {(0, 3), (1, 3), (3, 0)}, seen)


def test_deletions_reach_a_given_validation_split_as_they_reach_the_test_split(tmp_path):
    # (u1, a) is a row of all three files: removing the training row leaves the validation and test rows alone, alike.
    module = RecDataModule(triple(tmp_path, val=VAL + "u1,a\n", test=TEST + "u1,a\n"), split="given", num_negatives=1)
    module.setup()
    row = torch.nonzero((module.train.users == 0) & (module.train.items == 0)).flatten()
    removed = module.remove(row, users=torch.tensor([1]), items=torch.tensor([1]))  # the row (u1, a), user u2, item b
    assert len(removed.users) == 4
    assert pairs(module.train) == [("u3", "a"), ("u3", "c")]
    assert pairs(module.val) == [("u1", "a"), ("u1", "c")]
    assert pairs(module.test) == [("u1", "a"), ("u1", "d"), ("u4", "a")]
    assert ranked(module.val_dataloader()) == ([0], {(0, 0), (0, 2)}, set())
    # A checkpoint's state re-applies the removals to the triple loaded afresh ...
    state = module.state_dict()
    restored = RecDataModule(triple(tmp_path, val=VAL + "u1,a\n", test=TEST + "u1,a\n"), split="given", num_negatives=1)
    restored.load_state_dict(state)
    restored.setup()
    for name in ("train", "val", "test"):
        assert pairs(getattr(restored, name)) == pairs(getattr(module, name)), name
    assert restored.data_fingerprint == module.data_fingerprint
    # ... and only to the same triple: the validation file is part of the data's fingerprint.
    (tmp_path / "other").mkdir()
    other = RecDataModule(triple(tmp_path / "other", test=TEST + "u1,a\n"), split="given", num_negatives=1)
    with pytest.raises(DataFingerprintMismatch):
        other.check_state_dict(state)


def test_a_given_validation_file_and_val_fraction_are_refused_together(tmp_path):
    for fraction in (0.1, 0.0):
        with pytest.raises(ValueError, match=rf"own validation split, and RecDataModule\(val_fraction={fraction}\).*leave val_fraction unset"):
            RecDataModule(triple(tmp_path), split="given", val_fraction=fraction).setup()
    with pytest.raises(ValueError, match=r"CSVSource provides its own test split; use split='given' \(got 'random'\)"):
        RecDataModule(triple(tmp_path)).setup()

    class ValidationOnly(DataSource):
        def load(self):
            raise AssertionError("RecDataModule reads load_splits()")

        def load_splits(self):
            data = Interactions.from_raw([1, 2], [1, 2])
            return data.select(torch.tensor([True, False])), data.select(torch.tensor([False, True])), None

    with pytest.raises(ValueError, match=r"ValidationOnly provides its own validation split; use split='given'"):
        RecDataModule(ValidationOnly()).setup()
    with pytest.raises(ValueError, match="needs a source with its own test split"):
        RecDataModule(ValidationOnly(), split="given").setup()


def test_a_missing_or_bad_validation_file_names_it(tmp_path):
    source = triple(tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DataNotFoundError, match=r"Data file not found: .*val\.csv"):
        RecDataModule(source, split="given").setup()
    (tmp_path / "val.csv").write_text("user,item\nu1,c\nu2\n")
    with pytest.raises(ValueError, match=r"val\.csv, line 3: expected at least 2 fields, got 1"):
        RecDataModule(source, split="given").setup()


def test_without_a_validation_file_val_fraction_defaults_to_carving_a_tenth(tmp_path):
    source = Synthetic(num_users=40, num_items=30, density=0.3, seed=3)
    default, explicit = RecDataModule(source), RecDataModule(source, val_fraction=0.1)
    assert default.data_fingerprint == explicit.data_fingerprint and len(default.val) == len(explicit.val) > 0
    (tmp_path / "train.csv").write_text("user,item\n" + "".join(f"u{u},i{i}\n" for u in range(3) for i in range(10)))
    (tmp_path / "test.csv").write_text(TEST)
    module = RecDataModule(CSVSource("train.csv", root=str(tmp_path), test_path="test.csv"), split="given")
    module.setup()
    assert len(module.val) == 3 and len(module.train) == 27  # one of each user's ten rows
    assert sorted(pairs(module.train) + pairs(module.val)) == sorted((f"u{u}", f"i{i}") for u in range(3) for i in range(10))
