"""The output dataset: one row per job, its Arrow schema, and its sidecar JSON.

A finished job leaves two files under the output root (`jobs.identity`):
`videos/ab/<job_id>.mp4` and `videos/ab/<job_id>.json`, the sidecar, written
last, which is the job's commit marker and holds exactly the job's dataset
row. Compaction gathers sidecars into `metadata/*.parquet` with
`rows_to_table`; resume reads either to learn which jobs are done.

`file_name` is the MP4's path relative to the output root, the column Hugging
Face `videofolder` reads. The family's other parameters, its inputs (`name`
and `name_sha256`: strings for a one-file input, list<string> for a list
input) and the manifest's extra columns ("passthrough") are appended after the
fixed columns, their Arrow types inferred from the values (a row without such
a column, e.g. from an older sidecar or another family, holds null there).

Rows are plain dicts; timestamps in them are timezone-aware `datetime`s (UTC).
In the sidecar they are ISO 8601 strings. The sidecar is canonical JSON except
that a non-finite passthrough float is written as Python's `NaN`/`Infinity`
(a manifest may carry them, and the row must round-trip).
"""
from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from jobs.identity import LEGACY_FAMILY, canonical_json, check_job_id, sidecar_relpath, video_relpath

if TYPE_CHECKING:
    from jobs.job import RenderJob

__all__ = [
    "OUTPUT_SCHEMA",
    "OUTPUT_COLUMNS",
    "STATUSES",
    "SidecarError",
    "make_row",
    "rows_to_table",
    "sidecar_bytes",
    "parse_sidecar",
    "with_added_columns",
    "video_relpath",
    "sidecar_relpath",
]

DATASET_SCHEMA = "reelray.dataset/1"
STATUSES = ("done", "failed")

_UTC_US = pa.timestamp("us", tz="UTC")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("negative_prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float64(), nullable=False),
        pa.field("shift", pa.float64(), nullable=False),
        pa.field("fps", pa.int32(), nullable=False),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("model_digest", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("frames_sha256", pa.string()),
        pa.field("video_sha256", pa.string()),
        pa.field("video_bytes", pa.int64()),  # size of the MP4
        # the rendered video's size: the job's width x height, or the size chosen from its
        # image where the family's width and height 0 mean "from the image"
        pa.field("video_width", pa.int32()),
        pa.field("video_height", pa.int32()),
        pa.field("started_at", _UTC_US),
        pa.field("finished_at", _UTC_US),
        pa.field("render_s", pa.float64()),
        pa.field("encode_s", pa.float64()),
        pa.field("total_s", pa.float64()),
        pa.field("node", pa.string()),
        pa.field("actor", pa.string()),
        pa.field("software", pa.string()),  # JSON object of package versions
        pa.field("row", pa.int64(), nullable=False),  # the manifest row the job came from
    ],
    metadata={b"reelray.schema": DATASET_SCHEMA.encode()},
)
OUTPUT_COLUMNS = frozenset(OUTPUT_SCHEMA.names)
# Sidecars written before a column existed, and what that column held for them:
# before families, every job was Wan2.1 T2V.
ADDED_COLUMNS = {"family": LEGACY_FAMILY, "video_width": None, "video_height": None}


class SidecarError(ValueError):
    """A sidecar JSON that cannot be read back as a row (the job counts as not done)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: bad sidecar: {reason}")
        self.path = path
        self.reason = reason


def with_added_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from a sidecar or a metadata file written before some columns existed,
    with those columns as they would have been (`ADDED_COLUMNS`)."""
    return {**ADDED_COLUMNS, **row} if not ADDED_COLUMNS.keys() <= row.keys() else row


def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r:.60}")
    return value.astimezone(timezone.utc)


def _seconds(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r:.60}")
    return float(value)


