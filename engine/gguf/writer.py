"""Write GGUF files in the layouts the community publishes (tiny models, tests).

A thin, deterministic front end over `gguf.GGUFWriter`: tensors are written in
the order given, with no timestamps or other run-dependent bytes, so the same
input always gives the same file. Float arrays are quantized with
`gguf.quants.quantize` (which can produce F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1); types gguf-py cannot quantize (K-quants, IQ types) are given as
`uint8` raw blocks, shape `[..., n_blocks_per_row * type_size]`, and written
as they are. `write_gguf_stream` writes the same layout from tensors made one at a time.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, Keys
from gguf.quants import quantize

# Types stored as plain numpy arrays (no blocks): the writer maps the numpy
# dtype to the GGML type itself.
_PLAIN_NUMPY_DTYPES: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}

# What gguf-py 0.19 can quantize from float (besides the plain types above).
_GGUF_PY_QUANTIZABLE = frozenset({
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
})

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


def _int_value_type(values: list[int], key: str) -> GGUFValueType:
    """The narrowest of INT32 / INT64 / UINT64 that holds every value."""
    lo, hi = min(values), max(values)
    if _INT32[0] <= lo and hi <= _INT32[1]:
        return GGUFValueType.INT32
    if _INT64[0] <= lo and hi <= _INT64[1]:
        return GGUFValueType.INT64
    if 0 <= lo and hi <= _UINT64_MAX:
        return GGUFValueType.UINT64
    raise ValueError(f"metadata {key!r}: integer {lo if lo < _INT64[0] else hi} does not fit in 64 bits")


def _scalar_value_type(value: Any, key: str) -> GGUFValueType:
    # bool before int: bool is a subclass of int.
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        return _int_value_type([int(value)], key)
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise ValueError(f"metadata {key!r}: unsupported value type {type(value).__name__}")


def _python_value(value: Any, vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.BOOL:
        return bool(value)
    if vtype in (GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64, GGUFValueType.UINT32):
        return int(value)
    if vtype == GGUFValueType.FLOAT32:
        return float(value)
    return value


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, (bytes, bytearray)):
        # Raw bytes are an ARRAY of UINT8, as llama.cpp's converter writes
        # tokenizer.ggml.precompiled_charsmap (its loader accepts INT8/UINT8 only).
        writer.add_key_value(key, bytes(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
        return
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            # gguf-py cannot write an empty array (it needs an element to type it).
            raise ValueError(f"metadata {key!r}: empty arrays cannot be written")
        item_types = {_scalar_value_type(v, key) for v in items}
        if item_types <= {GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64}:
            sub_type = _int_value_type([int(v) for v in items], key)
        elif len(item_types) == 1:
            (sub_type,) = item_types
        elif item_types <= {GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64, GGUFValueType.FLOAT32}:
            sub_type = GGUFValueType.FLOAT32
        else:
            names = sorted(t.name for t in item_types)
            raise ValueError(f"metadata {key!r}: array mixes value types {names}")
        items = [_python_value(v, sub_type) for v in items]
        writer.add_key_value(key, items, GGUFValueType.ARRAY, sub_type=sub_type)
        return
    vtype = _scalar_value_type(value, key)
    writer.add_key_value(key, _python_value(value, vtype), vtype)


def _add_tensor(writer: GGUFWriter, name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> None:
    qtype = GGMLQuantizationType(qtype)
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint8 and qtype != GGMLQuantizationType.I8:
        # Raw blocks: the last axis holds whole blocks of `type_size` bytes.
        _, type_size = GGML_QUANT_SIZES[qtype]
        if array.ndim == 0 or array.shape[-1] % type_size != 0:
            raise ValueError(
                f"tensor {name!r}: raw {qtype.name} data needs a last axis that is a multiple of "
                f"{type_size} bytes, got shape {array.shape}"
            )
        writer.add_tensor(name, array, raw_dtype=qtype)
        return
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"tensor {name!r}: unsupported array dtype {array.dtype}")
    if qtype in _PLAIN_NUMPY_DTYPES:
        writer.add_tensor(name, array.astype(_PLAIN_NUMPY_DTYPES[qtype], copy=False))
        return
    if qtype not in _GGUF_PY_QUANTIZABLE:
        raise ValueError(
            f"tensor {name!r}: gguf-py cannot quantize to {qtype.name}; pass uint8 raw blocks instead"
        )
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if array.ndim == 0 or array.shape[-1] % block_size != 0:
        raise ValueError(
            f"tensor {name!r}: rows of {array.shape[-1] if array.ndim else 0} values are not a "
            f"multiple of the {qtype.name} block size {block_size}"
        )
    blocks = quantize(array.astype(np.float32, copy=False), qtype)
    writer.add_tensor(name, blocks, raw_dtype=qtype)


def write_gguf(
    path: str | os.PathLike[str],
    architecture: str,
    tensors: Mapping[str, tuple[np.ndarray, GGMLQuantizationType]],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a little-endian GGUF v3 file; byte-identical for identical input.

    `tensors` maps name -> (array, type), written in the mapping's order.
    Float arrays are quantized to `type` (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1);
    `uint8` arrays are raw blocks of `type` and are written unchanged.
    `metadata` values: str, int, float, bool, or lists of them (ints as INT32,
    widened to INT64/UINT64 only when a value needs it; floats as FLOAT32).
    `general.alignment`, when given, is written as UINT32 and used.
    """
    writer = _new_writer(architecture, metadata)
    for name, (array, qtype) in tensors.items():
        _add_tensor(writer, name, array, qtype)

    def write() -> None:
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    _write_via_partial(writer, Path(path), write)


