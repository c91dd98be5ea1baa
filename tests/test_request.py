"""Tests of deletion requests (lightning_unlearn/unlearning/request.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.unlearning.request import DeletionRequest, InvalidDeletionRequest, ResolvedDeletion

# The table every exact test uses. Raw ids are distinctive so a leak in repr() is visible.
#   row:    0       1       2       3       4       5
USERS = [987654, 987654, 555001, 555001, 555001, 555002]
ITEMS = [111, 222, 111, 111, 333, 222]  # (555001, 111) occurs twice: rows 2 and 3
# Index maps (sorted raw ids): users 555001->0, 555002->1, 555003->2, 987654->3;
# items 111->0, 222->1, 333->2, 444->3. User 555003 and item 444 are known but have no rows.
U = {555001: 0, 555002: 1, 555003: 2, 987654: 3}
I = {111: 0, 222: 1, 333: 2, 444: 3}  # noqa: E741 - U and I, the user and item maps
ACCEPTED = "accepts interaction pairs (user, item) that are rows of the table, whole users and whole items"
FILE_FORMS = "`user,item` (pairs), `user` (whole users) or `item` (whole items)"


def table() -> Interactions:
    """The six rows above; an extra row gives the maps user 555003 and item 444, then is dropped."""
    full = Interactions.from_raw(USERS + [555003], ITEMS + [444])
    return full.select(torch.arange(len(USERS)))


def resolve(data: Interactions | None = None, missing: str = "error", **request) -> ResolvedDeletion:
    return DeletionRequest(**request).resolve(table() if data is None else data, missing=missing)


def assert_resolved(done: ResolvedDeletion, rows, users=(), items=(), kind=None, pairs=0, ignored=0) -> None:
    assert done.rows.tolist() == list(rows)
    assert done.users.tolist() == list(users)
    assert done.items.tolist() == list(items)
    assert done.rows.dtype == done.users.dtype == done.items.dtype == torch.long
    assert (done.kind, done.num_pairs, done.num_ignored) == (kind, pairs, ignored)
    assert (done.num_rows, done.num_users, done.num_items) == (len(rows), len(users), len(items))


def snapshot(data: Interactions) -> tuple:
    return data.users.clone(), data.items.clone(), data.user_ids.copy(), data.item_ids.copy()


def assert_unchanged(data: Interactions, before: tuple) -> None:
    users, items, user_ids, item_ids = before
    assert torch.equal(data.users, users) and torch.equal(data.items, items)
    assert np.array_equal(data.user_ids, user_ids) and np.array_equal(data.item_ids, item_ids)


def raises(*fragments: str):
    """Context manager: an InvalidDeletionRequest whose message contains every fragment."""
    return _Raises(fragments)


class _Raises:
    def __init__(self, fragments):
        self.fragments = fragments

    def __enter__(self):
        self.ctx = pytest.raises(InvalidDeletionRequest)
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.ctx.__exit__(*exc)
        message = str(self.info.value)
        for fragment in self.fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return suppressed


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def reference_digest(num_users: int, num_items: int, row_keys, users, items) -> str:
    """The documented byte layout, written out independently of the implementation."""
    blob = b"lightning_unlearn/deletion/v1\x00" + struct.pack("<qq", num_users, num_items)
    for section in (sorted(row_keys), sorted(users), sorted(items)):
        blob += struct.pack("<q", len(section)) + struct.pack(f"<{len(section)}q", *section)
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- exact resolution


def test_the_table_is_what_the_comments_say():
    data = table()
    assert data.users.tolist() == [U[u] for u in USERS]
    assert data.items.tolist() == [I[i] for i in ITEMS]
    assert (data.num_users, data.num_items) == (4, 4)


def test_a_pair_removes_its_row():
    assert_resolved(resolve(pairs=[(987654, 222)]), rows=[1], kind="interactions", pairs=1)


def test_a_pair_that_occurs_twice_removes_both_rows():
    assert_resolved(resolve(pairs=[(555001, 111)]), rows=[2, 3], kind="interactions", pairs=1)


def test_whole_users_remove_all_their_rows():
    assert_resolved(resolve(users=[555001]), rows=[2, 3, 4], users=[0], kind="users")
    assert_resolved(resolve(users=[987654, 555002]), rows=[0, 1, 5], users=[1, 3], kind="users")


def test_whole_items_remove_all_their_rows():
    assert_resolved(resolve(items=[111]), rows=[0, 2, 3], items=[0], kind="items")
    assert_resolved(resolve(items=[333, 222]), rows=[1, 4, 5], items=[1, 2], kind="items")


def test_mixed_request_removes_the_union_once():
    done = resolve(pairs=[(555002, 222), (987654, 111)], users=[987654], items=[333])
    assert_resolved(done, rows=[0, 1, 4, 5], users=[3], items=[2], kind="mixed", pairs=2)


def test_two_kinds_are_mixed_too():
    assert resolve(pairs=[(987654, 222)], items=[333]).kind == "mixed"
    assert resolve(users=[555002], items=[333]).kind == "mixed"


def test_known_user_or_item_without_rows_is_accepted():
    assert_resolved(resolve(users=[555003]), rows=[], users=[2], kind="users")
    assert_resolved(resolve(items=[444], users=[555002]), rows=[5], users=[1], items=[3], kind="mixed")


def test_resolution_works_on_a_table_without_rows():
    empty = table().select(torch.zeros(0, dtype=torch.long))
    assert_resolved(resolve(empty, users=[987654]), rows=[], users=[3], kind="users")
    with raises("(987654, 111)"):
        resolve(empty, pairs=[(987654, 111)])


def test_rows_match_a_brute_force_oracle_on_a_random_table():
    g = torch.Generator().manual_seed(0)
    n, num_users, num_items = 400, 30, 25
    data = Interactions(
        users=torch.randint(0, num_users, (n,), generator=g),
        items=torch.randint(0, num_items, (n,), generator=g),
        user_ids=np.arange(num_users) * 7 + 1000,
        item_ids=np.arange(num_items) * 3 + 50,
    )
    rows = list(zip(data.users.tolist(), data.items.tolist()))
    raw_pairs = [(int(data.user_ids[u]), int(data.item_ids[i])) for u, i in rows[::37]]
    whole_users, whole_items = [1000 + 7 * 4, 1000 + 7 * 9], [50 + 3 * 11]
    done = resolve(data, pairs=raw_pairs, users=whole_users, items=whole_items)

    pair_idx = {(u, i) for u, i in rows[::37]}
    user_idx = {(u - 1000) // 7 for u in whole_users}
    item_idx = {(i - 50) // 3 for i in whole_items}
    expected = [r for r, (u, i) in enumerate(rows) if (u, i) in pair_idx or u in user_idx or i in item_idx]
    assert done.rows.tolist() == expected
    assert done.users.tolist() == sorted(user_idx) and done.items.tolist() == sorted(item_idx)
    assert done.num_pairs == len(pair_idx)


def test_resolved_rows_split_the_table():
    data = table()
    kept, removed = data.without(resolve(data, users=[555001]).rows)
    assert removed.users.tolist() == [U[555001]] * 3
    assert len(kept) == 3 and U[555001] not in kept.users.tolist()


# --------------------------------------------------------------------------- id forms and duplicates


def test_duplicates_fold_silently():
    request = DeletionRequest(pairs=[(987654, 222), (987654, 222)], users=[555002, 555002], items=[333, 333])
    assert request.summary() == {"kind": "mixed", "num_pairs": 1, "num_users": 1, "num_items": 1}
    assert_resolved(request.resolve(table()), rows=[1, 4, 5], users=[1], items=[2], kind="mixed", pairs=1)


def test_string_and_numeric_forms_of_one_id_fold_at_resolution():
    done = resolve(pairs=[(987654, 222), ("987654", "222"), (np.int64(987654), 222.0)], users=["555002", 555002])
    assert_resolved(done, rows=[1, 5], users=[1], kind="mixed", pairs=1)


def test_strings_are_matched_against_integer_ids():
    assert resolve(users=[" 555001 "]).rows.tolist() == [2, 3, 4]
    assert resolve(items=[np.int32(333)]).rows.tolist() == [4]
    negative = Interactions.from_raw([-7, 3], [1, 1])
    assert resolve(negative, users=["-7"]).rows.tolist() == [0]


def test_integers_are_matched_against_string_ids():
    data = Interactions.from_raw(["7", "7", "alice"], ["x", "42", "x"])
    assert resolve(data, users=[7]).rows.tolist() == [0, 1]
    assert resolve(data, pairs=[("alice", "x"), (7, 42)]).rows.tolist() == [1, 2]


def test_pairs_as_array_tensor_or_columns_give_the_same_request():
    by_tuples = DeletionRequest(pairs=[(987654, 222), (555001, 111)])
    assert DeletionRequest(pairs=np.array([[987654, 222], [555001, 111]])) == by_tuples
    assert DeletionRequest(pairs=torch.tensor([[987654, 222], [555001, 111]])) == by_tuples
    assert DeletionRequest.from_columns([987654, 555001], torch.tensor([222, 111])) == by_tuples
    assert DeletionRequest.from_columns([987654], [222], users=[555002]).summary()["kind"] == "mixed"


def test_request_is_frozen():
    request = DeletionRequest(users=[555001])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.users = (987654,)
    done = request.resolve(table())
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.rows = torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------- digest


def test_digest_follows_the_documented_layout():
    done = resolve(pairs=[(987654, 222)], users=[555002], items=[444])
    keys = [U[987654] * 4 + I[222], U[555002] * 4 + I[222]]  # rows 1 and 5
    assert done.digest == reference_digest(4, 4, keys, [U[555002]], [I[444]])
    assert resolve(users=[555003]).digest == reference_digest(4, 4, [], [U[555003]], [])


def test_digest_ignores_order_duplicates_and_id_form():
    a = resolve(pairs=[(987654, 222), (555001, 111)], users=[555002, 987654], items=[333])
    b = resolve(pairs=[("555001", "111"), (987654, 222), (555001, 111)], users=[987654, "555002"], items=[333, 333])
    assert a.digest == b.digest


def test_digest_ignores_the_row_order_of_the_table():
    data = table()
    shuffled = data.select(torch.tensor([5, 3, 1, 0, 4, 2]))
    assert resolve(data, users=[555001]).digest == resolve(shuffled, users=[555001]).digest


def test_digest_changes_with_the_content():
    digests = {
        resolve(pairs=[(987654, 222)]).digest,
        resolve(pairs=[(987654, 111)]).digest,
        resolve(pairs=[(987654, 111), (987654, 222)]).digest,
        resolve(users=[987654]).digest,  # the same rows as the two pairs, but a whole user
        resolve(users=[555003]).digest,
        resolve(items=[444]).digest,
        resolve(users=[555003], items=[444]).digest,
    }
    assert len(digests) == 7
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in digests)


def test_digest_from_file_equals_digest_from_python(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"item": 333}\n{"user": "987654", "item": "222"}\n{"user": 555002}\n')
    from_python = resolve(pairs=[(987654, 222)], users=[555002], items=[333])
    assert DeletionRequest.from_file(path).resolve(table()).digest == from_python.digest


# --------------------------------------------------------------------------- missing="ignore"


def test_missing_ignore_drops_pairs_that_are_not_rows():
    done = resolve(pairs=[(987654, 222), (987654, 333), (555003, 444)], missing="ignore")
    assert_resolved(done, rows=[1], kind="interactions", pairs=1, ignored=2)
    assert done.digest == resolve(pairs=[(987654, 222)]).digest


def test_missing_ignore_keeps_whole_users_and_items():
    done = resolve(pairs=[(987654, 333)], users=[555002], missing="ignore")
    assert_resolved(done, rows=[5], users=[1], kind="users", ignored=1)


def test_missing_ignore_with_nothing_left_is_an_empty_request():
    data = table()
    before = snapshot(data)
    with raises("empty after dropping 2 pairs", "missing='ignore'", ACCEPTED):
        resolve(data, pairs=[(987654, 333), (555003, 111)], missing="ignore")
    assert_unchanged(data, before)


def test_missing_ignore_does_not_hide_unknown_ids():
    with raises("1 unknown user id", "123123"):
        resolve(pairs=[(123123, 222), (987654, 222)], missing="ignore")


# --------------------------------------------------------------------------- bad input (refused, nothing changes)


@pytest.mark.parametrize(
    ("request_kwargs", "missing", "fragments"),
    [
        pytest.param({"users": [987000]}, "error", ["1 unknown user id", "987000"], id="unknown-user"),
        pytest.param({"items": ["nope"]}, "error", ["1 unknown item id", "'nope'"], id="unknown-item"),
        pytest.param(
            {"pairs": [(987654, 9001 + k) for k in range(7)]}, "error",
            ["7 unknown item ids", "9001", "9005", "(and 2 more)"], id="unknown-items-in-pairs-first-five",
        ),
        pytest.param(
            {"pairs": [(123123, 111)], "items": [456456]}, "error",
            ["1 unknown user id: 123123", "1 unknown item id: 456456"], id="unknown-user-and-item",
        ),
        pytest.param(
            {"users": ["--5", "\u00b2", "5.0", 10**30]}, "error",
            ["4 unknown user ids", "'--5'", "'\u00b2'", "'5.0'", str(10**30)], id="unparsable",
        ),
        pytest.param(
            {"pairs": [(987654, 333), (555001, 222), (987654, 222)]}, "error",
            ["2 pairs that are not rows of this table", "(987654, 333)", "(555001, 222)", "missing='ignore'"],
            id="pairs-not-rows",
        ),
        pytest.param(
            {"pairs": [(987654, 444)]}, "error", ["1 pair that is not a row", "(987654, 444)"], id="pair-item-without-rows",
        ),
        pytest.param({"users": [555001]}, "skip", ["'skip'", "'error' or 'ignore'"], id="bad-missing"),
    ],
)
def test_bad_resolution_is_refused_and_changes_nothing(request_kwargs, missing, fragments):
    data = table()
    request = DeletionRequest(**request_kwargs)
    before = snapshot(data)
    accepted = [] if missing == "skip" else [ACCEPTED]
    with raises(*fragments, *accepted):
        request.resolve(data, missing=missing)
    assert_unchanged(data, before)
    assert request == DeletionRequest(**request_kwargs)


def test_unknown_ids_are_named_at_most_five_times():
    with raises("12 unknown user ids", "(and 7 more)") as info:
        resolve(users=list(range(700001, 700013)))
    message = str(info.value)
    assert all(str(700000 + k) in message for k in range(1, 6))
    assert not any(str(700000 + k) in message for k in range(6, 13))


@pytest.mark.parametrize(
    ("request_kwargs", "fragments"),
    [
        pytest.param({}, ["empty"], id="empty"),
        pytest.param({"pairs": [], "users": [], "items": []}, ["empty"], id="empty-lists"),
        pytest.param({"users": [None, True, 2.5, "", " "]}, ["5 invalid ids", "None", "True", "2.5", "''"], id="bad-ids"),
        pytest.param({"pairs": [(987654, None)]}, ["1 pair with invalid ids", "(987654, None)"], id="bad-pair-id"),
        pytest.param({"pairs": [(987654,), (1, 2, 3)]}, ["2 entries", "(987654,)", "(1, 2, 3)"], id="not-pairs"),
        pytest.param({"users": "987654"}, ["`users` must be a sequence", "str"], id="string-not-list"),
        pytest.param({"items": 987654}, ["`items` must be a sequence", "int"], id="scalar-not-list"),
    ],
)
def test_bad_construction_is_refused(request_kwargs, fragments):
    with raises(*fragments, ACCEPTED):
        DeletionRequest(**request_kwargs)


def test_columns_of_different_length_are_refused():
    with raises("2 pair users, 1 pair items", ACCEPTED):
        DeletionRequest.from_columns([987654, 555001], [222])


def test_error_is_a_value_error():
    assert issubclass(InvalidDeletionRequest, ValueError)


# --------------------------------------------------------------------------- requests files


def test_csv_pairs(tmp_path):
    path = write(tmp_path, "r.csv", "user,item\n987654,222\n\n   \n 555001 , 111 \n987654,222\n")
    request = DeletionRequest.from_file(path)
    assert request.summary() == {"kind": "interactions", "num_pairs": 2, "num_users": 0, "num_items": 0}
    assert_resolved(request.resolve(table()), rows=[1, 2, 3], kind="interactions", pairs=2)


def test_csv_columns_may_come_in_either_order(tmp_path):
    path = write(tmp_path, "r.csv", "Item,User\n222,987654\n")
    assert DeletionRequest.from_file(path) == DeletionRequest(pairs=[("987654", "222")])


def test_csv_whole_users_and_whole_items(tmp_path):
    users = write(tmp_path, "users.csv", "\ufeffuser\n555001\n555002\n")
    items = write(tmp_path, "items.CSV", "item\r\n333\r\n")
    assert_resolved(DeletionRequest.from_file(users).resolve(table()), rows=[2, 3, 4, 5], users=[0, 1], kind="users")
    assert_resolved(DeletionRequest.from_file(str(items)).resolve(table()), rows=[4], items=[2], kind="items")


def test_jsonl_lines_may_mix_kinds(tmp_path):
    text = '{"user": 987654, "item": 222}\n\n{"user": "555002"}\n{"item": 333}\n{"item": 333}\n'
    for name in ("r.jsonl", "r.json"):
        request = DeletionRequest.from_file(write(tmp_path, name, text))
        assert request == DeletionRequest(pairs=[(987654, 222)], users=["555002"], items=[333])
        assert_resolved(request.resolve(table()), rows=[1, 4, 5], users=[1], items=[2], kind="mixed", pairs=1)


def test_file_ids_that_are_unknown_are_refused_at_resolution(tmp_path):
    request = DeletionRequest.from_file(write(tmp_path, "r.csv", "user\n987654\n424242\n"))
    with raises("1 unknown user id: '424242'"):
        request.resolve(table())


MALFORMED = [
    pytest.param("r.txt", "user\n1\n", None, ["unknown requests file extension '.txt'"], id="extension"),
    pytest.param("r", "user\n1\n", None, ["unknown requests file extension ''"], id="no-extension"),
    pytest.param("r.csv", "", None, ["no header line"], id="csv-empty"),
    pytest.param("r.csv", "user,item\n\n", None, ["holds no requests"], id="csv-header-only"),
    pytest.param("r.csv", "user,rating\n1,5\n", 1, ["unknown header column(s) 'rating'"], id="csv-unknown-column"),
    pytest.param("r.csv", "\n\n987654,222\n", 3, ["unknown header column(s) '987654', '222'"], id="csv-no-header"),
    pytest.param("r.csv", "user,user\n1,2\n", 1, ["repeated header column"], id="csv-repeated-column"),
    pytest.param("r.csv", "user,item\n1,2\n3\n", 3, ["1 field, expected 2"], id="csv-too-few-fields"),
    pytest.param("r.csv", "user\n1\n2,3\n", 3, ["2 fields, expected 1"], id="csv-too-many-fields"),
    pytest.param("r.csv", "user,item\n1,2\n\n4,\n", 4, ["empty `item` id"], id="csv-empty-id"),
    pytest.param("r.jsonl", '{"user": 1}\n{"user": 2\n', 2, ["invalid JSON"], id="jsonl-invalid"),
    pytest.param("r.jsonl", "\n[1, 2]\n", 2, ["expected a JSON object, got list"], id="jsonl-not-object"),
    pytest.param("r.jsonl", '{"user": 1, "rating": 5}\n', 1, ["unknown key(s) 'rating'"], id="jsonl-unknown-key"),
    pytest.param("r.jsonl", '{"user": 1}\n{}\n', 2, ["empty object"], id="jsonl-empty-object"),
    pytest.param("r.jsonl", '{"user": ""}\n', 1, ["empty `user` id"], id="jsonl-empty-id"),
    pytest.param("r.jsonl", '{"item": null}\n', 1, ["`item` must be an integer or a non-empty string"], id="null"),
    pytest.param("r.jsonl", '{"item": 2.5}\n', 1, ["got 2.5"], id="jsonl-fraction"),
    pytest.param("r.jsonl", '{"user": true}\n', 1, ["got True"], id="jsonl-bool"),
    pytest.param("r.jsonl", "\n\n", None, ["holds no requests"], id="jsonl-blank"),
]


@pytest.mark.parametrize(("name", "text", "line", "fragments"), MALFORMED)
def test_malformed_files_name_the_path_and_line(tmp_path, name, text, line, fragments):
    path = write(tmp_path, name, text)
    where = f"{path}, line {line}:" if line is not None else f"{path}:"
    with raises(where, *fragments, FILE_FORMS):
        DeletionRequest.from_file(path)


def test_file_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"user\n\xff\xfe\n")
    with raises(str(path), "not UTF-8"):
        DeletionRequest.from_file(path)


def test_missing_file_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        DeletionRequest.from_file(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- privacy


SECRET_IDS = ("987654", "555001", "555002", "222", "333")


def assert_no_ids(text: str) -> None:
    for raw in SECRET_IDS:
        assert raw not in text, f"raw id {raw} leaked into {text!r}"


def test_repr_and_str_show_counts_not_ids():
    request = DeletionRequest(pairs=[(987654, 222)], users=[555001, 555002], items=[333])
    assert repr(request) == str(request) == "DeletionRequest(kind='mixed', pairs=1, users=2, items=1)"
    done = request.resolve(table())
    assert repr(done) == str(done) == "ResolvedDeletion(kind='mixed', rows=5, pairs=1, users=2, items=1, ignored=0)"
    assert done.digest not in repr(done)  # unkeyed: never shown where it could be logged
    assert_no_ids(f"{request} {done!s} {[request, done]}")


def test_summaries_are_plain_and_hold_no_ids():
    request = DeletionRequest(pairs=[(987654, 222)], users=[555001])
    done = request.resolve(table())
    assert request.summary() == {"kind": "mixed", "num_pairs": 1, "num_users": 1, "num_items": 0}
    assert done.summary() == {"kind": "mixed", "num_rows": 4, "num_pairs": 1, "num_users": 1, "num_items": 0, "num_ignored": 0}
    assert json.loads(json.dumps(done.summary())) == done.summary()
    assert_no_ids(json.dumps(request.summary()))
    assert_no_ids(json.dumps(done.summary()))


def test_a_requests_file_that_is_a_folder_is_said_with_its_path_not_raised_as_a_traceback(tmp_path):
    folder = tmp_path / "deletions.csv"
    folder.mkdir()
    with pytest.raises(InvalidDeletionRequest, match=rf"{folder}: cannot be read \(Is a directory\)"):
        DeletionRequest.from_file(folder)
