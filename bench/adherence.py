"""Prompt adherence of the toy-world model, measured through `reelray run` (the whole pipeline in the loop).

    .venv/bin/python bench/adherence.py [--model DIR] [--seen 24] [--held-out 20] [--seeds 2] [--actors 2]

Renders canonical prompts of seen (trained) and held-out (never trained)
combinations with several seeds, one `run` per recipe below (the
recipe's `guidance` / `steps` are manifest columns), then reads every MP4 back
and scores it against its own prompt with the pixel-only scorer
(engine/toy/adherence.py). Prints the accuracy per attribute and for all four
together, per recipe and per split, and the targets:

- seen combinations: colour, direction and background >= 95%;
- held-out combinations: all four attributes together >= 80%.

Recipes: the model's defaults (20 UniPC steps, guidance 5), guidance 1 at 20
steps (one forward per step: no classifier-free guidance), and 2, 4 and 8
steps at guidance 5: the quality side of every speed choice.

Without --model, the embedded toy model set is written (`reelray
make-tiny-model`, Q8_0) into a temporary folder. `--smoke` runs a handful of
prompts at one recipe (seconds; used by tests/test_bench_smoke.py).
Not a test: nothing is asserted; the targets are printed as met or not.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# (label, guidance, steps): None keeps the model's default.
RECIPES = [
    ("default (20 steps, cfg 5)", None, None),
    ("guidance 1, 20 steps", 1.0, None),
    ("2 steps, cfg 5", None, 2),
    ("4 steps, cfg 5", None, 4),
    ("8 steps, cfg 5", None, 8),
]
TARGET_SEEN = 0.95  # colour, direction, background on seen combinations
TARGET_HELD_OUT = 0.80  # all four together on held-out combinations


def spread(items: list, count: int) -> list:
    """`count` items spread evenly over the list (all of them if it is shorter)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def write_manifest(path: Path, scenes: list, seeds: list[int], recipes: list) -> int:
    prompts, seed_lists, guidance, steps = [], [], [], []
    for _, g, s in recipes:
        for scene in scenes:
            prompts.append(scene.prompt)
            seed_lists.append(seeds)
            guidance.append(g)
            steps.append(s)
    pq.write_table(pa.table({"prompt": prompts, "seeds": seed_lists,
                             "guidance": pa.array(guidance, pa.float64()), "steps": pa.array(steps, pa.int64())}), path)
    return len(prompts) * len(seeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a toy-world model set (default: the embedded one, written to a temp folder)")
    parser.add_argument("--quant", default="Q8_0", help="the DiT type written when --model is not given")
    parser.add_argument("--seen", type=int, default=24, help="seen combinations rendered (spread over the 268)")
    parser.add_argument("--held-out", type=int, default=20, help="held-out combinations rendered (of 20)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="4 prompts, 1 seed, the default recipe only")
    args = parser.parse_args()

    from engine.model_set import ModelSet
    from engine.toy.adherence import accuracy, format_accuracy, score_output
    from engine.toy.world import held_out_scenes, training_scenes
    from pipeline.driver import RunConfig, ensure_ray, run

    work = Path(tempfile.mkdtemp(prefix="reelray-adherence-"))
    if args.model:
        model_dir = Path(args.model)
    else:
        from engine.toy.embedded import write_toy_model

        model_dir = work / "model"
        write_toy_model(model_dir, quant=args.quant)
    recipes = RECIPES[:1] if args.smoke else RECIPES
    seen = spread(training_scenes(), 2 if args.smoke else args.seen)
    held = spread(held_out_scenes(), 2 if args.smoke else args.held_out)
    seeds = list(range(1 if args.smoke else args.seeds))

    reports = []
    ensure_ray(None)
    models = ModelSet.from_dir(model_dir)
    for label, g, s in recipes:
        manifest = work / f"manifest-{len(reports)}.parquet"
        jobs = write_manifest(manifest, seen + held, seeds, [(label, g, s)])
        out = work / f"out-{len(reports)}"
        start = time.perf_counter()
        report = run(RunConfig(manifest=str(manifest), out=str(out), model_files=models.paths(), family=models.family,
                               actors=args.actors, log_every=1e9), stream=io.StringIO())
        wall = time.perf_counter() - start
        if report["counts"]["failed"]:
            print(f"{label}: {report['counts']['failed']} of {jobs} jobs failed; see {out}")
        scored = score_output(out)
        reports.append((label, wall, scored))

    print(f"toy-world adherence through `reelray run` ({args.actors} actors), model {model_dir}")
    print(f"{len(seen)} seen and {len(held)} held-out combinations x {len(seeds)} seed(s) per recipe")
    for label, wall, scored in reports:
        print(f"\n{label}  ({len(scored)} videos, {wall:.1f} s)")
        seen_scores = [item.score for item in scored if not item.held_out]
        held_scores = [item.score for item in scored if item.held_out]
        print("  " + format_accuracy("seen", seen_scores))
        print("  " + format_accuracy("held-out", held_scores))
        seen_acc, held_acc = accuracy(seen_scores), accuracy(held_scores)
        seen_ok = all(seen_acc[name] >= TARGET_SEEN for name in ("colour", "direction", "background"))
        held_ok = held_acc["all"] >= TARGET_HELD_OUT
        print(f"  targets: seen colour/direction/background >= {TARGET_SEEN:.0%}: {'met' if seen_ok else 'NOT met'}; "
              f"held-out all >= {TARGET_HELD_OUT:.0%}: {'met' if held_ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
