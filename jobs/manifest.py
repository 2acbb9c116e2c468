"""Prompt manifests: Parquet rows in, validated and expanded `RenderJob`s out.

Sources: a Parquet file, a directory (every ``*.parquet`` below it, skipping
names that start with ``.`` or ``_`` such as ``_SUCCESS``), a glob
(``data/*.parquet``, ``**`` for any depth; as in a shell, ``*`` skips
names starting with ".") or a pyarrow filesystem URI
(``file:///...``, ``s3://...``, ``gs://...``; percent-encode spaces). Files are
read in sorted path order, and **row numbers are global and 0-based across the
files in that order**: with files of 3 and 5 rows, the second file's rows are 3..7.

Columns (a column whose value is null in a row counts as absent for that row):

- ``prompt`` (required): a string that is not empty after stripping.
- ``negative_prompt``: a string; null or blank means `DEFAULT_NEGATIVE_PROMPT`
  and the job records the text actually used.
- seeds, one way per row: ``seed`` (an integer), ``seeds`` (a list of integers)
  or ``seed_start`` + ``seed_count`` (the sweep start..start+count-1, count in
  1..100000). Seeds lie in 0..2**63-1. A row giving none gets the reader's
  ``seeds`` argument (the CLI's ``--seeds 0-99``), or seed 0 if that is None too.
- any render parameter (`PARAM_FIELDS`): overrides the model's default for the row.
- anything else is passthrough: carried to the job and the output dataset,
  converted to plain JSON-able Python (timestamps/dates become ISO 8601 strings,
  decimals strings). Output-dataset column names (``status``, ``job_id``, ...)
  cannot be passthrough names.

A row expands to one job per seed, in row order then seed order. Jobs with the
same content have the same id and are yielded once (the first row wins). The
de-duplication set keeps the 32-byte digest of every job id seen: about 100
bytes of memory per job, so 10 million jobs need about 1 GB; everything else is
bounded by the batch size.

Bad rows do not stop reading: every bad field of every row becomes a
`RowError(row, field, reason)` next to the good jobs, and the caller decides
whether to refuse the manifest or skip the rows. Whole-source problems (no
file, not Parquet, no ``prompt`` column) raise `ManifestError` naming the file.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.dataset import OUTPUT_COLUMNS
from jobs.identity import SEED_MAX, job_digest
from jobs.params import DEFAULT_NEGATIVE_PROMPT, PARAM_FIELDS, RenderParams, as_integer, check_param, describe

MAX_SEED_COUNT = 100_000
SEED_COLUMNS = ("seed", "seeds", "seed_start", "seed_count")
KNOWN_COLUMNS = frozenset(("prompt", "negative_prompt", *SEED_COLUMNS, *PARAM_FIELDS))
# Output-dataset columns a manifest cannot carry as passthrough: the reader fills them.
RESERVED_COLUMNS = OUTPUT_COLUMNS - KNOWN_COLUMNS
# A float seed is only exact up to 2**53 (float64 mantissa).
_FLOAT_SEED_MAX = 2**53


# --------------------------------------------------------------------------- jobs


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, where)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_plain(item, where)
        return
    raise ValueError(f"passthrough {where!r}: {describe(value)} is not a JSON-able plain value")


class RenderJob(BaseModel):
    """One video to render: content, identity, and where it came from.

    Build one with `RenderJob.create` (which computes `job_id`); constructing
    it directly checks that `job_id` matches the content.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    model_digest: str
    prompt: str
    negative_prompt: str
    seed: int = Field(strict=True, ge=0, le=SEED_MAX)
    params: RenderParams
    row: int = Field(default=0, strict=True, ge=0)  # manifest row (global, 0-based)
    passthrough: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("passthrough")
    @classmethod
    def _passthrough_plain(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            _check_plain(item, key)
        clash = RESERVED_COLUMNS.union(KNOWN_COLUMNS).intersection(value)
        if clash:
            raise ValueError(f"passthrough names clash with job columns: {sorted(clash)}")
        return value

    @model_validator(mode="after")
    def _id_matches_content(self) -> "RenderJob":
        expected = job_digest(self.model_digest, self.prompt, self.negative_prompt, self.seed, self.params).hex()
        if self.job_id != expected:
            raise ValueError(f"job_id {self.job_id!r:.80} does not match the job's content ({expected})")
        return self

    @classmethod
    def create(
        cls,
        *,
        model_digest: str,
        prompt: str,
        seed: int,
        params: RenderParams,
        negative_prompt: str | None = None,
        row: int = 0,
        passthrough: dict[str, Any] | None = None,
    ) -> "RenderJob":
        """A job with its id computed; a None or blank negative prompt means the default one."""
        if negative_prompt is None or not negative_prompt.strip():
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        return cls(
            job_id=job_digest(model_digest, prompt, negative_prompt, seed, params).hex(),
            model_digest=model_digest,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            params=params,
            row=row,
            passthrough=passthrough or {},
        )


@dataclass(frozen=True)
class RowError:
    """A bad field of a manifest row."""

    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.field}: {self.reason}"


