"""The Wan2.2 A14B expert swap: what keeping one expert off the device costs per job.

Writes a T2V-A14B model set whose experts are scaled-down Wan DiTs (dim and
layers below; Q8_0 block weights), renders the same jobs with both experts
resident (the baseline, measured in the same run) and with the swap
placement (one expert on the device, the other in host memory, trading places
at the boundary), and prints per-job seconds, swaps per job, seconds per swap
and the ratio. Frames must be identical in both placements.

    .venv/bin/python bench/experts.py [--device cuda] [--dim 1536 --layers 8] [--jobs 3]

On a CPU-only machine the device is host memory, so a "swap" moves nothing:
the figure that matters needs a GPU (`bench/gpu_check.sh`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.families.wan22_t2v_a14b import Wan22T2VA14B  # noqa: E402
from engine.model_set import ModelSet  # noqa: E402
from engine.render import Engine  # noqa: E402
from engine.tiny import make_tiny_model, random_state_dict  # noqa: E402
from engine.wan.convert.dit import write_dit_gguf  # noqa: E402
from engine.wan.dit import WanConfig, WanModel  # noqa: E402


def write_experts(directory: Path, dim: int, layers: int) -> ModelSet:
    paths = make_tiny_model(directory, family="wan2.2-t2v-a14b")  # text encoder, VAE and the file names
    config = WanConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 128, num_layers=layers, in_dim=16, out_dim=16,
                       text_dim=64)
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = WanModel(config)
    defaults = {"width": 128, "height": 128, "frames": 9, "steps": 8, "guidance": 4.0, "guidance_2": 3.0,
                "shift": 12.0, "boundary": 0.875, "fps": 16, "sampler": "unipc"}
    for role in ("dit_high", "dit_low"):
        write_dit_gguf(random_state_dict(model, generator), paths[role], quant="Q8_0",
                       metadata={"reelray.render_defaults": json.dumps(defaults, sort_keys=True)})
    return ModelSet.from_dir(directory)


def run(models: ModelSet, device: str, placement: str, jobs: int) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    engine = Engine(models, device=device, dtype=dtype, cpu_threads=2, placement=placement)
    load_s = time.perf_counter() - start
    assert isinstance(engine.pipeline, Wan22T2VA14B)
    engine.render("warm-up", 0)  # first-call costs (allocator, kernels) outside the timing
    swaps_before, swap_s_before = engine.placement["swaps"], engine.placement["swap_s"]
    shas, start = [], time.perf_counter()
    for seed in range(jobs):
        shas.append(engine.render("a red fox in snow", seed).frames_sha256)
    per_job = (time.perf_counter() - start) / jobs
    swaps = engine.placement["swaps"] - swaps_before
    return {"placement": engine.placement["mode"], "reason": engine.placement["reason"], "load_s": load_s,
            "per_job_s": per_job, "swaps_per_job": swaps / jobs,
            "s_per_swap": (engine.placement["swap_s"] - swap_s_before) / swaps if swaps else 0.0, "frames": shas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = write_experts(Path(tmp), args.dim, args.layers)
        expert_mib = models.files["dit_high"].stat().st_size / 2**20
        resident = run(models, args.device, "resident", args.jobs)
        swap = run(models, args.device, "swap", args.jobs)
    assert swap["frames"] == resident["frames"], "frames differ between placements"
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"experts dim {args.dim} x {args.layers} layers, {expert_mib:.0f} MiB each (Q8_0 file), {args.jobs} jobs")
    for r in (resident, swap):
        print(f"  {r['placement']:8s} load {r['load_s']:6.2f} s  per job {r['per_job_s']:7.3f} s  "
              f"swaps/job {r['swaps_per_job']:.1f}  s/swap {r['s_per_swap']:.4f}")
    print(f"  swap / resident per job: x{swap['per_job_s'] / resident['per_job_s']:.3f}; frames identical")


if __name__ == "__main__":
    main()
