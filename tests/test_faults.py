"""Faults injected for real: killed processes, crash leftovers, a full disk, stuck jobs.

Everything runs on the session's local Ray instance with the tiny model. The
long version (at least 10 driver kills) is marked slow and run by
`make test-slow` and bench/reliability.py; the suite keeps a fast version of
each case.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.video import read_mp4
from pipeline.driver import RunStopped, run
from run_helpers import metadata, run_config, write_manifest

REPO = Path(__file__).parents[1]


def frames_by_job(out: Path) -> dict[str, str]:
    df = metadata(out)
    assert df["job_id"].is_unique
    return dict(zip(df["job_id"], df["frames_sha256"]))


def assert_complete_and_intact(out: Path, expected: dict[str, str]) -> None:
    """rows == jobs, no duplicates, every MP4 decodes, frames match a clean run."""
    df = metadata(out)
    assert len(df) == len(expected) and df["job_id"].is_unique
    assert set(df["status"]) == {"done"}
    assert dict(zip(df["job_id"], df["frames_sha256"])) == expected
    for row in df.itertuples():
        frames = read_mp4(out / row.file_name)
        assert frames.shape[0] == row.frames
    assert not [p for p in out.rglob(".tmp-*")], "temp files left behind"


def render_processes(title: str = "ray::RenderActor") -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title.encode()):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session, tiny_model):
    """A 12-job manifest and the frames of a clean run of it."""
    directory = tmp_path_factory.mktemp("sweep")
    manifest = write_manifest(
        directory / "m.parquet", {"prompt": ["fox", "harbor", "neon"], "seed_start": [0, 0, 0], "seed_count": [4, 4, 4]}
    )
    clean = directory / "clean"
    run(run_config(tiny_model, manifest, clean, actors=1), stream=io.StringIO())
    return manifest, clean, frames_by_job(clean)


def test_actor_killed_mid_job_is_replaced_and_the_job_committed_once(ray_session, tiny_model, tmp_path):
    # Slow jobs (more steps, larger frames) so the kill lands inside a render.
    manifest = write_manifest(
        tmp_path / "m.parquet",
        {"prompt": ["slow one", "slow two"], "seed_start": [0, 0], "seed_count": [2, 2], "steps": [40, 40], "width": [128, 128]},
    )
    out = tmp_path / "out"
    killed: list[int] = []
    earlier = set(render_processes())  # actors of earlier runs may still be exiting

    def kill_first_render() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [pid for pid in render_processes("ray::RenderActor.render") if pid not in earlier]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_render)
    killer.start()
    report = run(run_config(tiny_model, manifest, out, actors=1, retries=2), stream=io.StringIO())
    killer.join()
    assert killed, "no render was caught in flight"
    df = metadata(out)
    assert len(df) == 4 and df["job_id"].is_unique and set(df["status"]) == {"done"}
    assert sorted(df["attempts"]) == [1, 1, 1, 2]  # exactly the killed job ran twice
    assert len(list(out.glob("videos/*/*.json"))) == 4
    assert report["counts"]["done"] == 4


def kill_driver_at(points: list[float], command: list[str], out: Path) -> list[int]:
    """Start the driver, SIGKILL it after each delay; returns jobs committed at each kill."""
    committed = []
    for delay in points:
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            driver.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
        committed.append(len(list(out.glob("videos/*/*.json"))))
    return committed


def driver_command(manifest: Path, tiny_model: Path, out: Path) -> list[str]:
    import ray

    return [
        sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--model", str(tiny_model), "--out", str(out),
        "--actors", "1", "--address", ray.get_runtime_context().gcs_address,
    ]


def driver_kill_schedule(seed: int, kills: int) -> list[float]:
    """Seeded kill delays spread over start-up (imports, Ray connect, model load) and rendering."""
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 5.0), 2) for _ in range(kills)]


def check_driver_kills(sweep, tiny_model, tmp_path, seed: int, kills: int) -> list[int]:
    manifest, _, expected = sweep
    out = tmp_path / "out"
    command = driver_command(manifest, tiny_model, out)
    committed = kill_driver_at(driver_kill_schedule(seed, kills), command, out)
    final = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr
    assert_complete_and_intact(out, expected)
    return committed


def test_driver_killed_at_seeded_points_then_rerun_completes_bit_identical(sweep, tiny_model, tmp_path):
    committed = check_driver_kills(sweep, tiny_model, tmp_path, seed=1, kills=3)
    assert committed == sorted(committed)  # nothing committed is ever lost


@pytest.mark.slow
def test_driver_killed_at_twelve_seeded_points(sweep, tiny_model, tmp_path):
    committed = check_driver_kills(sweep, tiny_model, tmp_path, seed=2026, kills=12)
    assert committed == sorted(committed)


def test_crash_leftovers_are_detected_and_rerendered(sweep, ray_session, tiny_model, tmp_path):
    manifest, clean, expected = sweep
    out = tmp_path / "out"
    run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    sidecars = sorted(out.glob("videos/*/*.json"))
    truncated_mp4, truncated_sidecar, missing_sidecar = sidecars[0], sidecars[1], sidecars[2]
    mp4 = truncated_mp4.with_suffix(".mp4")
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    truncated_sidecar.write_bytes(truncated_sidecar.read_bytes()[:40])
    missing_sidecar.unlink()
    (mp4.parent / ".tmp-0123-orphan.mp4").write_bytes(b"\x00" * 100)
    metadata = out / "metadata" / "part-0.parquet"
    metadata.write_bytes(metadata.read_bytes()[:100])
    # A compaction and a report write killed half-way.
    (out / "metadata" / ".tmp-4567-part-0.parquet").write_bytes(metadata.read_bytes())
    (out / ".tmp-89ab-metadata.parquet").write_bytes(b"PAR1")
    (out / "runs" / ".tmp-cdef-20260101T000000.000000Z.json").write_text("{")

    from pipeline.cli import main

    assert main(["status", str(out), "--json"]) == 0

    report = run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"]["rendered"] == 3
    assert report["counts"]["skipped_done"] == len(expected) - 3
    assert_complete_and_intact(out, expected)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_output_out_of_space_stops_cleanly_and_resumes(sweep, ray_session, tiny_model, small_disk):
    manifest, _, expected = sweep
    out = small_disk / "out"
    with pytest.raises(RunStopped) as stopped:
        run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert "no space left" in str(stopped.value).lower()
    assert "rerun the same command to resume" in str(stopped.value)
    done = list(out.glob("videos/*/*.json"))
    assert 0 < len(done) < len(expected)
    for sidecar in done:  # what was committed before the disk filled is intact
        row = json.loads(sidecar.read_text())
        assert row["frames_sha256"] == expected[row["job_id"]]
        assert read_mp4(out / row["file_name"]).shape[0] == 9

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    report = run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"]["skipped_done"] == len(done)
    assert_complete_and_intact(out, expected)


def test_job_over_the_timeout_is_failed_and_retried(ray_session, tiny_model, tmp_path):
    # "stuck" needs ~25 min here; the quick jobs ~0.2 s, so 10 s leaves them room on a loaded machine.
    # The actor renders in submission order, so the timeout falls on "stuck", never on a quick job queued behind it.
    manifest = write_manifest(
        tmp_path / "m.parquet",
        {"prompt": ["quick", "stuck", "quick too"], "steps": [1, 1000, 1], "width": [64, 512, 64], "height": [64, 512, 64], "seed": [0, 0, 0]},
    )
    out = tmp_path / "out"
    report = run(run_config(tiny_model, manifest, out, actors=1, retries=1, job_timeout=10.0), stream=io.StringIO())
    df = metadata(out).set_index("prompt")
    assert df.loc["stuck", "status"] == "failed"
    assert df.loc["stuck", "attempts"] == 2
    assert "timeout" in df.loc["stuck", "error"].lower()
    assert set(df.loc[["quick", "quick too"], "status"]) == {"done"}
    assert set(df.loc[["quick", "quick too"], "attempts"]) == {1}
    assert report["counts"]["failed"] == 1


def test_path_like_prompts_write_nothing_outside_out(ray_session, tiny_model, tmp_path):
    prompts = ["../../etc/passwd", "/abs/path", "C:\\x", "videos/../../escape", "\u202eevil\u202c.mp4 🎬", "a\x00b\x07c"]
    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": prompts, "seed": [0] * len(prompts)})
    out = tmp_path / "work" / "out"
    before = {p for p in tmp_path.rglob("*")}
    report = run(run_config(tiny_model, manifest, out, actors=1), stream=io.StringIO())
    assert report["counts"]["done"] == len(prompts)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created, "the run wrote nothing"
    for path in created:
        rel = path.relative_to(tmp_path)
        assert rel.parts[:2] == ("work", "out") or rel == Path("work"), rel
    names = {p.name for p in out.glob("videos/*/*") if p.is_file()}
    df = metadata(out)
    assert names == {f"{j}.mp4" for j in df["job_id"]} | {f"{j}.json" for j in df["job_id"]}
    assert sorted(df["prompt"]) == sorted(prompts)


def test_local_ray_instance_has_no_dashboard_and_token_auth(ray_session):
    import ray._raylet as raylet

    node = ray_session._private.worker._global_node
    assert node.address_info["webui_url"] in ("", None)
    assert raylet.get_authentication_mode() == raylet.AuthenticationMode.TOKEN
