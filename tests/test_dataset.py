"""The output dataset: schema, rows, sidecars and what counts as done."""
import json
import math
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.dataset import (
    OUTPUT_SCHEMA,
    SidecarError,
    make_row,
    parse_sidecar,
    rows_to_table,
    sidecar_bytes,
)
from engine.families import FAMILIES
from engine.families.wan21_t2v import SPEC as WAN21
from jobs.identity import sidecar_relpath, video_relpath
from jobs.job import InputRef, RenderJob
from jobs.params import DEFAULT_NEGATIVE_PROMPT

MODEL = "cd" * 32
PARAMS = WAN21.params(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16, sampler="unipc")
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def job(prompt="a red fox", seed=0, row=0, **passthrough):
    return RenderJob.create(
        family="wan2.1-t2v", model_digest=MODEL, prompt=prompt, seed=seed, params=PARAMS, row=row,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT, passthrough=passthrough,
    )


def done_row(j, **kw):
    args = dict(
        status="done", attempts=1, frames_sha256="f" * 64, video_sha256="e" * 64, video_bytes=12345,
        video_size=(64, 48), started_at=T0,
        finished_at=T0 + timedelta(seconds=2.5), render_s=2.0, encode_s=0.25, total_s=2.5,
        node="node-1", actor="actor-0", software={"torch": "2.13.0", "reelray": "0.1.0"},
    )
    return make_row(j, **(args | kw))


def failed_row(j, **kw):
    return make_row(j, **(dict(status="failed", attempts=3, error="CUDA out of memory", started_at=T0) | kw))


def test_schema_columns_and_types():
    assert OUTPUT_SCHEMA.names == [
        "job_id", "file_name", "family", "prompt", "negative_prompt", "seed", "width", "height", "frames", "steps",
        "guidance", "shift", "fps", "sampler", "model_digest", "status", "error", "attempts", "frames_sha256",
        "video_sha256", "video_bytes", "video_width", "video_height", "started_at", "finished_at", "render_s", "encode_s", "total_s", "node", "actor",
        "software", "row",
    ]
    types = {f.name: f.type for f in OUTPUT_SCHEMA}
    assert types["seed"] == pa.int64() and types["row"] == pa.int64() and types["attempts"] == pa.int32()
    assert types["started_at"] == pa.timestamp("us", tz="UTC") == types["finished_at"]
    assert types["total_s"] == pa.float64() and types["guidance"] == pa.float64()
    assert not OUTPUT_SCHEMA.field("job_id").nullable and OUTPUT_SCHEMA.field("error").nullable


def test_make_row_fills_job_fields_and_file_name():
    j = job(seed=42, row=7, split="train")
    row = done_row(j)
    assert row["file_name"] == video_relpath(j.job_id) == f"videos/{j.job_id[:2]}/{j.job_id}.mp4"
    assert (row["seed"], row["row"], row["width"], row["steps"], row["sampler"]) == (42, 7, 64, 4, "unipc")
    assert row["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert row["model_digest"] == MODEL and row["split"] == "train" and row["video_bytes"] == 12345
    assert done_row(j, model_digest=MODEL) == row  # a redundant model_digest that agrees is fine
    assert json.loads(row["software"]) == {"torch": "2.13.0", "reelray": "0.1.0"}
    assert list(row)[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(status="ok"), "status must be one of"),
        (dict(status="done", video_sha256=None), "a done row needs"),
        (dict(status="done", error="boom"), "a done row needs"),
        (dict(status="failed", error=None, frames_sha256=None, video_sha256=None), "a failed row needs its error"),
        (dict(attempts=-1), "attempts must be"),
        (dict(attempts=True), "attempts must be"),
        (dict(started_at=datetime(2025, 1, 1)), "started_at must be a timezone-aware datetime"),
        (dict(render_s=float("nan")), "render_s must be a finite number"),
        (dict(total_s=-1.0), "total_s must be a finite number"),
        (dict(video_bytes=-1), "video_bytes must be an integer >= 0"),
        (dict(model_digest="ef" * 32), "is not the job's"),
    ],
)
def test_make_row_refuses_inconsistent_outcomes(kwargs, message):
    with pytest.raises(ValueError) as exc:
        done_row(job(), **kwargs)
    assert message in str(exc.value)