class ManifestError(ValueError):
    """A problem with a whole manifest source (missing, not Parquet, no prompt column); names the file."""


@dataclass(frozen=True)
class ManifestBatch:
    """Jobs and row errors from consecutive manifest rows.

    `jobs` holds at most `batch_rows` jobs (a long sweep row spans batches).
    `rows_read` counts the rows fully read once this batch is out, for progress.
    `duplicates` counts the jobs of these rows dropped as already yielded.
    """

    jobs: list[RenderJob]
    errors: list[RowError]
    rows_read: int
    duplicates: int


@dataclass(frozen=True)
class ManifestReport:
    """What `validate_manifest` found. `errors` keeps the first `max_errors`; `n_errors` counts all."""

    files: tuple[str, ...]
    n_rows: int
    n_jobs: int
    n_duplicates: int
    n_bad_rows: int
    n_errors: int
    errors: tuple[RowError, ...]

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def __str__(self) -> str:
        return (
            f"{self.n_rows} rows in {len(self.files)} file(s): {self.n_jobs} jobs "
            f"({self.n_duplicates} duplicates dropped), {self.n_bad_rows} bad rows, {self.n_errors} errors"
        )


# --------------------------------------------------------------------------- seeds


def check_seed(value: Any) -> int:
    """A seed as an int in 0..2**63-1, or ValueError with the reason."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) > _FLOAT_SEED_MAX:
        raise ValueError(f"a float seed above 2**53 is not exact; store seeds as integers, got {value!r}")
    seed = as_integer(value)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"must be an integer in 0..2**63-1, got {describe(seed)}")
    return seed


def parse_seed_range(text: str) -> list[int]:
    """Seeds from a CLI range: "7", "0-99", "0-9,20-29" (inclusive, ascending, no overlaps, at most 100000)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"seed range must be like '0-99', '7' or '0-9,20-29', got {text!r:.60}")
    seeds: list[int] = []
    seen: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() and b.strip().isascii() for b in bounds):
            raise ValueError(f"seed range {text!r:.60}: {part.strip()!r:.40} is not 'N' or 'N-M' with N, M >= 0")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise ValueError(f"seed range {text!r:.60}: {lo}-{hi} runs backwards")
        if hi > SEED_MAX:
            raise ValueError(f"seed range {text!r:.60}: seeds must be at most 2**63-1")
        if len(seeds) + (hi - lo + 1) > MAX_SEED_COUNT:
            raise ValueError(f"seed range {text!r:.60}: more than {MAX_SEED_COUNT} seeds")
        for seed in range(lo, hi + 1):
            if seed in seen:
                raise ValueError(f"seed range {text!r:.60}: seed {seed} appears twice")
            seen.add(seed)
            seeds.append(seed)
    return seeds


# --------------------------------------------------------------------------- sources


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Path segments against glob segments, as a shell does: ``**`` matches any number
    of segments, and names starting with "." match only a pattern segment that does too."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(
            _match(pattern[1:], parts[k:]) for k in range(len(parts) + 1) if not any(p.startswith(".") for p in parts[:k])
        )
    return (
        bool(parts)
        and (not parts[0].startswith(".") or pattern[0].startswith("."))
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _match(pattern[1:], parts[1:])
    )


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


@dataclass(frozen=True)
class _File:
    fs: pafs.FileSystem
    path: str
    name: str  # for messages: the path, or the URI for remote sources


