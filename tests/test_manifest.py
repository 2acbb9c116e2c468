"""Manifests: sources, validation with row numbers, sweeps, duplicates, passthrough, bounded memory."""
import datetime as dt
import decimal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.families.wan21_t2v import SPEC as WAN21
from jobs.identity import job_digest, video_relpath
from jobs.job import RenderJob
from jobs.manifest import (
    ManifestError,
    RowError,
    load_jobs,
    read_manifest,
)
from jobs.seeds import MAX_SEED_COUNT, parse_seed_range
from jobs.params import DEFAULT_NEGATIVE_PROMPT

MODEL = "9f" * 32
TINY = WAN21.with_defaults(dict(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16))


def job_id(model, prompt, negative, seed, params, family="wan2.1-t2v", inputs=None):
    return job_digest(model, prompt, negative, seed, params, family, inputs).hex()
REPO = Path(__file__).resolve().parents[1]


def write(path, columns, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kw)
    return str(path)


def read(source, family=TINY, **kw):
    """All jobs and errors of a source."""
    jobs, errors = [], []
    for batch in read_manifest(source, model_digest=MODEL, family=family, **kw):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
    return jobs, errors


def summary(source, **kw):
    """(rows, jobs, duplicates, errors) of a source, streamed without holding its jobs."""
    n_rows = n_jobs = n_duplicates = 0
    errors = []
    for batch in read_manifest(source, model_digest=MODEL, family=TINY, **kw):
        n_rows, n_jobs, n_duplicates = batch.rows_read, n_jobs + len(batch.jobs), n_duplicates + batch.duplicates
        errors.extend(batch.errors)
    return n_rows, n_jobs, n_duplicates, errors


def test_rows_become_jobs_with_defaults_overrides_and_ids(tmp_path):
    src = write(
        tmp_path / "m.parquet",
        {
            "prompt": ["a red fox", "a blue whale", "a green frog"],
            "negative_prompt": [None, "blurry", "   "],
            "steps": pa.array([None, 8, None], pa.int64()),
            "guidance": pa.array([None, None, 7], pa.int32()),
        },
    )
    jobs, errors = read(src)
    assert errors == []
    assert [(j.prompt, j.row, j.seed) for j in jobs] == [("a red fox", 0, 0), ("a blue whale", 1, 0), ("a green frog", 2, 0)]
    assert [j.negative_prompt for j in jobs] == [DEFAULT_NEGATIVE_PROMPT, "blurry", DEFAULT_NEGATIVE_PROMPT]
    assert [j.params.steps for j in jobs] == [4, 8, 4]
    assert [j.params.guidance for j in jobs] == [5.0, 5.0, 7.0]
    assert jobs[1].params == TINY.params(steps=8)
    for j in jobs:
        assert j.job_id == job_id(MODEL, j.prompt, j.negative_prompt, j.seed, j.params)
        assert j.model_digest == MODEL and j.passthrough == {}
        RenderJob.model_validate(j.model_dump())  # the fast construction path built a valid job
    # other defaults give other jobs
    wan_jobs, _ = read(src, family=WAN21)
    assert [j.params.width for j in wan_jobs] == [832, 832, 832]
    assert {j.job_id for j in wan_jobs}.isdisjoint(j.job_id for j in jobs)


def test_seed_columns_and_sweeps_expand_in_order(tmp_path):
    src = write(
        tmp_path / "m.parquet",
        {
            "prompt": ["p0", "p1", "p2", "p3"],
            "seed": pa.array([11, None, None, None], pa.int64()),
            "seeds": pa.array([None, [5, 3, 5, 9], None, None], pa.list_(pa.int64())),
            "seed_start": pa.array([None, None, 100, None], pa.int64()),
            "seed_count": pa.array([None, None, 3, None], pa.int64()),
        },
    )
    jobs, errors = read(src, seeds=parse_seed_range("0-1,7"))
    assert errors == []
    assert [(j.row, j.seed) for j in jobs] == [
        (0, 11), (1, 5), (1, 3), (1, 9), (2, 100), (2, 101), (2, 102), (3, 0), (3, 1), (3, 7),
    ]
    again, _ = read(src, seeds=[0, 1, 7], batch_rows=2)
    assert [j.job_id for j in again] == [j.job_id for j in jobs]
    # without a seeds argument a row giving no seed gets seed 0
    no_arg, _ = read(src)
    assert [(j.row, j.seed) for j in no_arg][-1] == (3, 0)


def test_duplicate_jobs_are_yielded_once_keeping_the_first_row(tmp_path):
    src = write(
        tmp_path / "m.parquet",
        {"prompt": ["cat", "dog", "cat", "cat"], "seed": pa.array([1, 1, 1, 2], pa.int64()), "tag": ["a", "b", "c", "d"]},
    )
    batches = list(read_manifest(src, model_digest=MODEL, family=TINY))
    jobs = [j for b in batches for j in b.jobs]
    assert [(j.row, j.passthrough["tag"]) for j in jobs] == [(0, "a"), (1, "b"), (3, "d")]
    assert sum(b.duplicates for b in batches) == 1
    n_rows, n_jobs, n_duplicates, errors = summary(src)
    assert (n_rows, n_jobs, n_duplicates, errors) == (4, 3, 1, [])


def test_load_jobs_gathers_every_batch(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["a", "", "c", "a"], "seed_count": pa.array([2, 1, 1, 2]),
                                         "seed_start": pa.array([0, 0, 5, 0])})
    jobs, errors, n_rows = load_jobs(src, model_digest=MODEL, family=TINY, batch_rows=1)
    assert [(j.row, j.seed) for j in jobs] == [(0, 0), (0, 1), (2, 5)]
    assert [str(e) for e in errors] == ["row 1: prompt: must not be empty"] and n_rows == 4


def test_long_sweeps_are_split_into_bounded_batches(tmp_path):
    src = write(
        tmp_path / "m.parquet",
        {"prompt": ["a", "b", "c"], "seed_start": pa.array([0, 0, None]), "seed_count": pa.array([5, 2, None])},
    )
    batches = list(read_manifest(src, model_digest=MODEL, family=TINY, batch_rows=2))
    # record batches of 2 rows: rows 0-1 give 5 + 2 jobs (flushed 2 at a time), row 2 gives 1
    assert [len(b.jobs) for b in batches] == [2, 2, 2, 1, 1]
    assert [b.rows_read for b in batches] == [0, 0, 1, 2, 3]
    assert [j.seed for b in batches for j in b.jobs] == [0, 1, 2, 3, 4, 0, 1, 0]


