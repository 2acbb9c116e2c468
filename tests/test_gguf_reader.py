"""GGUFFile against gguf-py's GGUFReader and numpy dequantization, on files written here."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from engine.gguf import GGUFFile, write_gguf

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]
GGUF_PY_QUANTIZES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}

# Byte offsets of the float16 scales in each block (ggml-common.h).
F16_SCALE_OFFSETS = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}

WAN_SIGNATURE = ["blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"]


def raw_blocks(qtype: Q, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with sane float16 scales, `[rows, blocks_per_row * type_size]` bytes."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    n = rows * blocks_per_row
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, blocks_per_row * type_size)


def tensor_for(qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q]:
    if qtype in GGUF_PY_QUANTIZES:
        return rng.standard_normal((3, 256)).astype(np.float32), qtype
    return raw_blocks(qtype, 3, 1, rng), qtype


# Every GGUF metadata value type, with the exact type it is written with.
METADATA = {
    "test.u8": (200, V.UINT8), "test.i8": (-100, V.INT8), "test.u16": (60000, V.UINT16),
    "test.i16": (-30000, V.INT16), "test.u32": (4_000_000_000, V.UINT32), "test.i32": (-2_000_000_000, V.INT32),
    "test.f32": (0.25, V.FLOAT32), "test.bool": (True, V.BOOL), "test.str": ("héllo wörld", V.STRING),
    "test.u64": (2**63 + 5, V.UINT64), "test.i64": (-(2**62), V.INT64), "test.f64": (1e300, V.FLOAT64),
}
ARRAYS = {
    "test.arr_str": (["a", "", "ünï"], V.STRING), "test.arr_i32": ([1, -2, 3], V.INT32),
    "test.arr_f32": ([0.5, -1.0], V.FLOAT32), "test.arr_u8": ([0, 255], V.UINT8),
    "test.arr_bool": ([True, False], V.BOOL), "test.arr_u64": ([2**64 - 1], V.UINT64),
}


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written with gguf.GGUFWriter: every type, a 5-D F32 tensor, comfy orig_shape, all value types."""
    path = tmp_path_factory.mktemp("gguf") / "all_types.gguf"
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "wan")
    for key, (value, vtype) in METADATA.items():
        w.add_key_value(key, value, vtype)
    for key, (value, sub_type) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, sub_type=sub_type)
    w.add_key_value("comfy.gguf.orig_shape.reshaped.weight", [2, 3, 64], V.ARRAY, sub_type=V.INT32)
    for qtype in ALL_TYPES:
        array, _ = tensor_for(qtype, rng)
        if array.dtype == np.uint8:
            w.add_tensor(f"t.{qtype.name}", array, raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16):
            w.add_tensor(f"t.{qtype.name}", gguf_quantize(array, qtype))
        else:
            w.add_tensor(f"t.{qtype.name}", gguf_quantize(array, qtype), raw_dtype=qtype)
    w.add_tensor("patch_embedding.weight", rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float32))
    w.add_tensor("reshaped.weight", gguf_quantize(rng.standard_normal((6, 64)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def field_value(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_names_types_shapes_offsets_match_gguf_reader(oracle_file: Path):
    reader = GGUFReader(oracle_file)
    with GGUFFile(oracle_file) as f:
        assert f.version == 3
        assert f.tensor_names == [t.name for t in reader.tensors]
        for t in reader.tensors:
            assert f.qtype(t.name) == t.tensor_type
            start, end = f.byte_range(t.name)
            assert (start, end - start) == (t.data_offset, t.n_bytes)
            if t.name != "reshaped.weight":
                assert f.shape(t.name) == tuple(reversed(t.shape.tolist()))
        assert f.shape("patch_embedding.weight") == (8, 4, 1, 2, 2)
        assert f.shape("reshaped.weight") == (2, 3, 64)  # from comfy.gguf.orig_shape
        assert f.n_params == sum(t.n_elements for t in reader.tensors)
        assert f.n_bytes == sum(t.n_bytes for t in reader.tensors)


def test_metadata_matches_gguf_reader(oracle_file: Path):
    reader = GGUFReader(oracle_file)
    with GGUFFile(oracle_file) as f:
        assert f.architecture == "wan"
        for key in reader.fields:
            if key.startswith("GGUF."):
                continue  # gguf-py's pseudo-fields for the header
            assert f.metadata[key] == field_value(reader, key), key
            assert f.value_type(key) == reader.fields[key].types[0], key
        assert set(f.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
        # And the values are the ones written, with Python types.
        for key, (value, _) in {**METADATA, **ARRAYS}.items():
            assert f.metadata[key] == value, key
        assert f.metadata["test.str"] == "héllo wörld" and isinstance(f.metadata["test.bool"], bool)


def test_dequantized_values_match_gguf_py_bit_for_bit(oracle_file: Path):
    reader = GGUFReader(oracle_file)
    with GGUFFile(oracle_file) as f:
        for t in reader.tensors:
            expected = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
            got = f.dequantize(t.name)
            assert got.dtype == torch.float32 and got.shape == f.shape(t.name)
            assert_same_bits(got.reshape(-1).numpy(), expected.reshape(-1))


def test_raw_is_a_view_of_the_file_bytes(oracle_file: Path):
    data = oracle_file.read_bytes()
    with GGUFFile(oracle_file) as f:
        for name in f.tensor_names:
            start, end = f.byte_range(name)
            raw = f.raw(name)
            assert raw.dtype == torch.uint8 and raw.numel() == end - start
            assert raw.numpy().tobytes() == data[start:end]
        # No copy: two calls see the same memory, and an F32 tensor read as float32 too.
        a, b = f.raw("t.Q4_K"), f.raw("t.Q4_K")
        assert a.data_ptr() == b.data_ptr()
        assert f.dequantize("patch_embedding.weight").data_ptr() == f.raw("patch_embedding.weight").data_ptr()


def test_dequantize_to_other_dtype(oracle_file: Path):
    with GGUFFile(oracle_file) as f:
        full = f.dequantize("t.Q6_K")
        half = f.dequantize("t.Q6_K", dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))


def test_unknown_tensor_name_raises_key_error(oracle_file: Path):
    with GGUFFile(oracle_file) as f, pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.shape("nope")


def test_our_writer_round_trips_every_type_and_metadata(tmp_path: Path):
    rng = np.random.default_rng(1)
    tensors = {f"t.{q.name}": tensor_for(q, rng) for q in ALL_TYPES}
    tensors["patch_embedding.weight"] = (rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float32), Q.F32)
    metadata = {"s": "x", "i": -3, "big": 2**40, "f": 1.5, "b": False, "ls": ["a", "b"], "li": [1, 2, 3],
                "lbig": [1, 2**40], "lf": [0.5, 2.0], "general.alignment": 64}
    path = tmp_path / "ours.gguf"
    write_gguf(path, "wan", tensors, metadata)
    reader = GGUFReader(path)
    assert [t.name for t in reader.tensors] == list(tensors)
    assert reader.alignment == 64
    types = {k: reader.fields[k].types for k in metadata}
    assert types["i"] == [V.INT32] and types["big"] == [V.INT64] and types["f"] == [V.FLOAT32]
    assert types["b"] == [V.BOOL] and types["li"] == [V.ARRAY, V.INT32] and types["lbig"] == [V.ARRAY, V.INT64]
    assert types["lf"] == [V.ARRAY, V.FLOAT32] and types["ls"] == [V.ARRAY, V.STRING]
    assert types["general.alignment"] == [V.UINT32]
    with GGUFFile(path) as f:
        assert {k: f.metadata[k] for k in metadata} == metadata
        assert f.alignment == 64
        for t in reader.tensors:
            array, qtype = tensors[t.name]
            assert f.qtype(t.name) == t.tensor_type == qtype
            assert f.byte_range(t.name)[0] == t.data_offset and f.byte_range(t.name)[0] % 64 == 0
            if array.dtype == np.uint8:  # raw blocks are written unchanged
                assert f.raw(t.name).numpy().tobytes() == array.tobytes()
                assert f.shape(t.name) == (3, GGML_QUANT_SIZES[qtype][0])
            else:
                assert f.shape(t.name) == array.shape
                expected = gguf_dequantize(gguf_quantize(array, qtype), qtype) if qtype != Q.F32 else array
                assert_same_bits(f.dequantize(t.name).numpy().reshape(-1), np.asarray(expected, np.float32).reshape(-1))


def test_writer_output_is_byte_identical_across_runs(tmp_path: Path):
    def write(path: Path) -> str:
        rng = np.random.default_rng(7)
        write_gguf(path, "wan", {"a": (rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0),
                                 "b": (raw_blocks(Q.Q4_K, 2, 1, rng), Q.Q4_K)}, {"k": [1.0, 2.0], "n": "x"})
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert write(tmp_path / "1.gguf") == write(tmp_path / "2.gguf")


def test_writer_rejects_what_it_cannot_write(tmp_path: Path):
    with pytest.raises(ValueError, match="cannot quantize to Q4_K"):
        write_gguf(tmp_path / "x.gguf", "wan", {"w": (np.zeros((2, 256), np.float32), Q.Q4_K)})
    with pytest.raises(ValueError, match="empty"):
        write_gguf(tmp_path / "x.gguf", "wan", {}, {"k": []})
    assert not (tmp_path / "x.gguf").exists()


def _signature_tensors(prefix: str = "") -> dict[str, tuple[np.ndarray, Q]]:
    return {prefix + n: (np.zeros((1, 2, 4) if n.endswith("modulation") else (4,), np.float32), Q.F32)
            for n in WAN_SIGNATURE}


@pytest.mark.parametrize(
    ("architecture", "tensors", "kind"),
    [
        ("wan", {"x.weight": (np.zeros(4, np.float32), Q.F32)}, "wan_dit"),
        ("", _signature_tensors(), "wan_dit"),
        ("", _signature_tensors("model.diffusion_model."), "wan_dit"),
        ("t5encoder", {"x.weight": (np.zeros(4, np.float32), Q.F32)}, "umt5"),
        ("t5", {"x.weight": (np.zeros(4, np.float32), Q.F32)}, "umt5"),
        ("", {"enc.blk.0.attn_q.weight": (np.zeros((4, 4), np.float32), Q.F32)}, "umt5"),
        ("llama", {"blk.0.attn_q.weight": (np.zeros((4, 4), np.float32), Q.F32)}, "unknown"),
        ("", {"blocks.0.self_attn.norm_q.weight": (np.zeros(4, np.float32), Q.F32)}, "unknown"),
    ],
    ids=["wan-arch", "wan-signature", "wan-prefixed", "t5encoder", "t5", "umt5-names", "llama", "partial-signature"],
)
def test_kind_detection(tmp_path: Path, architecture: str, tensors, kind: str):
    path = tmp_path / "k.gguf"
    write_gguf(path, architecture, tensors)
    with GGUFFile(path) as f:
        assert f.kind == kind
        assert f.architecture == (architecture or None)


def test_prefix_is_stripped_everywhere(tmp_path: Path):
    path = tmp_path / "p.gguf"
    modulation = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    write_gguf(path, "", {"model.diffusion_model.head.modulation": (modulation, Q.F32)},
               {"comfy.gguf.orig_shape.model.diffusion_model.head.modulation": [2, 4]})
    with GGUFFile(path) as f:
        assert f.tensor_names == ["head.modulation"]
        assert f.shape("head.modulation") == (2, 4)
        assert f.dequantize("head.modulation").tolist() == modulation.reshape(2, 4).tolist()
        assert f.qtype("model.diffusion_model.head.modulation") == Q.F32  # the stored name works too


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_opening_a_large_file_does_not_read_it(tmp_path: Path):
    # A ~200 MB file whose data region is sparse: writing it costs nothing, and
    # reading it would show up in the resident set.
    path = tmp_path / "big.gguf"
    w = GGUFWriter(path, "wan")
    n = 25 * 2**20  # float32 values: 100 MiB per tensor
    for name in ("a.weight", "b.weight"):
        w.add_tensor_info(name, (n,), np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header_end = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(-(-header_end // 32) * 32 + 2 * 4 * n)
    assert path.stat().st_size > 200 * 10**6

    before = _rss_kib()
    with GGUFFile(path) as f:
        assert f.shape("b.weight") == (n,) and f.byte_range("b.weight")[1] == path.stat().st_size
        raw = f.raw("a.weight")
        assert raw.numel() == 4 * n
        grown_mib = (_rss_kib() - before) / 1024
        del raw
    assert grown_mib < 50, f"opening grew the resident set by {grown_mib:.0f} MiB"


def test_version_2_files_are_read(tmp_path: Path):
    path = tmp_path / "v2.gguf"
    write_gguf(path, "wan", {"w": (np.ones((2, 32), np.float32), Q.F16)})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4, 2)  # v2 has the v3 layout (64-bit counts); only the number differs
    path.write_bytes(bytes(data))
    with GGUFFile(path) as f:
        assert f.version == 2 and f.dequantize("w").tolist() == [[1.0] * 32] * 2