def _list_files(source: str) -> list[_File]:
    """The Parquet files of a source, sorted by path; ManifestError if there are none."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ManifestError(f"manifest source must be a path or URI, got {source!r:.80}")
    scheme = source.split("://", 1)[0] if "://" in source else None
    # Split off the glob part before resolving: '?' would otherwise start a URI query.
    segments = source.split("/")
    cut = next((i for i, seg in enumerate(segments) if _has_glob(seg)), len(segments))
    prefix, pattern_rest = "/".join(segments[:cut]), segments[cut:]
    try:
        if scheme is None:
            fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(prefix or "."))
        else:
            fs, base = pafs.FileSystem.from_uri(prefix)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise ManifestError(f"{source}: cannot open manifest source ({_first_line(exc)})") from None
    base = base.rstrip("/") or "/"

    def name(path: str) -> str:
        return path if scheme is None else f"{scheme}://{path}"

    def listing(directory: str, recursive: bool) -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(directory, recursive=recursive))
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{name(directory)}: cannot list manifest files ({_first_line(exc)})") from None

    if pattern_rest:
        pattern = [seg for seg in pattern_rest if seg]
        infos = listing(base, recursive=len(pattern) > 1 or "**" in pattern)
        paths = [
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and _match(pattern, posixpath.relpath(info.path, base).split("/"))
        ]
        if not paths:
            raise ManifestError(f"{source}: no files match")
        return [_File(fs, p, name(p)) for p in sorted(paths)]

    try:
        info = fs.get_file_info(base)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"{name(base)}: cannot read manifest ({_first_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{name(base)}: manifest not found")
    if info.type == pafs.FileType.File:
        return [_File(fs, base, name(base))]
    paths = [
        i.path
        for i in listing(base, recursive=True)
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not _hidden(posixpath.relpath(i.path, base))
    ]
    if not paths:
        raise ManifestError(f"{name(base)}: no .parquet files in this directory")
    return [_File(fs, p, name(p)) for p in sorted(paths)]


# --------------------------------------------------------------------------- columns


class UnreadableCell:
    """A cell pyarrow could not turn into a Python value (e.g. a timestamp beyond year 9999)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"({self.reason})"


def _column_values(array: pa.Array) -> list[Any]:
    """The Python values of a column; cell by cell, with `UnreadableCell`s, if the whole fails."""
    try:
        return array.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):
        values: list[Any] = []
        for k in range(len(array)):
            try:
                values.append(array[k].as_py())
            except (ValueError, OverflowError, pa.ArrowException) as exc:
                values.append(UnreadableCell(_first_line(exc)))
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
class _Plan:
    """What each column of one manifest file is for, decided from its schema."""

    file: _File
    names: list[str]
    known: tuple[str, ...]
    passthrough: tuple[tuple[str, Converter], ...]


def _plan(file: _File) -> _Plan:
    """Read a file's footer and decide its columns; ManifestError for whole-file problems."""
    try:
        with file.fs.open_input_file(file.path) as f:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"{file.name}: not a readable Parquet file ({_first_line(exc)})") from None
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"{file.name}: duplicate column names {dupes}")
    if "prompt" not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ManifestError(f"{file.name}: no 'prompt' column (columns: {shown or 'none'})")
    reserved = sorted(RESERVED_COLUMNS.intersection(names))
    if reserved:
        raise ManifestError(
            f"{file.name}: columns {reserved} are output-dataset columns that reelray fills; rename them"
        )
    passthrough = []
    for field in schema:
        if field.name in KNOWN_COLUMNS:
            continue
        conv = _converter(field.type)
        if conv is None:
            raise ManifestError(
                f"{file.name}: passthrough column {field.name!r} has type {field.type}, which cannot be "
                "carried into the JSON sidecar (use strings, numbers, booleans, timestamps, lists or structs)"
            )
        passthrough.append((field.name, conv))
    known = tuple(n for n in names if n in KNOWN_COLUMNS)
    return _Plan(file, names, known, tuple(passthrough))


def _open_source(source: str) -> list[_Plan]:
    return [_plan(f) for f in _list_files(source)]


# --------------------------------------------------------------------------- rows