# One bad value per case, in row 1 (row 0 is good), or as listed. Column types
# are the Parquet types a user's writer would produce.
BAD_ROWS = [
    ({"prompt": ["ok", None]}, ["row 1: prompt: is missing (null)"]),
    ({"prompt": ["ok", " \t\n"]}, ["row 1: prompt: must not be empty"]),
    ({"prompt": pa.array([7, 8])}, ["row 0: prompt: must be a string, got 7", "row 1: prompt: must be a string, got 8"]),
    ({"prompt": pa.array([b"ok", b"x"])}, ["row 0: prompt: must be a string, got bytes b'ok'", "row 1: prompt: must be a string, got bytes b'x'"]),
    ({"negative_prompt": pa.array([None, 3])}, ["row 1: negative_prompt: must be a string, got 3"]),
    ({"steps": pa.array(["4", "x"])}, ["row 0: steps: must be an integer, got str '4'", "row 1: steps: must be an integer, got str 'x'"]),
    ({"steps": pa.array([4, -3])}, ["row 1: steps: must be an integer in 1..1000, got -3"]),
    ({"steps": pa.array([4, 0])}, ["row 1: steps: must be an integer in 1..1000, got 0"]),
    ({"steps": pa.array([4.0, float("nan")])}, ["row 1: steps: must be an integer, got nan"]),
    ({"steps": pa.array([4.0, float("inf")])}, ["row 1: steps: must be an integer, got inf"]),
    ({"steps": pa.array([4.0, 50.5])}, ["row 1: steps: must be an integer, got 50.5"]),
    ({"steps": pa.array([None, True])}, ["row 1: steps: must be an integer, got bool True"]),
    ({"steps": pa.array([[4], [5]])}, ["row 0: steps: must be an integer, got list [4]", "row 1: steps: must be an integer, got list [5]"]),
    ({"guidance": pa.array([1.0, -0.5])}, ["row 1: guidance: must be >= 0, got -0.5"]),
    ({"guidance": pa.array([1.0, float("-inf")])}, ["row 1: guidance: must be a finite number, got -inf"]),
    ({"shift": pa.array([1.0, 0.0])}, ["row 1: shift: must be > 0, got 0.0"]),
    ({"width": pa.array([64, 100])}, ["row 1: width: must be a multiple of 16 in 16..4096, got 100"]),
    ({"height": pa.array([64, 8192])}, ["row 1: height: must be a multiple of 16 in 16..4096, got 8192"]),
    ({"frames": pa.array([9, 80])}, ["row 1: frames: must be 4k+1 (1, 5, 9, ...) in 1..1001, got 80"]),
    ({"fps": pa.array([16, 0])}, ["row 1: fps: must be an integer in 1..240, got 0"]),
    ({"sampler": pa.array(["euler", "ddim"])}, ["row 1: sampler: must be one of 'unipc', 'euler', 'lcm', got str 'ddim'"]),
    ({"step_list": pa.array([[0, 250], [500, 250]])}, ["row 1: step_list: must increase strictly, got 500 then 250 (elements 0, 1)"]),
    ({"step_list": pa.array([[0], [0, 1000]])}, ["row 1: step_list: element 1: must be an integer in 0..999, got 1000"]),
    ({"step_list": pa.array([[-1, 5], None])}, ["row 0: step_list: element 0: must be an integer in 0..999, got -1"]),
    ({"step_list": pa.array([[0.0, 250.0], [0.0, 2.5]])}, ["row 1: step_list: element 1: must be an integer, got 2.5"]),
    ({"step_list": pa.array([["0"], ["250"]])}, ["row 0: step_list: element 0: must be an integer, got str '0'",
                                               "row 1: step_list: element 0: must be an integer, got str '250'"]),
    ({"step_list": pa.array([[0, None], [0]])}, ["row 0: step_list: element 1: must be an integer, got None"]),
    ({"step_list": pa.array([[0], []], pa.list_(pa.int64()))}, ["row 1: step_list: must hold at least one integer, got an empty list"]),
    ({"step_list": pa.array(["0,250", None])}, ["row 0: step_list: must be a list of integers, got str '0,250'"]),
    ({"step_list": pa.array([[0, 250, 500, 750]] * 2), "steps": pa.array([4, 8])},
     ["row 1: step_list: steps 8 disagrees with step_list of 4 entries"]),
    ({"seed": pa.array([1, -1])}, ["row 1: seed: must be an integer in 0..2**63-1, got -1"]),
    ({"seed": pa.array([1, 2**64 - 1], pa.uint64())}, ["row 1: seed: must be an integer in 0..2**63-1, got 18446744073709551615"]),
    ({"seed": pa.array([1.0, 1.5])}, ["row 1: seed: must be an integer, got 1.5"]),
    ({"seed": pa.array([1.0, 1e18])}, ["row 1: seed: a float seed above 2**53 is not exact; store seeds as integers, got 1e+18"]),
    ({"seed": pa.array([False, True])}, ["row 0: seed: must be an integer, got bool False", "row 1: seed: must be an integer, got bool True"]),
    ({"seed": pa.array(["1", "2"])}, ["row 0: seed: must be an integer, got str '1'", "row 1: seed: must be an integer, got str '2'"]),
    ({"seeds": pa.array([[1], [2, -5]])}, ["row 1: seeds: element 1: must be an integer in 0..2**63-1, got -5"]),
    ({"seeds": pa.array([[1], [2, None]])}, ["row 1: seeds: element 1: must be an integer, got None"]),
    ({"seeds": pa.array([[1], []], pa.list_(pa.int64()))}, ["row 1: seeds: must not be empty"]),
    ({"seeds": pa.array(["1", "1,2"])}, ["row 0: seeds: must be a list of integers, got str '1'", "row 1: seeds: must be a list of integers, got str '1,2'"]),
    ({"seed_start": pa.array([0, 0]), "seed_count": pa.array([1, 0])}, ["row 1: seed_count: must be an integer in 1..100000, got 0"]),
    ({"seed_start": pa.array([0, 0]), "seed_count": pa.array([1, MAX_SEED_COUNT + 1])}, ["row 1: seed_count: must be an integer in 1..100000, got 100001"]),
    ({"seed_start": pa.array([0, None]), "seed_count": pa.array([1, 3])}, ["row 1: seed_start: is missing: seed_count needs seed_start"]),
    ({"seed_start": pa.array([0, 5]), "seed_count": pa.array([1, None])}, ["row 1: seed_count: is missing: seed_start needs seed_count"]),
    ({"seed_start": pa.array([0, 2**63 - 2]), "seed_count": pa.array([1, 3])}, ["row 1: seed_count: the sweep 9223372036854775806+3 runs past 2**63-1"]),
    ({"seed": pa.array([1, 2]), "seeds": pa.array([None, [3]])}, ["row 1: seed: give one of seed, seeds, seed_start+seed_count; this row gives seed and seeds"]),
    (
        {"steps": pa.array([4, -1]), "width": pa.array([64, 65]), "seed": pa.array([0, -2])},
        ["row 1: width: must be a multiple of 16 in 16..4096, got 65", "row 1: steps: must be an integer in 1..1000, got -1",
         "row 1: seed: must be an integer in 0..2**63-1, got -2"],
    ),
]


