"""Manifest columns: which ones the row parser reads, which are passthrough, and their Python values."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.sources import ManifestError, SourceFile, first_line


class UnreadableCell:
    """A cell pyarrow could not turn into a Python value (e.g. a timestamp beyond year 9999)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"({self.reason})"


def column_values(array: pa.Array) -> list[Any]:
    """The Python values of a column; cell by cell, with `UnreadableCell`s, if the whole fails."""
    try:
        return array.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):
        values: list[Any] = []
        for k in range(len(array)):
            try:
                values.append(array[k].as_py())
            except (ValueError, OverflowError, pa.ArrowException) as exc:
                values.append(UnreadableCell(first_line(exc)))
        return values


Converter = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _iso(value: Any) -> Any:
    return None if value is None else value.isoformat()


def _converter(t: pa.DataType) -> Converter | None:
    """How a passthrough column's Python values become plain JSON-able ones; None if unsupported."""
    if (
        pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or getattr(pa.types, "is_string_view", lambda _: False)(t)
    ):
        return _identity
    if pa.types.is_dictionary(t):
        return _converter(t.value_type)
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return _iso
    if pa.types.is_decimal(t):
        return lambda v: None if v is None else str(v)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _converter(t.value_type)
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(x) for x in v]
    if pa.types.is_struct(t):
        fields = {t.field(i).name: _converter(t.field(i).type) for i in range(t.num_fields)}
        if any(conv is None for conv in fields.values()):
            return None
        return lambda v: None if v is None else {k: fields[k](x) for k, x in v.items()}
    return None


@dataclass(frozen=True)
class ColumnPlan:
    """What each column of one manifest file is for, decided from its schema."""

    file: SourceFile
    names: list[str]
    known: tuple[str, ...]  # columns the row parser reads
    passthrough: tuple[tuple[str, Converter], ...]


def plan_columns(file: SourceFile, known: frozenset[str], reserved: frozenset[str]) -> ColumnPlan:
    """Read a file's footer and decide its columns; ManifestError for whole-file problems.

    `known` columns go to the row parser; `reserved` ones (output-dataset
    columns that reelray fills) are refused; every other column is passthrough.
    """
    try:
        with file.fs.open_input_file(file.path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"{file.name}: not a readable Parquet file ({first_line(exc)})") from None
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"{file.name}: duplicate column names {dupes}")
    if "prompt" not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ManifestError(f"{file.name}: no 'prompt' column (columns: {shown or 'none'})")
    clash = sorted(reserved.intersection(names))
    if clash:
        raise ManifestError(
            f"{file.name}: columns {clash} are output-dataset columns that reelray fills; rename them"
        )
    passthrough = []
    for field in schema:
        if field.name in known:
            continue
        conv = _converter(field.type)
        if conv is None:
            raise ManifestError(
                f"{file.name}: passthrough column {field.name!r} has type {field.type}, which cannot be "
                "carried into the JSON sidecar (use strings, numbers, booleans, timestamps, lists or structs)"
            )
        passthrough.append((field.name, conv))
    return ColumnPlan(file, names, tuple(n for n in names if n in known), tuple(passthrough))
