"""Quality per quantization type: PSNR against the F32 render of the same jobs, and prompt adherence.

    .venv/bin/python bench/quality.py [--seen 24] [--held-out 20] [--seeds 1] [--types F16,Q8_0,...]

The embedded toy-world DiT checkpoint (engine/toy/model) is written once per
type with `reelray quantize`'s code (engine/gguf/quantize.py, the community
rules on which tensors stay F32), the rest of the model set unchanged; every
type renders the same jobs (canonical prompts of seen and held-out
combinations, fixed seeds, the model's defaults: 20 UniPC steps, guidance 5)
through `Engine`. For each type it prints the DiT file size, the PSNR of its
frames against the F32 frames (uint8 pixels, MSE pooled over all videos,
and the worst video), and the adherence per attribute read off the pixels
(engine/toy/adherence.py). Prints a Markdown table (docs/quality.md).
`--smoke`: two types, two prompts (seconds; tests/test_bench_smoke.py).
Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def render_all(model_dir: Path, jobs: list, threads: int) -> list[np.ndarray]:
    from engine.model_set import ModelSet
    from engine.render import Engine

    engine = Engine(ModelSet.from_dir(model_dir), cpu_threads=threads)
    return [engine.render(scene.prompt, seed).frames for scene, seed in jobs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--seen", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    from engine.toy.adherence import accuracy, score_clip
    from engine.toy.embedded import write_toy_model
    from engine.toy.world import held_out_scenes, training_scenes

    def spread(items, count):
        return list(items) if count >= len(items) else [items[(i * len(items)) // count] for i in range(count)]

    types = ["Q8_0"] if args.smoke else [t for t in args.types.split(",") if t]
    scenes = spread(training_scenes(), 1 if args.smoke else args.seen) + spread(held_out_scenes(), 1 if args.smoke else args.held_out)
    jobs = [(scene, seed) for seed in range(1 if args.smoke else args.seeds) for scene in scenes]
    work = Path(tempfile.mkdtemp(prefix="reelray-quality-"))

    start = time.perf_counter()
    reference = render_all(write_toy_model(work / "F32", quant="F32")["dit"].parent, jobs, args.threads)
    print(f"F32 reference: {len(jobs)} videos in {time.perf_counter() - start:.1f} s "
          f"({sum(not s.held_out for s, _ in jobs)} seen, {sum(s.held_out for s, _ in jobs)} held-out)")

    rows = []
    for qtype in ["F32", *types]:
        paths = write_toy_model(work / qtype, quant=qtype)
        videos = reference if qtype == "F32" else render_all(paths["dit"].parent, jobs, args.threads)
        errors = [float(np.mean((v.astype(np.float64) - r.astype(np.float64)) ** 2)) for v, r in zip(videos, reference)]
        seen = accuracy([score_clip(v, s) for v, (s, _) in zip(videos, jobs) if not s.held_out])
        held = accuracy([score_clip(v, s) for v, (s, _) in zip(videos, jobs) if s.held_out])
        rows.append((qtype, paths["dit"].stat().st_size, psnr(float(np.mean(errors))), psnr(max(errors)), seen, held))
        print(f"{qtype:5s} done", flush=True)

    print("\n| DiT type | DiT file | PSNR vs F32 (pooled) | worst video | seen: colour / shape / direction / background / all "
          "| held-out: all |")
    print("|---|---|---|---|---|---|")
    for qtype, size, pooled, worst, seen, held in rows:
        seen_cells = " / ".join(f"{100 * seen[k]:.0f}" for k in ("colour", "shape", "direction", "background", "all"))
        print(f"| {qtype} | {size / 1e6:.2f} MB | {pooled:.1f} dB | {worst:.1f} dB | {seen_cells} % | {100 * held['all']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