@pytest.mark.parametrize("columns, expected", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_every_bad_field_is_a_row_error_with_row_and_field(tmp_path, columns, expected):
    columns = {"prompt": ["first prompt", "second prompt"]} | columns
    src = write(tmp_path / "m.parquet", columns)
    jobs, errors = read(src)
    assert [str(e) for e in errors] == expected
    bad_rows = {e.row for e in errors}
    assert [j.row for j in jobs] == [r for r in (0, 1) if r not in bad_rows]


def test_row_numbers_are_global_across_files_in_sorted_order(tmp_path):
    write(tmp_path / "d" / "b.parquet", {"prompt": ["b0", "", "b2", "b3", "b4"]})
    write(tmp_path / "d" / "a.parquet", {"prompt": ["a0", "a1", None]})
    jobs, errors = read(str(tmp_path / "d"))
    assert [str(e) for e in errors] == ["row 2: prompt: is missing (null)", "row 4: prompt: must not be empty"]
    assert [(j.row, j.prompt) for j in jobs] == [(0, "a0"), (1, "a1"), (3, "b0"), (5, "b2"), (6, "b3"), (7, "b4")]


def test_directory_glob_and_file_uri_sources_agree(tmp_path):
    root = tmp_path / "data"
    write(root / "part-1.parquet", {"prompt": ["one", "two"]})
    write(root / "sub" / "part-2.parquet", {"prompt": ["three"]})
    write(root / "_temporary" / "part-9.parquet", {"prompt": ["half-written"]})
    write(root / ".hidden.parquet", {"prompt": ["hidden"]})
    (root / "_SUCCESS").write_bytes(b"")
    (root / "notes.txt").write_text("not a manifest")

    def prompts(source):
        return [j.prompt for j in read(source)[0]]

    assert prompts(str(root)) == ["one", "two", "three"]
    assert prompts(f"file://{root}") == ["one", "two", "three"]
    assert prompts(str(root / "*.parquet")) == ["one", "two"]
    assert prompts(str(root / "**" / "part-*.parquet")) == ["half-written", "one", "two", "three"]
    assert prompts(f"file://{root}/sub/*.parquet") == ["three"]
    assert prompts(f"file://{root}/part-1.parquet") == ["one", "two"]
    assert prompts(str(root / "part-?.parquet")) == ["one", "two"]
    assert prompts(str(root / ".*.parquet")) == ["hidden"]


@pytest.mark.parametrize(
    "make, source, message",
    [
        (lambda d: None, "{d}/missing.parquet", "{d}/missing.parquet: manifest not found"),
        (lambda d: None, "{d}/*.parquet", "{d}/*.parquet: no files match"),
        (lambda d: (d / "empty").mkdir(), "{d}/empty", "{d}/empty: no .parquet files in this directory"),
        (lambda d: (d / "m.parquet").write_text("prompt\na cat\n"), "{d}/m.parquet", "{d}/m.parquet: not a readable Parquet file ("),
        (lambda d: (d / "m.parquet").write_bytes(b""), "{d}/m.parquet", "{d}/m.parquet: not a readable Parquet file ("),
        (lambda d: write(d / "m.parquet", {"Prompt": ["x"], "seed": [1]}), "{d}/m.parquet", "{d}/m.parquet: no 'prompt' column (columns: Prompt, seed)"),
        (lambda d: write(d / "m.parquet", {"prompt": ["x"], "status": ["new"]}), "{d}/m.parquet", "{d}/m.parquet: columns ['status'] are output-dataset columns"),
        (lambda d: write(d / "m.parquet", {"prompt": ["x"], "blob": [b"\x00"]}), "{d}/m.parquet", "{d}/m.parquet: passthrough column 'blob' has type binary"),
        (lambda d: None, "nosuch://bucket/m.parquet", "nosuch://bucket/m.parquet: cannot open manifest source ("),
    ],
)
def test_whole_source_problems_raise_one_line_manifest_errors(tmp_path, make, source, message):
    make(tmp_path)
    source = source.format(d=tmp_path)
    with pytest.raises(ManifestError) as exc:
        read_manifest(source, model_digest=MODEL, family=TINY)  # raised before any batch is read
    text = str(exc.value)
    assert text.startswith(message.format(d=tmp_path)), text
    assert "\n" not in text and "Traceback" not in text


def test_a_bad_file_in_a_directory_is_named_before_any_job(tmp_path):
    write(tmp_path / "a.parquet", {"prompt": ["fine"]})
    (tmp_path / "b.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ManifestError, match=r"b\.parquet: not a readable Parquet file"):
        read_manifest(str(tmp_path), model_digest=MODEL, family=TINY)


def test_passthrough_columns_are_kept_as_plain_values(tmp_path):
    when = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    src = write(
        tmp_path / "m.parquet",
        {
            "prompt": ["a", "b"],
            "split": pa.array(["train", "eval"]).dictionary_encode(),
            "score": [0.25, None],
            "n": pa.array([3, 4], pa.int16()),
            "ok": [True, False],
            "tags": [["x"], []],
            "meta": [{"k": 1, "w": "v"}, None],
            "when": pa.array([when, None], pa.timestamp("us", tz="UTC")),
            "day": pa.array([dt.date(2024, 1, 2), None]),
            "price": pa.array([decimal.Decimal("1.50"), None]),
        },
    )
    jobs, errors = read(src)
    assert errors == []
    assert jobs[0].passthrough == {
        "split": "train", "score": 0.25, "n": 3, "ok": True, "tags": ["x"], "meta": {"k": 1, "w": "v"},
        "when": "2024-05-06T07:08:09+00:00", "day": "2024-01-02", "price": "1.50",
    }
    assert jobs[1].passthrough == {
        "split": "eval", "score": None, "n": 4, "ok": False, "tags": [], "meta": None, "when": None, "day": None, "price": None,
    }


def test_cells_python_cannot_hold_are_row_errors(tmp_path):
    # timestamp[s] of 3e14 s is far beyond year 9999: pyarrow cannot make a datetime of it
    far = pa.array([0, 300_000_000_000_000], pa.timestamp("s"))
    src = write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "when": far, "steps": far})
    jobs, errors = read(src)
    assert jobs == []
    assert [(e.row, e.field) for e in errors] == [(0, "steps"), (1, "steps"), (1, "when")]
    assert str(errors[0]).startswith("row 0: steps: must be an integer, got datetime")
    assert str(errors[2]).startswith("row 1: when: cannot be read: ")