@dataclass(slots=True)
class _RowSpec:
    """A valid row, before seed expansion."""

    row: int
    prompt: str
    negative_prompt: str
    params: RenderParams
    seeds: Sequence[int]
    passthrough: dict[str, Any]


_MISS = object()
_MEMO_MAX = 65536
_PARAM_CHECKS = {name: functools.partial(check_param, name) for name in PARAM_FIELDS}


def _checked(memo: dict, check: Callable[[Any], Any], value: Any) -> tuple[bool, Any]:
    """(True, normalised value) or (False, reason), remembered per distinct (type, value).

    A column of a million rows usually holds a few distinct values; the type is
    part of the key because True == 1 and 50.0 == 50 in Python.
    """
    key = (value.__class__, value)
    try:
        hit = memo.get(key, _MISS)
    except TypeError:  # unhashable (a list or struct cell): nothing to remember
        key, hit = None, _MISS
    if hit is _MISS:
        try:
            hit = (True, check(value))
        except ValueError as exc:
            hit = (False, str(exc))
        if key is not None:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = hit
    return hit


def _prompt_reason(prompt: Any) -> str:
    if prompt is None:
        return "is missing (null)"
    if not isinstance(prompt, str):
        return f"must be a string, got {describe(prompt)}"
    return "must not be empty"


class _RowParser:
    """Turns the Python values of manifest rows into `_RowSpec`s or their `RowError`s."""

    def __init__(self, defaults: RenderParams, seeds: Sequence[int] | None):
        if not isinstance(defaults, RenderParams):
            raise TypeError(f"defaults must be a RenderParams, got {type(defaults).__name__}")
        self.defaults = defaults
        if seeds is None:
            self.default_seeds: Sequence[int] = (0,)
        else:
            self.default_seeds = tuple(check_seed(s) for s in seeds)
            if not self.default_seeds:
                raise ValueError("seeds must not be empty (None means seed 0)")
        self._memos: dict[str, dict] = {name: {} for name in PARAM_FIELDS}
        # Most manifests use a handful of parameter combinations: build each RenderParams once.
        self._params: dict[tuple, RenderParams] = {(): defaults}

    def _params_for(self, overrides: tuple[tuple[str, Any], ...]) -> RenderParams:
        params = self._params.get(overrides)
        if params is None:
            if len(self._params) >= 4096:
                self._params = {(): self.defaults}
            params = self._params[overrides] = self.defaults.override(**dict(overrides))
        return params

    def parse_batch(
        self,
        first: int,
        n: int,
        cols: dict[str, list],
        extra: list[tuple[str, Converter, list]],
    ) -> list[_RowSpec | list[RowError]]:
        """Rows first..first+n-1 from their column values; one entry per row, in order."""
        prompts = cols["prompt"]
        negatives = cols.get("negative_prompt")
        param_cols = [(name, cols[name], self._memos[name]) for name in PARAM_FIELDS if name in cols]
        seed_cols = [cols.get(name) for name in SEED_COLUMNS]
        any_seed_col = any(c is not None for c in seed_cols)
        out: list[_RowSpec | list[RowError]] = []
        for j in range(n):
            row = first + j
            errors: list[RowError] = []

            prompt = prompts[j]
            if prompt.__class__ is not str or not prompt.strip():
                errors.append(RowError(row, "prompt", _prompt_reason(prompt)))

            negative = DEFAULT_NEGATIVE_PROMPT if negatives is None else negatives[j]
            if negative is None:
                negative = DEFAULT_NEGATIVE_PROMPT
            elif not isinstance(negative, str):
                errors.append(RowError(row, "negative_prompt", f"must be a string, got {describe(negative)}"))
            elif not negative.strip():
                negative = DEFAULT_NEGATIVE_PROMPT

            overrides = []
            for name, values, memo in param_cols:
                value = values[j]
                if value is None:
                    continue
                ok, result = _checked(memo, _PARAM_CHECKS[name], value)
                if ok:
                    overrides.append((name, result))
                else:
                    errors.append(RowError(row, name, result))

            if any_seed_col:
                seeds = self._seeds(row, [None if c is None else c[j] for c in seed_cols], errors)
            else:
                seeds = self.default_seeds

            passthrough = {}
            for name, conv, values in extra:
                value = values[j]
                if isinstance(value, UnreadableCell):
                    errors.append(RowError(row, name, f"cannot be read: {value.reason}"))
                else:
                    passthrough[name] = conv(value)

            if errors:
                out.append(errors)
            else:
                out.append(_RowSpec(row, prompt, negative, self._params_for(tuple(overrides)), seeds, passthrough))
        return out

    def _seeds(self, row: int, cells: list[Any], errors: list[RowError]) -> Sequence[int]:
        """The seeds of a row from its (seed, seeds, seed_start, seed_count) cells; () after an error."""
        seed, seeds, start, count = cells
        if seed.__class__ is int and seeds is None and start is None and count is None and 0 <= seed <= SEED_MAX:
            return (seed,)  # the common case, checked without a call

        def bad(field: str, reason: str) -> tuple[()]:
            errors.append(RowError(row, field, reason))
            return ()

        given = [
            label
            for label, present in (
                ("seed", seed is not None),
                ("seeds", seeds is not None),
                ("seed_start+seed_count", start is not None or count is not None),
            )
            if present
        ]
        if len(given) > 1:
            return bad("seed", f"give one of seed, seeds, seed_start+seed_count; this row gives {' and '.join(given)}")
        if not given:
            return self.default_seeds
        if seed is not None:
            try:
                return (check_seed(seed),)
            except ValueError as exc:
                return bad("seed", str(exc))
        if seeds is not None:
            if not isinstance(seeds, list):
                return bad("seeds", f"must be a list of integers, got {describe(seeds)}")
            if not seeds:
                return bad("seeds", "must not be empty")
            if len(seeds) > MAX_SEED_COUNT:
                return bad("seeds", f"must hold at most {MAX_SEED_COUNT} seeds, got {len(seeds)}")
            checked = []
            for k, value in enumerate(seeds):
                try:
                    checked.append(check_seed(value))
                except ValueError as exc:
                    return bad("seeds", f"element {k}: {exc}")
            return checked
        if start is None:
            return bad("seed_start", "is missing: seed_count needs seed_start")
        if count is None:
            return bad("seed_count", "is missing: seed_start needs seed_count")
        try:
            start = check_seed(start)
        except ValueError as exc:
            bad("seed_start", str(exc))
            start = None
        try:
            count = as_integer(count)
            if not 1 <= count <= MAX_SEED_COUNT:
                raise ValueError(f"must be an integer in 1..{MAX_SEED_COUNT}, got {describe(count)}")
        except ValueError as exc:
            return bad("seed_count", str(exc))
        if start is None:
            return ()
        if start + count - 1 > SEED_MAX:
            return bad("seed_count", f"the sweep {start}+{count} runs past 2**63-1")
        return range(start, start + count)


