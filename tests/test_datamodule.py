"""RecDataModule: seeded splits, fixed negatives, reproducible batches, ranking batches."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn.data import AdjacencyLists, CSVSource, DataNotFoundError, DataSource, Interactions, RecDataModule, Synthetic
from lightning_unlearn.data.datamodule import DataFingerprintMismatch
from lightning_unlearn.models import MF
from lightning_unlearn.ranking import FullRankingMetrics


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
        ({"k_core": 1.5}, r"k_core=...\) must be an integer >= 0"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": "64"}, "batch_size"),
        ({"seed": "a"}, "seed"),
        ({"num_negatives": True}, "num_negatives"),
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
        excluded |= {(u, i) for u in b["users"].tolist() for i in b.get("blocked_items", torch.zeros(0)).tolist()}
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
    # (u1, a) is a row of all three files: removing the training row removes its copies from the validation and test
    # splits alike (a deleted interaction is no evaluation target: that would reward a model that still holds it).
    module = RecDataModule(triple(tmp_path, val=VAL + "u1,a\n", test=TEST + "u1,a\n"), split="given", num_negatives=1)
    module.setup()
    row = torch.nonzero((module.train.users == 0) & (module.train.items == 0)).flatten()
    removed = module.remove(row, users=torch.tensor([1]), items=torch.tensor([1]))  # the row (u1, a), user u2, item b
    assert len(removed.users) == 4
    assert pairs(module.train) == [("u3", "a"), ("u3", "c")]
    assert pairs(module.val) == [("u1", "c")]
    assert pairs(module.test) == [("u1", "d"), ("u4", "a")]
    assert ranked(module.val_dataloader()) == ([0], {(0, 2)}, {(0, 1)})  # item b, removed whole, is excluded for every user
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


# ----------------------------------------------------------------------------- sampled evaluation


def candidate_rows(loader) -> dict[int, tuple[int, ...]]:
    """Each evaluated user's candidates (valid ones only), checked to be distinct and eligible."""
    out = {}
    for b in loader:
        assert b["candidate_items"].dtype == torch.int32
        for row, user in enumerate(b["users"].tolist()):
            n = int(b["num_candidates"][row])
            cands = b["candidate_items"][row]
            assert (cands[n:] == -1).all()
            out[user] = tuple(cands[:n].tolist())
    return out


def forbidden(module, split) -> dict[int, set[int]]:
    """Per user, what it may not get as a candidate in ``split``: its targets and exclusions."""
    tables = [module.val, module.train] if split == "val" else [module.test, module.train, module.val]
    seen: dict[int, set[int]] = {}
    for table in tables:
        for u, i in zip(table.users.tolist(), table.items.tolist()):
            seen.setdefault(u, set()).add(i)
    return seen


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10", 1e3])
def test_eval_candidates_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"RecDataModule\(eval_candidates=\.\.\.\) must be None .* or an int >= 1 .*got"):
        RecDataModule(Synthetic(), eval_candidates=value)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("count", [1, 4, 19, 1000])
def test_candidates_are_distinct_eligible_items(split, count):
    """Never a target, an excluded (seen) item or a repeat; min(count, eligible) of them."""
    module = dm(eval_candidates=count)
    loader = module.val_dataloader() if split == "val" else module.test_dataloader()
    got = candidate_rows(loader)
    seen = forbidden(module, split)
    assert sorted(got) == sorted(set((module.val if split == "val" else module.test).users.tolist()))
    for user, cands in got.items():
        eligible = set(range(module.num_items)) - seen[user]
        assert len(set(cands)) == len(cands) == min(count, len(eligible))
        assert set(cands) <= eligible
        if count >= len(eligible):
            assert set(cands) == eligible  # every eligible item: the full ranking


def test_candidates_are_the_same_for_every_batch_size_epoch_and_instance():
    base = candidate_rows(dm(eval_candidates=7, eval_batch_size=16).test_dataloader())
    for eval_batch_size in (1, 3, 1000):
        module = dm(eval_candidates=7, eval_batch_size=eval_batch_size)
        loader = module.test_dataloader()
        assert candidate_rows(loader) == base and candidate_rows(loader) == base  # two epochs
    assert candidate_rows(dm(eval_candidates=7, seed=1).test_dataloader()) != base
    val = candidate_rows(dm(eval_candidates=7).val_dataloader())
    assert any(val[u] != base[u] for u in set(val) & set(base))  # each split draws its own


