"""Property-based tests: deletion removes exactly what was asked, and bad input changes nothing.

Random tables (integer or string raw ids, duplicate rows, ids known to the maps but without
rows), random requests (empty, duplicated, in equivalent id forms, with unknown ids, pairs
that are not rows, malformed ids) and random requests files are checked against a brute-force
answer computed from the raw rows. Every test is derandomized (the same examples on every
run, in CI too) and keeps no example database, so runs are reproducible and leave no files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_unlearn.data import Interactions, RecDataModule, Synthetic
from lightning_unlearn.data.datamodule import DataFingerprintMismatch
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.methods import FineTune
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest

FAST = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=15)

# ----------------------------------------------------------------------------- strategies

SMALL_INTS = st.integers(-5, 40)
ANY_INTS = st.one_of(SMALL_INTS, st.integers(-(2**63), 2**63 - 1))
# Raw string ids: printable, non-blank, no surrounding whitespace (requests files strip fields).
TEXT_IDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=4)


@st.composite
def tables(draw, max_rows: int = 24) -> Interactions:
    """A table with integer or string ids, possibly duplicate rows, and ids that have no rows."""
    ids = draw(st.sampled_from([ANY_INTS, TEXT_IDS]))
    user_pool = draw(st.lists(ids, min_size=1, max_size=7, unique=True))
    item_pool = draw(st.lists(ids, min_size=1, max_size=7, unique=True))
    rows = draw(st.lists(st.tuples(st.sampled_from(user_pool), st.sampled_from(item_pool)), max_size=max_rows))
    # Every pool id enters the maps through padding rows, which are then dropped: some ids have no rows.
    width = max(len(user_pool), len(item_pool))
    pad = [(user_pool[k % len(user_pool)], item_pool[k % len(item_pool)]) for k in range(width)]
    every = rows + pad
    full = Interactions.from_raw([u for u, _ in every], [i for _, i in every])
    return full.select(torch.arange(len(rows)))


def raw_rows(data: Interactions) -> list[tuple]:
    """The table's rows as raw ``(user, item)`` ids (Python values)."""
    return [(data.user_ids[u].item(), data.item_ids[i].item()) for u, i in zip(data.users.tolist(), data.items.tolist())]


def known(ids: np.ndarray) -> list:
    return [v.item() for v in ids]


def other_forms(value):
    """Equivalent ways to name a raw id in a request: the value, and for integers its string
    (padded with spaces) and, when exact, a float."""
    forms = [st.just(value)]
    if isinstance(value, int):
        forms.append(st.just(str(value)))
        forms.append(st.just(f" {value} "))
        if abs(value) < 2**53:
            forms.append(st.just(float(value)))
    return st.one_of(forms)


@st.composite
def valid_requests(draw, data: Interactions):
    """``(request_kwargs, pairs, users, items)``: parts drawn from the table's rows and maps, with
    duplicates, in any id form; the last three are the canonical raw ids asked for."""
    rows = raw_rows(data)
    pairs = draw(st.lists(st.sampled_from(rows), max_size=4)) if rows else []
    users = draw(st.lists(st.sampled_from(known(data.user_ids)), max_size=2))
    items = draw(st.lists(st.sampled_from(known(data.item_ids)), max_size=2))
    pairs = pairs + draw(st.lists(st.sampled_from(pairs), max_size=2)) if pairs else pairs  # duplicates
    kwargs = {
        "pairs": [(draw(other_forms(u)), draw(other_forms(i))) for u, i in pairs],
        "users": [draw(other_forms(u)) for u in users],
        "items": [draw(other_forms(i)) for i in items],
    }
    return kwargs, set(pairs), set(users), set(items)


def expected_rows(data: Interactions, pairs: set, users: set, items: set) -> list[int]:
    """Brute force: every row whose pair, user or item is asked for."""
    return [r for r, (u, i) in enumerate(raw_rows(data)) if (u, i) in pairs or u in users or i in items]


def snapshot(data: Interactions) -> tuple:
    return (data.users.clone(), data.items.clone(), data.user_ids.copy(), data.item_ids.copy(),
            None if data.ratings is None else data.ratings.clone())