def test_rows_to_table_appends_passthrough_columns_with_inferred_types(tmp_path):
    rows = [
        done_row(job("a", 0, 0, score=0.5, n=3, tags=["x", "y"], meta={"k": 1}, when="2024-01-01T00:00:00")),
        failed_row(job("b", 1, 1, score=None, n=4, tags=[], meta={"k": 2}, when=None)),
    ]
    table = rows_to_table(rows)
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    # the family's other parameter (step_list, not given: null) and the passthrough, by name: the
    # order sidecars (canonical JSON) give back, so a resumed run writes the same columns
    assert table.schema.names[len(OUTPUT_SCHEMA):] == ["meta", "n", "score", "step_list", "tags", "when"]
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.schema.field("meta").type == pa.struct([("k", pa.int64())])
    assert table.column("status").to_pylist() == ["done", "failed"]
    assert table.column("error").to_pylist() == [None, "CUDA out of memory"]
    assert table.column("finished_at").to_pylist()[0] == T0 + timedelta(seconds=2.5)
    # written and read back as a user would
    (tmp_path / "metadata").mkdir()
    pq.write_table(table, tmp_path / "metadata" / "part-0.parquet")
    back = pq.read_table(tmp_path / "metadata")
    assert back.num_rows == 2 and back.column("n").to_pylist() == [3, 4]
    assert back.schema.field("started_at").type == pa.timestamp("us", tz="UTC")


def test_passthrough_values_of_disagreeing_types_become_json_text():
    rows = [done_row(job("a", 0, 0, x=1)), done_row(job("b", 0, 1, x="one")), done_row(job("c", 0, 2))]
    table = rows_to_table(rows)
    assert table.schema.field("x").type == pa.string()
    assert table.column("x").to_pylist() == ["1", '"one"', None]


def test_empty_rows_give_an_empty_table_with_the_schema():
    table = rows_to_table([])
    assert table.num_rows == 0 and table.schema.names == OUTPUT_SCHEMA.names


def test_sidecar_round_trips_a_row_byte_for_byte(tmp_path):
    row = done_row(job("a ünïcode prompt ✓ \"quoted\"", 5, 3, score=float("nan"), tags=[1, 2]))
    data = sidecar_bytes(row)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert sidecar_bytes(dict(reversed(list(row.items())))) == data  # canonical: key order does not matter
    assert "ünïcode".encode() in data  # UTF-8, not \u escapes
    back = parse_sidecar(data, sidecar_relpath(row["job_id"]))
    assert math.isnan(back.pop("score")) and math.isnan(row.pop("score"))
    assert back == row
    assert back["started_at"] == T0 and back["started_at"].tzinfo is not None


def test_bad_sidecars_raise_sidecar_error_naming_the_path():
    row = done_row(job())
    good = sidecar_bytes(row)
    path = "out/" + sidecar_relpath(row["job_id"])
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "not utf-8": b"\xff\xfe{}",
        "a list": b"[]\n",
        "missing key": sidecar_bytes({k: v for k, v in row.items()} | {"seed": 1})
        .replace(b'"seed":1,', b""),
        "wrong type": good.replace(b'"seed":0', b'"seed":"0"'),
        "null status": good.replace(b'"status":"done"', b'"status":null'),
        "bad status": good.replace(b'"status":"done"', b'"status":"maybe"'),
        "naive time": good.replace(b"+00:00", b""),
    }
    for what, data in cases.items():
        with pytest.raises(SidecarError) as exc:
            parse_sidecar(data, path)
        assert str(exc.value).startswith(f"{path}: bad sidecar: "), what
        assert exc.value.path == path
    other = job("another prompt")
    with pytest.raises(SidecarError) as exc:
        parse_sidecar(good, sidecar_relpath(other.job_id))
    assert "not the job its name says" in str(exc.value)