def _row_specs(plans: list[_Plan], parser: _RowParser, batch_rows: int) -> Iterator[tuple[int, list]]:
    """Per Arrow record batch: (rows read after it, [spec or [RowError], ...] in row order)."""
    first = 0
    for plan in plans:
        file = plan.file
        try:
            with file.fs.open_input_file(file.path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    if batch.schema.names != plan.names:
                        raise ManifestError(f"{file.name}: the file changed while being read (its columns differ)")
                    cols = {name: _column_values(batch.column(name)) for name in plan.known}
                    extra = [(name, conv, _column_values(batch.column(name))) for name, conv in plan.passthrough]
                    specs = parser.parse_batch(first, batch.num_rows, cols, extra)
                    first += batch.num_rows
                    yield first, specs
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{file.name}: cannot read Parquet data ({_first_line(exc)})") from None


def _new_jobs(spec: _RowSpec, model_digest: str, seen: set[bytes]) -> Iterator[tuple[bytes, int]]:
    """(digest, seed) for each job of a row whose id was not seen before."""
    for seed in spec.seeds:
        digest = job_digest(model_digest, spec.prompt, spec.negative_prompt, seed, spec.params)
        if digest not in seen:
            seen.add(digest)
            yield digest, seed


# --------------------------------------------------------------------------- public


def _check_arguments(model_digest: Any, batch_rows: Any) -> None:
    if not isinstance(model_digest, str) or not model_digest:
        raise ValueError(f"model_digest must be a non-empty string, got {model_digest!r:.80}")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r:.80}")


