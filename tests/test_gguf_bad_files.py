"""Malformed GGUF files raise GGUFFormatError naming the path (and the tensor), without allocating."""
from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType as V

from engine.gguf import GGUFFile, GGUFFormatError


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int, n_dims: int | None = None) -> bytes:
    """One tensor info; `dims` fastest-varying first, as GGUF stores them."""
    n = len(dims) if n_dims is None else n_dims
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", n, *dims, type_id, offset)


A_DATA = np.arange(4, dtype=np.float32).tobytes()  # F32 [4] at offset 0 (padded to 32)
B_DATA = (np.float16(0.5).tobytes() + bytes(range(32))) * 2  # Q8_0 [2, 32] at offset 32


def gguf_bytes(
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    data: bytes | None = None,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF file in the documented layout; by default a valid one with tensors a.weight and b.weight."""
    kvs = [kv("general.architecture", V.STRING, _str("wan"))] if kvs is None else kvs
    tensors = [tensor_info("a.weight", (4,), Q.F32, 0), tensor_info("b.weight", (32, 2), Q.Q8_0, 32)] if tensors is None else tensors
    data = A_DATA + bytes(32 - len(A_DATA)) + B_DATA if data is None else data
    header = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return header + bytes(-len(header) % 32) + data


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def open_fails(path: Path, match: str, tensor: str | None = None) -> GGUFFormatError:
    with pytest.raises(GGUFFormatError, match=match) as info:
        GGUFFile(path)
    message = str(info.value)
    assert str(path) in message
    if tensor is not None:
        assert repr(tensor) in message and info.value.tensor == tensor
    return info.value


def test_the_builder_writes_valid_files(tmp_path: Path):
    path = write(tmp_path, gguf_bytes(), "good.gguf")
    reader = GGUFReader(path)  # the oracle accepts it
    with GGUFFile(path) as f:
        assert f.tensor_names == [t.name for t in reader.tensors] == ["a.weight", "b.weight"]
        assert f.dequantize("a.weight").tolist() == [0.0, 1.0, 2.0, 3.0]
        assert f.dequantize("b.weight")[1, :3].tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("keep", [0, 3, 10, 23, 40, 90, 150])
def test_truncated_header(tmp_path: Path, keep: int):
    full = gguf_bytes()
    path = write(tmp_path, full[:keep])
    open_fails(path, "truncated")


def test_truncated_data_names_the_tensor(tmp_path: Path):
    path = write(tmp_path, gguf_bytes()[:-1])
    open_fails(path, "outside the file", tensor="b.weight")


def test_wrong_magic(tmp_path: Path):
    open_fails(write(tmp_path, gguf_bytes(magic=b"GGML")), "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path: Path, version: int):
    open_fails(write(tmp_path, gguf_bytes(version=version)), f"unsupported GGUF version {version}")


def test_tensor_data_outside_the_file(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), Q.F32, 0), tensor_info("b.weight", (32, 2), Q.Q8_0, 32 * 1024)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors)), "outside the file", tensor="b.weight")


def test_element_count_larger_than_its_bytes(tmp_path: Path):
    # a.weight claims 40 values (160 bytes) but b.weight's data starts 32 bytes after it
    # (the file is long enough for both, so only the byte sizes disagree).
    tensors = [tensor_info("a.weight", (40,), Q.F32, 0), tensor_info("b.weight", (32, 2), Q.Q8_0, 32)]
    data = A_DATA + bytes(32 - len(A_DATA)) + B_DATA + bytes(256)
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors, data=data)), "needs 160 bytes", tensor="a.weight")


def test_rows_not_a_multiple_of_the_block_size(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), Q.F32, 0), tensor_info("b.weight", (48, 1), Q.Q8_0, 32)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors)), "not a multiple of the Q8_0 block size", tensor="b.weight")


@pytest.mark.parametrize(
    ("dims", "n_dims", "match"),
    [
        ((1,) * 9, None, "absurd dimension count 9"),
        ((), None, "absurd dimension count 0"),
        ((4, 0), None, "absurd dimensions"),
        ((2**40, 2**40), None, "overflows"),
        ((2**63,), None, "absurd dimensions"),
    ],
    ids=["9-dims", "0-dims", "zero-dim", "overflow", "huge-dim"],
)
def test_absurd_dimensions(tmp_path: Path, dims: tuple[int, ...], n_dims: int | None, match: str):
    tensors = [tensor_info("a.weight", dims, Q.F32, 0, n_dims)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors, data=bytes(64))), match, tensor="a.weight")


def test_dimension_count_beyond_the_file(tmp_path: Path):
    # n_dims says 8 but the file ends: the dims are never read past the end.
    data = gguf_bytes(tensors=[tensor_info("a.weight", (), Q.F32, 0, n_dims=8)], data=b"")
    open_fails(write(tmp_path, data), "truncated")


def _fails_fast_without_allocating(path: Path, match: str) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        open_fails(path, match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5  # generous: it is one comparison, not a loop over 2**60 entries
    assert peak < 1 << 20, f"peak Python allocation {peak} bytes"


def test_absurd_tensor_count(tmp_path: Path):
    _fails_fast_without_allocating(write(tmp_path, gguf_bytes(n_tensors=2**60)), r"declares 1152921504606846976 tensors")


def test_absurd_metadata_count(tmp_path: Path):
    _fails_fast_without_allocating(write(tmp_path, gguf_bytes(n_kv=2**60)), "declares 1152921504606846976 metadata")


def test_absurd_string_length(tmp_path: Path):
    bad_key = struct.pack("<Q", 2**60) + b"general.architecture"
    data = gguf_bytes(kvs=[bad_key + struct.pack("<I", V.UINT8) + b"\x00"])
    _fails_fast_without_allocating(write(tmp_path, data), "truncated")


def test_absurd_array_length(tmp_path: Path):
    array = struct.pack("<IQ", V.STRING, 2**60) + _str("x")
    data = gguf_bytes(kvs=[kv("tokenizer.ggml.tokens", V.ARRAY, array)])
    _fails_fast_without_allocating(write(tmp_path, data), "truncated")


def test_duplicate_tensor_names(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), Q.F32, 0), tensor_info("a.weight", (32, 2), Q.Q8_0, 32)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors)), "duplicate tensor name", tensor="a.weight")


def test_duplicate_tensor_names_after_the_prefix_is_stripped(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), Q.F32, 0), tensor_info("model.diffusion_model.a.weight", (32, 2), Q.Q8_0, 32)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors)), "duplicate tensor name", tensor="a.weight")


def test_duplicate_metadata_keys(tmp_path: Path):
    kvs = [kv("general.name", V.STRING, _str("x")), kv("general.name", V.STRING, _str("y"))]
    open_fails(write(tmp_path, gguf_bytes(kvs=kvs)), "duplicate metadata key 'general.name'")


def test_unknown_ggml_type(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), 99, 0)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors, data=bytes(64))), "unknown GGML type id 99", tensor="a.weight")


def test_unknown_metadata_value_type(tmp_path: Path):
    open_fails(write(tmp_path, gguf_bytes(kvs=[kv("x", 77, b"\x00" * 8)])), "unknown metadata value type 77")


def test_misaligned_tensor_offset(tmp_path: Path):
    tensors = [tensor_info("a.weight", (4,), Q.F32, 8)]
    open_fails(write(tmp_path, gguf_bytes(tensors=tensors, data=bytes(64))), "not a multiple of the alignment", tensor="a.weight")


def test_bad_alignment(tmp_path: Path):
    open_fails(write(tmp_path, gguf_bytes(kvs=[kv("general.alignment", V.UINT32, struct.pack("<I", 24))])), "power of two")


def test_orig_shape_that_does_not_fit(tmp_path: Path):
    orig = struct.pack("<IQ3i", V.INT32, 3, 2, 2, 2)
    kvs = [kv("comfy.gguf.orig_shape.a.weight", V.ARRAY, orig)]
    open_fails(write(tmp_path, gguf_bytes(kvs=kvs)), "does not fit the 4 stored elements", tensor="a.weight")


def test_key_that_is_not_utf8(tmp_path: Path):
    open_fails(write(tmp_path, gguf_bytes(kvs=[kv(b"\xff\xfe", V.UINT8, b"\x01")])), "not valid UTF-8")


def test_missing_file_is_a_plain_os_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "nope.gguf")