def test_a_sidecar_from_before_families_reads_as_wan21_t2v():
    row = done_row(job())
    assert (row["video_width"], row["video_height"]) == (64, 48)
    added = ("family", "video_width", "video_height")
    old = {k: v for k, v in json.loads(sidecar_bytes(row)).items() if k not in added}
    path = sidecar_relpath(row["job_id"])
    parsed = parse_sidecar(json.dumps(old).encode(), path)
    assert parsed["family"] == "wan2.1-t2v" and parsed["job_id"] == row["job_id"]
    assert parsed["video_width"] is None and parsed["video_height"] is None
    assert rows_to_table([parsed]).column("video_width").to_pylist() == [None]


def test_family_parameters_and_inputs_are_columns_after_the_fixed_ones():
    spec = FAMILIES["wan2.2-i2v-a14b"].spec
    params = spec.params(width=64, height=48)
    j = RenderJob.create(family=spec.name, model_digest=MODEL, prompt="p", seed=1, params=params,
                         negative_prompt="n", inputs={"image": InputRef(uri="/data/a.png", sha256="ab" * 32)},
                         passthrough={"tag": "x"})
    row = done_row(j)
    assert row["family"] == "wan2.2-i2v-a14b"
    assert (row["guidance_2"], row["boundary"]) == (3.5, 0.9)
    assert (row["image"], row["image_sha256"]) == ("/data/a.png", "ab" * 32)
    table = rows_to_table([row])
    names = table.column_names
    assert names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert names[len(OUTPUT_SCHEMA):] == ["boundary", "guidance_2", "image", "image_sha256", "step_list", "tag"]  # by name
    assert table.schema.field("boundary").type == pa.float64()
    assert parse_sidecar(sidecar_bytes(row), sidecar_relpath(j.job_id))["image_sha256"] == "ab" * 32
    with pytest.raises(ValueError, match="clash"):
        make_row(j.model_copy(update={"passthrough": {"image_sha256": "x"}}), status="failed", attempts=1, error="e")


def test_list_inputs_are_list_columns_that_round_trip_through_sidecars_and_compaction(tmp_path):
    from jobs.dataset import with_added_columns
    from pipeline.output import METADATA_FILE, VIDEOFOLDER_FILE, OutputDir

    refs = [InputRef(uri="/data/r2.png", sha256="bb" * 32), InputRef(uri="/data/r1.png", sha256="aa" * 32)]
    control = InputRef(uri="s3://bucket/ctl.mp4", sha256="cc" * 32)

    def mixed_job(prompt, inputs, **passthrough):
        return RenderJob.create(family="test-mixed", model_digest=MODEL, prompt=prompt, seed=0, params=PARAMS,
                                negative_prompt="n", inputs=inputs, passthrough=passthrough)

    with_refs = done_row(mixed_job("a", {"reference_images": refs, "control_video": control}, tag="x"))
    assert with_refs["reference_images"] == ["/data/r2.png", "/data/r1.png"]  # the input's order
    assert with_refs["reference_images_sha256"] == ["bb" * 32, "aa" * 32]
    assert (with_refs["control_video"], with_refs["control_video_sha256"]) == ("s3://bucket/ctl.mp4", "cc" * 32)
    one_ref = failed_row(mixed_job("b", {"reference_images": refs[1:]}))
    no_inputs = done_row(job("c"))  # another family's row: no input columns at all
    # A sidecar written before these columns existed (nor family, nor video size) reads back as well.
    old = {k: v for k, v in json.loads(sidecar_bytes(done_row(job("d")))).items()
           if k not in ("family", "video_width", "video_height")}

    rows = []
    for row in (with_refs, one_ref, no_inputs):
        back = parse_sidecar(sidecar_bytes(row), sidecar_relpath(row["job_id"]))
        assert back == row  # lists come back as lists, in order
        rows.append(back)
    rows.append(parse_sidecar(json.dumps(old).encode(), sidecar_relpath(old["job_id"])))

    out = OutputDir(str(tmp_path / "out"))
    out.compact(rows)
    table = out.read_metadata()
    assert table.schema.field("reference_images").type == pa.list_(pa.string())
    assert table.schema.field("reference_images_sha256").type == pa.list_(pa.string())
    assert table.schema.field("control_video").type == pa.string()
    assert table.column("reference_images").to_pylist() == [
        ["/data/r2.png", "/data/r1.png"], ["/data/r1.png"], None, None]
    assert table.column("reference_images_sha256").to_pylist() == [["bb" * 32, "aa" * 32], ["aa" * 32], None, None]
    assert table.column("family").to_pylist() == ["test-mixed", "test-mixed", "wan2.1-t2v", "wan2.1-t2v"]
    # The next run reads the failed rows back from the metadata file (as the driver's previous_failures
    # does) and compacts them with the sidecars' rows again: the same dataset.
    failed = [with_added_columns(r) for r in table.to_pylist() if r["status"] == "failed"]
    assert failed[0]["reference_images"] == ["/data/r1.png"]
    out.compact([rows[0], failed[0], rows[2], rows[3]])
    again = out.read_metadata()
    assert again.schema == table.schema and again.to_pylist() == table.to_pylist()
    # The videofolder index holds the done rows, list columns included, as a user reads it.
    index = pq.read_table(str(tmp_path / "out" / VIDEOFOLDER_FILE))
    assert index.column("reference_images").to_pylist() == [["/data/r2.png", "/data/r1.png"], None, None]
    assert pq.read_table(str(tmp_path / "out" / METADATA_FILE)).num_rows == 4