def write_gguf_stream(
    path: str | os.PathLike[str],
    architecture: str,
    layout: Mapping[str, tuple[Sequence[int], GGMLQuantizationType]],
    blocks: Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a GGUF file whose tensors are made one at a time: the same bytes as `write_gguf`.

    `layout` maps name -> (shape, type) for every tensor, in file order, so the
    header can be written first; `blocks` then yields (name, raw blocks) in that
    order, each a `uint8` array of the tensor's bytes, and each is written and
    dropped before the next is asked for. A name out of order, a wrong byte count,
    a missing or an extra tensor is a ValueError, and no file is left behind.
    """
    writer = _new_writer(architecture, metadata)
    sizes = {}
    for name, (shape, qtype) in layout.items():
        qtype = GGMLQuantizationType(qtype)
        shape = tuple(int(s) for s in shape)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block_size:
            raise ValueError(f"tensor {name!r}: shape {list(shape)} is not whole {qtype.name} blocks of {block_size}")
        sizes[name] = math.prod(shape) // block_size * type_size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), sizes[name], raw_dtype=qtype)

    def write() -> None:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        names = iter(sizes)
        for name, array in blocks:
            want = next(names, None)
            if name != want:
                raise ValueError(f"tensor {name!r} given where the layout has "
                                 f"{'no more tensors' if want is None else repr(want)}")
            array = np.ascontiguousarray(array)
            if array.dtype != np.uint8 or array.nbytes != sizes[name]:
                raise ValueError(f"tensor {name!r}: expected {sizes[name]} bytes of raw blocks (uint8), "
                                 f"got {array.nbytes} bytes of {array.dtype}")
            writer.write_tensor_data(array)
        missing = next(names, None)
        if missing is not None:
            raise ValueError(f"tensor {missing!r} of the layout was never given")

    _write_via_partial(writer, Path(path), write)


def _new_writer(architecture: str, metadata: Mapping[str, Any] | None) -> GGUFWriter:
    writer = GGUFWriter(None, architecture)
    for key, value in (metadata or {}).items():
        if key == Keys.General.ARCHITECTURE:
            if value != architecture:
                raise ValueError(f"metadata {key!r}={value!r} contradicts architecture {architecture!r}")
            continue
        if key == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(value))  # raises unless a power of two
            continue
        _add_metadata(writer, key, value)
    return writer


def _write_via_partial(writer: GGUFWriter, path: Path, write: Callable[[], None]) -> None:
    """Open the file next to `path`, `write()` the rest, rename: a crash never leaves a half file
    under the real name."""
    tmp = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(tmp)
        write()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
