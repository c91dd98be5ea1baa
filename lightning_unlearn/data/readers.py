"""Readers for the interaction files recommenders are trained on.

Every reader returns :class:`Interactions` whose raw ids are the ids of the file.
"""

from __future__ import annotations

import csv
import itertools
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.data.splits import compact

__all__ = ["read_adjacency", "read_csv", "read_header", "read_movielens_100k", "read_movielens_1m"]


def _numeric_table(path: Path, sep: str | None, columns: int) -> np.ndarray:
    """The file's integers, ``columns`` per line; a line with another count or a non-integer is named."""
    text = Path(path).read_text(encoding="latin-1")
    if sep:
        text = text.replace(sep, " ")
    lines = text.splitlines()
    counts = np.fromiter((len(line.split()) for line in lines), dtype=np.int64, count=len(lines))
    wrong = np.flatnonzero((counts != columns) & (counts > 0))
    if len(wrong):
        raise ValueError(f"{path}, line {wrong[0] + 1}: expected {columns} whitespace/'{sep}'-separated integers, "
                         f"got {counts[wrong[0]]} fields.")
    try:
        values = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        number = next(n for n, line in enumerate(lines, start=1) if not _int64_fields(line))
        raise ValueError(f"{path}, line {number}: expected integers, got {lines[number - 1].strip()!r}.") from None
    return values.reshape(-1, columns)


