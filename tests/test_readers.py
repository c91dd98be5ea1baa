"""Tests of the file readers (lightning_unlearn/data/readers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.readers import read_adjacency, read_csv, read_movielens_1m, read_movielens_100k
from lightning_unlearn.data.sources import CSVSource

# (user, item, rating, timestamp) rows shared by the MovieLens reader tests.
ML_ROWS = [(196, 242, 3, 881250949), (186, 302, 3, 891717742), (22, 377, 1, 878887116), (196, 51, 2, 880606923)]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def raw_rows(data: Interactions) -> list[tuple]:
    """The table as ``(raw user, raw item[, rating][, timestamp])`` tuples, in row order."""
    cols = [data.user_ids[data.users.numpy()].tolist(), data.item_ids[data.items.numpy()].tolist()]
    cols += [c.tolist() for c in (data.ratings, data.timestamps) if c is not None]
    return list(zip(*cols))


def check_movielens(data: Interactions) -> None:
    assert raw_rows(data) == [(u, i, float(r), t) for u, i, r, t in ML_ROWS]
    assert data.user_ids.tolist() == [22, 186, 196]
    assert data.item_ids.tolist() == [51, 242, 302, 377]
    assert data.users.tolist() == [2, 1, 0, 2]
    assert data.items.tolist() == [1, 2, 3, 0]


# --------------------------------------------------------------------------- MovieLens


def test_read_movielens_100k(tmp_path):
    path = write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS))
    check_movielens(read_movielens_100k(path))
    check_movielens(read_movielens_100k(str(path)))


def test_read_movielens_1m(tmp_path):
    path = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS))
    check_movielens(read_movielens_1m(path))


@pytest.mark.parametrize(
    "reader, text",
    [(read_movielens_100k, "1\t2\t3\t4\n5\t6\t7\n"), (read_movielens_1m, "1::2::3::4\n5::6::7\n")],
    ids=["100k", "1m"],
)
def test_movielens_wrong_field_count_raises(tmp_path, reader, text):
    with pytest.raises(ValueError, match="expected 4"):
        reader(write(tmp_path / "ratings", text))


def test_read_real_movielens_100k(data_dir):
    """The real file, found by conftest's ``data_dir`` ($LIGHTNING_UNLEARN_DATA, else ../shared/data); skipped if absent."""
    data = read_movielens_100k(data_dir / "ml-100k" / "u.data")
    assert (len(data), data.num_users, data.num_items) == (100000, 943, 1682)
    assert data.user_ids.tolist() == list(range(1, 944))
    assert data.item_ids.tolist() == list(range(1, 1683))
    assert sorted(set(data.ratings.tolist())) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert raw_rows(data.select(torch.tensor([0])))[0] == (196, 242, 3.0, 881250949)


# --------------------------------------------------------------------------- adjacency lists


def test_read_adjacency_train_only(tmp_path):
    train = write(tmp_path / "train.txt", "0 5 3\n\n2 3\n1\n")
    data, test = read_adjacency(train)
    assert test is None
    assert raw_rows(data) == [(0, 5), (0, 3), (2, 3)]
    assert data.user_ids.tolist() == [0, 2]  # a user without items has no rows, so no index
    assert data.item_ids.tolist() == [3, 5]


def test_read_adjacency_train_and_test_share_one_id_map(tmp_path):
    train = write(tmp_path / "train.txt", "10 1 2\n20 2\n")
    test = write(tmp_path / "test.txt", "10 3\n30 1 4\n")  # user 30 and items 3, 4 only in test
    tr, te = read_adjacency(train, test)
    for table in (tr, te):
        assert table.user_ids.tolist() == [10, 20, 30]
        assert table.item_ids.tolist() == [1, 2, 3, 4]
    assert raw_rows(tr) == [(10, 1), (10, 2), (20, 2)]
    assert raw_rows(te) == [(10, 3), (30, 1), (30, 4)]
    assert tr.users.tolist() == [0, 0, 1] and te.users.tolist() == [0, 2, 2]
    assert tr.items.tolist() == [0, 1, 1] and te.items.tolist() == [2, 0, 3]


