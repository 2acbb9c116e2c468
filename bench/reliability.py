"""Reliability report: every fault and bad input, tried for real, counted, tabulated.

    .venv/bin/python bench/reliability.py [--out docs/reliability.md] [--quick]

Runs the fault cases of tests/test_faults.py against a real local Ray
instance with the tiny model (actor and driver SIGKILLs, crash leftovers, a
full disk, stuck jobs, NaN renders, path-like prompts), random bad manifests
through the manifest reader, and mutated GGUF / safetensors / tokenizer files
through the file readers (tests/fuzz_cases.py), and writes the table to
docs/reliability.md. Each case counts as passed only when every property its
test asserts holds.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

Row = tuple[str, int, int, str]  # case, tried, passed, outcome


def timed(rows: list[Row], case: str, tries: int, fn, outcome: str) -> None:
    """Run fn(i) for each try; a try passes when fn returns without raising."""
    passed = 0
    failures = []
    start = time.monotonic()
    for i in range(tries):
        try:
            fn(i)
            passed += 1
        except BaseException as exc:  # noqa: BLE001 - the report counts every way a case can fail
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    seconds = time.monotonic() - start
    text = outcome if passed == tries else f"FAILED {tries - passed}x: {failures[0]}"
    rows.append((case, tries, passed, f"{text} ({seconds:.0f} s)"))
    print(f"{case}: {passed}/{tries} {text}", flush=True)


def fault_rows(quick: bool) -> list[Row]:
    import ray

    import test_faults as faults
    import test_pipeline as pipeline_tests
    from engine.tiny import make_tiny_model
    from pipeline.driver import ensure_ray, run
    from run_helpers import run_config, write_manifest

    work = Path(tempfile.mkdtemp(prefix="reelray-reliability-"))
    tiny = work / "model"
    make_tiny_model(tiny)
    ensure_ray(None)
    rows: list[Row] = []

    def fresh(name: str, i: int) -> Path:
        path = work / f"{name}-{i}"
        path.mkdir()
        return path

    # The sweep every driver-kill and leftover case compares against: a clean run's frames.
    sweep_dir = fresh("sweep", 0)
    manifest = write_manifest(
        sweep_dir / "m.parquet", {"prompt": ["fox", "harbor", "neon"], "seed_start": [0, 0, 0], "seed_count": [4, 4, 4]}
    )
    run(run_config(tiny, manifest, sweep_dir / "clean", actors=1), stream=io.StringIO())
    sweep = (manifest, sweep_dir / "clean", faults.frames_by_job(sweep_dir / "clean"))

    kills = 3 if quick else 12
    # A longer sweep for the kills (3 prompts x 8 seeds), so they land all through the run.
    long_dir = fresh("long-sweep", 0)
    long_manifest = write_manifest(
        long_dir / "m.parquet", {"prompt": ["fox", "harbor", "neon"], "seed_start": [0, 0, 0], "seed_count": [8, 8, 8]}
    )
    run(run_config(tiny, long_manifest, long_dir / "clean", actors=1), stream=io.StringIO())
    long_sweep = (long_manifest, long_dir / "clean", faults.frames_by_job(long_dir / "clean"))
    start = time.monotonic()
    try:
        committed = faults.check_driver_kills(long_sweep, tiny, fresh("driver-kill", 0), seed=2026, kills=kills)
        passed, outcome = kills, (
            "each time the same command resumed; at the end rows == jobs, no duplicates, every MP4 decodes, "
            f"frames_sha256 == a clean run's; jobs committed at the successive kills: {committed}"
        )
    except Exception as exc:  # noqa: BLE001 - counted as a failure
        passed, outcome = 0, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    rows.append((f"driver SIGKILL at {kills} seeded random points of one run", kills, passed,
                 f"{outcome} ({time.monotonic() - start:.0f} s)"))
    print(rows[-1], flush=True)

    timed(
        rows, "render actor SIGKILL mid-job", 2 if quick else 5,
        lambda i: faults.test_actor_killed_mid_job_is_replaced_and_the_job_committed_once(ray, tiny, fresh("actor-kill", i)),
        "actor replaced, killed job retried and committed exactly once",
    )
    timed(
        rows, "crash leftovers: truncated MP4, truncated sidecar, missing sidecar, orphan temp file, truncated metadata Parquet",
        1 if quick else 3,
        lambda i: faults.test_crash_leftovers_are_detected_and_rerendered(sweep, ray, tiny, fresh("leftovers", i)),
        "the 3 affected jobs re-rendered, temp file removed, nothing corrupt counted as done",
    )
    if os.geteuid() == 0:
        def out_of_space(i: int) -> None:
            import subprocess

            mount = fresh("disk", i) / "small"
            mount.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], check=True)
            try:
                faults.test_output_out_of_space_stops_cleanly_and_resumes(sweep, ray, tiny, mount)
            finally:
                subprocess.run(["umount", str(mount)], check=False)

        timed(
            rows, "output filesystem out of space (160 KiB tmpfs)", 1 if quick else 3, out_of_space,
            "RunStopped with a one-line reason, committed jobs intact, resumed after space freed",
        )
    timed(
        rows, "job over the per-job timeout", 1,
        lambda i: faults.test_job_over_the_timeout_is_failed_and_retried(ray, tiny, fresh("timeout", i)),
        "actor replaced, job retried, then a failed row naming the timeout; other jobs done",
    )
    timed(
        rows, "render producing non-finite latents (guidance 1e38)", 1,
        lambda i: pipeline_tests.test_failing_job_becomes_failed_row_and_others_finish(ray, tiny, fresh("nan", i)),
        "failed row with 'non-finite' error after retries, no MP4 committed, other jobs done",
    )
    timed(
        rows, "path-like / control / RTL / emoji prompts through a whole run", 1,
        lambda i: faults.test_path_like_prompts_write_nothing_outside_out(ray, tiny, fresh("paths", i)),
        "every file under OUT, named by job id only",
    )
    ray.shutdown()
    return rows


def random_manifest_columns(rng: random.Random) -> dict[str, pa.Array | list]:
    """A manifest with every kind of bad value the reader must survive."""
    n = rng.choice([0, 1, 3, 10, 40])
    nasty_prompts = [
        "", " ", "../../etc/passwd", "/abs/path", "C:\\x", "\x00\x01\x1b[31m", "\u202eevil\u202c", "🎬" * 50,
        "x" * (1 << 20), "ok prompt", None,
    ]
    ints = [None, -1, 0, 1, 3, 9, 50, 64, 81, 2**63 - 1, -(2**63), 10**12]
    floats = [None, math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 5.0, 50.0, 1e300]
    columns: dict[str, pa.Array | list] = {}
    if rng.random() < 0.95:
        kind = rng.choice(["str", "str", "int"])
        columns["prompt"] = [rng.choice(nasty_prompts) if kind == "str" else rng.randint(0, 9) for _ in range(n)]
    for name in ("steps", "frames", "width", "height", "guidance", "shift", "seed", "fps"):
        if rng.random() < 0.4:
            kind = rng.choice(["int", "float", "str", "uint64"])
            if kind == "int":
                columns[name] = [rng.choice(ints) for _ in range(n)]
            elif kind == "float":
                columns[name] = [rng.choice(floats) for _ in range(n)]
            elif kind == "str":
                columns[name] = [rng.choice(["50", "abc", None, ""]) for _ in range(n)]
            else:  # seeds beyond 2**63 - 1 need an unsigned column
                columns[name] = pa.array([rng.choice([0, 2**63, 2**64 - 1]) for _ in range(n)], pa.uint64())
    # Other families' columns, now and then: for Wan2.1 T2V an error in each row that gives one (null: absent).
    for name, values in (("guidance_2", floats), ("image", [None, "", "first.png", "../../etc/passwd"])):
        if rng.random() < 0.1:
            columns[name] = [rng.choice(values) for _ in range(n)]
    if rng.random() < 0.2:
        columns["seeds"] = [rng.choice([None, [], [0, 1], [-1], [2**62, 2**62]]) for _ in range(n)]
    if rng.random() < 0.3:
        columns["user_id"] = [rng.randint(0, 10**6) for _ in range(n)]
    if n and rng.random() < 0.2:  # duplicate rows
        columns = {k: (v if isinstance(v, pa.Array) else v[:-1] + [v[0]]) for k, v in columns.items()}
    return columns


def manifest_rows(quick: bool) -> list[Row]:
    from engine.families import foreign_names, get_family
    from jobs.manifest import ManifestError, read_manifest

    family = get_family("wan2.1-t2v")

    rng = random.Random(7)
    work = Path(tempfile.mkdtemp(prefix="reelray-manifests-"))
    tries = 100 if quick else 500
    outcomes = {"rows validated (jobs + numbered row errors)": 0, "whole-file ManifestError (one line)": 0}
    bad = []
    totals = {"rows": 0, "jobs": 0, "row errors": 0}
    for i in range(tries):
        path = work / f"m{i}.parquet"
        if i % 50 == 49:
            path.write_bytes(b"PAR1 this is not parquet" * rng.randint(0, 10))
        else:
            pq.write_table(pa.table(random_manifest_columns(rng)), path)
        try:
            rows_seen, numbered = 0, True
            for batch in read_manifest(str(path), model_digest="0" * 64, family=family.spec, seeds=None,
                                       foreign=foreign_names(family)):
                rows_seen += batch.rows_read
                totals["rows"] += batch.rows_read
                totals["jobs"] += len(batch.jobs)
                totals["row errors"] += len(batch.errors)
                numbered &= all(0 <= e.row < 10**6 for e in batch.errors)
            if not numbered:
                bad.append(f"m{i}: row error without a valid row number")
            outcomes["rows validated (jobs + numbered row errors)"] += 1
        except ManifestError as exc:
            if "\n" in str(exc) or str(path) not in str(exc):
                bad.append(f"m{i}: ManifestError not one line naming the file: {exc}")
            outcomes["whole-file ManifestError (one line)"] += 1
        except Exception as exc:  # noqa: BLE001 - counted as a crash
            bad.append(f"m{i}: {type(exc).__name__}: {exc}")
    outcome = ", ".join(f"{k}: {v}" for k, v in outcomes.items())
    outcome += f"; {totals['rows']} rows -> {totals['jobs']} jobs and {totals['row errors']} row errors, no crash"
    if bad:
        outcome = f"FAILED {len(bad)}x: {bad[0]}; " + outcome
    return [("random bad manifests (types, nulls, NaN/Inf, huge/negative seeds, 1 MB / control / RTL / emoji / path prompts, other families' columns, duplicates, zero rows, non-Parquet)", tries, tries - len(bad), outcome)]


FILE_CAMPAIGNS = [
    # name, what is tried, random mutants (quick, full)
    ("gguf", "mutated GGUF files (field edits, truncations, crafted, random bytes): open, list, metadata, dequantize every tensor; file_role", (400, 5000)),
    ("dit", "parseable DiT GGUF mutants (renamed, reshaped, retyped tensors, metadata, random): load_dit", (60, 1000)),
    ("safetensors", "mutated VAE / umT5 safetensors (header length, JSON, dtypes, offsets, truncation, random): load_vae, load_text_encoder, file_role", (150, 2000)),
    ("tokenizer", "mutated tokenizer metadata in a umT5 GGUF (tokens, scores, types, ids, charsmap): Tokenizer.from_gguf + encode", (40, 500)),
]


def file_rows(quick: bool) -> list[Row]:
    """Each campaign in a child process with its address space capped at start-up + 512 MiB and a timeout."""
    from fuzz_cases import run_campaign

    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="reelray-fuzz-"))
    for name, what, (n_quick, n_full) in FILE_CAMPAIGNS:
        report = run_campaign(name, work / name, headroom_mb=512, timeout=1800.0,
                              kwargs={name: {"n_random": n_quick if quick else n_full}})
        result = report.result
        if report.returncode != 0 or result is None:
            rows.append((what, 0, 0, f"FAILED: child exited {report.returncode} at {report.last_case!r}: {report.stderr[-300:]}"))
            continue
        outcomes: dict[str, int] = {}
        for (_, outcome), n in result.counts.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
        text = ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items(), key=lambda x: -x[1]))
        text += (f"; no crash, hang or other exception type; peak RSS {report.peak_rss_growth >> 20} MiB above "
                 f"start-up, under a 512 MiB address-space cap ({report.seconds:.0f} s)")
        if result.unexpected:
            category, label, outcome, message = result.unexpected[0]
            text = f"FAILED {len(result.unexpected)}x: {category} {label}: {outcome}: {message[:200]}; " + text
        rows.append((what, result.n_cases, result.n_cases - len(result.unexpected), text))
        print(rows[-1], flush=True)
    return rows


def write_report(rows: list[Row], path: Path, command: str, seconds: float) -> None:
    lines = [
        "# Reliability report",
        "",
        "Every fault and bad input below was tried for real by `bench/reliability.py` (real local Ray",
        "instance, real processes killed with SIGKILL, real files written, mutated and read back), on a",
        f"2-core CPU machine with the embedded tiny model. Whole run: {seconds / 60:.1f} minutes.",
        "",
        f"Reproduce: `{command}`",
        "",
        "The fast version of each case runs in `make test` (tests/test_faults.py, tests/test_pipeline.py,",
        "tests/test_fuzz_*.py, tests/test_manifest.py); the 12-kill driver case is `make test-slow`.",
        "",
        "| case | tried | passed | outcome |",
        "|---|---:|---:|---|",
    ]
    for case, tried, passed, outcome in rows:
        lines.append(f"| {case} | {tried} | {passed} | {outcome.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--quick", action="store_true", help="fewer tries of each case")
    args = parser.parse_args()
    start = time.monotonic()
    rows = fault_rows(args.quick) + manifest_rows(args.quick) + file_rows(args.quick)
    command = "make reliability" + ("" if not args.quick else "  (this table: --quick)")
    write_report(rows, Path(args.out), command, time.monotonic() - start)
    if any(passed != tried for _, tried, passed, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
