"""Benchmark: how fast `engine.gguf.quantize` makes each block type, against a float16 cast.

    .venv/bin/python bench/quantize.py [--types Q4_K,Q8_0] [--repeat 3] [--threads 1] [--out FILE] [--smoke]

The tensors are the block weights of one Wan2.1-1.3B block: attention [1536, 1536] (rows of
1536 values) and the FFN's [8960, 1536] and [1536, 8960] (rows of 8960), seeded Gaussian values
of the size of trained weights (std 0.02). For every type, all three are quantized as
`reelray quantize` does (`quantize(values, type)`), types interleaved round by round so a busy
moment of a shared machine hurts all alike; best of `--repeat`. Throughput is MB of float32 input
per second; the ratio is against the baseline measured in the same run: the float16 cast
(gguf-py's F16, a plain `astype`), the cheapest thing a quantizer could do. The relative RMS
error of each type (dequantized with gguf-py) is printed beside it.

`--threads` sets torch's threads (default 1: on a shared 2-core machine that measures the work,
not the scheduler); `quantize` runs its chunks on that many threads. Not a test: timings depend
on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.gguf.quantize import QUANT_TYPES, quantize  # noqa: E402

WAN_1_3B = {"attn": (1536, 1536), "ffn.0": (8960, 1536), "ffn.2": (1536, 8960)}
SMOKE = {"attn": (256, 256), "ffn.0": (512, 256), "ffn.2": (256, 512)}
BASELINE = "F16"
DEFAULT_TYPES = [t.name for t in QUANT_TYPES if t != Q.F32]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated GGML types")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds, best kept (default 3; 1 with --smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny tensors: a check that the bench runs, in seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SMOKE if args.smoke else WAN_1_3B
    repeat = args.repeat or (1 if args.smoke else 3)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if BASELINE not in types:
        types.insert(0, BASELINE)

    rng = np.random.default_rng(0)
    tensors = {name: (0.02 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    mb = sum(t.nbytes for t in tensors.values()) / 1e6
    print(f"{len(tensors)} tensors {', '.join(f'{n} {list(s)}' for n, s in shapes.items())}: {mb:.1f} MB float32; "
          f"{args.threads} torch thread(s), best of {repeat}", flush=True)

    best = {t: float("inf") for t in types}
    for _ in range(repeat):
        for qtype in types:  # interleaved: a slow moment of the machine hurts every type
            start = time.perf_counter()
            for values in tensors.values():
                quantize(values, qtype)
            best[qtype] = min(best[qtype], time.perf_counter() - start)

    report = {"smoke": args.smoke, "threads": args.threads, "repeat": repeat, "mb": mb, "baseline": BASELINE,
              "shapes": {n: list(s) for n, s in shapes.items()}, "types": {}}
    print(f"{'type':8s} {'MB/s':>9s} {'x ' + BASELINE:>9s} {'rel rms':>9s}")
    for qtype in types:
        errors = []
        for values in tensors.values():
            back = dequantize(quantize(values, qtype), Q[qtype])
            errors.append(((back - values) ** 2).sum() / (values ** 2).sum())
        rel_rms = float(np.sqrt(np.mean(errors)))
        rate = mb / best[qtype]
        ratio = rate / (mb / best[BASELINE])
        report["types"][qtype] = {"seconds": best[qtype], "mb_per_s": rate, "ratio_vs_baseline": ratio,
                                  "rel_rms_error": rel_rms}
        print(f"{qtype:8s} {rate:9.1f} {ratio:9.4f} {rel_rms:9.4f}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
