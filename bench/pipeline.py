"""Pipeline benchmark: resident render actors vs loading the model for every job.

    .venv/bin/python bench/pipeline.py [--prompts 6] [--seeds 4]

Same tiny model, same jobs for each. Prints wall times and ratios, and the
share of each actor's wall time spent outside rendering (scheduling, I/O,
encoding); target under 5%. Not a test: timings are never asserted.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import make_tiny_model
    from engine.video import write_mp4
    from jobs.manifest import load_jobs
    from pipeline.driver import RunConfig, ensure_ray, run

    work = Path(tempfile.mkdtemp(prefix="reelray-bench-"))
    make_tiny_model(work / "model")
    models = ModelSet.from_dir(work / "model")
    prompts = [f"benchmark prompt number {i}: a slow pan over a quiet landscape" for i in range(args.prompts)]
    manifest = work / "manifest.parquet"
    pq.write_table(pa.table({"prompt": prompts, "seed_start": [0] * args.prompts, "seed_count": [args.seeds] * args.prompts}), manifest)
    jobs, _, _ = load_jobs(str(manifest), model_digest=models.digest(), family=models.spec)
    n = len(jobs)
    print(f"{n} jobs ({args.prompts} prompts x {args.seeds} seeds), tiny model, {os.cpu_count()} CPUs")

    # Baseline: one process, the model loaded for every job, then render + encode.
    start = time.perf_counter()
    for job in jobs:
        engine = Engine(models)
        result = engine.render(job.prompt, job.seed, job.params, job.negative_prompt)
        write_mp4(result.frames, work / f"loop-{job.job_id}.mp4", fps=job.params.fps)
    loop_s = time.perf_counter() - start
    print(f"load-per-job loop            {loop_s:8.2f} s   {60 * n / loop_s:7.1f} videos/min")

    ensure_ray(None)
    for actors in sorted({1, args.actors}):
        out = work / f"out-{actors}"
        start = time.perf_counter()
        report = run(
            RunConfig(manifest=str(manifest), out=str(out), model_files=models.paths(), family=models.family,
                      actors=actors, log_every=1e9),
            stream=io.StringIO(),
        )
        wall = time.perf_counter() - start
        print(
            f"pipeline, {actors} resident actor(s)  {wall:8.2f} s   {60 * n / wall:7.1f} videos/min   "
            f"speed-up vs loop x{loop_s / wall:.2f}  (run incl. actor start-up and model load)"
        )
        for stats in report["actors"]:
            outside = stats["wall_s"] - stats["render_s"]
            share = outside / stats["wall_s"] if stats["wall_s"] else float("nan")
            print(
                f"    actor {stats['actor']:>22s}: {stats['jobs']:3d} jobs, load {stats['load_s']:.2f} s, "
                f"render {stats['render_s']:.2f} s, encode {stats['encode_s']:.2f} s, commit {stats['commit_s']:.2f} s, "
                f"wall {stats['wall_s']:.2f} s -> outside rendering {100 * share:.1f}%"
            )
        steady = sum(60 * a["jobs"] / a["wall_s"] for a in report["actors"] if a["wall_s"])
        print(
            f"    steady state (after model load) {steady:7.1f} videos/min: x{steady / (60 * n / loop_s):.2f} the loop; "
            f"embedding cache hit rate {report['embedding_cache_hit_rate']:.3f}"
        )


if __name__ == "__main__":
    main()