def assert_unchanged(data: Interactions, before: tuple) -> None:
    users, items, user_ids, item_ids, ratings = before
    assert torch.equal(data.users, users) and torch.equal(data.items, items)
    assert np.array_equal(data.user_ids, user_ids) and np.array_equal(data.item_ids, item_ids)
    assert (ratings is None and data.ratings is None) or torch.equal(data.ratings, ratings)


def unknown_id(data_ids: np.ndarray, draw) -> object:
    """An id of the same kind as the map's that the map does not hold."""
    taken = set(known(data_ids))
    pool = ANY_INTS if data_ids.dtype.kind in "iu" else TEXT_IDS
    return draw(pool.filter(lambda v: v not in taken))


# ----------------------------------------------------------------------------- Interactions


@FAST
@given(st.data())
def test_without_partitions_rows_exactly(data_strategy):
    data = data_strategy.draw(tables())
    n = len(data)
    before = snapshot(data)
    as_mask = data_strategy.draw(st.booleans())
    if as_mask:
        mask = torch.tensor(data_strategy.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
        gone = set(torch.nonzero(mask).flatten().tolist())
        kept, removed = data.without(mask)
    else:
        rows = data_strategy.draw(st.lists(st.integers(0, n - 1), max_size=2 * n)) if n else []
        gone = set(rows)
        kept, removed = data.without(torch.tensor(rows, dtype=torch.long))
    rows_raw = raw_rows(data)
    assert raw_rows(kept) == [rows_raw[r] for r in range(n) if r not in gone]  # order kept, nothing extra lost
    assert raw_rows(removed) == [rows_raw[r] for r in sorted(gone)]
    assert np.array_equal(kept.user_ids, data.user_ids) and np.array_equal(removed.item_ids, data.item_ids)
    assert_unchanged(data, before)


@FAST
@given(st.data())
def test_without_refuses_rows_outside_the_table_and_changes_nothing(data_strategy):
    data = data_strategy.draw(tables())
    n = len(data)
    before = snapshot(data)
    bad = data_strategy.draw(st.sampled_from(["negative", "too_large", "float", "short_mask", "2d"]))
    if bad == "negative":  # -1 must not silently mean "the last row"
        rows, error, match = torch.tensor([0, -data_strategy.draw(st.integers(1, n + 3))])[1 if n == 0 else 0:], IndexError, r"\[0, "
    elif bad == "too_large":
        rows, error, match = torch.tensor([n + data_strategy.draw(st.integers(0, 3))]), IndexError, r"\[0, "
    elif bad == "float":
        rows, error, match = torch.tensor([0.0]), TypeError, "integer indices or a boolean mask"
    elif bad == "short_mask":
        rows, error, match = torch.ones(n + 1, dtype=torch.bool), IndexError, f"length {n}"
    else:
        rows, error, match = torch.zeros(1, 1, dtype=torch.long), IndexError, "1-D"
    with pytest.raises(error, match=match):
        data.without(rows)
    assert_unchanged(data, before)


@FAST
@given(tables())
def test_csr_views_hold_every_row_once(data):
    for csr, keys, other, size in ((data.by_user, data.users, data.items, data.num_users),
                                   (data.by_item, data.items, data.users, data.num_items)):
        assert csr.indptr[-1] == len(data) and len(csr.indptr) == size + 1
        assert sorted(csr.rows.tolist()) == list(range(len(data)))
        for k in range(size):
            segment = csr.rows[csr.indptr[k]:csr.indptr[k + 1]]
            assert (keys[segment] == k).all() and torch.equal(csr.cols[csr.indptr[k]:csr.indptr[k + 1]], other[segment])


# ----------------------------------------------------------------------------- DeletionRequest


@FAST
@given(st.data())
def test_resolve_removes_exactly_the_rows_asked_for(data_strategy):
    data = data_strategy.draw(tables())
    kwargs, pairs, users, items = data_strategy.draw(valid_requests(data))
    before = snapshot(data)
    if not (pairs or users or items):
        with pytest.raises(InvalidDeletionRequest, match="empty"):
            DeletionRequest(**kwargs)
        return
    request = DeletionRequest(**kwargs)
    # The request folds repeats of one id form (7.0 is 7); "7" and " 7 " stay apart until resolved.
    forms = lambda values: len(dict.fromkeys(int(v) if isinstance(v, float) else v for v in values))  # noqa: E731
    assert (len(request.users), len(request.items)) == (forms(kwargs["users"]), forms(kwargs["items"]))
    assert len(request.pairs) == len(dict.fromkeys((forms([u]) and (int(u) if isinstance(u, float) else u),
                                                     int(i) if isinstance(i, float) else i) for u, i in kwargs["pairs"]))
    done = request.resolve(data)
    expected = expected_rows(data, pairs, users, items)
    assert done.rows.tolist() == expected
    assert done.num_pairs == len(pairs) and done.num_ignored == 0
    assert done.users.tolist() == sorted(data.user_index(list(users)).tolist())
    assert done.items.tolist() == sorted(data.item_index(list(items)).tolist())
    kept, removed = data.without(done.rows)
    for u, i in raw_rows(kept):  # nothing that was asked to go stays ...
        assert (u, i) not in pairs and u not in users and i not in items
    everything = raw_rows(data)  # ... and nothing else goes
    assert sorted(raw_rows(kept) + raw_rows(removed)) == sorted(everything)
    assert len(kept) == len(data) - len(expected)
    assert_unchanged(data, before)


@FAST
@given(st.data())
def test_digest_ignores_order_duplicates_id_forms_and_row_order(data_strategy):
    data = data_strategy.draw(tables())
    assume(len(data) > 0)
    kwargs, pairs, users, items = data_strategy.draw(valid_requests(data))
    assume(pairs or users or items)
    done = DeletionRequest(**kwargs).resolve(data)
    shuffled = {k: data_strategy.draw(st.permutations(v)) + v[:1] for k, v in kwargs.items()}  # reordered, repeated
    again = DeletionRequest(**shuffled).resolve(data)
    assert again.digest == done.digest and torch.equal(again.rows, done.rows)
    order = torch.tensor(data_strategy.draw(st.permutations(range(len(data)))), dtype=torch.long)
    permuted = data.select(order)
    moved = DeletionRequest(**kwargs).resolve(permuted)
    assert moved.digest == done.digest
    assert sorted(raw_rows(permuted.select(moved.rows))) == sorted(raw_rows(data.select(done.rows)))


@FAST
@given(st.data())
def test_unknown_ids_are_refused_whatever_missing_says_and_nothing_changes(data_strategy):
    data = data_strategy.draw(tables())
    kwargs, *_ = data_strategy.draw(valid_requests(data))
    where = data_strategy.draw(st.sampled_from(["users", "items", "pair_user", "pair_item"]))
    ids = data.user_ids if where in ("users", "pair_user") else data.item_ids
    stranger = unknown_id(ids, data_strategy.draw)
    if where in ("users", "items"):
        kwargs[where] = kwargs[where] + [stranger]
    else:
        other = known(data.item_ids if where == "pair_user" else data.user_ids)[0]
        kwargs["pairs"] = kwargs["pairs"] + [(stranger, other) if where == "pair_user" else (other, stranger)]
    before = snapshot(data)
    missing = data_strategy.draw(st.sampled_from(["error", "ignore"]))
    with pytest.raises(InvalidDeletionRequest, match="unknown (user|item) id") as err:
        DeletionRequest(**kwargs).resolve(data, missing=missing)
    assert repr(stranger) in str(err.value) and "Ids must be raw ids" in str(err.value)
    assert_unchanged(data, before)


@FAST
@given(st.data())
def test_pairs_that_are_not_rows_are_refused_or_ignored_as_asked(data_strategy):
    data = data_strategy.draw(tables())
    present = set(raw_rows(data))
    absent = [(u, i) for u in known(data.user_ids) for i in known(data.item_ids) if (u, i) not in present]
    assume(absent)
    kwargs, pairs, users, items = data_strategy.draw(valid_requests(data))
    extra = data_strategy.draw(st.lists(st.sampled_from(absent), min_size=1, max_size=3))
    kwargs["pairs"] = kwargs["pairs"] + extra
    before = snapshot(data)
    with pytest.raises(InvalidDeletionRequest, match="not (a row|rows) of this table") as err:
        DeletionRequest(**kwargs).resolve(data)
    # ignoring them is advised only where something would be left to remove
    assert f"({extra[0][0]!r}, {extra[0][1]!r})" in str(err.value) and ("missing='ignore'" in str(err.value)) == bool(pairs or users or items)
    if pairs or users or items:
        done = DeletionRequest(**kwargs).resolve(data, missing="ignore")
        assert done.rows.tolist() == expected_rows(data, pairs, users, items)
        assert done.num_ignored == len(set(extra)) and done.num_pairs == len(pairs)
    else:
        with pytest.raises(InvalidDeletionRequest, match="empty after dropping"):
            DeletionRequest(**kwargs).resolve(data, missing="ignore")
    assert_unchanged(data, before)


BAD_IDS = st.sampled_from([None, True, False, 2.5, -0.5, math.nan, math.inf, -math.inf, "", "   ", "\t", b"7",
                           [1], (1,), {"user": 1}, {1}, object(), 1 + 2j, np.bool_(True), np.float64(0.25)])


@FAST
@given(st.data())
def test_malformed_ids_are_refused_when_the_request_is_made(data_strategy):
    bad = data_strategy.draw(BAD_IDS)
    good = data_strategy.draw(st.lists(SMALL_INTS, max_size=3))
    where = data_strategy.draw(st.sampled_from(["users", "items", "pair_user", "pair_item"]))
    kwargs = {"users": list(good), "items": list(good), "pairs": [(g, g) for g in good]}
    position = data_strategy.draw(st.integers(0, len(good)))
    if where in ("users", "items"):
        kwargs[where].insert(position, bad)
        match = f"`{where}` has 1 invalid id"
    else:
        kwargs["pairs"].insert(position, (bad, 1) if where == "pair_user" else (1, bad))
        match = "`pairs` has 1 pair with invalid ids"
    with pytest.raises(InvalidDeletionRequest, match=match) as err:
        DeletionRequest(**kwargs)
    assert "integers or non-empty strings" in str(err.value)


@FAST
@given(st.sampled_from([(1,), (1, 2, 3), (), "ab", "a", 5, None, b"xy", 2.0]),
       st.lists(st.tuples(SMALL_INTS, SMALL_INTS), max_size=3))
def test_pairs_that_are_not_two_tuples_are_refused(bad, good):
    with pytest.raises(InvalidDeletionRequest, match="`pairs` has 1 entry that is not a \\(user, item\\) pair"):
        DeletionRequest(pairs=good + [bad])


@FAST
@given(st.sampled_from(["users", "items", "pairs"]), st.sampled_from([5, "12", b"12", 3.0, None, True]))
def test_a_scalar_where_a_sequence_belongs_is_refused(column, value):
    with pytest.raises(InvalidDeletionRequest, match=f"`{column}` must be a sequence of ids"):
        DeletionRequest(**{column: value})


# ----------------------------------------------------------------------------- requests files


def write_csv(path: Path, header: list[str], records: list[tuple]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    path.write_text(buffer.getvalue(), encoding="utf-8")


@SLOW
@given(st.data())
def test_request_files_round_trip(tmp_path_factory, data_strategy):
    data = data_strategy.draw(tables())
    kwargs, pairs, users, items = data_strategy.draw(valid_requests(data))
    assume(pairs or users or items)
    folder = tmp_path_factory.mktemp("files")
    canonical = DeletionRequest(pairs=list(pairs), users=list(users), items=list(items))
    # JSON lines keep the id types: the file's request is the canonical one, in any line order.
    records = [{"user": u, "item": i} for u, i in pairs] + [{"user": u} for u in users] + [{"item": i} for i in items]
    records = data_strategy.draw(st.permutations(records))
    lines = [json.dumps(r) for r in records]
    blank = data_strategy.draw(st.integers(0, len(lines)))
    jsonl = folder / "forget.jsonl"
    jsonl.write_text("\n".join(lines[:blank] + ["  "] + lines[blank:]) + data_strategy.draw(st.sampled_from(["", "\n", "\r\n"])),
                     encoding="utf-8")
    from_jsonl = DeletionRequest.from_file(jsonl)
    assert sorted(map(repr, from_jsonl.pairs)) == sorted(map(repr, canonical.pairs))
    assert set(from_jsonl.users) == users and set(from_jsonl.items) == items
    assert from_jsonl.resolve(data).digest == canonical.resolve(data).digest
    # CSV holds one kind per file and reads every id as text; it resolves to the same rows.
    for header, values in ((["user", "item"], sorted(pairs, key=repr)), (["user"], [(u,) for u in users]), (["item"], [(i,) for i in items])):
        if not values:
            continue
        path = folder / f"forget-{len(header)}{header[0]}.csv"
        write_csv(path, header, values)
        request = DeletionRequest.from_file(path)
        expected = DeletionRequest(**({"pairs": values} if len(header) == 2 else {header[0] + "s": [v for v, in values]}))
        assert request.resolve(data).digest == expected.resolve(data).digest


@SLOW
@given(st.data())
def test_a_corrupt_line_is_refused_naming_the_path_and_line(tmp_path_factory, data_strategy):
    folder = tmp_path_factory.mktemp("corrupt")
    ids = data_strategy.draw(st.lists(SMALL_INTS, min_size=1, max_size=6))
    kind = data_strategy.draw(st.sampled_from(["csv", "jsonl"]))
    if kind == "csv":
        lines = ["user,item"] + [f"{u},{u + 1}" for u in ids]
        garbage = data_strategy.draw(st.sampled_from(["1,2,3", "7", "1,", ",2", '"unterminated,3']))
        match = "field|empty `(user|item)` id|malformed CSV|quoted field runs on"
    else:
        lines = [json.dumps({"user": u, "item": u + 1}) for u in ids]
        garbage = data_strategy.draw(st.sampled_from(['{"user": 1', "[1, 2]", '{"user": 1, "color": 2}', "{}",
                                                      '{"user": null}', '{"item": 2.5}', '{"user": ""}', "nan", '"x"']))
        match = "invalid JSON|expected a JSON object|unknown key|empty object|must be an integer|empty `user` id"
    position = data_strategy.draw(st.integers(1 if kind == "csv" else 0, len(lines)))
    lines.insert(position, garbage)
    path = folder / f"forget.{kind}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InvalidDeletionRequest, match=match) as err:
        DeletionRequest.from_file(path)
    assert re.match(rf"{re.escape(str(path))}, line {position + 1}(: | \(a quoted field runs on)", str(err.value))
    assert "Requests files are CSV" in str(err.value)


@SLOW
@given(st.binary(max_size=80), st.sampled_from([".csv", ".jsonl", ".json", ".txt", ""]))
def test_any_file_content_gives_a_request_or_the_documented_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"forget{suffix}"
    path.write_bytes(content)
    try:
        request = DeletionRequest.from_file(path)
    except InvalidDeletionRequest as err:
        assert str(err).startswith(str(path)) and "Requests files are CSV" in str(err)
    else:
        assert isinstance(request, DeletionRequest) and (request.pairs or request.users or request.items)


# ----------------------------------------------------------------------------- datamodule, callback and journal


def tiny_datamodule(seed: int = 0) -> RecDataModule:
    dm = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.3, seed=seed), num_negatives=2, batch_size=16, seed=seed)
    dm.setup()
    return dm