def test_full_ranking_batches_carry_no_candidates():
    assert all("candidate_items" not in b for b in dm().test_dataloader())


def test_removed_users_and_items_are_never_candidates_afterwards():
    """Removals reach a loader made before them (Lightning keeps its validation loader through a fit):
    removed users are not evaluated, removed items are never candidates, other users keep theirs."""
    module = dm(eval_candidates=12)
    loaders = {split: getattr(module, f"{split}_dataloader")() for split in ("val", "test")}
    before = {split: candidate_rows(loader) for split, loader in loaders.items()}
    gone_user, gone_item = 5, int(module.test.items[0])
    rows = torch.nonzero(module.train.users == 7).flatten()[:2]  # two training rows of user 7
    touched = {7} | set(module.train.users[module.train.items == gone_item].tolist())
    module.remove(rows, users=torch.tensor([gone_user]), items=torch.tensor([gone_item]))
    for split, loader in loaders.items():
        after = candidate_rows(loader)
        assert gone_user not in after and all(gone_item not in cands for cands in after.values())
        assert after == candidate_rows(getattr(module, f"{split}_dataloader")())  # what a fresh loader gives
        seen = forbidden(module, split)
        for user, cands in after.items():
            assert not set(cands) & seen[user]
            if user not in touched and gone_item not in before[split][user]:
                assert cands == before[split][user], (split, user)  # only the removals change candidates


def test_removed_items_are_excluded_for_every_user_in_full_ranking():
    """Full ranking scores every item: a deleted item is excluded for every evaluated user, as sampled candidates skip it."""
    module = dm()
    loader = module.val_dataloader()
    gone = int(module.train.items[0])
    module.remove(torch.zeros(0, dtype=torch.long), items=torch.tensor([gone]))
    users, _, excluded = ranked(loader)
    assert users and all((user, gone) in excluded for user in users)
    model = MF(module.num_users, module.num_items, embedding_dim=4)
    before = model.evaluate(module.val_dataloader(), prefix="val")
    with torch.no_grad():
        model.item_embedding.weight[gone] = 100 * model.user_embedding.weight.mean(0)  # the deleted item on top of every list
    assert model.evaluate(module.val_dataloader(), prefix="val") == before


def test_full_ranking_loader_made_before_a_removal_serves_the_data_after_it():
    module = dm()
    loader = module.test_dataloader()
    module.remove(torch.tensor([0]), users=torch.tensor([3]), items=torch.tensor([int(module.test.items[0])]))
    assert ranked(loader) == ranked(module.test_dataloader())
    assert 3 not in ranked(loader)[0]


def test_a_restored_state_with_other_candidates_warns():
    module = dm(eval_candidates=5)
    state = module.state_dict()
    assert state["eval_candidates"] == 5 and "eval_candidates" not in dm().state_dict()
    with pytest.warns(UserWarning, match=r"eval_candidates=5, this RecDataModule with eval_candidates=9.*not comparable"):
        dm(eval_candidates=9).load_state_dict(state)
    dm(eval_candidates=5).load_state_dict(state)  # the same series: no warning
    dm().load_state_dict(state)  # full ranking: other metric names, nothing to mix


