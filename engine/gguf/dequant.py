"""Dequantization of GGML blocks in torch, bit-exact with gguf-py's numpy code.

Every `dequantize_<type>(blocks, out=None)` takes a `uint8` tensor
`[n_blocks, type_size]` and returns (or fills `out` with) float32
`[n_blocks, block_size]`. The block layouts and the order of the float32
operations follow `gguf/quants.py` (which follows ggml-quants.c): float16 scales
are converted to float32, then multiplied in the same order as gguf-py
(e.g. `(d * sc) * q - (dmin * m)`), so every product is rounded the same way.
Only torch ops are used, so the same code runs on CPU and CUDA.

How it is fast on the CPU (measured on torch 2.x): bit fields are unpacked by
scalar shifts and masks on contiguous bytes (torch's broadcast and strided
integer kernels are 10-30x slower), signed quants come from wrapping uint8
subtraction read back as int8, the float32 output is written once and scaled in
place, and `dequantize` walks large tensors in cache-sized chunks into one
output allocated with transparent huge pages.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

Q = GGMLQuantizationType


class UnsupportedQuantType(ValueError):
    """A tensor uses a GGML type that this engine cannot dequantize."""

    def __init__(self, qtype: GGMLQuantizationType | int, name: str | None = None):
        type_name = qtype.name if isinstance(qtype, GGMLQuantizationType) else f"id {int(qtype)}"
        where = f"tensor {name!r}: " if name is not None else ""
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        super().__init__(f"{where}GGML type {type_name} is not supported (supported: {supported})")
        self.qtype = qtype
        self.name = name


# --- helpers ----------------------------------------------------------------------------

Tensor = torch.Tensor


def _output(blocks: Tensor, out: Tensor | None, block_size: int) -> Tensor:
    if out is None:
        return torch.empty(blocks.shape[0], block_size, dtype=torch.float32, device=blocks.device)
    return out


def _f16_to_f32(h: Tensor, out: Tensor | None = None) -> Tensor:
    """Exact float16 -> float32 conversion of a float16 tensor, NaN payloads included.

    numpy keeps a NaN's payload and sign; torch's CPU kernels return a canonical
    NaN. The rare NaNs are rebuilt from their bits so the result matches gguf-py.
    """
    f = h.to(torch.float32) if out is None else out.copy_(h)
    # A sum is NaN when a NaN (or both infinities) is present, and costs far less
    # than torch.isnan(...).any() over the whole tensor.
    if bool(torch.isnan(f.sum())):
        nan = torch.isnan(f)
        # Assigned as int32: a float assignment would quiet the NaNs again.
        bits = h[nan].view(torch.int16).to(torch.int32)
        f.view(torch.int32)[nan] = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return f


def _f16(blocks: Tensor, offset: int) -> Tensor:
    """The little-endian float16 at byte `offset` of every block, as float32 `[n, 1]`."""
    return _f16_to_f32(blocks[:, offset:offset + 2].contiguous().view(torch.float16))


def _fields(x: Tensor, shifts: Sequence[int], mask: int) -> Tensor:
    """Bit fields of bytes: `[..., k]` -> `[..., len(shifts), k]`, slot i = (x >> shifts[i]) & mask.

    A negative shift shifts left (to move a high bit where it belongs). This is
    gguf-py's `x.reshape(..., 1, k) >> np.array(shifts).reshape(..., 1)` idiom,
    done as scalar shifts on a contiguous copy (torch's broadcast and strided
    integer kernels are many times slower).
    """
    x = x.contiguous()
    slots = []
    for s in shifts:
        if s == 0:
            slots.append(x & mask)
            continue
        field = x >> s if s > 0 else x << -s
        if not (s > 0 and mask == 0xFF >> s):  # a right shift may already have cleared the high bits
            field.bitwise_and_(mask)
        slots.append(field)
    return torch.stack(slots, dim=-2)


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """Split bytes in groups of `group` into their low then their high nibbles: `[n, k*group]` -> `[n, k, 2, group]`.

    ggml's order: in a group of `group` bytes, element j is the low nibble of byte j
    and element group+j its high nibble.
    """
    return _fields(qs.reshape(qs.shape[0], -1, group), (0, 4), 0x0F)


def _signed(q: Tensor, offset: int) -> Tensor:
    """`q - offset` for uint8 quants as int8: wrapping uint8 subtraction, read back as int8."""
    return q.sub_(offset).view(torch.int8)


# --- plain float types -----------------------------------------------------------------

def dequantize_f32(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    values = blocks.contiguous().view(torch.float32)
    return values if out is None else out.copy_(values)


def dequantize_f16(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    return _f16_to_f32(blocks.contiguous().view(torch.float16), out)


def dequantize_bf16(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # bfloat16 is the top half of a float32: the conversion is exact, NaNs included.
    out = _output(blocks, out, 1)
    return out.copy_(blocks.contiguous().view(torch.bfloat16))


# --- 32-element blocks -----------------------------------------------------------------

def dequantize_q8_0(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][qs: 32 x int8]; value = q * d
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    return out.copy_(blocks[:, 2:].view(torch.int8)).mul_(d)


def dequantize_q4_0(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][qs: 16 bytes, two 4-bit quants each]; value = d * (q - 8)
    n = blocks.shape[0]
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    q = _signed(_nibbles(blocks[:, 2:], 16), 8)
    return out.copy_(q.reshape(n, 32)).mul_(d)


def dequantize_q4_1(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][m: f16][qs: 16 bytes]; value = d * q + m
    n = blocks.shape[0]
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    return out.copy_(_nibbles(blocks[:, 4:], 16).reshape(n, 32)).mul_(d).add_(m)


def _q5_quants(qh: Tensor, qs: Tensor) -> Tensor:
    """5-bit quants `[n, 32]`: low 4 bits from the `qs` nibbles, bit 4 of element j is bit j of the u32 `qh`."""
    n = qs.shape[0]
    q = _nibbles(qs, 16).reshape(n, 32)
    # Little-endian u32: bit j lives in byte j // 8 at position j % 8; move it to bit 4.
    high = _fields(qh.reshape(n, 4, 1), (-4, -3, -2, -1, 0, 1, 2, 3), 0x10)
    return q.bitwise_or_(high.reshape(n, 32))


def dequantize_q5_0(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][qh: u32][qs: 16 bytes]; value = d * (q - 16)
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    return out.copy_(_signed(_q5_quants(blocks[:, 2:6], blocks[:, 6:]), 16)).mul_(d)


def dequantize_q5_1(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][m: f16][qh: u32][qs: 16 bytes]; value = d * q + m
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    return out.copy_(_q5_quants(blocks[:, 4:8], blocks[:, 8:])).mul_(d).add_(m)


# IQ4_NL's non-linear grid (kvalues_iq4nl in ggml-common.h), shared by IQ4_XS.
IQ4_NL_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# A byte's two grid values packed in one int16: the low nibble's value in the low
# byte, the high nibble's in the high byte. One lookup per byte, not per nibble.
_IQ4_PAIRS = [(IQ4_NL_GRID[b >> 4] << 8) | (IQ4_NL_GRID[b & 15] & 0xFF) for b in range(256)]
_pair_tables: dict[torch.device, Tensor] = {}


def _iq4_grid_values(qs: Tensor, group: int, out: Tensor) -> Tensor:
    """Fill `out` (float32 `[n, k * 2 * group]`) with the grid values of the IQ4 bytes `qs` `[n, k * group]`.

    ggml's order: in each group of bytes, the low nibbles' values, then the high
    nibbles'. The two values of a byte come from one int16 lookup, then are split
    by arithmetic shifts (which sign-extend) and written to their halves.
    """
    n = qs.shape[0]
    table = _pair_tables.get(qs.device)
    if table is None:
        table = _pair_tables[qs.device] = torch.tensor(_IQ4_PAIRS, dtype=torch.int16, device=qs.device)
    pairs = torch.index_select(table, 0, qs.reshape(-1).to(torch.int64)).view(n, -1, group)
    halves = out.view(n, -1, 2, group)
    halves[:, :, 0].copy_((pairs << 8) >> 8)
    halves[:, :, 1].copy_(pairs >> 8)
    return out


def dequantize_iq4_nl(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][qs: 16 bytes of grid indices]; value = d * grid[q]
    out = _output(blocks, out, 32)
    d = _f16(blocks, 0)
    return _iq4_grid_values(blocks[:, 2:], 16, out).mul_(d)


# --- 256-element super-blocks (K-quants) ---------------------------------------------

def dequantize_q2_k(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [scales: 16 bytes (low nibble scale, high nibble min)][qs: 64 bytes of 2-bit quants][d: f16][dmin: f16]
    # value = (d * sc) * q - (dmin * m), per 16 values
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    scales = blocks[:, :16]
    d = _f16(blocks, 80)
    dmin = _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    # Each 32-byte half holds 4 runs of 32 quants at bit offsets 0, 2, 4, 6.
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3)
    return out.view(n, 16, 16).copy_(q.reshape(n, 16, 16)).mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q3_k(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [hmask: 32 bytes][qs: 64 bytes of 2-bit quants][scales: 12 bytes of 6-bit scales][d: f16]
    # value = (d * (sc - 32)) * q, q = low 2 bits - (4 if the hmask bit is CLEAR else 0)
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    # Scale i: low 4 bits are the nibbles of bytes 0..7 (all low nibbles first),
    # high 2 bits are the 2-bit fields of bytes 8..11 (bits 0-1 of the four bytes first).
    sc = _fields(scales[:, :8].reshape(n, 1, 8), (0, 4), 0x0F).reshape(n, 16)
    sc.bitwise_or_(_fields(scales[:, 8:].reshape(n, 1, 4), (-4, -2, 0, 2), 0x30).reshape(n, 16))
    dl = (d * _signed(sc, 32).to(torch.float32)).reshape(n, 16, 1)
    q = _fields(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    # Bit b of hmask[j] belongs to run b; moved to bit 2, then q - 4 is ql - 4 * (1 - bit).
    q.bitwise_or_(_fields(hmask.reshape(n, 1, 32), (-2, -1, 0, 1, 2, 3, 4, 5), 0x04).reshape(n, 16, 16))
    return out.view(n, 16, 16).copy_(_signed(q, 4)).mul_(dl).view(n, QK_K)


def _k_scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-32-value `(d * sc, dmin * m)` of Q4_K/Q5_K as float32 `[n, 8, 1]`.

    The 12 scale bytes hold eight 6-bit (scale, min) pairs:
    bytes 0-3: scales 0-3 (low 6 bits) + the top 2 bits of scales 4-7;
    bytes 4-7: mins 0-3 (low 6 bits) + the top 2 bits of mins 4-7;
    bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = of mins 4-7.
    """
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    s = blocks[:, 4:16].reshape(n, 3, 4)
    ds, ms, mds = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([ds & 0x3F, (mds & 0x0F) | ((ds >> 2) & 0x30)], dim=-1)
    mn = torch.cat([ms & 0x3F, (mds >> 4) | ((ms >> 2) & 0x30)], dim=-1)
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return dl, ml