def test_a_file_corrupted_after_listing_gives_a_manifest_error_naming_it(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["a"] * 100})
    batches = read_manifest(Path(src), model_digest=MODEL, family=TINY)
    Path(src).write_bytes(b"garbage" * 10)
    with pytest.raises(ManifestError) as exc:
        list(batches)
    assert str(exc.value).startswith(f"{src}: cannot read Parquet data (") and "\n" not in str(exc.value)


def test_render_job_checks_its_id_and_content():
    params = TINY.defaults()
    job = RenderJob.create(family="wan2.1-t2v", model_digest=MODEL, prompt="a cat", seed=3, params=params,
                           negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    assert job.job_id == job_id(MODEL, "a cat", DEFAULT_NEGATIVE_PROMPT, 3, params)
    fields = job.model_dump()
    assert RenderJob(**fields) == job
    for change, message in [
        ({"job_id": "0" * 64}, "does not match the job's content"),
        ({"seed": 4}, "does not match the job's content"),
        ({"seed": True}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"prompt": " "}, "prompt must not be empty"),
        ({"family": "wan2.2-ti2v-5b"}, "does not match the job's content"),
        ({"passthrough": {"blob": b"x"}}, "not a JSON-able plain value"),
        ({"extra": 1}, "extra"),
    ]:
        with pytest.raises(ValueError) as exc:
            RenderJob(**(fields | change))
        assert message in str(exc.value), change


def test_prompts_never_become_paths(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["../../etc/passwd", "/abs/path", "C:\\win\\x", "a/b"]})
    jobs, errors = read(src)
    assert errors == [] and len(jobs) == 4
    for j in jobs:
        path = video_relpath(j.job_id)
        assert path == f"videos/{j.job_id[:2]}/{j.job_id}.mp4" and ".." not in path


def test_every_error_of_many_bad_rows_is_reported(tmp_path):
    n = 2500
    src = write(tmp_path / "m.parquet", {"prompt": ["p"] * n, "steps": pa.array([-1] * n), "fps": pa.array([0] * n)})
    n_rows, n_jobs, _, errors = summary(src, batch_rows=512)
    assert (n_rows, n_jobs, len(errors), len({e.row for e in errors})) == (2500, 0, 5000, 2500)
    assert str(errors[0]) == "row 0: steps: must be an integer in 1..1000, got -1"
    assert str(errors[-1]) == "row 2499: fps: must be an integer in 1..240, got 0"


def test_read_manifest_refuses_bad_arguments(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["p"]})
    with pytest.raises(ValueError, match="batch_rows"):
        read_manifest(src, model_digest=MODEL, family=TINY, batch_rows=0)
    with pytest.raises(ValueError, match="model_digest"):
        read_manifest(src, model_digest="", family=TINY)
    with pytest.raises(ValueError, match="seeds must not be empty"):
        read_manifest(src, model_digest=MODEL, family=TINY, seeds=[])
    with pytest.raises(ValueError, match="got -1"):
        read_manifest(src, model_digest=MODEL, family=TINY, seeds=[-1])


@pytest.mark.parametrize(
    "text, seeds",
    [("7", [7]), ("0-3", [0, 1, 2, 3]), ("0-1,20-21", [0, 1, 20, 21]), (" 5 - 6 , 9", [5, 6, 9]),
     ("0-99999", list(range(100000))), ("9223372036854775807", [2**63 - 1])],
)
def test_parse_seed_range(text, seeds):
    assert parse_seed_range(text) == seeds


@pytest.mark.parametrize(
    "text, message",
    [("", "seed range must be like"), ("a", "'a' is not 'N' or 'N-M'"), ("5-3", "5-3 runs backwards"),
     ("-1", "'-1' is not"), ("1-2-3", "is not"), ("0-4,3", "seed 3 appears twice"), ("0-100000", "more than 100000 seeds"),
     ("9223372036854775808", "at most 2**63-1"), ("1,,2", "'' is not"), ("٣", "is not")],
)
def test_parse_seed_range_refuses(text, message):
    with pytest.raises(ValueError) as exc:
        parse_seed_range(text)
    assert message in str(exc.value)