def _int64_fields(line: str) -> bool:
    try:
        np.array(line.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        return False
    return True


def read_movielens_100k(path: str | Path) -> Interactions:
    """Read MovieLens-100K ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``).

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "u.data")
        >>> _ = open(f, "w").write("196\\t242\\t3\\t881250949\\n186\\t302\\t3\\t891717742\\n")
        >>> read_movielens_100k(f)
        Interactions(rows=2, users=2, items=2)
    """
    t = _numeric_table(Path(path), None, 4)
    return Interactions.from_raw(t[:, 0], t[:, 1], ratings=t[:, 2], timestamps=t[:, 3])


def read_movielens_1m(path: str | Path) -> Interactions:
    """Read MovieLens-1M ``ratings.dat`` (``user::item::rating::timestamp``)."""
    t = _numeric_table(Path(path), "::", 4)
    return Interactions.from_raw(t[:, 0], t[:, 1], ratings=t[:, 2], timestamps=t[:, 3])


def _adjacency_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    users, items = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            ids = np.array(fields, dtype=np.int64)
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: expected integers `user item item ...`: {err}") from None
        users.append(np.full(len(ids) - 1, ids[0]))
        items.append(ids[1:])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(users), cat(items)


def read_adjacency(train: str | Path, test: str | Path | None = None) -> tuple[Interactions, Interactions | None]:
    """Read the ``user item item ...`` adjacency lists used by LightGCN-family code.

    Args:
        train: the training file.
        test: an optional test file; both tables then share one id map.

    Returns:
        ``(train, test)``; ``test`` is ``None`` when no test file is given.

    Raises:
        ValueError: on a line that is not a list of integers (names the line).
    """
    tu, ti = _adjacency_pairs(Path(train))
    if test is None:
        return Interactions.from_raw(tu, ti), None
    su, si = _adjacency_pairs(Path(test))
    both = Interactions.from_raw(np.concatenate([tu, su]), np.concatenate([ti, si]))
    is_train = torch.arange(len(both)) < len(tu)
    return both.select(is_train), both.select(~is_train)


def read_csv(
    path: str | Path,
    columns: Mapping[str, str | int] | None = None,
    sep: str = ",",
    header: bool = True,
    threshold: float | None = None,
) -> Interactions:
    """Read interactions from any CSV/TSV file.

    Args:
        path: the file.
        columns: where each field is: a mapping from ``user``, ``item`` and optionally
            ``rating`` and ``timestamp`` to a column name (with ``header=True``) or a
            0-based position. Default: ``{"user": 0, "item": 1}`` plus ``rating`` at 2 and
            ``timestamp`` at 3 when the file has those columns.
        sep: the field separator (``","``, ``"\\t"``, ...).
        header: whether the first line names the columns.
        threshold: if given, keep only rows whose rating is at least this (implicit positives).

    Raises:
        ValueError: if a named column is missing, a field cannot be parsed or a row has more
            fields than the header and the first data row (names the line).

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "x.csv")
        >>> _ = open(f, "w").write("uid,iid,stars\\nu1,a,5\\nu1,b,2\\nu2,a,4\\n")
        >>> read_csv(f, {"user": "uid", "item": "iid", "rating": "stars"}, threshold=4)
        Interactions(rows=2, users=2, items=1)
    """
    with open(path, newline="", encoding=_ENCODING) as fh:
        reader = csv.reader(fh, delimiter=sep)
        first = next(reader, [])
        # the default columns follow the width of the first data row (no row has more fields, unless the header names more)
        width = len(next((row for row in (reader if header else itertools.chain([first], reader)) if row), []))
    if header and first and all(_NUMBER.fullmatch(field.strip()) for field in first) and not (columns and any(
            isinstance(c, str) for c in columns.values())):
        raise ValueError(f"{path}: the first line {','.join(first)!r} is numbers, not column names (header=True): "
                         f"pass header=False for a file without a header line.")
    names = first if header else None
    index = _column_index(path, columns, names, width)
    widest = max(width, len(first) if header else 0)  # a row may have as many fields as the header names
    table = _read_numeric(Path(path), index, sep, header, width)
    if table is None:  # not plain numbers: the general path, which names any bad line
        with open(path, newline="", encoding=_ENCODING) as fh:
            rows = list(csv.reader(fh, delimiter=sep))[1 if header else 0:]
        table = _read_rows(Path(path), rows, index, 2 if header else 1, widest)
    if not len(table):
        raise ValueError(f"{path}: no interactions (an empty file{', or only its header line' if header else ''}).")
    return table if threshold is None else compact(table.binarize(threshold))


def read_header(path: str | Path, sep: str = ",") -> list[str]:
    """The fields of the first line of a CSV/TSV file (a byte-order mark is not part of the first name)."""
    with open(path, newline="", encoding=_ENCODING) as fh:
        return next(csv.reader([fh.readline()], delimiter=sep), [])


_ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark, as some spreadsheet programs write, is dropped
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _column_index(path: str | Path, columns: Mapping[str, str | int] | None, names: list[str] | None, width: int) -> dict[str, int]:
    """The 0-based position of each field of :func:`read_csv`'s ``columns`` (default: by position)."""
    if columns is None:
        columns = {"user": 0, "item": 1, **({"rating": 2} if width > 2 else {}), **({"timestamp": 3} if width > 3 else {})}
    unknown = set(columns) - {"user", "item", "rating", "timestamp"}
    if unknown or not {"user", "item"} <= set(columns):
        raise ValueError(f"read_csv columns must map 'user', 'item' and optionally 'rating', 'timestamp'; got {dict(columns)}.")
    index = {}
    for field, col in columns.items():
        if isinstance(col, str):
            if names is None or col not in names:
                raise ValueError(f"{path}: column {col!r} for {field!r} not found; header is {names}.")
            col = names.index(col)
        index[field] = col
    return index


def _read_rows(path: Path, rows: list[list[str]], index: dict[str, int], first_line: int, width: int) -> Interactions:
    """The general path of :func:`read_csv`: parsed rows of strings (any ids; bad lines are named).

    No row has more than ``width`` fields (the first data row's, or the header's if it names
    more): one with more was split where it should not have been (a separator in a field that
    is not quoted).
    """
    data: dict[str, list] = {field: [] for field in index}
    lines: list[int] = []
    for number, row in enumerate(rows, start=first_line):
        if not row:
            continue
        lines.append(number)
        if len(row) < max(index.values()) + 1:
            raise ValueError(f"{path}, line {number}: expected at least {max(index.values()) + 1} fields, got {len(row)}.")
        if len(row) > width:
            raise ValueError(f"{path}, line {number}: {len(row)} fields where at most {width} are expected (as many as the "
                             f"header or the first row has): a separator inside a field that is not quoted? Quote such a field, "
                             f"or mend the line.")
        for field, col in index.items():
            data[field].append(row[col])
    users, items = (np.array(data[k]) for k in ("user", "item"))
    users, items = _as_int_if_possible(users), _as_int_if_possible(items)
    try:
        ratings = np.array(data["rating"], dtype=np.float64) if "rating" in data else None
        stamps = np.array(data["timestamp"], dtype=np.float64).astype(np.int64) if "timestamp" in data else None
    except ValueError:
        field, at, value = _first_non_number(data, lines)
        raise ValueError(f"{path}, line {at}: rating/timestamp columns must be numbers; the {field} is {value!r}.") from None
    return Interactions.from_raw(users, items, ratings, stamps)


def _read_numeric(path: Path, index: dict[str, int], sep: str, header: bool, width: int) -> Interactions | None:
    """The vectorised path of :func:`read_csv`: a file of plain numbers parsed in C (``numpy.loadtxt``), no Python loop per line.

    Returns ``None`` (the general path reads the file, and names any bad line) unless every
    field is a plain number (digits, ``.``, ``-``; no quotes, spaces or exponents; no number
    written with a leading zero such as ``"007"``), every line has ``width`` fields (no blank
    line but at the end) and the ids are integers, so that both paths give the same ids.
    """
    if len(sep) != 1:
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    body = data[data.find(b"\n") + 1:] if header else data
    separator = sep.encode()
    if not body.strip() or body.translate(None, b"0123456789.-\r\n" + separator):  # a byte that is not part of a plain number
        return None
    if not _every_line_has(body.rstrip(b"\r\n"), separator, width):  # a row of another width, or a blank line between rows
        return None
    if re.match(rb"0[0-9]", body) or re.search(rb"[\n" + re.escape(separator) + rb"]0[0-9]", body):  # "007"
        return None
    if re.search(rb"(?:^|[\n" + re.escape(separator) + rb"])-0(?![0-9.])", body):  # "-0": the general path keeps it apart from "0"
        return None
    fields = sorted(set(index.values()))
    ids = {index["user"], index["item"]}  # parsed as int64, exactly (as floats, ids above 2**53 would merge)
    dtype = np.dtype([(f"c{col}", np.int64 if col in ids else np.float64) for col in fields])
    try:
        values = np.loadtxt(path, delimiter=sep, skiprows=int(header), usecols=fields, dtype=dtype, ndmin=1, encoding="latin-1")
        column = {field: np.ascontiguousarray(values[f"c{col}"]) for field, col in index.items()}
    except (ValueError, OverflowError):  # ids written as numbers but not as int64 literals (7.0, 1.5, beyond int64)
        column = _whole_float_ids(path, sep, header, fields, index)
        if column is None:  # the general path keeps them as strings
            return None
    if not all(np.isfinite(column[f]).all() for f in ("rating", "timestamp") if f in column):
        return None
    stamps = column["timestamp"].astype(np.int64) if "timestamp" in column else None
    return Interactions.from_raw(column["user"], column["item"], column.get("rating"), stamps)


def _every_line_has(body: bytes, separator: bytes, width: int) -> bool:
    """Whether every line of ``body`` has ``width`` fields (``width - 1`` separators): vectorised, no loop per line."""
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.append(np.flatnonzero(data == ord("\n")), len(data))  # where each line ends
    separators = np.searchsorted(np.flatnonzero(data == separator[0]), ends)  # separators before each line's end
    return bool((np.diff(separators, prepend=0) == width - 1).all())


def _whole_float_ids(path: Path, sep: str, header: bool, fields: list[int], index: dict[str, int]) -> dict[str, np.ndarray] | None:
    """Ids written as whole floats (``7.0``, as pandas writes a float column) are the integers they were read as
    before ids were parsed as int64, below ``2**53`` where a float holds them exactly; ``None`` for any other id."""
    try:
        values = np.loadtxt(path, delimiter=sep, skiprows=int(header), usecols=fields, dtype=np.float64, ndmin=2, encoding="latin-1")
    except ValueError:
        return None
    column = {field: values[:, fields.index(col)] for field, col in index.items()}
    ids = np.concatenate([column["user"], column["item"]])
    if not (np.isfinite(ids).all() and np.array_equal(ids, np.round(ids)) and (np.abs(ids) < 2**53).all()):
        return None
    return {**column, "user": column["user"].astype(np.int64), "item": column["item"].astype(np.int64)}


def _first_non_number(data: dict[str, list], lines: list[int]) -> tuple[str, int, str]:
    for n, line in enumerate(lines):
        for field in ("rating", "timestamp"):
            if field in data:
                try:
                    float(data[field][n])
                except ValueError:
                    return field, line, data[field][n]
    return "rating", lines[0] if lines else 0, ""  # not reached: numpy refused a value float() takes


def _as_int_if_possible(values: np.ndarray) -> np.ndarray:
    """Integer ids when every id is written as a plain integer (``"7"``, not ``"007"``)."""
    try:
        ints = values.astype(np.int64)
    except (ValueError, OverflowError):  # not integers, or beyond int64
        return values
    return ints if np.array_equal(ints.astype(str), values) else values