def dequantize_q4_k(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][dmin: f16][scales: 12 bytes][qs: 128 bytes]; value = (d * sc) * q - (dmin * m), per 32 values
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    dl, ml = _k_scales(blocks)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32)
    return out.view(n, 8, 32).copy_(q).mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q5_k(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][dmin: f16][scales: 12 bytes][qh: 32 bytes][qs: 128 bytes]
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    dl, ml = _k_scales(blocks)
    q = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    # Bit b of qh[j] is the fifth bit of value j of run b.
    q.bitwise_or_(_fields(blocks[:, 16:48].reshape(n, 1, 32), (-4, -3, -2, -1, 0, 1, 2, 3), 0x10).reshape(n, 8, 32))
    return out.view(n, 8, 32).copy_(q).mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q6_k(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [ql: 128 bytes][qh: 64 bytes][scales: 16 x int8][d: f16]; value = (d * sc) * (q - 32), per 16 values
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    d = _f16(blocks, 208)
    dl = (d * blocks[:, 192:208].view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    q = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    # Each 32-byte half of qh holds the top 2 bits of 4 runs, at bit offsets 0, 2, 4, 6.
    q.bitwise_or_(_fields(blocks[:, 128:192].reshape(n, 2, 32), (-4, -2, 0, 2), 0x30).reshape(n, 8, 32))
    return out.view(n, 16, 16).copy_(_signed(q, 32).view(n, 16, 16)).mul_(dl).view(n, QK_K)


def dequantize_iq4_xs(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    # [d: f16][scales_h: u16][scales_l: 4 bytes][qs: 128 bytes]; value = (d * (sc - 32)) * grid[q], per 32 values
    n = blocks.shape[0]
    out = _output(blocks, out, QK_K)
    d = _f16(blocks, 0)
    # 6-bit scales: low nibbles from scales_l (low nibble first), the top 2 bits from
    # the little-endian u16 scales_h, two bits per run.
    sc = _fields(blocks[:, 4:8].reshape(n, 4, 1), (0, 4), 0x0F).reshape(n, 8)
    sc.bitwise_or_(_fields(blocks[:, 2:4].reshape(n, 2, 1), (-4, -2, 0, 2), 0x30).reshape(n, 8))
    dl = (d * _signed(sc, 32).to(torch.float32)).reshape(n, 8, 1)
    return _iq4_grid_values(blocks[:, 8:], 16, out).view(n, 8, 32).mul_(dl).view(n, QK_K)


# --- dispatch --------------------------------------------------------------------------

DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor, Tensor | None], Tensor]] = {
    Q.F32: dequantize_f32,
    Q.F16: dequantize_f16,
    Q.BF16: dequantize_bf16,
    Q.Q8_0: dequantize_q8_0,
    Q.Q4_0: dequantize_q4_0,
    Q.Q4_1: dequantize_q4_1,
    Q.Q5_0: dequantize_q5_0,
    Q.Q5_1: dequantize_q5_1,
    Q.Q2_K: dequantize_q2_k,
    Q.Q3_K: dequantize_q3_k,
    Q.Q4_K: dequantize_q4_k,
    Q.Q5_K: dequantize_q5_k,
    Q.Q6_K: dequantize_q6_k,
    Q.IQ4_NL: dequantize_iq4_nl,
    Q.IQ4_XS: dequantize_iq4_xs,
}