def read_manifest(
    source: str | os.PathLike[str],
    *,
    model_digest: str,
    defaults: RenderParams,
    seeds: Sequence[int] | None = None,
    batch_rows: int = 65536,
) -> Iterator[ManifestBatch]:
    """Stream the jobs and row errors of a manifest source, `batch_rows` rows (and at most that many jobs) at a time.

    The source is listed and every file's footer read before this returns, so
    a missing or non-Parquet file raises `ManifestError` here, not halfway.
    """
    _check_arguments(model_digest, batch_rows)
    plans = _open_source(source)
    parser = _RowParser(defaults, seeds)

    def batches() -> Iterator[ManifestBatch]:
        seen: set[bytes] = set()
        jobs: list[RenderJob] = []
        errors: list[RowError] = []
        duplicates = 0
        for rows_read, specs in _row_specs(plans, parser, batch_rows):
            for spec in specs:
                if isinstance(spec, list):
                    errors.extend(spec)
                    continue
                n_new = 0
                for digest, seed in _new_jobs(spec, model_digest, seen):
                    n_new += 1
                    jobs.append(
                        RenderJob.model_construct(  # fields already validated by the parser
                            job_id=digest.hex(),
                            model_digest=model_digest,
                            prompt=spec.prompt,
                            negative_prompt=spec.negative_prompt,
                            seed=seed,
                            params=spec.params,
                            row=spec.row,
                            passthrough=dict(spec.passthrough),
                        )
                    )
                    if len(jobs) >= batch_rows:
                        yield ManifestBatch(jobs, errors, spec.row, duplicates)
                        jobs, errors, duplicates = [], [], 0
                duplicates += len(spec.seeds) - n_new
            yield ManifestBatch(jobs, errors, rows_read, duplicates)
            jobs, errors, duplicates = [], [], 0

    return batches()


def validate_manifest(
    source: str | os.PathLike[str],
    *,
    model_digest: str,
    defaults: RenderParams,
    seeds: Sequence[int] | None = None,
    batch_rows: int = 65536,
    max_errors: int = 1000,
) -> ManifestReport:
    """Read a whole manifest without building jobs; memory is bounded by the batch and the de-duplication set."""
    _check_arguments(model_digest, batch_rows)
    if isinstance(max_errors, bool) or not isinstance(max_errors, int) or max_errors < 0:
        raise ValueError(f"max_errors must be an integer >= 0, got {max_errors!r:.80}")
    plans = _open_source(source)
    parser = _RowParser(defaults, seeds)
    seen: set[bytes] = set()
    n_rows = n_jobs = n_duplicates = n_bad_rows = n_errors = 0
    kept: list[RowError] = []
    for rows_read, specs in _row_specs(plans, parser, batch_rows):
        n_rows = rows_read
        for spec in specs:
            if isinstance(spec, list):
                n_bad_rows += 1
                n_errors += len(spec)
                kept.extend(spec[: max(0, max_errors - len(kept))])
                continue
            n_new = sum(1 for _ in _new_jobs(spec, model_digest, seen))
            n_jobs += n_new
            n_duplicates += len(spec.seeds) - n_new
    return ManifestReport(
        files=tuple(p.file.name for p in plans),
        n_rows=n_rows,
        n_jobs=n_jobs,
        n_duplicates=n_duplicates,
        n_bad_rows=n_bad_rows,
        n_errors=n_errors,
        errors=tuple(kept),
    )



def load_jobs(
    source: str | os.PathLike[str],
    *,
    model_digest: str,
    defaults: RenderParams,
    seeds: Sequence[int] | None = None,
    batch_rows: int = 65536,
) -> tuple[list[RenderJob], list[RowError], int]:
    """All jobs, all row errors and the row count of a manifest, in memory.

    For a driver that schedules the whole job list anyway; `validate_manifest`
    counts without holding jobs, and `read_manifest` streams.
    """
    jobs: list[RenderJob] = []
    errors: list[RowError] = []
    n_rows = 0
    for batch in read_manifest(source, model_digest=model_digest, defaults=defaults, seeds=seeds, batch_rows=batch_rows):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
        n_rows = batch.rows_read
    return jobs, errors, n_rows
