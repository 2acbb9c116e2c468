"""Our torch dequantizers against gguf-py's numpy ones, bit for bit (float32 bit patterns)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.gguf import dequant
from engine.gguf.dequant import DEQUANTIZERS, UnsupportedQuantType, dequantize

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]

# Byte offsets of the float16 scale fields in each block (ggml-common.h block_* structs).
F16_SCALE_OFFSETS: dict[Q, tuple[int, ...]] = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """`[n_blocks, type_size]` random bytes with finite float16 scales (some negative, some zero)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS.get(qtype, ()):
        d = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        d[rng.random(n_blocks) < 0.1] = 0
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(gguf_dequantize(blocks.reshape(-1), qtype), dtype=np.float32).reshape(-1)


def ours(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1))
    return dequantize(raw, qtype, (blocks.shape[0] * block_size,)).numpy()


def assert_bit_exact(a: np.ndarray, b: np.ndarray) -> None:
    """Equal float32 bit patterns: exact values, signed zeros and NaN payloads included."""
    assert a.shape == b.shape
    a_bits, b_bits = a.view(np.uint32), b.view(np.uint32)
    bad = np.flatnonzero(a_bits != b_bits)
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[0]}: {a[bad[0]]!r} vs {b[bad[0]]!r}"


def test_table_covers_exactly_the_supported_types():
    assert set(DEQUANTIZERS) == set(ALL_TYPES)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@settings(max_examples=50)
@given(data=st.data())
def test_random_blocks_bit_exact_with_gguf_py(qtype: Q, data: st.DataObject):
    _, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = data.draw(st.integers(1, 6), label="n_blocks")
    raw = bytearray(data.draw(st.binary(min_size=n_blocks * type_size, max_size=n_blocks * type_size)))
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n_blocks, type_size).copy()
    # Scale fields: any finite float16 (sign, exponent < 31, mantissa), so zero,
    # subnormal, negative and the largest values are all drawn.
    finite_f16_bits = st.builds(lambda s, e, m: s << 15 | e << 10 | m,
                                st.integers(0, 1), st.integers(0, 30), st.integers(0, 1023))
    for offset in F16_SCALE_OFFSETS.get(qtype, ()):
        bits = data.draw(st.lists(finite_f16_bits, min_size=n_blocks, max_size=n_blocks), label=f"scales@{offset}")
        blocks[:, offset:offset + 2] = np.array(bits, dtype="<u2").view(np.uint8).reshape(n_blocks, 2)
    assert_bit_exact(ours(blocks, qtype), reference(blocks, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF])
@pytest.mark.parametrize("scales", [(0.0, 0.0), (-1.5, 0.25), (65504.0, -65504.0)])
def test_all_zero_and_all_max_quants(qtype: Q, fill: int, scales: tuple[float, float]):
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.full((3, type_size), fill, dtype=np.uint8)
    for offset, value in zip(F16_SCALE_OFFSETS.get(qtype, ()), scales * 2):
        blocks[:, offset:offset + 2] = np.array([value], dtype=np.float16).view(np.uint8)
    assert_bit_exact(ours(blocks, qtype), reference(blocks, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks", [1, 3000])
def test_one_block_and_many_blocks(qtype: Q, n_blocks: int):
    blocks = random_blocks(qtype, n_blocks, np.random.default_rng(n_blocks))
    assert_bit_exact(ours(blocks, qtype), reference(blocks, qtype))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.IQ4_XS, Q.F16], ids=lambda t: t.name)
def test_cpu_chunking_does_not_change_values(qtype: Q, monkeypatch: pytest.MonkeyPatch):
    # Chunks of 3 blocks' worth of values: many boundaries, and a short last chunk.
    block_size, _ = GGML_QUANT_SIZES[qtype]
    monkeypatch.setattr(dequant, "_CPU_CHUNK_VALUES", 3 * block_size)
    blocks = random_blocks(qtype, 100, np.random.default_rng(1))
    assert_bit_exact(ours(blocks, qtype), reference(blocks, qtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.BF16], ids=lambda t: t.name)
def test_other_dtypes_are_the_float32_values_cast(qtype: Q, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dequant, "_CPU_CHUNK_VALUES", 1024)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, 40, np.random.default_rng(2))
    shape = (4, 10 * block_size)
    got = dequantize(torch.from_numpy(blocks.reshape(-1)), qtype, shape, dtype)
    expected = torch.from_numpy(reference(blocks, qtype)).reshape(shape).to(dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, expected)  # exact: the same float32 values, the same rounding


def test_stored_dtype_comes_back_as_a_view():
    raw = torch.from_numpy(np.arange(8, dtype=np.float16).view(np.uint8).copy())
    values = dequantize(raw, Q.F16, (2, 4), torch.float16)
    assert values.data_ptr() == raw.data_ptr()
    assert values.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_logical_shape_is_kept():
    blocks = random_blocks(Q.Q8_0, 12, np.random.default_rng(3))
    got = dequantize(torch.from_numpy(blocks.reshape(-1)), Q.Q8_0, (2, 3, 64))
    assert got.shape == (2, 3, 64)
    assert_bit_exact(got.reshape(-1).numpy(), reference(blocks, Q.Q8_0))


@pytest.mark.parametrize("qtype", [Q.TQ1_0, Q.IQ2_XXS, Q.Q8_1, Q.MXFP4], ids=lambda t: t.name)
def test_unsupported_types_raise_naming_tensor_and_type(qtype: Q):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = torch.zeros(type_size, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantType, match=rf"'blocks\.3\.ffn\.0\.weight'.*{qtype.name}"):
        dequantize(raw, qtype, (block_size,), name="blocks.3.ffn.0.weight")


def test_unknown_type_id_raises_unsupported():
    with pytest.raises(UnsupportedQuantType, match="id 99"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 99, (1,), name="w")


def test_byte_count_must_match_shape():
    with pytest.raises(ValueError, match="'w'.*do not hold"):
        dequantize(torch.zeros(35, dtype=torch.uint8), Q.Q8_0, (32,), name="w")
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (16,))
