"""Benchmark: one toy-world DiT training step in float32 (the committed model's recipe) against
`--precision bfloat16` (bfloat16 autocast with explicit attention).

    .venv/bin/python bench/toy_training.py [--batch 64] [--steps 10] [--threads 2]

The toy DiT (engine/toy/train_dit.py's TOY_DIT: dim 256, 4 blocks, heads 128 wide) on a batch of
full toy clips' latents ([16, 5, 8, 8]: 80 video tokens each) with an 11-token prompt context
through CompactText: forward, backward and an AdamW step, as train_dit's loop runs them.
The two precisions alternate step by step so a busy moment of a shared machine hurts both alike;
it prints the median seconds per step of each and the ratio against float32, measured in the same
run. Not a test: timings depend on the machine (bfloat16 pays off on CPUs with bfloat16 matrix
units, AMX or AVX512-BF16, and on GPUs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.toy.train_dit import TOY_DIT, CompactText, trainable  # noqa: E402
from engine.wan.dit import WanConfig, WanModel  # noqa: E402


def trainer(precision: str, batch: int):
    torch.manual_seed(0)
    explicit = precision == "bfloat16"
    cfg = WanConfig(dim=TOY_DIT["dim"], ffn_dim=TOY_DIT["ffn_dim"], num_heads=TOY_DIT["num_heads"],
                    num_layers=TOY_DIT["num_layers"], in_dim=16, out_dim=16, text_dim=64)
    model = trainable(WanModel(cfg), explicit=explicit)
    compact = CompactText(model, explicit=explicit)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0, context = torch.randn(batch, 16, 5, 8, 8), torch.randn(batch, 12, 64)
    lengths = torch.full((batch,), 11)

    def step() -> float:
        start = time.perf_counter()
        compact.set_lengths(lengths, context.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=explicit):
            v = model(x0, torch.rand(batch) * 1000, context).float()
        loss = F.mse_loss(v, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = {p: trainer(p, args.batch) for p in ("float32", "bfloat16")}
    times = {p: [] for p in steps}
    for i in range(args.steps + 2):
        for precision, step in steps.items():
            took = step()
            if i >= 2:  # the first steps allocate and warm up
                times[precision].append(took)
    base = statistics.median(times["float32"])
    print(f"toy DiT training step, batch {args.batch}, {args.threads} threads, {torch.__version__}")
    for precision, values in times.items():
        median = statistics.median(values)
        print(f"  {precision:9s} {median:6.3f} s/step  x{base / median:.2f} vs float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
