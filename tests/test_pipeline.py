"""`reelray run` end to end on a real local Ray instance, with the tiny model (and the tiny Wan2.2 I2V-A14B one)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from engine.video import read_mp4
from jobs.manifest import ManifestError
from pipeline.driver import run
from run_helpers import metadata, run_config, write_manifest, write_png, write_tiny_dit

PROMPTS = ["a red fox in snow", "boats in a harbor at dusk", "rain on a neon street"]


@pytest.fixture(scope="module")
def sweep_manifest(tmp_path_factory):
    directory = tmp_path_factory.mktemp("manifest")
    return write_manifest(
        directory / "m.parquet",
        {"prompt": PROMPTS, "clip": ["fox", "harbor", "neon"], "seeds": [[0, 1, 2]] * len(PROMPTS)},
    )


@pytest.fixture(scope="module")
def one_actor_run(ray_session, tiny_model, sweep_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-1-actor")
    report = run(run_config(tiny_model, sweep_manifest, out, actors=1), stream=io.StringIO())
    return out, report


def test_same_seed_same_frames_across_actor_counts(one_actor_run, ray_session, tiny_model, sweep_manifest, tmp_path):
    out1, _ = one_actor_run
    out2 = tmp_path / "out-2-actors"
    report = run(run_config(tiny_model, sweep_manifest, out2, actors=2), stream=io.StringIO())
    assert len(report["actors"]) == 2
    assert all(a["jobs"] > 0 for a in report["actors"]), "both actors should have rendered"
    one = metadata(out1).set_index("job_id")["frames_sha256"].sort_index()
    two = metadata(out2).set_index("job_id")["frames_sha256"].sort_index()
    assert len(one) == len(PROMPTS) * 3
    assert one.index.equals(two.index)
    assert (one == two).all()


def test_each_actor_encodes_each_prompt_once(one_actor_run):
    _, report = one_actor_run
    (actor,) = report["actors"]
    assert report["family"] == "wan2.1-t2v"
    # One DiT: no expert placement to report.
    assert actor["placement"] is None and report["expert_placement"] is None
    assert actor["jobs"] == len(PROMPTS) * 3
    # P prompts x S seeds: P encoder calls for the prompts, 1 for the shared default negative prompt.
    assert actor["text_encoder_calls"] == len(PROMPTS) + 1
    lookups = 2 * len(PROMPTS) * 3
    assert report["embedding_cache_hit_rate"] == pytest.approx((lookups - len(PROMPTS) - 1) / lookups)


def test_output_reads_back_with_pyarrow_and_pandas(one_actor_run):
    out, report = one_actor_run
    table = pq.read_table(out / "metadata")
    df = metadata(out)
    assert table.num_rows == len(df) == len(PROMPTS) * 3
    assert df["job_id"].is_unique
    assert set(df["status"]) == {"done"}
    assert set(df["family"]) == {"wan2.1-t2v"}
    assert set(df["clip"]) == {"fox", "harbor", "neon"}  # passthrough column kept
    for row in df.itertuples():
        video = out / row.file_name
        assert video.is_file()
        frames = read_mp4(video)
        assert frames.shape == (row.frames, row.height, row.width, 3)
    assert report["counts"]["done"] == len(PROMPTS) * 3
    reports = list((out / "runs").glob("*.json"))
    assert len(reports) == 1


def test_output_reads_back_with_ray_data(one_actor_run, ray_session):
    import ray.data

    out, _ = one_actor_run
    rows = ray.data.read_parquet(str(out / "metadata")).take_all()
    assert sorted(r["job_id"] for r in rows) == sorted(metadata(out)["job_id"])
    assert all((out / r["file_name"]).is_file() for r in rows)


def test_output_loads_as_a_hugging_face_videofolder(one_actor_run):
    import datasets

    out, _ = one_actor_run
    ds = datasets.load_dataset("videofolder", data_dir=str(out), split="train")
    # Decoding needs torchcodec, which reelray does not install: the paths are what we check.
    ds = ds.cast_column("video", datasets.Video(decode=False))
    df = metadata(out).set_index("job_id")
    assert len(ds) == len(df)
    assert "label" not in ds.column_names  # the metadata file was found (without it, folders become labels)
    for sample in ds:
        row = df.loc[sample["job_id"]]
        assert Path(sample["video"]["path"]).resolve() == (out / row["file_name"]).resolve()
        assert sample["prompt"] == row["prompt"] and sample["seed"] == row["seed"] and sample["clip"] == row["clip"]
        assert sample["frames_sha256"] == row["frames_sha256"]


def test_rerun_skips_every_done_job(one_actor_run, ray_session, tiny_model, sweep_manifest):
    out, _ = one_actor_run
    before = metadata(out).sort_values("job_id").reset_index(drop=True)
    report = run(run_config(tiny_model, sweep_manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"]["skipped_done"] == len(PROMPTS) * 3
    assert report["counts"]["rendered"] == 0
    after = metadata(out).sort_values("job_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_failing_job_becomes_failed_row_and_others_finish(ray_session, tiny_model, tmp_path):
    # guidance 1e38 is a valid number that overflows float32 in the guidance
    # step: the render produces non-finite latents and must not be committed.
    manifest = write_manifest(
        tmp_path / "m.parquet",
        {"prompt": ["fine", "overflows", "also fine"], "guidance": [5.0, 1e38, None], "seed": [1, 2, 3]},
    )
    out = tmp_path / "out"
    report = run(run_config(tiny_model, manifest, out, actors=1, retries=1), stream=io.StringIO())
    df = metadata(out).set_index("prompt")
    assert report["counts"] == report["counts"] | {"done": 2, "failed": 1, "jobs": 3}
    failed = df.loc["overflows"]
    assert failed["status"] == "failed"
    assert failed["attempts"] == 2
    assert "non-finite" in failed["error"]
    assert pd.isna(failed["file_name"]) or not (out / failed["file_name"]).exists()
    assert set(df.loc[["fine", "also fine"], "status"]) == {"done"}
    # The videofolder index holds only the rows that have a video.
    assert sorted(pd.read_parquet(out / "metadata.parquet")["prompt"]) == ["also fine", "fine"]


def test_manifest_with_bad_rows_is_refused_then_skip_invalid_renders_good_rows(ray_session, tiny_model, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.parquet",
        {"prompt": ["good one", "", "good two", "bad frames"], "frames": [None, None, None, 10], "seed": [0, 0, 0, 0]},
    )
    out = tmp_path / "out"
    with pytest.raises(ManifestError) as refused:
        run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    message = str(refused.value)
    assert "row 1: prompt" in message and "row 3: frames" in message
    assert not (out / "videos").exists()

    report = run(run_config(tiny_model, manifest, out, actors=1, skip_invalid=True), stream=io.StringIO())
    assert report["counts"]["done"] == 2
    assert report["counts"]["invalid_rows"] == 2
    assert sorted(metadata(out)["prompt"]) == ["good one", "good two"]


def test_a_model_set_that_does_not_fit_stops_the_run_before_ray_in_one_line(ray_session, tiny_model, tmp_path):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    for path in tiny_model.iterdir():
        if "t2v" not in path.name:  # keep the text encoder and the VAE
            shutil.copy(path, models / path.name)
    write_tiny_dit(models / "narrow-text-Q8_0.gguf", text_dim=32)
    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": ["a", "b"], "seed": [0, 1]})
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--model", str(models), "--out", str(out),
         "--actors", "1", "--address", ray_address()],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300,
    )
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.startswith("reelray: error:")]
    assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "expects 32-wide text embeddings" in error[0] and "narrow-text-Q8_0.gguf" in error[0]
    assert not out.exists()  # refused before anything was written (or any actor started)


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_driver_killed_mid_run_then_rerun_renders_exactly_the_missing_jobs(ray_session, tiny_model, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": PROMPTS, "seed_start": [0, 0, 0], "seed_count": [4, 4, 4]})
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--model", str(tiny_model),
        "--out", str(out), "--actors", "1", "--address", ray_address(),
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 240
    while len(list(out.glob("videos/*/*.json"))) < 3:
        assert driver.poll() is None, driver.stderr.read().decode()
        assert time.monotonic() < deadline, "no job committed in time"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = {p.stem for p in out.glob("videos/*/*.json")}
    assert 3 <= len(committed) < 12

    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert result.returncode == 0, result.stderr
    df = metadata(out)
    assert len(df) == 12 and df["job_id"].is_unique
    assert set(df["status"]) == {"done"}
    last_report = sorted((out / "runs").glob("*.json"))[-1].read_text()
    import json

    counts = json.loads(last_report)["counts"]
    assert counts["skipped_done"] >= len(committed)
    assert counts["rendered"] == 12 - counts["skipped_done"]
    for file_name in df["file_name"]:
        assert read_mp4(out / file_name).shape[0] == 9


def test_status_counts_done_failed_and_pending(one_actor_run, tiny_model, sweep_manifest, tmp_path, capsys):
    import json

    from pipeline.cli import main

    out, _ = one_actor_run
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"done": 9, "failed": 0, "leftovers": 0}

    bigger = write_manifest(tmp_path / "more.parquet", {"prompt": PROMPTS + ["a new prompt"], "seeds": [[0, 1, 2]] * 4})
    assert main(["status", str(out), "--manifest", str(bigger), "--model", str(tiny_model), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"done": 9, "failed": 0, "pending": 3, "invalid_rows": 0, "leftovers": 0}


def test_force_rerenders_every_job_without_duplicate_rows(one_actor_run, ray_session, tiny_model, sweep_manifest, tmp_path):
    out, _ = one_actor_run
    before = metadata(out).set_index("job_id")["frames_sha256"].sort_index()
    report = run(run_config(tiny_model, sweep_manifest, out, actors=1, force=True), stream=io.StringIO())
    assert report["counts"]["rendered"] == len(before)
    after = metadata(out).set_index("job_id")["frames_sha256"].sort_index()
    assert after.equals(before)


def test_output_given_as_a_filesystem_uri(ray_session, tiny_model, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": ["uri out"], "seed": [3]})
    report = run(run_config(tiny_model, f"file://{manifest}", f"file://{tmp_path / 'out'}", actors=1), stream=io.StringIO())
    assert report["counts"]["done"] == 1
    df = metadata(tmp_path / "out")
    assert read_mp4(tmp_path / "out" / df["file_name"][0]).shape == (9, 64, 64, 3)


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(ray_session, tiny_model, tmp_path):
    from pipeline.output import LOCK_FILE, OutputError

    # Slow enough jobs (40 steps at 128 px) that the first run is still going when the second starts.
    manifest = write_manifest(
        tmp_path / "m.parquet", {"prompt": ["first", "second"], "seed_start": [0, 0], "seed_count": [2, 2], "steps": [40, 40], "width": [128, 128]}
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--model", str(tiny_model),
               "--out", str(out), "--actors", "1", "--address", ray_address()]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 240
    while not (out / LOCK_FILE).exists():
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    with pytest.raises(OutputError, match=rf"in use by reelray run pid {first.pid} on .* delete .*{LOCK_FILE}"):
        run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert not (out / LOCK_FILE).exists()  # released at the end
    df = metadata(out)
    assert len(df) == 4 and set(df["status"]) == {"done"} and set(df["attempts"]) == {1}  # nothing of it was disturbed

    report = run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())  # free again
    assert report["counts"]["skipped_done"] == 4


def test_a_lock_left_by_a_dead_driver_is_taken_over_and_one_from_another_host_is_refused(ray_session, tiny_model, tmp_path):
    import json
    import socket

    from pipeline.output import LOCK_FILE, OutputError, _process_start

    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": ["locked"], "seed": [0]})
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "pid_started": 12345, "since": "then"}))
    report = run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"]["done"] == 1 and not lock.exists()

    # A live pid with another start time is a reused pid: stale as well.
    me = os.getpid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": me, "pid_started": _process_start(me) + 1, "since": "then"}))
    assert run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())["counts"]["skipped_done"] == 1

    lock.write_text(json.dumps({"host": "render-node-7", "pid": 4242, "pid_started": 1, "since": "2026-11-20T23:00:00+00:00"}))
    with pytest.raises(OutputError, match=r"in use by reelray run pid 4242 on render-node-7 since 2026-11-20T23:00:00"):
        run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert lock.exists()  # not ours to remove


def test_an_image_to_video_expert_pair_family_renders_its_manifest_end_to_end(ray_session, tmp_path):
    import hashlib

    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import make_tiny_model

    model = tmp_path / "model"
    make_tiny_model(model, family="wan2.2-i2v-a14b")
    (tmp_path / "images").mkdir()
    a = write_png(tmp_path / "images" / "a.png")
    b = write_png(tmp_path / "images" / "b.png", flip=True)
    # Relative image paths are taken from the manifest's folder; an absolute one as it is.
    manifest = write_manifest(tmp_path / "m.parquet", {
        "prompt": ["a fox", "a fox", "a boat"], "image": ["images/a.png", "images/b.png", str(b)], "seed": [0, 0, 1],
        "width": [None, None, 48], "height": [None, None, 32],
    })
    out = tmp_path / "out"
    report = run(run_config(model, manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"] == report["counts"] | {"jobs": 3, "done": 3, "failed": 0}
    assert report["family"] == "wan2.2-i2v-a14b"
    # Both tiny experts fit on the CPU: resident, never swapped.
    (placement,) = report["expert_placement"]
    assert placement["mode"] == "resident" and placement["swaps"] == 0 and placement["reason"].startswith("cpu device")

    df = metadata(out).set_index(["prompt", "seed", "image_sha256"])
    sha = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (a, b)}
    assert set(df.index) == {("a fox", 0, sha[a]), ("a fox", 0, sha[b]), ("a boat", 1, sha[b])}
    assert set(df["family"]) == {"wan2.2-i2v-a14b"} and set(df["status"]) == {"done"}
    models = ModelSet.from_dir(model)
    defaults = models.spec.defaults()
    assert set(df["guidance_2"]) == {defaults.guidance_2} and set(df["boundary"]) == {defaults.boundary}

    # The frames are the engine's for the same prompt, seed and image: the image reached the actor.
    engine = Engine(models)
    for (prompt, seed, image_sha), row in df.iterrows():
        image = a if image_sha == sha[a] else b
        assert Path(row["image"]).resolve() == image.resolve()
        params = models.spec.params(width=int(row["width"]), height=int(row["height"]))
        expected = engine.render(prompt, seed, params, inputs={"image": str(image)}).frames_sha256
        assert row["frames_sha256"] == expected
        size = (48, 32) if prompt == "a boat" else (64, 64)
        assert (row["width"], row["height"]) == (row["video_width"], row["video_height"]) == size
        assert read_mp4(out / row["file_name"]).shape == (9, size[1], size[0], 3)
    # Same prompt and seed, another image: another job with other frames.
    assert df.loc[("a fox", 0, sha[a]), "frames_sha256"] != df.loc[("a fox", 0, sha[b]), "frames_sha256"]


@pytest.mark.parametrize("family", ["wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.1-i2v"])
def test_the_other_families_render_their_manifests_end_to_end(ray_session, tmp_path, family):
    """T2V-A14B with a sweep over its expert parameters; TI2V-5B with and without an image;
    Wan2.1 I2V (CLIP image encoder) from an image at two seeds."""
    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import make_tiny_model

    model = tmp_path / "model"
    make_tiny_model(model, family=family)
    if family == "wan2.2-t2v-a14b":
        rows = {"prompt": ["a fox"] * 3, "seed": [0, 0, 0], "boundary": [None, 0.95, None],
                "guidance_2": [None, None, 1.5]}
    elif family == "wan2.2-ti2v-5b":
        image = write_png(tmp_path / "first.png")
        rows = {"prompt": ["a fox", "a fox"], "seed": [0, 0], "image": [None, "first.png"]}
    else:
        image = write_png(tmp_path / "first.png")
        rows = {"prompt": ["a fox", "a fox"], "seed": [0, 1], "image": ["first.png", "first.png"]}
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    report = run(run_config(model, manifest, out, actors=1), stream=io.StringIO())
    n = len(rows["prompt"])
    assert report["counts"] == report["counts"] | {"jobs": n, "done": n, "failed": 0}
    assert report["family"] == family
    df = metadata(out).sort_values("row")
    assert list(df["family"]) == [family] * n and df["frames_sha256"].nunique() == n

    models = ModelSet.from_dir(model)
    engine = Engine(models)
    for _, row in df.iterrows():
        params = models.spec.params(**{name: row[name] for name in models.spec.param_names})
        inputs = {"image": str(image)} if isinstance(row.get("image"), str) else {}
        assert engine.render(row["prompt"], int(row["seed"]), params, inputs=inputs).frames_sha256 == row["frames_sha256"]
    if family == "wan2.2-t2v-a14b":
        assert list(df["boundary"]) == [0.875, 0.95, 0.875] and list(df["guidance_2"]) == [3.0, 3.0, 1.5]
    elif family == "wan2.2-ti2v-5b":
        assert df["image_sha256"].isna().tolist() == [True, False]
    else:
        assert df["image_sha256"].nunique() == 1 and list(df["area"]) == [832 * 480] * 2
        assert set(df["negative_prompt"]) == {models.spec.negative_prompt}


def test_failed_rows_of_an_output_from_before_families_are_read_and_compacted(tmp_path):
    """An OUT whose metadata predates the family and video size columns: its failed rows come back
    with those columns filled (Wan2.1 T2V, no size) and compact into the current schema."""
    from jobs.dataset import OUTPUT_SCHEMA, rows_to_table
    from pipeline.driver import previous_failures
    from pipeline.output import OutputDir

    out = OutputDir(str(tmp_path))
    out.ensure()
    job_id = "ab" * 32
    old = {name: None for name in OUTPUT_SCHEMA.names if name not in ("family", "video_width", "video_height")}
    old |= {"job_id": job_id, "file_name": f"videos/ab/{job_id}.mp4", "prompt": "p", "negative_prompt": "n", "seed": 0,
            "width": 64, "height": 64, "frames": 9, "steps": 4, "guidance": 5.0, "shift": 5.0, "fps": 16,
            "sampler": "unipc", "model_digest": "cd" * 32, "status": "failed", "error": "boom", "attempts": 3, "row": 0}
    (tmp_path / "metadata").mkdir(exist_ok=True)
    pq.write_table(rows_to_table([old | {"family": "x", "video_width": None, "video_height": None}])
                   .drop_columns(["family", "video_width", "video_height"]), tmp_path / "metadata" / "part-0.parquet")
    failed = previous_failures(out, {})
    assert failed[job_id]["family"] == "wan2.1-t2v" and failed[job_id]["video_width"] is None
    out.compact(list(failed.values()))
    table = pq.read_table(tmp_path / "metadata" / "part-0.parquet")
    assert table.column_names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert table.column("family").to_pylist() == ["wan2.1-t2v"]
