"""Requests files: the CSV and JSON-lines files a deletion request is read from.

:func:`read_requests_file` reads one into the raw ids of its interaction pairs, whole users and
whole items; :meth:`~lightning_unlearn.unlearning.request.DeletionRequest.from_file` makes the
request. Every problem raises
:class:`~lightning_unlearn.unlearning.request.InvalidDeletionRequest` naming the path and the
line, and saying which forms are accepted.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lightning_unlearn.unlearning.request import InvalidDeletionRequest, RawId, _canonical, _plural

__all__ = ["read_requests_file"]

_FILE_FORMS = (
    "Requests files are CSV (.csv) with the header `user,item` (pairs), `user` (whole users) "
    'or `item` (whole items), or JSON lines (.jsonl/.json) with one object per line: '
    '{"user": u, "item": i}, {"user": u} or {"item": i}.'
)


def read_requests_file(path: str | Path) -> tuple[list[tuple[RawId, RawId]], list[RawId], list[RawId]]:
    """The raw ids a requests file names: CSV (``.csv``) or JSON lines (``.jsonl``/``.json``).

    CSV needs a header, ``user,item`` (pairs, in either order), ``user`` (whole users) or
    ``item`` (whole items); fields are stripped, blank lines skipped. JSON lines hold one
    object per line, ``{"user": u, "item": i}``, ``{"user": u}`` or ``{"item": i}``, and lines
    may mix the three kinds. Ids are raw ids: a CSV field is a string, a JSON value an integer
    (``196.0`` too) or a non-empty string, none with control characters. They are matched to a
    data set's id maps (:func:`~lightning_unlearn.unlearning.request.canonical_id`) only when
    the request is resolved.

    Args:
        path: the requests file.

    Returns:
        ``(pairs, users, items)``: the ``(user, item)`` pairs, the whole users and the whole
        items, in file order.

    Raises:
        InvalidDeletionRequest: for an unknown extension, a missing or unknown header column, a
            line with the wrong number of fields, invalid JSON, a line that is not an object or
            has unknown keys, an empty or invalid id, or a file with no requests; the message
            names the path and the line number.
        OSError: if the file cannot be read.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> f = os.path.join(folder, "forget.jsonl")
        >>> _ = open(f, "w").write('{"user": 196, "item": 242}\\n{"user": "alice"}\\n{"item": 5.0}\\n')
        >>> read_requests_file(f)
        ([(196, 242)], ['alice'], [5])
        >>> f = os.path.join(folder, "forget.csv")
        >>> _ = open(f, "w").write("item,user\\n242,196\\n")
        >>> read_requests_file(f)  # CSV fields stay strings until resolution
        ([('196', '242')], [], [])
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        parsed = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        parsed = _read_jsonl(path)
    else:
        raise InvalidDeletionRequest(f"{path}: unknown requests file extension {path.suffix!r}. {_FILE_FORMS}")
    if not any(parsed):
        raise InvalidDeletionRequest(f"{path}: the file holds no requests. {_FILE_FORMS}")
    return parsed


_Parsed = tuple[list[tuple[RawId, RawId]], list[RawId], list[RawId]]


def _file_error(path: Path, line: int | str | None, problem: str) -> InvalidDeletionRequest:
    where = f"{path}, line {line}" if line is not None else str(path)
    return InvalidDeletionRequest(f"{where}: {problem}. {_FILE_FORMS}")


def _file_id(path: Path, line: int | str, column: str, value: Any) -> RawId:
    """One id of a requests file as a raw id, or an error naming the path and line."""
    if isinstance(value, str) and not value.strip():
        raise _file_error(path, line, f"empty `{column}` id")
    canon = _canonical(value)
    if canon is None:
        raise _file_error(
            path, line, f"`{column}` must be an integer or a non-empty string without line breaks or other control "
                        f"characters, got {value!r}"
        )
    return canon


def _collect(record: dict[str, RawId], parsed: _Parsed) -> None:
    pairs, users, items = parsed
    if "user" in record and "item" in record:
        pairs.append((record["user"], record["item"]))
    elif "user" in record:
        users.append(record["user"])
    else:
        items.append(record["item"])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _file_error(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (IsADirectoryError, PermissionError) as err:  # a missing file is FileNotFoundError, said as it is
        raise _file_error(path, None, f"cannot be read ({err.strerror})") from None


def _csv_header(path: Path, line: int | str, fields: list[str]) -> list[str]:
    columns = [f.lower() for f in fields]
    unknown = [f for f, c in zip(fields, columns) if c not in ("user", "item")]
    if unknown:
        raise _file_error(path, line, f"unknown header column(s) {', '.join(map(repr, unknown))}")
    if len(set(columns)) != len(columns):
        raise _file_error(path, line, f"repeated header column(s) in {','.join(fields)!r}")
    return columns


def _read_csv(path: Path) -> _Parsed:
    parsed: _Parsed = ([], [], [])
    header: list[str] | None = None
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)  # the whole file: quotes may span lines
    end = 0
    try:
        for fields in reader:
            # A record starts on the line after the previous one ended; a quoted field may run on.
            start, end = end + 1, reader.line_num
            line: int | str = start if end == start else f"{start} (a quoted field runs on to line {end}: is a quote left open?)"
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue
            if header is None:
                header = _csv_header(path, line, fields)
                continue
            if len(fields) != len(header):
                expected = f"expected {len(header)} as in the header `{','.join(header)}`"
                raise _file_error(path, line, f"{_plural(len(fields), 'field')}, {expected}")
            _collect({c: _file_id(path, line, c, v) for c, v in zip(header, fields)}, parsed)
    except csv.Error as err:
        raise _file_error(path, end + 1, f"malformed CSV ({err})") from None
    if header is None:
        raise _file_error(path, None, "no header line")
    return parsed


MAX_JSON_DEPTH = 4
"""How deeply a JSON line may nest (a request line is one flat object)."""


def _read_jsonl(path: Path) -> _Parsed:
    parsed: _Parsed = ([], [], [])
    for line, text in enumerate(_read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        if _nesting(text) > MAX_JSON_DEPTH:
            raise _file_error(path, line, f"JSON nested more than {MAX_JSON_DEPTH} levels deep (a request is one flat object)")
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            raise _file_error(path, line, f"invalid JSON ({err.msg} at column {err.colno})") from None
        except _DuplicateKey as err:
            raise _file_error(path, line, f"the key {err.args[0]!r} is given twice (which one is meant?)") from None
        if not isinstance(record, dict):
            raise _file_error(path, line, f"expected a JSON object, got {type(record).__name__}")
        unknown = [k for k in record if k not in ("user", "item")]
        if unknown:
            raise _file_error(path, line, f"unknown key(s) {', '.join(map(repr, unknown))}")
        if not record:
            raise _file_error(path, line, "empty object")
        _collect({k: _file_id(path, line, k, v) for k, v in record.items()}, parsed)
    return parsed


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text, outside strings (cheap, before parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