def splits(dm: RecDataModule) -> tuple:
    return tuple(t.keys.clone() for t in (dm.train, dm.val, dm.test)) + (dm.train_negatives.clone(),)


def assert_same_splits(a: tuple, b: tuple) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@st.composite
def datamodule_requests(draw, dm: RecDataModule):
    """A valid request against the datamodule's current training split (raw ids)."""
    kwargs, pairs, users, items = draw(valid_requests(dm.train))
    assume(pairs or users or items)
    return DeletionRequest(**kwargs), pairs, users, items


@SLOW
@given(st.data())
def test_datamodule_removal_is_exact_in_every_split_and_survives_a_restart(data_strategy):
    dm = tiny_datamodule()
    negatives = {(u, i): n for u, i, n in zip(dm.train.users.tolist(), dm.train.items.tolist(), dm.train_negatives.tolist())}
    asked_pairs, asked_users, asked_items = set(), set(), set()
    for _ in range(data_strategy.draw(st.integers(1, 3))):
        if len(dm.train) == 0:
            break
        request, pairs, users, items = data_strategy.draw(datamodule_requests(dm))
        done = request.resolve(dm.train)
        expected_train = [r for r in raw_rows(dm.train) if not (r in pairs or r[0] in users or r[1] in items)]
        expected_eval = [[r for r in raw_rows(t) if not (r[0] in users or r[1] in items)] for t in (dm.val, dm.test)]
        removed = dm.remove(done.rows, done.users, done.items)
        assert raw_rows(dm.train) == expected_train
        assert [raw_rows(dm.val), raw_rows(dm.test)] == expected_eval
        assert len(removed) == done.num_rows
        asked_pairs |= pairs
        asked_users |= users
        asked_items |= items
    for u, i in raw_rows(dm.train):
        assert (u, i) not in asked_pairs and u not in asked_users and i not in asked_items
    # Every retained row keeps its own fixed negatives.
    for u, i, n in zip(dm.train.users.tolist(), dm.train.items.tolist(), dm.train_negatives.tolist()):
        assert negatives[(u, i)] == n
    # A fresh datamodule given the state (before or after its own setup) holds exactly the same data.
    state = dm.state_dict()
    for set_up_first in (False, True):
        fresh = RecDataModule(Synthetic(num_users=12, num_items=10, density=0.3, seed=0), num_negatives=2, batch_size=16, seed=0)
        if set_up_first:
            fresh.setup()
        fresh.load_state_dict(state)
        fresh.setup()
        assert_same_splits(splits(fresh), splits(dm))


