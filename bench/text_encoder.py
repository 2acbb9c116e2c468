"""Benchmark: resident memory of the umT5-XXL text encoder under both weight policies.

    .venv/bin/python bench/text_encoder.py [--layers 1] [--tokens 40]

The real encoder (umt5-xxl-encoder-Q8_0.gguf) is dominated by its token
table: 256384 x 4096 values, 1.1 GB as Q8_0 blocks and 4.2 GB as float32.
A GGUF of that width (vocab 256384, dim 4096, ffn 10240, 64 heads) with
`--layers` blocks is written once, every 2-D weight as random Q8_0 blocks
with small float16 scales, as llama-quantize stores them. Each policy then
loads it in a fresh subprocess and encodes `--tokens` token ids:

- dequantize_once (the baseline): every weight dequantized to float32 at load;
- on_the_fly: Linear weights and the token table stay as blocks in the memory
  map; a lookup dequantizes only the rows of the ids it is given.

Printed per policy: load time, encode time, peak resident memory above the
child's RSS after imports (VmHWM after clearing the mark), and the growth of
anonymous memory (RssAnon: what the process owns, as opposed to page cache
of the mapped file, shared and reclaimable). The two encodings are compared:
they must be identical. Ratios are on_the_fly / dequantize_once, measured in
the same run. Not a test: figures depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine import _status_kib  # noqa: E402
from engine.gguf import write_gguf  # noqa: E402

VOCAB, DIM, FFN, HEADS, BUCKETS = 256384, 4096, 10240, 64, 32


def q8_0_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q8_0 blocks of a [rows, cols] weight: a float16 scale (~0.002) then 32 int8 quants per block."""
    block_size, type_size = GGML_QUANT_SIZES[Q.Q8_0]
    n = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    scales = (rng.random(n, dtype=np.float32) * 0.002 + 0.001).astype(np.float16)
    blocks[:, :2] = scales.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def write_encoder(path: Path, layers: int) -> None:
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (q8_0_blocks(VOCAB, DIM, rng), Q.Q8_0)}
    for i in range(layers):
        p = f"enc.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_o"):
            tensors[p + name + ".weight"] = (q8_0_blocks(DIM, DIM, rng), Q.Q8_0)
        tensors[p + "attn_rel_b.weight"] = (rng.standard_normal((HEADS, BUCKETS)).astype(np.float32) * 0.1, Q.F32)
        tensors[p + "attn_norm.weight"] = (np.ones(DIM, dtype=np.float32), Q.F32)
        tensors[p + "ffn_gate.weight"] = (q8_0_blocks(FFN, DIM, rng), Q.Q8_0)
        tensors[p + "ffn_up.weight"] = (q8_0_blocks(FFN, DIM, rng), Q.Q8_0)
        tensors[p + "ffn_down.weight"] = (q8_0_blocks(DIM, FFN, rng), Q.Q8_0)
        tensors[p + "ffn_norm.weight"] = (np.ones(DIM, dtype=np.float32), Q.F32)
    tensors["enc.output_norm.weight"] = (np.ones(DIM, dtype=np.float32), Q.F32)
    arch = "t5encoder"
    write_gguf(path, arch, tensors, {
        f"{arch}.embedding_length": DIM, f"{arch}.feed_forward_length": FFN, f"{arch}.block_count": layers,
        f"{arch}.attention.head_count": HEADS, f"{arch}.attention.relative_buckets_count": BUCKETS,
    })


def child(policy: str, path: str, tokens: int) -> None:
    import torch

    from engine.wan.t5 import load_text_encoder

    torch.set_num_threads(1)
    rss_before, anon_before = _status_kib("VmRSS"), _status_kib("RssAnon")
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak-RSS mark
        fh.write("5")
    t0 = time.perf_counter()
    encoder = load_text_encoder(path, policy=policy)
    load_s = time.perf_counter() - t0
    peak_load = _status_kib("VmHWM")
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, size=(1, tokens)))
    t0 = time.perf_counter()
    with torch.inference_mode():
        hidden = encoder(ids)
    encode_s = time.perf_counter() - t0
    print(json.dumps({
        "load_s": load_s, "encode_s": encode_s,
        "peak_load_mib": (peak_load - rss_before) / 1024,
        "peak_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        "anon_growth_mib": (_status_kib("RssAnon") - anon_before) / 1024,
        "hidden_sha": __import__("hashlib").sha256(hidden.numpy().tobytes()).hexdigest(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--child", nargs=2, metavar=("POLICY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.tokens)
        return
    with tempfile.TemporaryDirectory(prefix="reelray-bench-") as tmp:
        path = Path(tmp) / f"umt5-xxl-width-{args.layers}-layers-Q8_0.gguf"
        t0 = time.perf_counter()
        write_encoder(path, args.layers)
        print(f"umT5-XXL width, {args.layers} block(s), Q8_0: {path.stat().st_size / 2**20:.0f} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s); encoding {args.tokens} tokens, 1 thread")
        results = {}
        for policy in ("dequantize_once", "on_the_fly"):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", policy, str(path)],
                                 capture_output=True, text=True, check=True)
            results[policy] = json.loads(out.stdout.strip().splitlines()[-1])
    base, fly = results["dequantize_once"], results["on_the_fly"]
    print(f"{'policy':<16}{'load s':>8}{'encode s':>10}{'peak MiB':>10}{'anon MiB':>10}")
    for policy, r in results.items():
        print(f"{policy:<16}{r['load_s']:>8.2f}{r['encode_s']:>10.3f}{r['peak_mib']:>10.0f}{r['anon_growth_mib']:>10.0f}")
    print(f"on_the_fly / dequantize_once: peak {fly['peak_mib'] / base['peak_mib']:.3f}x, "
          f"anonymous memory {fly['anon_growth_mib'] / base['anon_growth_mib']:.3f}x, "
          f"load time {fly['load_s'] / base['load_s']:.3f}x, encode time {fly['encode_s'] / base['encode_s']:.2f}x")
    same = base["hidden_sha"] == fly["hidden_sha"]
    print(f"encodings identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