def test_sampled_metrics_equal_full_ranking_of_the_candidates_built_densely():
    """The model scores targets and candidates only; a dense oracle scores every item, sets all but
    the candidates and targets to -inf and excludes them: the same figures, exactly."""
    torch.manual_seed(0)
    module = dm(eval_candidates=6, eval_batch_size=7)
    model = MF(module.num_users, module.num_items, embedding_dim=4)
    got = model.evaluate(module.test_dataloader(), "test")
    oracle = FullRankingMetrics(model.top_k)
    users_vectors, item_vectors = model.representations()
    with torch.no_grad():
        for b in module.test_dataloader():
            keep = torch.zeros(len(b["users"]), module.num_items, dtype=torch.bool)
            keep[b["target_rows"], b["target_items"]] = True
            valid = torch.arange(6) < b["num_candidates"].unsqueeze(1)
            keep[torch.arange(len(b["users"])).unsqueeze(1).expand(-1, 6)[valid], b["candidate_items"][valid].long()] = True
            scores = model.interact(users_vectors[b["users"]].unsqueeze(1), item_vectors.unsqueeze(0))
            target = torch.zeros_like(keep)
            target[b["target_rows"], b["target_items"]] = True
            oracle.update(scores.masked_fill(~keep, float("-inf")), target, ~keep)
    expected = {f"test/sampled/{k}": v.item() for k, v in oracle.compute().items()}
    assert got == {**expected, "test/sampled/candidates": 6.0}


def test_as_many_candidates_as_eligible_items_give_the_full_ranking_metrics():
    torch.manual_seed(0)
    model = MF(40, 30, embedding_dim=4)
    for split in ("val", "test"):
        full = model.evaluate(getattr(dm(), f"{split}_dataloader")(), split)
        sampled = model.evaluate(getattr(dm(eval_candidates=30), f"{split}_dataloader")(), split)
        assert sampled.pop(f"{split}/sampled/candidates") == 30.0
        assert {k.replace("/sampled", ""): v for k, v in sampled.items()} == full


def test_a_fit_with_eval_candidates_logs_sampled_metrics_and_the_candidates(tmp_path):
    module = dm(eval_candidates=8, val_fraction=0.3)
    model = MF(module.num_users, module.num_items, embedding_dim=4, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, module)
    logged = trainer.callback_metrics
    assert {"val/sampled/ndcg@20", "val/sampled/recall@10", "val/sampled/auc"} <= set(logged)
    assert logged["val/sampled/candidates"].item() == 8.0
    assert not any(k.startswith("val/") and "/sampled/" not in k for k in logged)
    tested = trainer.test(model, module, verbose=False)[0]
    assert tested["test/sampled/candidates"] == 8.0 and "test/sampled/ndcg@20" in tested and "test/ndcg@20" not in tested
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/sampled/ndcg@20" in header and "val/ndcg@20" not in header
    assert (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text().count("eval_candidates: 8") == 1


def test_a_k_core_that_leaves_no_interactions_is_refused():
    with pytest.raises(ValueError, match="k_core=100.*leaves no interactions"):
        RecDataModule(Synthetic(num_users=20, num_items=10, density=0.3), k_core=100).setup()


def test_a_source_that_gives_nothing_or_no_timestamps_for_leave_last_out_says_what_to_change(tmp_path):
    """A threshold that drops every row was reported as a k_core that leaves nothing, and leave_last_out on a file
    without timestamps advised `random_holdout`, a split the datamodule does not accept."""
    (tmp_path / "inter.csv").write_text("user,item,rating\n" + "".join(f"u{u},i{i},{1 + (u + i) % 5}\n" for u in range(6) for i in range(5)))
    columns = {"user": "user", "item": "item", "rating": "rating"}
    with pytest.raises(ValueError, match=r"CSVSource gives no training interactions: .* threshold"):
        RecDataModule(CSVSource("inter.csv", root=str(tmp_path), columns=columns, threshold=6)).setup()
    with pytest.raises(ValueError, match=r"split='leave_last_out'.* gives no timestamps: use split='random'"):
        RecDataModule(CSVSource("inter.csv", root=str(tmp_path), columns=columns), split="leave_last_out").setup()


def test_evaluating_a_split_without_users_gives_no_figures_not_zeros(recwarn):
    """The callback's utility logged every unlearn/val/* as 0.0 (and torchmetrics warned) when the data has no validation split."""
    module = RecDataModule(Synthetic(num_users=30, num_items=20, seed=0), val_fraction=0.0)
    module.setup()
    model = MF(module.num_users, module.num_items, embedding_dim=4)
    assert model.evaluate(module.val_dataloader(), "val") == {}
    assert set(model.evaluate(module.test_dataloader(), "test")) >= {"test/recall@20", "test/ndcg@20"}
    assert not [w for w in recwarn if "before the ``update``" in str(w.message)]