@pytest.mark.parametrize("bad_line", ["3 x 4", "3 4.5", "u 1"])
def test_read_adjacency_malformed_line_names_the_line(tmp_path, bad_line):
    train = write(tmp_path / "train.txt", "0 1\n")
    test = write(tmp_path / "test.txt", f"0 2\n\n{bad_line}\n1 1\n")
    with pytest.raises(ValueError, match=r"test\.txt, line 3: expected integers"):
        read_adjacency(train, test)


# --------------------------------------------------------------------------- CSV


def test_read_csv_header_with_named_columns(tmp_path):
    path = write(tmp_path / "x.csv", "ts,iid,junk,uid,stars\n100,a,?,u2,4.5\n200,b,?,u1,2\n300,a,?,u1,3\n")
    data = read_csv(path, {"user": "uid", "item": "iid", "rating": "stars", "timestamp": "ts"})
    assert raw_rows(data) == [("u2", "a", 4.5, 100), ("u1", "b", 2.0, 200), ("u1", "a", 3.0, 300)]
    assert data.user_ids.tolist() == ["u1", "u2"]
    assert data.users.tolist() == [1, 0, 0]


def test_read_csv_default_columns_with_header(tmp_path):
    path = write(tmp_path / "x.csv", "user,item,rating,time\n7,9,5,11\n3,9,1,12\n")
    data = read_csv(path)
    assert raw_rows(data) == [(7, 9, 5.0, 11), (3, 9, 1.0, 12)]
    assert data.user_ids.dtype.kind == "i"  # numeric ids are read as integers


def test_read_csv_default_columns_two_fields_have_no_ratings(tmp_path):
    data = read_csv(write(tmp_path / "x.csv", "1,2\n3,4\n"), header=False)
    assert data.ratings is None and data.timestamps is None
    assert raw_rows(data) == [(1, 2), (3, 4)]


def test_read_csv_no_header_positional_columns_tsv(tmp_path):
    path = write(tmp_path / "x.tsv", "x\t5\tu1\t3\nx\t6\tu2\t1\n")
    data = read_csv(path, {"user": 2, "item": 1, "rating": 3}, sep="\t", header=False)
    assert raw_rows(data) == [("u1", 5, 3.0), ("u2", 6, 1.0)]
    assert data.timestamps is None


def test_read_csv_threshold_keeps_positives_and_compacts(tmp_path):
    path = write(tmp_path / "x.csv", "uid,iid,stars\nu1,a,5\nu1,b,2\nu2,a,4\nu3,c,3.9\n")
    data = read_csv(path, {"user": "uid", "item": "iid", "rating": "stars"}, threshold=4)
    assert raw_rows(data) == [("u1", "a", 5.0), ("u2", "a", 4.0)]
    assert data.user_ids.tolist() == ["u1", "u2"]  # u3 and items b, c have no positives left
    assert data.item_ids.tolist() == ["a"]


def test_read_csv_missing_named_column(tmp_path):
    path = write(tmp_path / "x.csv", "uid,iid\n1,2\n")
    with pytest.raises(ValueError, match=r"column 'stars' for 'rating' not found"):
        read_csv(path, {"user": "uid", "item": "iid", "rating": "stars"})


def test_read_csv_named_column_without_header(tmp_path):
    with pytest.raises(ValueError, match=r"column 'uid' for 'user' not found"):
        read_csv(write(tmp_path / "x.csv", "1,2\n"), {"user": "uid", "item": 1}, header=False)


@pytest.mark.parametrize("columns", [{"user": 0}, {"user": 0, "item": 1, "weight": 2}])
def test_read_csv_bad_column_mapping(tmp_path, columns):
    with pytest.raises(ValueError, match="must map 'user', 'item'"):
        read_csv(write(tmp_path / "x.csv", "1,2,3\n"), columns, header=False)


@pytest.mark.parametrize("header, line", [(True, 4), (False, 3)])
def test_read_csv_short_line_names_the_line(tmp_path, header, line):
    text = ("u,i,r\n" if header else "") + "1,2,3\n4,5,6\n7,8\n9,9,9\n"
    with pytest.raises(ValueError, match=rf"x\.csv, line {line}: expected at least 3 fields, got 2"):
        read_csv(write(tmp_path / "x.csv", text), {"user": 0, "item": 1, "rating": 2}, header=header)