def test_validating_200k_rows_keeps_memory_bounded(tmp_path):
    # 200k rows of a 1 KiB prompt: reading it whole with to_pylist() peaks ~600 MiB
    # above the baseline here; the reader holds one row group's Arrow buffers, one
    # batch of 1000 rows, and the de-duplication set (~100 B a job, ~25 MiB): ~50 MiB.
    n = 200_000
    prompt = ("a slow pan over a misty pine forest at dawn, volumetric light " * 17)[:1024]
    table = pa.table({"prompt": pa.array([prompt]).take(pa.array(np.zeros(n, np.int64))), "seed": np.arange(n)})
    src = str(tmp_path / "big.parquet")
    pq.write_table(table, src, row_group_size=20_000)
    del table
    # VmHWM: the peak resident set of this process image (ru_maxrss would carry
    # over the size of the forked pytest parent).
    code = (
        "import sys\n"
        "def peak_mib():\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "    return int(status.split()[0]) // 1024\n"
        "from jobs.family import FamilySpec\n"
        "from jobs.manifest import read_manifest\n"
        "from jobs.params import size_param, steps_param\n"
        "spec = FamilySpec('wan2.1-t2v', 'T', (size_param('width', 832, 16), steps_param(50)))\n"
        "before = peak_mib()\n"
        "rows = jobs = errors = 0\n"
        "for b in read_manifest(sys.argv[1], model_digest='0' * 64, family=spec, batch_rows=1000):\n"
        "    rows, jobs, errors = b.rows_read, jobs + len(b.jobs), errors + len(b.errors)\n"
        "print(rows, jobs, errors, peak_mib() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, cwd=REPO, check=True)
    n_rows, n_jobs, n_errors, growth_mib = map(int, out.stdout.split())
    assert (n_rows, n_jobs, n_errors) == (n, n, 0)
    assert growth_mib < 100, f"peak RSS grew by {growth_mib} MiB while validating"


# ------------------------------------------------------------------ random manifests

_WEIRD = ["../../etc/passwd", "\u202eevil\u202c", "😀🎬", "\x00\x1f\x7f", "  ", "", "50", "unipc", "C:\\x", "a" * 300]


def _column(kind, n):
    none = st.none()
    return {
        "string": st.lists(st.one_of(none, st.text(max_size=12), st.sampled_from(_WEIRD)), min_size=n, max_size=n)
        .map(lambda v: pa.array(v, pa.string())),
        "int": st.lists(st.one_of(none, st.integers(0, 100), st.integers(-(2**63), 2**63 - 1)), min_size=n, max_size=n)
        .map(lambda v: pa.array(v, pa.int64())),
        "uint": st.lists(st.one_of(none, st.integers(0, 2**64 - 1)), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.uint64())),
        "float": st.lists(st.one_of(none, st.sampled_from([4.0, 16.0, 64.0, 9.0]), st.floats()), min_size=n, max_size=n)
        .map(lambda v: pa.array(v, pa.float64())),
        "bool": st.lists(st.one_of(none, st.booleans()), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.bool_())),
        "list": st.lists(st.one_of(none, st.lists(st.one_of(none, st.integers(-5, 2**63 - 1)), max_size=4)), min_size=n, max_size=n)
        .map(lambda v: pa.array(v, pa.list_(pa.int64()))),
        "null": st.just(pa.nulls(n)),
    }[kind]


@st.composite
def manifests(draw):
    n = draw(st.integers(1, 10))
    prompt_kind = draw(st.sampled_from(["string"] * 5 + ["int", "null", "list"]))
    columns = {"prompt": draw(_column(prompt_kind, n))}
    optional = ["seed", "seeds", "seed_start", "seed_count", "steps", "guidance", "width", "frames", "sampler", "note"]
    for name in draw(st.lists(st.sampled_from(optional), unique=True, max_size=4)):
        kind = draw(st.sampled_from(["string", "int", "uint", "float", "bool", "list", "null"]))
        columns[name] = draw(_column(kind, n))
    # A unique, never-blank negative prompt per row (random text + row number)
    # makes every row's jobs distinct, so each row is exactly a job row or an error row.
    prefixes = draw(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(_WEIRD)), min_size=n, max_size=n))
    columns["negative_prompt"] = pa.array([f"{p}#{i}" for i, p in enumerate(prefixes)])
    return n, columns


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manifest=manifests(), batch_rows=st.sampled_from([1, 3, 1000]))
def test_random_manifests_never_crash_and_account_for_every_row(tmp_path, manifest, batch_rows):
    n, columns = manifest
    src = write(tmp_path / "random.parquet", columns)
    jobs, errors = read(src, batch_rows=batch_rows)
    error_rows = {e.row for e in errors}
    job_rows = {j.row for j in jobs}
    assert error_rows.isdisjoint(job_rows)
    assert error_rows | job_rows == set(range(n))
    for e in errors:
        assert isinstance(e, RowError) and e.field in set(columns) | {"seed", "seed_start", "seed_count"}
        assert str(e).startswith(f"row {e.row}: {e.field}: ") and len(str(e)) < 300
    assert len({j.job_id for j in jobs}) == len(jobs)
    for j in jobs:
        assert j.job_id == job_id(MODEL, j.prompt, j.negative_prompt, j.seed, j.params)
        assert 0 <= j.seed <= 2**63 - 1 and j.prompt.strip()
    n_rows, n_jobs, _, streamed_errors = summary(src, batch_rows=batch_rows)
    assert (n_rows, n_jobs, streamed_errors) == (n, len(jobs), errors)


# ------------------------------------------------------------------ families and inputs

from engine.families import FAMILIES, foreign_names  # noqa: E402

I2V = FAMILIES["wan2.2-i2v-a14b"]
A14B = FAMILIES["wan2.2-t2v-a14b"]


def read_family(source, family, **kw):
    jobs, errors = [], []
    for batch in read_manifest(source, model_digest=MODEL, family=family.spec, foreign=foreign_names(family), **kw):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
    return jobs, errors


def test_family_parameters_override_per_row_and_enter_the_id(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["a", "a", "a"], "boundary": pa.array([None, 0.9, None]),
                                         "guidance_2": pa.array([None, None, 2])})
    jobs, errors = read_family(src, A14B)
    assert errors == []
    assert [(j.params.boundary, j.params.guidance_2) for j in jobs] == [(0.875, 3.0), (0.9, 3.0), (0.875, 2.0)]
    assert len({j.job_id for j in jobs}) == 3 and {j.family for j in jobs} == {"wan2.2-t2v-a14b"}
    for j in jobs:
        assert j.job_id == job_id(MODEL, j.prompt, j.negative_prompt, j.seed, j.params, "wan2.2-t2v-a14b")


def test_an_image_family_row_with_only_one_of_width_and_height_is_a_row_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image A")
    src = write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"], "image": ["a.png"] * 3,
                                         "width": pa.array([640, None, 640]), "height": pa.array([None, None, 352])})
    jobs, errors = read_family(src, I2V)
    assert [j.row for j in jobs] == [1, 2] and [(j.params.width, j.params.height) for j in jobs] == [(0, 0), (640, 352)]
    assert [(e.row, e.field) for e in errors] == [(0, "width")]
    assert "width 640, height 0: give both, or neither" in str(errors[0]) and "\n" not in str(errors[0])


def test_another_familys_parameter_or_input_is_a_row_error_not_passthrough(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"], "boundary": pa.array([None, 0.9, None]),
                                         "image": pa.array([None, None, "x.png"])})
    jobs, errors = read_family(src, FAMILIES["wan2.1-t2v"])
    assert [j.row for j in jobs] == [0] and jobs[0].passthrough == {}
    assert [(e.row, e.field) for e in errors] == [(1, "boundary"), (2, "image")]
    assert "the Wan2.1 T2V family has no 'image' (its parameters: width, height" in str(errors[1])
    assert "its inputs: loras)" in str(errors[1])


