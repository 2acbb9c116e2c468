"""Quantization of float tensors to GGML blocks: every type `reelray quantize` writes, in numpy and torch.

`quantize(values, qtype)` turns a float array `[..., row]` into the raw blocks
`[..., row / block_size * type_size]` (uint8) that a GGUF file stores.
F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are gguf-py's own quantizers
(`gguf.quants.quantize`, the same bytes as ggml's reference code). The
K-quants (Q2_K ... Q6_K) and IQ4_NL / IQ4_XS follow ggml's quantizers as
llama-quantize runs them without an importance matrix (ggml-quants.c:
`quantize_row_q{2,3,4,5,6}_K_ref`, which use `make_qkx2_quants`,
`make_q3_quants` and `make_qx_quants`, and `quantize_iq4_nl` /
`quantize_iq4_xs` through `quantize_row_iq4_nl_impl` with 7 scale tries):
the same searches and the same block layouts, written as torch operations over
all blocks at once. The float arithmetic is arranged differently (sums in
another order, a fit's error from its sums), so a file is not byte-identical
with llama-quantize's, but every block is a valid block of its type that
`engine.gguf.dequant` and gguf-py read.

Each `quantize_<type>(x)` takes float32 `[n, block_size]` and returns uint8
`[n, type_size]`; `QUANTIZERS` dispatches on the type. Values go through in
chunks of `_CHUNK_VALUES` so a search's temporaries stay in the cache.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize as gguf_quantize

from engine.gguf.dequant import IQ4_NL_GRID

Q = GGMLQuantizationType
Tensor = torch.Tensor

_F16_MAX = 65504.0  # the largest finite float16: K-quant and 32-block scales are float16
_GROUP_MAX_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a group whose largest |value| is below it is all zeros
_CHUNK_VALUES = 1 << 18  # values per chunk (1 MiB of float32 per temporary)


class QuantizeError(ValueError):
    """A tensor that cannot be quantized to the asked type (NaN, inf, out of range, bad row length); names the tensor."""


# --- helpers ----------------------------------------------------------------------------


def _f16_bytes(values: Tensor) -> Tensor:
    """float32 `[n]` -> their float16 (round to nearest even, as GGML_FP32_TO_FP16) as little-endian bytes `[n, 2]`."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _f16_round(values: Tensor) -> Tensor:
    """float32 `[n]` rounded to float16 and back: the scale a reader will see."""
    return values.to(torch.float16).to(torch.float32)