@SLOW
@given(st.data())
def test_datamodule_remove_refuses_bad_indices_and_changes_nothing(data_strategy):
    dm = tiny_datamodule()
    before = splits(dm)
    n = len(dm.train)
    bad = data_strategy.draw(st.sampled_from(["negative_row", "large_row", "float_rows", "short_mask", "negative_user",
                                              "large_item", "float_users"]))
    empty = torch.zeros(0, dtype=torch.long)
    rows, users, items = empty, None, None
    if bad == "negative_row":
        rows = torch.tensor([0, -data_strategy.draw(st.integers(1, 5))])
    elif bad == "large_row":
        rows = torch.tensor([n + data_strategy.draw(st.integers(0, 5))])
    elif bad == "float_rows":
        rows = torch.tensor([0.0, 1.0])
    elif bad == "short_mask":
        rows = torch.ones(n - 1, dtype=torch.bool)
    elif bad == "negative_user":
        users = torch.tensor([-1])
    elif bad == "large_item":
        items = torch.tensor([dm.num_items + data_strategy.draw(st.integers(0, 3))])
    else:
        users = torch.tensor([1.5])
    with pytest.raises((IndexError, TypeError), match=r"\[0, |boolean row mask must be 1-D of length|integer"):
        dm.remove(rows, users, items)
    assert_same_splits(splits(dm), before)
    assert dm.state_dict()["train_keys"].numel() == 0