def test_a_step_list_is_a_list_int_column_only_where_given_and_round_trips(tmp_path):
    from jobs.dataset import with_added_columns
    from pipeline.output import OutputDir

    def make(prompt, params):
        return RenderJob.create(family="wan2.1-t2v", model_digest=MODEL, prompt=prompt, seed=0, params=params,
                                negative_prompt="n")

    distilled = failed_row(make("a", WAN21.params(PARAMS, step_list=[0, 250, 500, 750], sampler="lcm")))
    assert distilled["step_list"] == [0, 250, 500, 750] and distilled["steps"] == 4 and distilled["sampler"] == "lcm"
    assert b'"step_list":[0,250,500,750]' in sidecar_bytes(distilled)
    # not given: a null cell, so that a row always holds every parameter of its family
    plain = done_row(make("b", PARAMS))
    assert plain["step_list"] is None and b'"step_list":null' in sidecar_bytes(plain)
    # a sidecar written before the parameter existed reads, and compacts beside the others
    old = {k: v for k, v in json.loads(sidecar_bytes(done_row(make("c", PARAMS)))).items() if k != "step_list"}

    rows = []
    for row in (distilled, plain):
        back = parse_sidecar(sidecar_bytes(row), sidecar_relpath(row["job_id"]))
        assert back == row  # a list of ints comes back as one
        rows.append(back)
    rows.append(parse_sidecar(json.dumps(old).encode(), sidecar_relpath(old["job_id"])))
    assert "step_list" not in rows[2]
    out = OutputDir(str(tmp_path / "out"))
    out.compact(rows)
    table = out.read_metadata()
    assert table.schema.field("step_list").type == pa.list_(pa.int64())
    assert table.column("step_list").to_pylist() == [[0, 250, 500, 750], None, None]
    # the failed row read back from the metadata (the driver's previous_failures) compacts to the same table
    failed = [with_added_columns(r) for r in table.to_pylist() if r["status"] == "failed"]
    assert failed[0]["step_list"] == [0, 250, 500, 750]
    out.compact([failed[0], rows[1], rows[2]])
    assert out.read_metadata().to_pylist() == table.to_pylist()
    # every row of a family's dataset gives back its parameters (steps from the list included)
    for row in table.to_pylist():
        params = WAN21.params(**{name: row[name] for name in WAN21.param_names})
        assert params == (WAN21.params(PARAMS, step_list=[0, 250, 500, 750], sampler="lcm")
                          if row["prompt"] == "a" else PARAMS)