def make_row(
    job: RenderJob,
    *,
    status: str,
    attempts: int,
    error: str | None = None,
    frames_sha256: str | None = None,
    video_sha256: str | None = None,
    video_bytes: int | None = None,
    video_size: tuple[int, int] | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    render_s: float | None = None,
    encode_s: float | None = None,
    total_s: float | None = None,
    node: str | None = None,
    actor: str | None = None,
    software: Mapping[str, str] | str | None = None,
    model_digest: str | None = None,
) -> dict[str, Any]:
    """The dataset row of `job` with the outcome of its rendering.

    A "done" row carries both digests and no error; a "failed" row carries the error.
    `video_size` is the rendered video's (width, height).
    `model_digest` comes from the job; passing it too only checks that the two agree.
    """
    if model_digest is not None and model_digest != job.model_digest:
        raise ValueError(f"model_digest {model_digest!r:.80} is not the job's {job.model_digest!r:.80}")
    if video_bytes is not None and (isinstance(video_bytes, bool) or not isinstance(video_bytes, int) or video_bytes < 0):
        raise ValueError(f"video_bytes must be an integer >= 0, got {video_bytes!r:.60}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status == "done" and (error is not None or not frames_sha256 or not video_sha256):
        raise ValueError("a done row needs frames_sha256 and video_sha256 and no error")
    if status == "failed" and not error:
        raise ValueError("a failed row needs its error")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError(f"attempts must be an integer >= 0, got {attempts!r}")
    if isinstance(software, Mapping):
        software = canonical_json(dict(software)).decode("utf-8")
    params = job.params
    row: dict[str, Any] = {
        "job_id": job.job_id,
        "file_name": video_relpath(job.job_id),
        "family": job.family,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "width": params.width,
        "height": params.height,
        "frames": params.frames,
        "steps": params.steps,
        "guidance": params.guidance,
        "shift": params.shift,
        "fps": params.fps,
        "sampler": params.sampler,
        "model_digest": job.model_digest,
        "status": status,
        "error": error,
        "attempts": attempts,
        "frames_sha256": frames_sha256,
        "video_sha256": video_sha256,
        "video_bytes": video_bytes,
        "video_width": None if video_size is None else int(video_size[0]),
        "video_height": None if video_size is None else int(video_size[1]),
        "started_at": _utc(started_at, "started_at"),
        "finished_at": _utc(finished_at, "finished_at"),
        "render_s": _seconds(render_s, "render_s"),
        "encode_s": _seconds(encode_s, "encode_s"),
        "total_s": _seconds(total_s, "total_s"),
        "node": node,
        "actor": actor,
        "software": software,
        "row": job.row,
    }
    # The family's other parameters (guidance_2, boundary, ...) and its inputs
    # (path and content digest; a LoRA list also its strengths) follow the fixed
    # columns, then the passthrough.
    # A list parameter (step_list) is a list<int64> column, null where the job does not give it.
    family_columns = {name: list(value) if isinstance(value, tuple) else value
                      for name, value in params.items() if name not in row}
    for name, ref in job.inputs.items():
        if isinstance(ref, list):  # a list input: both columns are lists, in the input's order
            family_columns[name] = [r.uri for r in ref]
            family_columns[f"{name}_sha256"] = [r.sha256 for r in ref]
            if ref and ref[0].strength is not None:  # LoRAs: their strengths too
                family_columns[f"{name}_strength"] = [r.strength for r in ref]
        else:
            family_columns[name] = ref.uri
            family_columns[f"{name}_sha256"] = ref.sha256
    clash = (OUTPUT_COLUMNS | set(family_columns)).intersection(job.passthrough)
    if clash:
        raise ValueError(f"passthrough columns clash with output columns: {sorted(clash)}")
    row.update(family_columns)
    row.update(job.passthrough)
    return row


def _passthrough_array(name: str, values: list[Any]) -> pa.Array:
    """Arrow infers a passthrough column's type from its values.

    Values whose types disagree across rows (an int in one manifest file, a
    string in another) cannot share one Arrow type; such a column is stored as
    JSON text rather than failing a compaction of finished work.
    """
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(
            [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values],
            type=pa.string(),
        )


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The dataset table of `rows`: `OUTPUT_SCHEMA` followed by the family's and the passthrough columns,
    sorted by name: rows read back from sidecars (canonical JSON, keys sorted) and rows made in
    memory give the same column order, so a resumed run rewrites the same dataset."""
    rows = list(rows)
    columns = {name: [r[name] for r in rows] for name in OUTPUT_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
    extra = sorted({name for r in rows for name in r if name not in OUTPUT_COLUMNS})
    for name in extra:
        table = table.append_column(name, _passthrough_array(name, [r.get(name) for r in rows]))
    return table


def _sidecar_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return value


def sidecar_bytes(row: Mapping[str, Any]) -> bytes:
    """The sidecar file of a row: canonical JSON, timestamps as ISO 8601, ending with a newline."""
    missing = [name for name in OUTPUT_SCHEMA.names if name not in row]
    if missing:
        raise ValueError(f"row lacks output columns {missing}")
    return canonical_json({k: _sidecar_value(v) for k, v in row.items()}, allow_nan=True) + b"\n"


def _check_value(field: pa.Field, value: Any) -> Any:
    """`value` as the row holds it for `field`, or ValueError. Only types are checked here."""
    if value is None:
        if not field.nullable:
            raise ValueError("is null")
        return None
    t = field.type
    if pa.types.is_string(t):
        ok = isinstance(value, str)
    elif pa.types.is_integer(t):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif pa.types.is_floating(t):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif pa.types.is_timestamp(t):
        try:
            parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        ok = parsed is not None and parsed.tzinfo is not None
        value = parsed.astimezone(timezone.utc) if ok else value
    else:  # pragma: no cover - the schema holds only the types above
        raise AssertionError(t)
    if not ok:
        raise ValueError(f"expected {t}, got {type(value).__name__} {value!r:.60}")
    return value


def parse_sidecar(data: bytes, path: str) -> dict[str, Any]:
    """The row held in sidecar bytes read from `path`; SidecarError naming `path` if it is not a whole, valid row."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(path, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SidecarError(path, f"expected a JSON object, got {type(obj).__name__}")
    obj = with_added_columns(obj)
    missing = [name for name in OUTPUT_SCHEMA.names if name not in obj]
    if missing:
        raise SidecarError(path, f"missing keys {missing}")
    for field in OUTPUT_SCHEMA:
        try:
            obj[field.name] = _check_value(field, obj[field.name])
        except ValueError as exc:
            raise SidecarError(path, f"{field.name}: {exc}") from None
    try:
        check_job_id(obj["job_id"])
    except ValueError as exc:
        raise SidecarError(path, str(exc)) from None
    if obj["file_name"] != video_relpath(obj["job_id"]):
        raise SidecarError(path, f"file_name {obj['file_name']!r:.80} does not match job_id")
    if obj["status"] not in STATUSES:
        raise SidecarError(path, f"status must be one of {STATUSES}, got {obj['status']!r:.40}")
    name = posixpath.basename(str(path).replace("\\", "/"))
    stem = name[: -len(".json")] if name.endswith(".json") else None
    if stem is not None and len(stem) == 64 and stem != obj["job_id"]:
        raise SidecarError(path, f"holds job {obj['job_id']}, not the job its name says")
    return obj