def test_datamodule_remove_takes_a_boolean_mask_as_a_mask():
    dm = tiny_datamodule()
    mask = torch.zeros(len(dm.train), dtype=torch.bool)
    mask[[2, 5]] = True
    expected = [r for k, r in enumerate(raw_rows(dm.train)) if k not in (2, 5)]
    removed = dm.remove(mask)
    assert len(removed) == 2 and raw_rows(dm.train) == expected


INVALID = st.sampled_from(["unknown_user", "unknown_item", "absent_pair", "unknown_pair_user"])


@SLOW
@given(st.data())
def test_a_bad_request_leaves_datamodule_model_journal_and_queue_unchanged(tmp_path_factory, data_strategy):
    folder = tmp_path_factory.mktemp("journal")
    dm = tiny_datamodule()
    model = MF(dm.num_users, dm.num_items, embedding_dim=4)
    good = UnlearningCallback(FineTune(epochs=1, batch_size=64), requests=[DeletionRequest(users=[0])], dirpath=folder, evaluate=False)
    good.apply_pending(model, dm)  # a journal with history, and one removal already made
    journal_bytes = (folder / "journal.jsonl").read_bytes()
    before_data, before_model = splits(dm), {k: v.clone() for k, v in model.state_dict().items()}
    kind = data_strategy.draw(INVALID)
    present = set(raw_rows(dm.train))
    if kind == "unknown_user":
        request, match = DeletionRequest(users=[1, 10_000 + data_strategy.draw(st.integers(0, 99))]), "unknown user id"
    elif kind == "unknown_item":
        request, match = DeletionRequest(items=["no-such-item"]), "unknown item id"
    elif kind == "unknown_pair_user":
        request, match = DeletionRequest(pairs=[(-7, 1)]), "unknown user id"
    else:
        absent = [(u, i) for u in range(dm.num_users) for i in range(dm.num_items) if (u, i) not in present]
        request, match = DeletionRequest(pairs=[data_strategy.draw(st.sampled_from(absent))]), "not a row"
    callback = good
    callback.request(request)
    with pytest.raises(InvalidDeletionRequest, match=match):
        callback.apply_pending(model, dm)
    assert_same_splits(splits(dm), before_data)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before_model[name]), name
    assert (folder / "journal.jsonl").read_bytes() == journal_bytes
    assert callback.pending == 1 and len(callback.reports) == 1  # the refused request stays at the head of the queue
    assert sorted(p.name for p in folder.iterdir()) == ["journal.jsonl", "journal.key", "journal.lock",
                                                        next(folder.glob("unlearned-*.ckpt")).name]