def test_image_inputs_are_resolved_hashed_once_and_identified_by_content(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"image A")
    (tmp_path / "copy.png").write_bytes(b"image A")
    (tmp_path / "b.png").write_bytes(b"image B")
    src = write(tmp_path / "m.parquet", {"prompt": ["p"] * 5, "seed": pa.array([0, 0, 0, 0, 0]),
                                         "image": ["imgs/a.png", str(tmp_path / "copy.png"), "b.png", "missing.png",
                                                   None]})
    calls = []

    def counting(uris):
        from jobs.inputs import digest_inputs

        calls.append(list(uris))
        return digest_inputs(uris)

    jobs, errors = [], []
    for batch in read_manifest(src, model_digest=MODEL, family=I2V.spec, foreign=foreign_names(I2V), digest=counting):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
    import hashlib

    sha_a = hashlib.sha256(b"image A").hexdigest()
    # the same bytes under another path are the same job (the first row wins); another image is another job
    assert [(j.row, j.inputs["image"].uri, j.inputs["image"].sha256) for j in jobs] == [
        (0, str(tmp_path / "imgs" / "a.png"), sha_a), (2, str(tmp_path / "b.png"), hashlib.sha256(b"image B").hexdigest())]
    assert [(e.row, e.field) for e in errors] == [(3, "image"), (4, "image")]
    assert str(tmp_path / "missing.png") in str(errors[0]) and "\n" not in str(errors[0])
    assert "is missing: the Wan2.2 I2V-A14B family needs an image" in str(errors[1])
    assert len(calls) == 1 and sorted(calls[0]) == sorted(
        str(tmp_path / p) for p in ("imgs/a.png", "copy.png", "b.png", "missing.png"))
    assert jobs[0].job_id == job_id(MODEL, "p", jobs[0].negative_prompt, 0, jobs[0].params, I2V.spec.name,
                                    {"image": sha_a})


def test_an_input_digest_column_cannot_be_passthrough(tmp_path):
    src = write(tmp_path / "m.parquet", {"prompt": ["p"], "image": ["a.png"], "image_sha256": ["x"]})
    with pytest.raises(ManifestError, match=r"\['image_sha256'\] are output-dataset columns"):
        read_family(src, I2V)


# ------------------------------------------------------------------ video and list inputs, `needs`

import hashlib  # noqa: E402

from jobs.family import FamilySpec, InputSpec  # noqa: E402
from jobs.inputs import digest_inputs  # noqa: E402

