"""Benchmark: our torch dequantization vs gguf-py's numpy, the quantized linear layer, and RSS on open.

    .venv/bin/python bench/dequant.py [--mb 64] [--repeat 3] [--types Q4_K,Q8_0] [--threads N]

For each type: the same `--mb` MB of random valid blocks (finite float16 scales),
shaped as a weight with rows of 4096 values, dequantized to float32 by
`gguf.quants.dequantize` and by `engine.gguf.dequant.dequantize` (best of
`--repeat` wall-clock runs each, interleaved). Throughput is MB of blocks per
second. Then a 4096x4096 linear on 32 tokens: dense nn.Linear vs QuantizedLinear
(dequantizing per call). Then the resident-set growth after opening a 1 GB GGUF
file written to a temporary directory.

Not a test: timings depend on the machine and on whatever else runs on it (on
a shared machine, `--threads 1` compares the work done rather than the luck of
the scheduler). F32 is a view of the bytes in both libraries and is not timed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.gguf import GGUFFile  # noqa: E402
from engine.gguf.dequant import DEQUANTIZERS, dequantize  # noqa: E402
from engine.gguf.linear import QuantizedLinear  # noqa: E402

ROW = 4096  # values per weight row

# Byte offsets of the float16 scales in each block (ggml-common.h).
F16_SCALE_OFFSETS: dict[Q, tuple[int, ...]] = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}


def valid_blocks(qtype: Q, n_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """About `n_bytes` of `qtype` data as `[rows, bytes per row]`: random quants, finite scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = ROW // block_size * type_size
    rows = max(1, n_bytes // row_bytes)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((rows, ROW), dtype=np.float32)
        return np.ascontiguousarray(gguf_quantize(values, qtype)).view(np.uint8).reshape(rows, row_bytes)
    n = rows * ROW // block_size
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, row_bytes)


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        del result
    return best


def bench_types(types: list[Q], mb: int, repeat: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    threads = torch.get_num_threads()
    print(f"dequantization to float32, {mb} MB of blocks per type, best of {repeat}, {threads} torch threads")
    print(f"{'type':8s} {'gguf-py MB/s':>13s} {'ours MB/s':>10s} {'ratio':>6s}  bit-exact")
    for qtype in types:
        blocks = valid_blocks(qtype, mb * 2**20, rng)
        raw = torch.from_numpy(blocks.reshape(-1))
        shape = (blocks.shape[0], ROW)
        ref = np.asarray(gguf_dequantize(blocks, qtype), dtype=np.float32)
        exact = np.array_equal(ref.view(np.uint32), dequantize(raw, qtype, shape).numpy().view(np.uint32))
        del ref
        t_ref, t_ours = float("inf"), float("inf")
        for _ in range(repeat):  # interleaved, so both see the same machine load
            t_ref = min(t_ref, best_of(lambda: gguf_dequantize(blocks, qtype), 1))
            t_ours = min(t_ours, best_of(lambda: dequantize(raw, qtype, shape), 1))
        size_mb = blocks.nbytes / 2**20
        if qtype == Q.F32:  # both return a view of the bytes: nothing to time
            print(f"{qtype.name:8s} {'(view)':>13s} {'(view)':>10s} {'':6s}  {exact}", flush=True)
            continue
        rows.append((qtype.name, size_mb / t_ref, size_mb / t_ours))
        line = f"{qtype.name:8s} {size_mb / t_ref:13.0f} {size_mb / t_ours:10.0f} {t_ref / t_ours:6.2f}  {exact}"
        print(line, flush=True)
    return rows


def bench_linear(repeat: int) -> None:
    out_features = in_features = 4096
    tokens = 32
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    x = torch.randn(tokens, in_features)
    print(f"\nlinear {in_features}->{out_features} on {tokens} tokens, float32, best of {repeat}")
    with torch.no_grad():
        for qtype in (Q.Q8_0, Q.Q4_K, Q.Q6_K):
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            blocks = valid_blocks(qtype, out_features * in_features // block_size * type_size, rng)
            layer = QuantizedLinear(torch.from_numpy(blocks.reshape(-1)), qtype, (out_features, in_features))
            dense = torch.nn.Linear(in_features, out_features, bias=False)
            dense.weight.copy_(layer.dequantized_weight())
            assert torch.equal(layer(x), dense(x))
            t_dense = best_of(lambda: dense(x), repeat)
            t_quant = best_of(lambda: layer(x), repeat)
            weight_mb = dense.weight.numel() * 4 / 2**20
            blocks_mb = blocks.nbytes / 2**20
            print(f"{qtype.name:6s} dense nn.Linear {t_dense * 1e3:7.1f} ms ({weight_mb:.0f} MB weight)  "
                  f"QuantizedLinear {t_quant * 1e3:7.1f} ms ({blocks_mb:.0f} MB blocks)  "
                  f"x{t_quant / t_dense:.1f} time, x{weight_mb / blocks_mb:.1f} less weight memory")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bench_open_rss(gb: float = 1.0) -> None:
    """Write a real ~1 GB Q8_0 file (every byte written), then open it and list/view every tensor."""
    rng = np.random.default_rng(2)
    tensor_rows = 1024  # one tensor: 1024 x 4096 Q8_0 = 4.25 MiB
    tensor = valid_blocks(Q.Q8_0, tensor_rows * ROW // 32 * 34, rng)
    n_tensors = int(gb * 2**30 // tensor.nbytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.gguf"
        w = GGUFWriter(path, "wan")
        for i in range(n_tensors):
            w.add_tensor(f"blocks.{i}.ffn.0.weight", tensor, raw_dtype=Q.Q8_0)  # the same array, not copies
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size_gb = path.stat().st_size / 2**30
        before = _rss_mib()
        t0 = time.perf_counter()
        f = GGUFFile(path)
        views = [f.raw(name) for name in f.tensor_names]
        shapes = [f.shape(name) for name in f.tensor_names]
        t_open = time.perf_counter() - t0
        after = _rss_mib()
        one = f.dequantize(f.tensor_names[0])
        after_one = _rss_mib()
        print(f"\nopen a {size_gb:.2f} GiB GGUF ({n_tensors} tensors) and view every tensor: {t_open * 1e3:.0f} ms, "
              f"RSS +{after - before:.1f} MiB (target < 100 MiB); after dequantizing one {list(shapes[0])} tensor: "
              f"+{after_one - before:.1f} MiB")
        del views, one
        f.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="MB of blocks per type")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--types", default=",".join(t.name for t in DEQUANTIZERS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # numpy's overflow warnings on extreme random scales
    rows = bench_types([Q[name] for name in args.types.split(",")], args.mb, args.repeat)
    ratios = [ours / ref for _, ref, ours in rows]
    print(f"ratio ours/gguf-py: min {min(ratios):.2f} ({rows[int(np.argmin(ratios))][0]}), "
          f"geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}")
    bench_linear(args.repeat)
    bench_open_rss()


if __name__ == "__main__":
    main()