# Unquantized types whose bytes already are the wanted dtype: returned as a view.
_SAME_BYTES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def dequantize(
    raw: torch.Tensor,
    qtype: GGMLQuantizationType | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Dequantize the raw bytes of one tensor to `dtype`, in `shape`, on `raw`'s device.

    Values are first computed in float32 exactly as gguf-py does, then cast to
    `dtype`. When the stored type already is `dtype` the result is a view of `raw`.
    `name` only serves error messages. Raises `UnsupportedQuantType` for types
    outside `DEQUANTIZERS` and ValueError when `raw` does not hold `shape`.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedQuantType(int(qtype), name) from None
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise UnsupportedQuantType(qtype, name)
    if raw.dtype != torch.uint8:
        raise TypeError(f"{_where(name)}raw data must be a uint8 tensor, got {raw.dtype}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    n_elements = math.prod(shape)
    if n_elements % block_size != 0 or raw.numel() != n_elements // block_size * type_size:
        raise ValueError(
            f"{_where(name)}{raw.numel()} bytes of {qtype.name} do not hold a tensor of shape {list(shape)} "
            f"({block_size} values per {type_size}-byte block)"
        )
    if _SAME_BYTES.get(qtype) == dtype:
        return raw.reshape(-1).view(dtype).reshape(shape)
    n_blocks = n_elements // block_size
    blocks = raw.reshape(n_blocks, type_size)
    if raw.device.type != "cpu":
        return fn(blocks).reshape(shape).to(dtype)
    # On the CPU, go through the blocks in chunks of a few MiB of float32 (in cache): the
    # passes of a dequantizer then run in the cache, and each output value goes
    # to main memory once.
    out = _empty_cpu((n_blocks, block_size), dtype)
    step = max(1, _CPU_CHUNK_VALUES // block_size)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, n_blocks), block_size)
    for start in range(0, n_blocks, step):
        chunk = blocks[start:start + step]
        if scratch is None:
            fn(chunk, out[start:start + step])
        else:
            out[start:start + step].copy_(fn(chunk, scratch[:chunk.shape[0]]))
    return out.reshape(shape)


# float32 values per CPU chunk (16 MiB, within a server L3): on a 2-core EPYC, 4-64 MiB chunks
# ran at the same speed (1.4x unchunked); the fewer the chunks, the fewer the parallel regions.
_CPU_CHUNK_VALUES = 1 << 22


def _empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor whose memory comes from numpy.

    numpy asks the kernel for transparent huge pages on large arrays
    (madvise(MADV_HUGEPAGE)); torch's allocator does not by default. Writing a
    fresh multi-MB output in 4 KiB pages costs more page faults than the
    dequantization itself (measured 3-4x slower first touch).
    """
    n_bytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.empty(n_bytes, dtype=np.uint8)).view(dtype).reshape(shape)


def _where(name: str | None) -> str:
    return f"tensor {name!r}: " if name is not None else ""