@SLOW
@given(st.integers(0, 3), st.sampled_from(["seed", "density", "num_negatives", "split"]))
def test_removals_recorded_on_other_data_are_refused_naming_both_fingerprints(seed, change):
    dm = tiny_datamodule(seed)
    dm.remove(torch.tensor([0, 3]))
    state = dm.state_dict()
    options = {"seed": seed, "density": 0.3, "num_negatives": 2, "split": "random"}
    options[change] = {"seed": seed + 1, "density": 0.4, "num_negatives": 3, "split": "leave_last_out"}[change]
    source = Synthetic(num_users=12, num_items=10, density=options["density"], seed=seed)
    other = RecDataModule(source, num_negatives=options["num_negatives"], split=options["split"], batch_size=16, seed=options["seed"])
    other.setup()
    before = splits(other)
    with pytest.raises(DataFingerprintMismatch) as err:
        other.load_state_dict(state)
    message = str(err.value)
    assert state["fingerprint"] in message and other.data_fingerprint in message
    assert "same data" in message
    assert_same_splits(splits(other), before)


@settings(FAST, max_examples=30)
@given(seed=st.integers(0, 10_000), sized=st.booleans())
def test_rows_touching_is_the_isin_mask(seed, sized):
    """The lookup-table masks equal the plain isin ones, with the table sizes given or inferred."""
    from lightning_unlearn.data.batches import TrainRows
    from lightning_unlearn.unlearning.methods.scope import rows_of_items, rows_of_users, rows_touching

    g = torch.Generator().manual_seed(seed)
    rows = TrainRows(torch.randint(0, 9, (40,), generator=g), torch.randint(0, 7, (40,), generator=g),
                     torch.randint(0, 7, (40, 2), generator=g))
    users, items = torch.randperm(9, generator=g)[:3], torch.randperm(7, generator=g)[:2]
    sizes = (9, 7) if sized else (None, None)
    by_user = torch.isin(rows.users, users)
    by_item = torch.isin(rows.items, items) | torch.isin(rows.negatives, items).any(1)
    assert torch.equal(rows_of_users(rows, users, sizes[0]), by_user)
    assert torch.equal(rows_of_items(rows, items, sizes[1]), by_item)
    assert torch.equal(rows_touching(rows, users, items, *sizes), by_user | by_item)
