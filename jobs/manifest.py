"""Prompt manifests: Parquet rows in, validated and expanded `RenderJob`s out.

Sources (`jobs.sources`): a Parquet file, a directory, a glob or a pyarrow
filesystem URI. Files are read in sorted path order, and **row numbers are
global and 0-based across the files in that order**: with files of 3 and 5
rows, the second file's rows are 3..7.

Columns (a column whose value is null in a row counts as absent for that row):

- ``prompt`` (required): a string that is not empty after stripping.
- ``negative_prompt``: a string; null or blank means the family's default
  (the official Wan negative prompt) and the job records the text actually used.
- seeds, one way per row: ``seed`` (an integer), ``seeds`` (a list of integers)
  or ``seed_start`` + ``seed_count`` (the sweep start..start+count-1, count in
  1..100000). Seeds lie in 0..2**63-1. A row giving none gets the reader's
  ``seeds`` argument (the CLI's ``--seeds 0-99``), or seed 0 if that is None too.
- any render parameter of the family (``width``, ``steps``, ``guidance_2``, ...):
  overrides the family's default for the row.
- the family's conditioning inputs: an ``image`` or ``video`` input is a
  string, a local path or a filesystem URI; an ``images`` input (e.g.
  ``reference_images``) a list of them (list<string>; one string is a
  one-element list; null or an empty list gives none). Relative paths are
  taken from the manifest file's folder. The job id holds each file's content
  digest (a list input: the list of its digests, in order), each distinct file
  hashed, and its header checked, once per batch. An input given without the
  input it ``needs`` is the row's error.
- a parameter or input of another family (the reader's ``foreign`` names):
  an error in each row that gives it.
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

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.columns import ColumnPlan, column_values, plan_columns
from jobs.dataset import OUTPUT_COLUMNS
from jobs.family import FamilySpec
from jobs.identity import job_digest
from jobs.inputs import FileKind, InputError, digest_inputs
from jobs.job import InputRef, RenderJob, input_digests
from jobs.rows import RowError, RowParser, RowSpec
from jobs.sources import ManifestError, first_line, list_files

__all__ = ["ManifestBatch", "ManifestError", "RowError", "load_jobs", "read_manifest"]

# {uri: what the file holds} in; {uri: its sha256 hex, or the InputError saying why it cannot be used} out.
# `jobs.inputs.digest_inputs` hashes; the driver's callable also checks each file's header by its kind.
DigestInputs = Callable[[Mapping[str, FileKind]], Mapping[str, str | InputError]]


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


def _row_specs(plans: list[ColumnPlan], parser: RowParser, batch_rows: int) -> Iterator[tuple[int, list]]:
    """Per Arrow record batch: (rows read after it, [spec or [RowError], ...] in row order)."""
    first = 0
    for plan in plans:
        file = plan.file
        try:
            with file.fs.open_input_file(file.path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    if batch.schema.names != plan.names:
                        raise ManifestError(f"{file.name}: the file changed while being read (its columns differ)")
                    cols = {name: column_values(batch.column(name)) for name in plan.known}
                    extra = [(name, conv, column_values(batch.column(name))) for name, conv in plan.passthrough]
                    specs = parser.parse_batch(first, batch.num_rows, cols, extra, file)
                    first += batch.num_rows
                    yield first, specs
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{file.name}: cannot read Parquet data ({first_line(exc)})") from None


def _hash_inputs(specs: list, digest: DigestInputs, kinds: Mapping[str, FileKind]) -> list:
    """Specs with their input files hashed (each distinct file once): (spec, {name: InputRef or [InputRef]}),
    or the row's errors for a file that cannot be read. `kinds` gives each input name's file kind."""
    # One call for every distinct file; a file that rows name as two kinds (an image here, a
    # video there) is looked at once more for each other kind, so each row's file is checked as what it is.
    rounds: list[dict[str, FileKind]] = [{}]
    for spec in specs:
        if not isinstance(spec, RowSpec):
            continue
        for name, ref in spec.inputs.items():
            kind = kinds[name]
            for uri in (ref if ref.__class__ is list else (ref,)):
                if uri.__class__ is tuple:  # a LoRA: (path, strength)
                    uri = uri[0]
                for wanted in rounds:
                    if wanted.setdefault(uri, kind) == kind:
                        break
                else:
                    rounds.append({uri: kind})
    found: dict[tuple[str, FileKind], Any] = {}
    for wanted in rounds:
        if wanted:
            results = digest(dict(sorted(wanted.items())))
            found.update(((uri, kind), results[uri]) for uri, kind in wanted.items())

    def ref_of(uri: str | tuple[str, float], kind: FileKind, name: str, row: int, errors: list,
               where: str = "") -> InputRef | None:
        strength = None
        if uri.__class__ is tuple:  # a LoRA: (path, strength)
            uri, strength = uri
        result = found[uri, kind]
        if isinstance(result, str):
            return InputRef(uri=uri, sha256=result, strength=strength)
        errors.append(RowError(row, name, f"{where}{result}"))
        return None

    out = []
    for spec in specs:
        if not isinstance(spec, RowSpec):
            out.append(spec)
            continue
        refs: dict[str, InputRef | list[InputRef]] = {}
        errors: list[RowError] = []
        for name, ref in spec.inputs.items():
            kind = kinds[name]
            if ref.__class__ is list:
                n_errors = len(errors)
                items = [ref_of(uri, kind, name, spec.row, errors, f"element {k}: ") for k, uri in enumerate(ref)]
                if len(errors) == n_errors:
                    refs[name] = items
            else:
                item = ref_of(ref, kind, name, spec.row, errors)
                if item is not None:
                    refs[name] = item
        out.append(errors if errors else (spec, refs))
    return out


def read_manifest(
    source: str | os.PathLike[str],
    *,
    model_digest: str,
    family: FamilySpec,
    seeds: Sequence[int] | None = None,
    foreign: frozenset[str] = frozenset(),
    batch_rows: int = 65536,
    digest: DigestInputs = digest_inputs,
    input_defaults: Mapping[str, Sequence[Any]] | None = None,
) -> Iterator[ManifestBatch]:
    """Stream the jobs and row errors of a manifest source, `batch_rows` rows (and at most that many jobs) at a time.

    `family` gives the render parameters (with their defaults) and inputs a
    row may have; `foreign` the names of other families' parameters and inputs;
    `input_defaults` what a list input ("loras") is in rows that leave it null.
    The source is listed and every file's footer read before this returns, so
    a missing or non-Parquet file raises `ManifestError` here, not halfway.
    """
    if not isinstance(model_digest, str) or not model_digest:
        raise ValueError(f"model_digest must be a non-empty string, got {model_digest!r:.80}")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r:.80}")
    parser = RowParser(family, seeds, foreign, input_defaults)
    reserved = (OUTPUT_COLUMNS - parser.known) | {f"{name}_sha256" for name in family.input_names} \
        | {f"{spec.name}_strength" for spec in family.inputs if spec.kind == "loras"}
    kinds = {spec.name: spec.file_kind for spec in family.inputs}
    plans = [plan_columns(f, parser.known, frozenset(reserved)) for f in list_files(source)]

    def batches() -> Iterator[ManifestBatch]:
        seen: set[bytes] = set()
        jobs: list[RenderJob] = []
        errors: list[RowError] = []
        duplicates = 0
        for rows_read, specs in _row_specs(plans, parser, batch_rows):
            for item in _hash_inputs(specs, digest, kinds):
                if isinstance(item, list):
                    errors.extend(item)
                    continue
                spec, refs = item
                digests = input_digests(refs)
                n_new = 0
                for seed in spec.seeds:
                    job_key = job_digest(model_digest, spec.prompt, spec.negative_prompt, seed, spec.params,
                                         family.name, digests)
                    if job_key in seen:
                        continue
                    seen.add(job_key)
                    n_new += 1
                    jobs.append(
                        RenderJob.model_construct(  # fields already validated by the parser
                            job_id=job_key.hex(),
                            family=family.name,
                            model_digest=model_digest,
                            prompt=spec.prompt,
                            negative_prompt=spec.negative_prompt,
                            seed=seed,
                            params=spec.params,
                            inputs=refs,
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


def load_jobs(
    source: str | os.PathLike[str],
    *,
    model_digest: str,
    family: FamilySpec,
    seeds: Sequence[int] | None = None,
    foreign: frozenset[str] = frozenset(),
    batch_rows: int = 65536,
    digest: DigestInputs = digest_inputs,
    input_defaults: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[list[RenderJob], list[RowError], int]:
    """All jobs, all row errors and the row count of a manifest, in memory (for a driver that
    schedules the whole job list anyway; `read_manifest` streams)."""
    jobs: list[RenderJob] = []
    errors: list[RowError] = []
    n_rows = 0
    for batch in read_manifest(source, model_digest=model_digest, family=family, seeds=seeds,
                               foreign=foreign, batch_rows=batch_rows, digest=digest, input_defaults=input_defaults):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
        n_rows = batch.rows_read
    return jobs, errors, n_rows