@pytest.mark.parametrize("body", ["user,item\n1,2\n3,4,5\n6,7\n", "user,item\na,2\nb,4,5\n", "user,item\n1,2\n\"3,4\",5,6\n"])
def test_read_csv_row_with_more_fields_than_the_first_names_the_line(tmp_path, body):
    """An extra field means a line was split where it should not be: read as it is, its fields would be shifted."""
    (tmp_path / "x.csv").write_text(body)
    with pytest.raises(ValueError, match=r"x\.csv, line 3: 3 fields where at most 2 are expected"):
        read_csv(tmp_path / "x.csv")
    (tmp_path / "ok.csv").write_text('user,item\n1,2\n\n"3,4",5\n\n')  # blank lines, and a quoted separator: one field
    assert len(read_csv(tmp_path / "ok.csv")) == 2
    # A blank line after the header, a quoted line break in the first row, ragged optional columns: as before.
    (tmp_path / "ok.csv").write_text('user,item,rating,note\r\n\r\n1,2,5,"two\nlines"\r\n3,4,3\r\n5,6\r\n')
    table = read_csv(tmp_path / "ok.csv", {"user": "user", "item": "item"})
    assert len(table) == 3
    (tmp_path / "ok.csv").write_text("user,item,rating,tags\n1,2,5\n3,4,1,funny\n")  # as many fields as the header names
    assert len(read_csv(tmp_path / "ok.csv")) == 2
    # A short row and a long one: the fast path's separator count is per line, so they do not cancel out.
    (tmp_path / "x.csv").write_text("user,item,rating\n1,2,5\n3,4\n5,6,7,8\n")
    with pytest.raises(ValueError, match=r"x\.csv, line 4: 4 fields where at most 3"):
        read_csv(tmp_path / "x.csv", {"user": 0, "item": 1})


def test_read_csv_non_numeric_rating(tmp_path):
    with pytest.raises(ValueError, match="rating/timestamp columns must be numbers"):
        read_csv(write(tmp_path / "x.csv", "u,i,r\n1,2,five\n"))


def test_read_csv_keeps_ids_that_are_not_plain_integers_distinct(tmp_path):
    path = tmp_path / "zero_padded.csv"
    path.write_text("u,i\n007,a\n7,b\n")
    assert sorted(read_csv(path).user_ids.tolist()) == ["007", "7"]


def test_read_csv_non_numeric_rating_names_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"x\.csv, line 4: rating/timestamp columns must be numbers; the rating is 'five'"):
        read_csv(write(tmp_path / "x.csv", "u,i,r\n1,2,3\n\n1,3,five\n"))


def test_csv_source_given_split_shares_one_id_map(tmp_path):
    from lightning_unlearn.data import RecDataModule

    write(tmp_path / "train.tsv", "u1\ta\t5\nu2\tb\t4\nu2\ta\t1\n")
    write(tmp_path / "test.tsv", "u3\tc\t5\nu1\tb\t4\n")  # u3 and c appear only in the test file
    source = CSVSource(path="train.tsv", sep="\t", header=False, threshold=4, root=str(tmp_path), test_path="test.tsv")
    train, test = source.load()
    assert train.user_ids.tolist() == test.user_ids.tolist() == ["u1", "u2", "u3"]
    assert train.item_ids.tolist() == test.item_ids.tolist() == ["a", "b", "c"]
    pairs = lambda t: sorted((str(t.user_ids[u]), str(t.item_ids[i])) for u, i in zip(t.users.tolist(), t.items.tolist()))  # noqa: E731
    assert pairs(train) == [("u1", "a"), ("u2", "b")]  # u2's rating 1 is below the threshold
    assert pairs(test) == [("u1", "b"), ("u3", "c")]
    dm = RecDataModule(source, split="given", val_fraction=0.0, num_negatives=1)
    dm.setup()
    assert len(dm.train) == 2 and len(dm.test) == 2 and dm.num_users == 3


def test_csv_source_given_split_with_integer_and_string_ids_and_validation(tmp_path):
    write(tmp_path / "train.csv", "user,item\n1,10\n2,11\n")
    write(tmp_path / "val.csv", "user,item\n1,11\n")
    write(tmp_path / "test.csv", "user,item\nx,10\n")  # a string id: every id becomes a string, as in one file
    source = CSVSource(str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), val_path=str(tmp_path / "val.csv"))
    train, val, test = source.load_splits()
    assert train.user_ids.tolist() == val.user_ids.tolist() == test.user_ids.tolist() == ["1", "2", "x"]
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    with pytest.raises(ValueError, match=r"load\(\) returns only \(train, test\) and would drop the validation file"):
        source.load()
    with pytest.raises(ValueError, match="needs test_path"):
        CSVSource("train.csv", val_path="val.csv")


