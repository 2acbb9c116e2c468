"""Benchmark: one toy-world DiT training step as train_dit's loop runs it, in float32 (the committed
model's recipe) and with `--precision bfloat16` (bfloat16 autocast, explicit attention), the latter
with the caption-dropped samples in a second forward and in the same forward (CompactText.share_tail).

    .venv/bin/python bench/toy_training.py [--batch 64] [--steps 10] [--threads 2]

The toy DiT (engine/toy/train_dit.py's TOY_DIT: dim 256, 4 blocks, heads 128 wide) on a batch of
full toy clips' latents ([16, 5, 8, 8]: 80 video tokens each): 90% of the samples with an
11-token prompt context through CompactText, 10% (caption dropout) reading a 350-token negative
prompt; forward, backward, gradient clipping and an AdamW step. The variants alternate step by step
so a busy moment of a shared machine hurts them alike; it prints the median seconds per step of each
and the ratio against float32, measured in the same run. Not a test: timings depend on the machine
(bfloat16 pays off on CPUs with bfloat16 matrix units, AMX or AVX512-BF16, and on GPUs).
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

from engine.toy.train_dit import CAPTION_DROPOUT, TOY_DIT, CompactText, trainable  # noqa: E402
from engine.wan.dit import WanConfig, WanModel  # noqa: E402

PROMPT, NEGATIVE = 11, 350  # tokens: a world prompt, the family's negative prompt
# name -> (bfloat16, the caption-dropped samples in the same forward)
VARIANTS = {"float32": (False, False), "bf16-two-forwards": (True, False), "bfloat16": (True, True)}


def trainer(fast: bool, shared: bool, batch: int):
    torch.manual_seed(0)
    cfg = WanConfig(dim=TOY_DIT["dim"], ffn_dim=TOY_DIT["ffn_dim"], num_heads=TOY_DIT["num_heads"],
                    num_layers=TOY_DIT["num_layers"], in_dim=16, out_dim=16, text_dim=64)
    model = trainable(WanModel(cfg), explicit=fast)
    compact = CompactText(model, explicit=fast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dropped = max(1, round(CAPTION_DROPOUT * batch)) if batch > 1 else 0
    own = batch - dropped
    x0, context = torch.randn(batch, 16, 5, 8, 8), torch.randn(batch, PROMPT + 1, 64)
    negative = torch.randn(1, NEGATIVE + 1, 64)

    def step() -> float:
        start = time.perf_counter()
        t = torch.rand(batch) * 1000
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            compact.set_lengths(torch.full((own,), PROMPT), PROMPT + 1)
            if shared or not dropped:
                if dropped:
                    compact.share_tail(negative, NEGATIVE, dropped)
                v = model(x0, t, context).float()
            else:
                head = model(x0[:own], t[:own], context[:own]).float()
                compact.set_lengths(torch.full((dropped,), NEGATIVE), NEGATIVE + 1)
                v = torch.cat([head, model(x0[own:], t[own:], negative.expand(dropped, -1, -1)).float()])
        loss = F.mse_loss(v, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
    steps = {name: trainer(*variant, args.batch) for name, variant in VARIANTS.items()}
    times = {name: [] for name in steps}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            took = step()
            if i >= 2:  # the first steps allocate and warm up
                times[name].append(took)
    base = statistics.median(times["float32"])
    print(f"toy DiT training step, batch {args.batch}, {args.threads} threads, {torch.__version__}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:17s} {median:6.3f} s/step  x{base / median:.2f} vs float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