# A made-up family with every input kind: one image, two videos (the mask needs the control
# video) and an ordered list of reference images. Nothing here is a real family's rule.
MIXED = FamilySpec("test-mixed", "Test Mixed", TINY.param_specs, inputs=(
    InputSpec("image", "image", required=False),
    InputSpec("control_video", "video", required=False),
    InputSpec("mask_video", "video", required=False, needs="control_video"),
    InputSpec("reference_images", "images", required=False),
), lora_slots=())  # no LoRA input: the messages below list exactly these four
REFS_REQUIRED = FamilySpec("test-refs", "Test Refs", TINY.param_specs,
                           inputs=(InputSpec("reference_images", "images", required=True),))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recording:
    """A digest callable that hashes (no header checks) and records what it was asked, and as what."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, files):
        self.calls.append(dict(files))
        return digest_inputs(files)


def read_with(source, family, digest=None, **kw):
    jobs, errors = [], []
    for batch in read_manifest(source, model_digest=MODEL, family=family, digest=digest or Recording(), **kw):
        jobs.extend(batch.jobs)
        errors.extend(batch.errors)
    return jobs, errors


@pytest.fixture
def media(tmp_path):
    """Input files by name: three distinct images (one also under a second name) and two videos."""
    contents = {"r1.png": b"image one", "r2.png": b"image two", "r3.png": b"image three", "copy_of_r1.png": b"image one",
                "ctl.mp4": b"control video", "mask.mp4": b"mask video"}
    (tmp_path / "media").mkdir()
    for name, data in contents.items():
        (tmp_path / "media" / name).write_bytes(data)
    return {name: (str(tmp_path / "media" / name), _sha(data)) for name, data in contents.items()}


def test_list_cells_single_strings_nulls_and_empty_lists(tmp_path, media):
    refs = pa.array([["media/r1.png", "media/r2.png"], None, [], [" media/r2.png "], ["media/r1.png", None],
                     ["media/r1.png", "  "], ["media/r3.png"]],
                    pa.list_(pa.string()))
    write(tmp_path / "a.parquet", {"prompt": [f"a{k}" for k in range(7)], "reference_images": refs})
    # Another file of the same manifest holds the column as plain strings: one string is a one-element list.
    write(tmp_path / "b.parquet", {"prompt": ["b0", "b1", "b2"], "reference_images": ["media/r1.png", "", None]})
    recording = Recording()
    jobs, errors = read_with(str(tmp_path / "*.parquet"), MIXED, recording)
    assert [str(e) for e in errors] == [
        "row 4: reference_images: element 1: must be a file path or URI, got None",
        "row 5: reference_images: element 1: must be a file path or URI, got str '  '",
        "row 8: reference_images: must be a file path or URI, got str ''",
    ]
    got = {j.row: [(ref.uri, ref.sha256) for ref in j.inputs["reference_images"]] if j.inputs else None for j in jobs}
    r1, r2, r3 = media["r1.png"], media["r2.png"], media["r3.png"]
    assert got == {0: [r1, r2], 1: None, 2: None, 3: [r2], 6: [r3], 7: [r1], 9: None}
    # null and [] give no input at all: those rows are the same job (prompts differ, so not deduplicated here)
    assert jobs[1].inputs == {} and jobs[2].inputs == {}
    # one call per record batch, each distinct file once, as an image
    assert recording.calls == [{r1[0]: "image", r2[0]: "image", r3[0]: "image"}, {r1[0]: "image"}]
    for j in jobs:
        RenderJob.model_validate(j.model_dump())  # the fast construction path built a valid job


def test_a_bad_list_cell_type_and_a_list_for_a_one_file_input_are_row_errors(tmp_path, media):
    write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "reference_images": pa.array([7, None], pa.int64()),
                                   "control_video": pa.array([None, ["media/ctl.mp4"]], pa.list_(pa.string()))})
    jobs, errors = read_with(str(tmp_path / "m.parquet"), MIXED)
    assert jobs == []
    assert [str(e) for e in errors] == [
        "row 0: reference_images: must be a list of file paths or URIs, got 7",
        "row 1: control_video: must be a file path or URI, got list ['media/ctl.mp4']",
    ]
    write(tmp_path / "ints.parquet", {"prompt": ["a"], "reference_images": pa.array([[7]], pa.list_(pa.int64()))})
    _, errors = read_with(str(tmp_path / "ints.parquet"), MIXED)
    assert [str(e) for e in errors] == ["row 0: reference_images: element 0: must be a file path or URI, got 7"]


def test_a_required_list_input_missing_or_empty_is_a_row_error(tmp_path, media):
    write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"],
                                   "reference_images": pa.array([None, [], ["media/r1.png"]], pa.list_(pa.string()))})
    jobs, errors = read_with(str(tmp_path / "m.parquet"), REFS_REQUIRED)
    assert [j.row for j in jobs] == [2]
    assert [str(e) for e in errors] == [
        "row 0: reference_images: is missing: the Test Refs family needs one or more images",
        "row 1: reference_images: is missing: the Test Refs family needs one or more images",
    ]
    write(tmp_path / "none.parquet", {"prompt": ["a"]})  # no column at all
    _, errors = read_with(str(tmp_path / "none.parquet"), REFS_REQUIRED)
    assert [str(e) for e in errors] == ["row 0: reference_images: is missing: the Test Refs family needs one or more images"]


def test_an_input_given_without_the_input_it_needs_is_a_row_error(tmp_path, media):
    write(tmp_path / "m.parquet", {
        "prompt": ["a", "b", "c", "d"],
        "control_video": ["media/ctl.mp4", None, " ", None],
        "mask_video": ["media/mask.mp4", "media/mask.mp4", "media/mask.mp4", None],
    })
    recording = Recording()
    jobs, errors = read_with(str(tmp_path / "m.parquet"), MIXED, recording)
    assert [j.row for j in jobs] == [0, 3]
    assert {name: (ref.uri, ref.sha256) for name, ref in jobs[0].inputs.items()} == {
        "control_video": media["ctl.mp4"], "mask_video": media["mask.mp4"]}
    # row 2 gives a control video, a bad one: its error is that one, not a missing control video
    assert [str(e) for e in errors] == [
        "row 1: mask_video: needs control_video, which this row does not give",
        "row 2: control_video: must be a file path or URI, got str ' '",
    ]
    assert recording.calls == [{media["ctl.mp4"][0]: "video", media["mask.mp4"][0]: "video"}]
    # without a control_video column at all, too
    write(tmp_path / "mask_only.parquet", {"prompt": ["a"], "mask_video": ["media/mask.mp4"]})
    _, errors = read_with(str(tmp_path / "mask_only.parquet"), MIXED)
    assert [str(e) for e in errors] == ["row 0: mask_video: needs control_video, which this row does not give"]


def test_reference_images_enter_the_id_by_content_and_order_not_path(tmp_path, media):
    rows = [["media/r1.png", "media/r2.png"],       # 0
            ["media/r2.png", "media/r1.png"],       # 1: reordered: another job
            ["media/copy_of_r1.png", "media/r2.png"],  # 2: same bytes under another name: row 0's job
            ["media/r1.png", "media/r3.png"],       # 3: another image's content: another job
            ["media/r1.png"],                       # 4: fewer images: another job
            ["media/r1.png", "media/r2.png", "media/r2.png"]]  # 5: a repeated image counts
    write(tmp_path / "m.parquet", {"prompt": ["p"] * len(rows), "seed": [0] * len(rows),
                                   "reference_images": pa.array(rows, pa.list_(pa.string()))})
    recording = Recording()
    batches = list(read_manifest(str(tmp_path / "m.parquet"), model_digest=MODEL, family=MIXED, digest=recording))
    jobs = [j for b in batches for j in b.jobs]
    assert [j.row for j in jobs] == [0, 1, 3, 4, 5] and sum(b.duplicates for b in batches) == 1
    assert len({j.job_id for j in jobs}) == 5
    sha = {name: value[1] for name, value in media.items()}
    expected = [[sha["r1.png"], sha["r2.png"]], [sha["r2.png"], sha["r1.png"]], [sha["r1.png"], sha["r3.png"]],
                [sha["r1.png"]], [sha["r1.png"], sha["r2.png"], sha["r2.png"]]]
    for j, digests in zip(jobs, expected):
        assert j.input_digests() == {"reference_images": digests}
        assert j.job_id == job_id(MODEL, "p", j.negative_prompt, 0, j.params, "test-mixed", {"reference_images": digests})
    # four distinct files, each asked for once though named eleven times
    assert recording.calls == [{media[n][0]: "image" for n in ("copy_of_r1.png", "r1.png", "r2.png", "r3.png")}]


def test_a_missing_list_element_file_fails_its_row_and_the_others_go_on(tmp_path, media):
    write(tmp_path / "m.parquet", {
        "prompt": ["a", "b", "c"],
        "reference_images": pa.array([["media/r1.png", "media/gone.png"], ["media/r2.png"], None],
                                     pa.list_(pa.string())),
        "image": ["media/r3.png", "media/gone.png", None],
    })
    jobs, errors = read_with(str(tmp_path / "m.parquet"), MIXED)
    assert [j.row for j in jobs] == [2]
    gone = str(tmp_path / "media" / "gone.png")
    assert [(e.row, e.field) for e in errors] == [(0, "reference_images"), (1, "image")]
    assert str(errors[0]) == f"row 0: reference_images: element 1: {gone}: no such file"
    assert str(errors[1]) == f"row 1: image: {gone}: no such file"


def test_a_file_named_as_two_kinds_is_checked_as_each(tmp_path, media):
    write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "control_video": ["media/ctl.mp4", None],
                                   "reference_images": pa.array([None, ["media/ctl.mp4"]], pa.list_(pa.string()))})
    recording = Recording()
    jobs, errors = read_with(str(tmp_path / "m.parquet"), MIXED, recording)
    ctl = media["ctl.mp4"][0]
    assert recording.calls == [{ctl: "video"}, {ctl: "image"}]
    assert errors == [] and [j.row for j in jobs] == [0, 1]


def test_the_drivers_digest_probes_images_and_videos_by_kind(tmp_path, media, monkeypatch):
    # The driver's digest checks each image's header with probe_image and each video's with
    # engine.video_input.probe_video (stood in for here: a fake module that accepts "*.mp4" files).
    import types

    from jobs.inputs import InputError
    from pipeline.driver import digest_and_probe

    probed = []

    def probe_video(uri):
        probed.append(uri)
        if not uri.endswith(".mp4"):
            raise InputError(f"{uri}: not a video (fake probe)")
        return 64, 48, 9

    monkeypatch.setitem(sys.modules, "engine.video_input", types.SimpleNamespace(probe_video=probe_video))
    from run_helpers import write_png

    write_png(tmp_path / "media" / "real.png")
    write(tmp_path / "m.parquet", {
        "prompt": ["a", "b", "c"],
        "control_video": ["media/ctl.mp4", "media/real.png", None],
        "reference_images": pa.array([["media/real.png"], None, ["media/real.png", "media/r1.png"]],
                                     pa.list_(pa.string())),
    })
    jobs, errors = read_with(str(tmp_path / "m.parquet"), MIXED, digest_and_probe)
    assert [j.row for j in jobs] == [0]
    assert sorted(probed) == sorted([media["ctl.mp4"][0], str(tmp_path / "media" / "real.png")])
    assert [(e.row, e.field) for e in errors] == [(1, "control_video"), (2, "reference_images")]
    assert errors[0].reason.endswith("real.png: not a video (fake probe)")
    assert errors[1].reason == f"element 1: {media['r1.png'][0]}: not a PNG, JPEG or WebP image"


def test_another_familys_list_input_is_a_row_error_unless_empty(tmp_path):
    write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"],
                                   "reference_images": pa.array([None, [], ["x.png"]], pa.list_(pa.string()))})
    jobs, errors = read_with(str(tmp_path / "m.parquet"), TINY, foreign=frozenset(MIXED.input_names))
    assert [j.row for j in jobs] == [0, 1] and jobs[1].passthrough == {}
    assert [(e.row, e.field) for e in errors] == [(2, "reference_images")]


def test_family_specs_refuse_bad_input_declarations():
    with pytest.raises(ValueError, match="kind must be one of"):
        InputSpec("x", "audio", required=False)
    with pytest.raises(ValueError, match="cannot need itself"):
        InputSpec("x", "video", required=False, needs="x")
    with pytest.raises(ValueError, match="match its own size"):
        InputSpec("x", "video", required=False, same_size_as="x")
    with pytest.raises(ValueError, match="same_size_as is for video inputs, not 'image'"):
        InputSpec("x", "image", required=False, same_size_as="y")
    with pytest.raises(ValueError, match="input m is to match the size of 'i', which is not one of its video inputs"):
        FamilySpec("f", "F", TINY.param_specs, inputs=(InputSpec("i", "image", False),
                                                       InputSpec("m", "video", False, same_size_as="i")))
    with pytest.raises(ValueError, match="needs 'nothing', which is not one of its inputs"):
        FamilySpec("f", "F", TINY.param_specs, inputs=(InputSpec("m", "video", required=False, needs="nothing"),))
    with pytest.raises(ValueError, match="duplicate input names"):
        FamilySpec("f", "F", TINY.param_specs, inputs=(InputSpec("m", "video", False), InputSpec("m", "image", False)))
    with pytest.raises(ValueError, match=r"\['steps'\] are both parameters and inputs"):
        FamilySpec("f", "F", TINY.param_specs, inputs=(InputSpec("steps", "image", False),))


def test_family_check_inputs_normalises_lists_and_checks_needs():
    assert MIXED.check_inputs({"reference_images": "a.png", "image": "b.png"}) == {
        "reference_images": ["a.png"], "image": "b.png"}
    assert MIXED.check_inputs({"reference_images": ("a.png", "b.png")}) == {"reference_images": ["a.png", "b.png"]}
    assert MIXED.check_inputs({"reference_images": []}) == {}
    for inputs, message in [
        ({"mask_video": "m.mp4"}, "input mask_video needs input control_video, which is not given"),
        ({"control_video": ["c.mp4"]}, "input control_video: must be a file path or URI, got ['c.mp4']"),
        ({"reference_images": ["a.png", ""]}, "input reference_images: element 1: must be a file path or URI"),
        ({"reference_images": 3}, "input reference_images: must be a list of file paths or URIs, got int"),
        ({"audio": "a.wav"}, "the Test Mixed family takes no input 'audio' (its inputs: image, control_video, "
                             "mask_video, reference_images)"),
    ]:
        with pytest.raises(ValueError) as exc:
            MIXED.check_inputs(inputs)
        assert message in str(exc.value), inputs
    with pytest.raises(ValueError, match=r"the Test Refs family needs inputs \['reference_images'\]"):
        REFS_REQUIRED.check_inputs({"reference_images": []})


def test_a_step_list_column_sets_steps_and_enters_the_id_only_where_given(tmp_path):
    src = write(tmp_path / "m.parquet", {
        "prompt": ["a", "a", "a", "a", "a"],
        "step_list": pa.array([None, [0, 250, 500, 750], [0, 250, 500, 750], [0, 500], [0, 250, 500, 750]],
                              pa.list_(pa.int32())),
        "steps": pa.array([None, None, 4, None, None]),
        "sampler": pa.array([None, "lcm", "lcm", "euler", "euler"]),
    })
    jobs, errors, n_rows = load_jobs(src, model_digest=MODEL, family=TINY)
    assert errors == [] and n_rows == 5
    # row 2 (steps 4, agreeing) is row 1's job again: a duplicate
    assert [j.row for j in jobs] == [0, 1, 3, 4]
    assert [(j.params.step_list, j.params.steps) for j in jobs] == [
        (None, 4), ((0, 250, 500, 750), 4), ((0, 500), 2), ((0, 250, 500, 750), 4)]
    assert all(type(i) is int for i in jobs[1].params.step_list)
    # without a step_list the job is the job of before: no step_list key in its canonical JSON ...
    import hashlib

    from jobs.identity import JOB_SCHEMA, canonical_json

    assert jobs[0].params == TINY.defaults()
    before = {name: value for name, value in TINY.defaults().items() if name != "step_list"}
    canonical = {"model_digest": MODEL, "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "params": before,
                 "prompt": "a", "schema": JOB_SCHEMA, "seed": 0}
    assert jobs[0].job_id == hashlib.sha256(canonical_json(canonical)).hexdigest()
    # ... with one, the list is part of the id (same steps, other job)
    assert len({j.job_id for j in jobs}) == 4
    for j in jobs:
        assert j.job_id == job_id(MODEL, j.prompt, j.negative_prompt, j.seed, j.params)