def _signed_max(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """(largest |x|, the x that has it) along `dim`, as ggml's `if (ax > amax) { amax = ax; max = x; }`."""
    amax, index = x.abs().max(dim=dim)
    return amax, x.gather(dim, index.unsqueeze(dim)).squeeze(dim)


def _pack_bits(fields: Tensor, bits: int) -> Tensor:
    """uint8 `[..., k, m]` with values below 2**bits -> bytes `[..., m]`: field i at bit offset i * bits."""
    out = fields[..., 0, :].clone()
    for i in range(1, fields.shape[-2]):
        out |= fields[..., i, :] << (i * bits)
    return out


def _k_scale_bytes(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins `[n, 8]` (uint8) -> the 12 scale bytes (ggml's `get_scale_min_k4` layout).

    bytes 0-3: scales 0-3 and the top 2 bits of scales 4-7; bytes 4-7: mins 0-3 and
    the top 2 bits of mins 4-7; bytes 8-11: the low 4 bits of scales 4-7 (low nibble) and of mins 4-7.
    """
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], dim=1)


# --- ggml's scale searches, vectorised over groups ---------------------------------------
#
# A search works on `[k, g]`: group j (k values) is column j. Per-group numbers are `[g]`
# vectors that broadcast along the rows, and a group's sums add k contiguous rows:
# both run at memory speed, where reducing `[g, k]` along its short last axis does not.


def _columns(x: Tensor, k: int) -> Tensor:
    """Values in groups of `k` (in order) as the columns of a contiguous `[k, g]` tensor."""
    return x.reshape(-1, k).t().contiguous()


def _rows(t: Tensor, n: int, *shape: int) -> Tensor:
    """The inverse of `_columns`: `[k, g]` back to `[n, *shape]`."""
    return t.t().reshape(n, *shape)


def _make_qkx2(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ggml's `make_qkx2_quants` for every group (column) of `x` `[k, g]` with weights `w`.

    Fits x ~ scale * L - the_min with L in 0..nmax: start from the min-max grid, then
    try nstep + 1 stretched grids, each refit by weighted least squares, keeping the
    one with the least weighted squared (or, with `use_mad`, absolute) error.
    Returns (scale [g], the_min [g], L [k, g] as float32).
    """
    mn = x.amin(dim=0).clamp(max=0)
    mx = x.amax(dim=0)
    flat = mx == mn  # all values equal (or all zero): L = 0, the value is -the_min
    sum_w = w.sum(dim=0)
    wx = w * x
    sum_x = wx.sum(dim=0)
    sum_x2 = (wx * x).sum(dim=0)

    def grid(iscale: Tensor, mn: Tensor) -> Tensor:
        """round(iscale * (x - mn)) clamped to 0..nmax, as one fused multiply-add."""
        return torch.addcmul(-mn * iscale, x, iscale).round_().clamp_(0, nmax)

    def sums(L: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        wl = w * L
        return wl.sum(dim=0), (wl * L).sum(dim=0), (wl * x).sum(dim=0)

    def error(scale: Tensor, mn: Tensor, L: Tensor, fit: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        if use_mad:
            return (torch.addcmul(mn, L, scale).sub_(x).abs_().mul_(w)).sum(dim=0)
        # sum w (s l + m - x)^2 expanded into the sums the fit has anyway: no pass over the values.
        sum_l, sum_l2, sum_xl = fit
        return (scale * scale * sum_l2 + 2 * scale * mn * sum_l + mn * mn * sum_w
                - 2 * scale * sum_xl - 2 * mn * sum_x + sum_x2)

    iscale = nmax / torch.where(flat, 1.0, mx - mn)
    scale = 1 / iscale
    L = grid(iscale, mn)
    best = error(scale, mn, L, sums(L))
    # The winning grid is kept as its (iscale, min) and rebuilt once at the end.
    best_iscale, best_grid_min = iscale, mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (mx - mn)  # `mn` is the best fit's min so far, as in ggml
        candidate = grid(iscale, mn)
        sum_l, sum_l2, sum_xl = fit = sums(candidate)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a positive min is not allowed: refit the scale alone with min 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = this_min.clamp(max=0)
        cur = error(this_scale, this_min, candidate, fit)
        better = (D > 0) & (cur < best) & ~flat
        best = torch.where(better, cur, best)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_grid_min = torch.where(better, mn, best_grid_min)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = grid(best_iscale, best_grid_min).masked_fill_(flat, 0)
    return scale.masked_fill(flat, 0.0), -mn, L


def _make_qx(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """ggml's `make_qx_quants` with rmse_type 1 and no importance weights (weights x^2) over groups `[k, g]`.

    Fits x ~ scale * (L - nmax), L in 0..2 nmax - 1, trying the grids through the
    largest-|x| value at 19 stretches. Returns (scale [g], L [k, g] as float32).
    """
    amax, signed = _signed_max(x, dim=0)
    zero = amax < _GROUP_MAX_EPS
    signed = torch.where(zero, 1.0, signed)
    w = x * x
    wx = w * x

    def grid(iscale: Tensor) -> Tensor:
        return (x * iscale).round_().clamp_(-nmax, nmax - 1)

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        l = grid(iscale)
        return (wx * l).sum(dim=0), (w * l).mul_(l).sum(dim=0)

    best_iscale = -nmax / signed
    sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(nmax + 0.1 * step) / signed
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    L = grid(best_iscale).add_(nmax).masked_fill_(zero, 0)
    return scale.masked_fill(zero, 0.0), L


def _make_q3(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """ggml's `make_q3_quants` with do_rmse over groups `[k, g]` (weights x^2).

    Rounds to the grid through the largest-|x| value, then up to 5 passes of
    coordinate descent: each value in turn moves to the level that the scale fitted
    without it asks for, when that raises sum(w x l)^2 / sum(w l^2). The values of a
    group are visited in order (each move changes the fit the next one sees); the
    groups run side by side. Returns (scale [g], L [k, g] in 0..2 nmax - 1 as float32).
    """
    amax, signed = _signed_max(x, dim=0)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    L = (x * (-nmax / torch.where(zero, 1.0, signed))).round_().clamp_(-nmax, nmax - 1)
    sumlx = (w * x * L).sum(dim=0)
    suml2 = (w * L * L).sum(dim=0)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], L[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = (xi * sl2 / slx).round_().clamp_(-nmax, nmax - 1)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            take = ((slx > 0) & (new != li) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            L[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed |= take
        # A pass that moves nothing would move nothing again: stopping per group or for all is the same.
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0).masked_fill_(zero, 0.0)
    return scale, L.add_(nmax).masked_fill_(zero, 0)


# IQ4_NL's grid. A value x takes level i once 2x reaches grid[i-1] + grid[i], an integer
# (ggml's best_index_int8, ties going up), so the level depends on floor(2x) alone: tables
# over floor(2x) in -256..256 (beyond the outermost midpoints, -231 and 202) give the level
# and its grid value in one lookup.
_IQ4_GRID = torch.tensor(IQ4_NL_GRID, dtype=torch.float32)
_IQ4_LEVEL = torch.bucketize(torch.arange(-256, 257, dtype=torch.float32), _IQ4_GRID[:-1] + _IQ4_GRID[1:], right=True)
_IQ4_VALUE = _IQ4_GRID[_IQ4_LEVEL]


def _iq4_lookup(x: Tensor, table: Tensor) -> Tensor:
    """`table` at floor(2x) for every value of `x` (the IQ4_NL level, or its grid value)."""
    at = (x + x).clamp_(-256, 256).floor_().add_(256).to(torch.int64)
    return torch.index_select(table.to(x.device), 0, at.reshape(-1)).view(x.shape)


def _iq4_scale(x: Tensor, ntry: int = 7) -> Tensor:
    """The per-group scale of `quantize_row_iq4_nl_impl` over groups `[32, g]` (weights x^2, `ntry` tries).

    Least-squares scale for the grid through the largest-|x| value, then for
    2 ntry + 1 stretches of the mirrored grid; the best sum(w q x)^2 / sum(w q^2) wins.
    """
    amax, signed = _signed_max(x, dim=0)
    zero = amax < _GROUP_MAX_EPS
    signed = torch.where(zero, 1.0, signed)
    w = x * x
    wx = w * x

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        q = _iq4_lookup(x * iscale, _IQ4_VALUE)
        return (wx * q).sum(dim=0), (w * q).mul_(q).sum(dim=0)

    sumqx, sumq2 = fit(1 / (-signed / IQ4_NL_GRID[0]))
    d = torch.where(sumq2 > 0, sumqx / sumq2, 0.0)
    best = d * sumqx
    for step in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit((step + IQ4_NL_GRID[0]) / signed)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return d.masked_fill_(zero, 0.0)


def _inverse(d: Tensor) -> Tensor:
    """1 / d, and 0 where d is 0 (ggml's `d ? 1/d : 0`)."""
    return torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)


def _requantize(x: Tensor, dl: Tensor, ml: Tensor | None, lo: int, hi: int, L: Tensor) -> Tensor:
    """The final quants, round((x + ml) / dl) in lo..hi, with the stored (float16-rounded) group
    scales `dl`; a group whose scale is 0 keeps the search's `L` (ggml's `if (!d) continue`)."""
    y = x if ml is None else x + ml
    requant = (y / torch.where(dl != 0, dl, 1.0)).round_().clamp_(lo, hi)
    return torch.where(dl != 0, requant, L)


# --- K-quants ---------------------------------------------------------------------------


def _block_scales(scales: Tensor, mins: Tensor, levels: int) -> tuple[Tensor, ...]:
    """Q2_K/Q4_K/Q5_K: each group's scale and min `[n, groups]` as an integer 0..levels times a
    block-wide float16 step (the block's largest / levels), as ggml's `_ref` quantizers store them.

    Returns (ls, lm, d, dmin, dl, ml): the integers, the two steps, and the group scales and mins
    `[n, groups, 1]` a reader computes from the stored (float16-rounded) steps.
    """
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    ls = (scales * (levels * _inverse(max_scale))[:, None]).round_().clamp_(0, levels)
    lm = (mins * (levels * _inverse(max_min))[:, None]).round_().clamp_(0, levels)
    d = max_scale / levels
    dmin = max_min / levels
    dl = (_f16_round(d)[:, None] * ls)[..., None]
    ml = (_f16_round(dmin)[:, None] * lm)[..., None]
    return ls, lm, d, dmin, dl, ml


def quantize_q2_k(x: Tensor) -> Tensor:
    # [scales: 16 bytes (scale | min << 4)][qs: 64 bytes of 2-bit quants][d: f16][dmin: f16]
    n = x.shape[0]
    xs = _columns(x, 16)
    scales, mins, L = _make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    ls, lm, d, dmin, dl, ml = _block_scales(scales.view(n, 16), mins.view(n, 16), 15)
    L = _requantize(x.view(n, 16, 16), dl, ml, 0, 3, _rows(L, n, 16, 16)).to(torch.uint8)
    qs = _pack_bits(L.view(n, 2, 4, 32), 2).view(n, 64)  # 2 halves x 32 bytes; runs of 32 at bits 0, 2, 4, 6
    scale_bytes = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
    return torch.cat([scale_bytes, qs, _f16_bytes(d), _f16_bytes(dmin)], dim=1)


def quantize_q3_k(x: Tensor) -> Tensor:
    # [hmask: 32 bytes][qs: 64 bytes of low 2 bits][scales: 12 bytes of 6-bit scales][d: f16]
    n = x.shape[0]
    scales, L = _make_q3(_columns(x, 16), 4)
    scales, L = scales.view(n, 16), _rows(L, n, 16, 16)
    _, max_scale = _signed_max(scales)
    some = max_scale != 0
    iscale = -32 / torch.where(some, max_scale, 1.0)
    l = (scales * iscale[:, None]).round_().clamp_(-32, 31).masked_fill_(~some[:, None], -32) + 32
    d = torch.where(some, 1 / iscale, 0.0)
    dl = (_f16_round(d)[:, None] * (l - 32))[..., None]
    L = _requantize(x.view(n, 16, 16), dl, None, -4, 3, L - 4).add_(4).to(torch.uint8).view(n, 8, 32)
    # Bit 2 of value j goes to bit j // 32 of hmask[j % 32]; the low 2 bits pack as in Q2_K.
    hmask = _pack_bits(L >> 2, 1)
    qs = _pack_bits((L & 3).view(n, 2, 4, 32), 2).view(n, 64)
    l = l.to(torch.uint8)
    low = (l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4)  # scale i's low nibble: byte i % 8, low then high nibble
    high = _pack_bits((l >> 4).view(n, 4, 4), 2)  # its top 2 bits: byte 8 + i % 4, bit offset 2 * (i // 4)
    return torch.cat([hmask, qs, low, high, _f16_bytes(d)], dim=1)


def _quantize_qx_k(x: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[Tensor, ...]:
    """Q4_K/Q5_K: 8 groups of 32 with a 6-bit scale and min each: (d, dmin, scale bytes, L [n, 8, 32] uint8)."""
    n = x.shape[0]
    xs = _columns(x, 32)
    av = xs.square().mean(dim=0).sqrt_()  # weights: the group's rms + |x|
    scales, mins, L = _make_qkx2(xs, xs.abs().add_(av), nmax, rmin, rdelta, nstep, use_mad=False)
    ls, lm, d, dmin, dl, ml = _block_scales(scales.view(n, 8), mins.view(n, 8), 63)
    L = _requantize(x.view(n, 8, 32), dl, ml, 0, nmax, _rows(L, n, 8, 32)).to(torch.uint8)
    return d, dmin, _k_scale_bytes(ls.to(torch.uint8), lm.to(torch.uint8)), L


def quantize_q4_k(x: Tensor) -> Tensor:
    # [d: f16][dmin: f16][scales: 12 bytes][qs: 128 bytes]; groups 2c and 2c+1 share bytes 32c..32c+31 (low, high nibble)
    n = x.shape[0]
    d, dmin, scale_bytes, L = _quantize_qx_k(x, 15, -1.0, 0.1, 20)
    qs = _pack_bits(L.view(n, 4, 2, 32), 4).view(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scale_bytes, qs], dim=1)


def quantize_q5_k(x: Tensor) -> Tensor:
    # [d: f16][dmin: f16][scales: 12 bytes][qh: 32 bytes][qs: 128 bytes]; bit 4 of value j of group g is bit g of qh[j]
    n = x.shape[0]
    d, dmin, scale_bytes, L = _quantize_qx_k(x, 31, -0.5, 0.1, 15)
    qh = _pack_bits(L >> 4, 1)
    qs = _pack_bits((L & 0x0F).view(n, 4, 2, 32), 4).view(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scale_bytes, qh, qs], dim=1)


def quantize_q6_k(x: Tensor) -> Tensor:
    # [ql: 128 bytes][qh: 64 bytes][scales: 16 x int8][d: f16]; value = d * sc * (q - 32), per 16 values
    n = x.shape[0]
    scales, L = _make_qx(_columns(x, 16), 32)
    scales, L = scales.view(n, 16), _rows(L, n, 16, 16)
    amax, max_scale = _signed_max(scales)
    zero = amax < _GROUP_MAX_EPS  # the whole block is stored as zeros
    iscale = -128 / torch.where(zero, 1.0, max_scale)
    sc = (scales * iscale[:, None]).round_().clamp_(max=127)
    d = 1 / iscale
    dl = (_f16_round(d)[:, None] * sc)[..., None]
    L = _requantize(x.view(n, 16, 16), dl, None, -32, 31, L - 32).add_(32).to(torch.uint8).view(n, 2, 4, 32)
    # Per 128-value half: ql byte l holds runs 0 and 2 (low, high nibble), byte 32 + l runs 1 and 3;
    # qh byte l holds the top 2 bits of runs 0-3 at bit offsets 0, 2, 4, 6.
    low = L & 0x0F
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).view(n, 128)
    qh = _pack_bits(L >> 4, 2).view(n, 64)
    block = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)
    return block.masked_fill_(zero[:, None], 0)


# --- IQ4 --------------------------------------------------------------------------------


def _iq4_nibbles(L: Tensor) -> Tensor:
    """Grid levels `[n, k * 32]` -> bytes `[n, k * 16]`: in each 32 values, value j low nibble, value 16 + j high."""
    n = L.shape[0]
    L = L.to(torch.uint8).view(n, -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).view(n, -1)


def quantize_iq4_nl(x: Tensor) -> Tensor:
    # [d: f16][qs: 16 bytes of grid levels]; value = d * grid[q]
    d = _iq4_scale(_columns(x, 32))
    L = _iq4_lookup(x * _inverse(d)[:, None], _IQ4_LEVEL)
    return torch.cat([_f16_bytes(d), _iq4_nibbles(L)], dim=1)


def quantize_iq4_xs(x: Tensor) -> Tensor:
    # [d: f16][scales_h: u16][scales_l: 4 bytes][qs: 128 bytes]; value = d * (sc - 32) * grid[q], per 32 values
    n = x.shape[0]
    scales = _iq4_scale(_columns(x, 32)).view(n, 8)
    _, max_scale = _signed_max(scales)
    d = -max_scale / 32
    l = (scales * _inverse(d)[:, None]).round_().clamp_(-32, 31)
    L = _iq4_lookup(x.view(n, 8, 32) * _inverse(d[:, None] * l)[..., None], _IQ4_LEVEL)
    l = (l + 32).to(torch.uint8)
    scales_h = _pack_bits((l >> 4).view(n, 2, 4).transpose(1, 2), 2)  # top 2 bits of scale i: bits 2i of a u16
    scales_l = (l[:, 0::2] & 0x0F) | ((l[:, 1::2] & 0x0F) << 4)
    return torch.cat([_f16_bytes(d), scales_h, scales_l, _iq4_nibbles(L.view(n, 256))], dim=1)


# --- dispatch ---------------------------------------------------------------------------

QUANTIZERS = {
    Q.Q2_K: quantize_q2_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
    Q.IQ4_NL: quantize_iq4_nl,
    Q.IQ4_XS: quantize_iq4_xs,
}
# gguf-py quantizes these itself (the bytes of ggml's reference code).
GGUF_PY_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# Every type `quantize` writes, in the order `reelray quantize --type` lists them.
QUANT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
               Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)


def quant_type(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """The GGML type named `name` ("Q4_K", "q4_k"), if `quantize` writes it; QuantizeError otherwise."""
    if isinstance(name, GGMLQuantizationType):
        qtype = name
    else:
        qtype = Q.__members__.get(str(name).upper())
    if qtype not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {name!r} (types: {', '.join(t.name for t in QUANT_TYPES)})")
    return qtype


def quantize(values: np.ndarray | Tensor, qtype: GGMLQuantizationType | str, *, name: str | None = None) -> np.ndarray:
    """Quantize a float array `[..., row]` to `qtype`: uint8 raw blocks `[..., row / block_size * type_size]`.

    Rows must be whole blocks. NaN or infinite values, and (for every type but
    F32 and BF16) values beyond the float16 range that the scales are stored in,
    are a QuantizeError naming the tensor (`name`). K-quants and IQ4 run in torch on
    the tensor's device (CPU for numpy input); the other types in gguf-py's numpy.
    """
    qtype = quant_type(qtype)
    where = f"tensor {name!r}: " if name is not None else ""
    x = torch.as_tensor(values)
    if not (x.is_floating_point() and x.ndim >= 1):
        raise QuantizeError(f"{where}{qtype.name} takes a float tensor with at least one axis, got {x.dtype} "
                            f"of shape {list(x.shape)}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(x.shape)
    if shape[-1] % block_size:
        raise QuantizeError(f"{where}rows of {shape[-1]} values are not whole {qtype.name} blocks of {block_size}")
    x = x.to(torch.float32)
    _check_values(x, qtype, where)
    out_shape = (*shape[:-1], shape[-1] // block_size * type_size)
    if qtype in GGUF_PY_TYPES:
        blocks = gguf_quantize(x.cpu().numpy(), qtype)
        return np.ascontiguousarray(blocks).view(np.uint8).reshape(out_shape)
    fn = QUANTIZERS[qtype]
    flat = x.reshape(-1, block_size)
    out = torch.empty(flat.shape[0], type_size, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_VALUES // block_size)
    starts = range(0, flat.shape[0], step)

    def chunk(start: int) -> None:
        out[start:start + step] = fn(flat[start:start + step])

    if x.device.type != "cpu":
        for start in starts:
            chunk(start)
        return out.cpu().numpy().reshape(out_shape)
    # On the CPU the chunks run side by side, each op on one thread: a search is hundreds of small
    # ops, and torch's own threads would meet at a barrier after each (on a busy machine, waiting
    # for a core that another process holds). A chunk's bytes do not depend on the split.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1 or len(starts) == 1:
            for start in starts:
                chunk(start)
        else:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                list(pool.map(chunk, starts))
    finally:
        torch.set_num_threads(threads)
    return out.numpy().reshape(out_shape)


def _check_values(x: Tensor, qtype: GGMLQuantizationType, where: str) -> None:
    amax = float(x.abs().max()) if x.numel() else 0.0
    if math.isfinite(amax) and (amax <= _F16_MAX or qtype in (Q.F32, Q.BF16)):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        index = np.unravel_index(int(bad.reshape(-1).nonzero()[0]), tuple(x.shape))
        value = float(x[index])
        raise QuantizeError(f"{where}holds {value} at {list(map(int, index))}: a model file cannot store it")
    raise QuantizeError(f"{where}|value| reaches {amax:.4g}, beyond the float16 range (65504) that "
                        f"{qtype.name} stores{' values' if qtype == Q.F16 else ' its scales'} in")