def test_csv_source_given_validation_file_missing_or_with_a_bad_line(tmp_path):
    from lightning_unlearn.data import DataNotFoundError


    write(tmp_path / "train.csv", "user,item,rating\n1,10,5\n2,11,4\n")
    write(tmp_path / "test.csv", "user,item,rating\n1,11,5\n")
    source = CSVSource("train.csv", root=str(tmp_path), test_path="test.csv", val_path="val.csv")
    with pytest.raises(DataNotFoundError, match=r"Data file not found: .*val\.csv"):
        source.load_splits()
    write(tmp_path / "val.csv", "user,item,rating\n2,10,5\n\n1\n")
    with pytest.raises(ValueError, match=r"val\.csv, line 4: expected at least 3 fields, got 1"):
        source.load_splits()
    write(tmp_path / "val.csv", "user,item,rating\n2,10,five\n")
    with pytest.raises(ValueError, match=r"val\.csv, line 2: rating/timestamp columns must be numbers; the rating is 'five'"):
        source.load_splits()


def test_csv_source_given_split_refuses_a_bad_test_line(tmp_path):
    write(tmp_path / "train.csv", "user,item,rating\n1,10,5\n2,11,4\n")
    write(tmp_path / "test.csv", "user,item,rating\n1,11,5\n2\n")
    source = CSVSource(str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"))
    with pytest.raises(ValueError, match=r"test\.csv, line 3: expected at least 3 fields, got 1"):
        source.load()
    write(tmp_path / "test.csv", "user,item,rating\n1,11,5\n2,10,high\n")
    with pytest.raises(ValueError, match=r"test\.csv, line 3: rating/timestamp columns must be numbers; the rating is 'high'"):
        source.load()


def _general(path, **kwargs):
    """``read_csv`` with its vectorised path switched off (the reference it must equal)."""
    import lightning_unlearn.data.readers as readers

    original = readers._read_numeric
    readers._read_numeric = lambda *a, **k: None
    try:
        return read_csv(path, **kwargs)
    finally:
        readers._read_numeric = original


@pytest.mark.parametrize(("header", "sep", "width"), [(True, ",", 4), (False, "\t", 3), (True, ";", 2)])
def test_read_csv_plain_numbers_take_the_vectorised_path_and_equal_the_general_one(tmp_path, header, sep, width):
    import lightning_unlearn.data.readers as readers

    g = torch.Generator().manual_seed(width)
    rows = torch.stack([torch.randint(-3, 40, (200,), generator=g), torch.randint(1, 900, (200,), generator=g),
                        torch.randint(1, 6, (200,), generator=g), torch.randint(10**8, 10**9, (200,), generator=g)], 1)[:, :width]
    text = (sep.join(["u", "i", "r", "t"][:width]) + "\n" if header else "") + "\n".join(
        sep.join(str(v) if c != 2 else f"{v / 2}" for c, v in enumerate(row.tolist())) for row in rows) + "\n\n"
    path = tmp_path / "plain.csv"
    path.write_text(text)
    fast, general = read_csv(path, sep=sep, header=header), _general(path, sep=sep, header=header)
    assert readers._read_numeric(path, {"user": 0, "item": 1}, sep, header, width) is not None  # the fast path took it
    for name in ("users", "items", "ratings", "timestamps"):
        a, b = getattr(fast, name), getattr(general, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert fast.user_ids.tolist() == general.user_ids.tolist() and fast.item_ids.tolist() == general.item_ids.tolist()


@pytest.mark.parametrize("line", ['007,3,5', '"7",3,5', "7, 3,5", "7,3e2,5", "u7,3,5", "7.5,3,5", "-0,3,5",
                                  "99999999999999999999,3,5"])
def test_read_csv_leaves_ids_that_are_not_plain_numbers_to_the_general_path(tmp_path, line):
    import lightning_unlearn.data.readers as readers

    path = tmp_path / "odd.csv"
    path.write_text("user,item,rating\n7,3,5\n" + line + "\n")
    assert readers._read_numeric(path, {"user": 0, "item": 1, "rating": 2}, ",", True, 3) is None
    table = read_csv(path)
    assert len(table) == 2 and table.user_ids.tolist() == _general(path).user_ids.tolist()


def test_64_bit_ids_stay_distinct_on_both_paths(tmp_path):
    """Ids above 2**53 (hashed or snowflake ids) parsed as floats merged; they are int64 exactly, or strings beyond."""
    path = write(tmp_path / "big.csv", "user,item\n1234567890123456789,1\n1234567890123456790,2\n1234567890123456791,2\n")
    assert read_csv(path).user_ids.tolist() == [1234567890123456789, 1234567890123456790, 1234567890123456791]
    huge = write(tmp_path / "huge.csv", "user,item\n99999999999999999999,1\n99999999999999999998,2\n")
    assert read_csv(huge).user_ids.tolist() == ["99999999999999999998", "99999999999999999999"]


def test_ids_written_as_whole_floats_stay_the_integers_they_were(tmp_path):
    """pandas writes an id column that was float as 7.0: such ids were integers before ids were parsed as int64,
    and stay so (the data's fingerprint, and the checkpoints trained on it, are unchanged)."""
    path = write(tmp_path / "floats.csv", "user,item,rating\n7.0,3.0,4.5\n8.0,3.0,2.0\n")
    table = read_csv(path)
    assert table.user_ids.tolist() == [7, 8] and table.item_ids.tolist() == [3]


@pytest.mark.parametrize("text", ["", "user,item\n", "user,item\n\n"])
def test_a_file_without_interactions_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match="no interactions"):
        read_csv(write(tmp_path / "empty.csv", text))


def test_a_file_without_a_header_line_read_with_header_true_is_refused(tmp_path):
    path = write(tmp_path / "bare.csv", "1,10,5\n2,11,4\n")
    with pytest.raises(ValueError, match="is numbers, not column names.*header=False"):
        read_csv(path)
    assert len(read_csv(path, header=False)) == 2


def test_a_byte_order_mark_is_not_part_of_the_first_id_or_name(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffuser,item\nu1,a\nu2,b\n".encode("utf-8"))
    assert read_csv(tmp_path / "bom.csv", {"user": "user", "item": "item"}).user_ids.tolist() == ["u1", "u2"]
    (tmp_path / "bare.csv").write_bytes("\ufeffu1,a\nu2,b\nu1,b\n".encode("utf-8"))
    assert read_csv(tmp_path / "bare.csv", header=False).user_ids.tolist() == ["u1", "u2"]


def test_the_files_of_a_given_split_need_one_header(tmp_path):
    write(tmp_path / "train.csv", "user,item\nu1,a\nu2,b\n")
    write(tmp_path / "test.csv", "item,user\na,u2\n")  # swapped: read by position, users and items would trade places
    with pytest.raises(ValueError, match="test.csv: its header \\['item', 'user'\\] differs from the training file"):
        CSVSource("train.csv", root=str(tmp_path), test_path="test.csv").load_splits()
    named = CSVSource("train.csv", root=str(tmp_path), test_path="test.csv", columns={"user": "user", "item": "item"})
    train, _, test = named.load_splits()  # by name, each file's own order is found
    assert [(str(test.user_ids[u]), str(test.item_ids[i])) for u, i in zip(test.users.tolist(), test.items.tolist())] == [("u2", "a")]


@pytest.mark.parametrize(("reader", "text", "line"), [
    (read_movielens_100k, "1\t2\t3\n4\t5\t6\t7\t8\n", 1),  # a short and a long line add up to whole rows
    (read_movielens_100k, "1\t2\t3\t4\n5\tx\t7\t8\n", 2),
    (read_movielens_1m, "1::2::3::4\n\n5::6::7::8::9\n", 3),
    (read_movielens_100k, "1\t2\t3\t4\n99999999999999999999\t6\t7\t8\n", 2),  # beyond int64
])
def test_movielens_readers_name_the_bad_line(tmp_path, reader, text, line):
    with pytest.raises(ValueError, match=f"ratings, line {line}: expected"):
        reader(write(tmp_path / "ratings", text))
