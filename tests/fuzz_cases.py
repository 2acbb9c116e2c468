"""Mutated model files for the fuzz tests (tests/test_fuzz_*.py) and bench/reliability.py.

Every generator starts from a small valid file written in the real layout
(GGUF by `engine.gguf.write_gguf` or by the raw encoder below, safetensors by
`safetensors.torch.save_file`, tokenizer metadata from the tiny umT5
tokenizer) and yields `(category, label, mutated)`; the label says what was
done ("base_write_gguf.gguf: dim 1 of 'q8_0'=18446744073709551615"), so a
failure names its reproducer. Two families:

- structure-aware: every header field (counts, string lengths, value and
  element types, n_dims, dims, GGML types, data offsets, safetensors' header
  length, dtypes, shapes and data_offsets) set to each of a list of hostile
  values, truncation at every structural boundary, and content mutations
  that keep the file parseable (renamed, reshaped, retyped tensors);
- random: seeded byte flips, overwritten windows, inserted and deleted
  bytes, appended garbage, random truncation.

A campaign runs one family of cases through the loader that reads them and
counts the outcome of each (the loader's own error type, "ok", or anything
else, which is a bug). `run_campaign` runs a campaign in a child process
under `RLIMIT_AS` (its address space after start-up plus a modest headroom)
and a timeout, so a hang, a giant allocation or a crash of the interpreter
is reported instead of taking the test run down:

    python tests/fuzz_cases.py CAMPAIGN[+CAMPAIGN...] WORKDIR HEADROOM_MB [KWARGS_JSON]

prints progress to WORKDIR/progress.txt and one JSON report as its last line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the child process of `run_campaign`
    sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

# (category, outcome) -> number of mutated files: filled by every campaign run
# in this process, for the tests' summaries and bench/reliability.py.
OUTCOMES: Counter[tuple[str, str]] = Counter()

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
# What reading a file may allocate, as tracemalloc sees it (Python objects and
# numpy buffers, so the dequantized outputs too): at most 32 bytes per byte of
# the file plus 1 MiB. A metadata array becomes a list (8-byte pointers, and
# objects for values outside the small-int cache); a Q2_K block's 84 bytes
# become 1 kB of float32. A size read from a header must never count.
BYTES_PER_FILE_BYTE = 32
SLACK = 1 << 20


def assert_allocation_bounded(peak: int, file_bytes: int, what: str) -> None:
    assert peak <= BYTES_PER_FILE_BYTE * file_bytes + SLACK, f"{what}: {peak} bytes traced for a {file_bytes}-byte file"


SEED = 20250225


class CaseTimeout(BaseException):
    """A case ran past its time limit (a BaseException, so no `except Exception` in the code under test eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after `seconds` of wall time."""
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn: Callable[[], Any], seconds: float = 10.0) -> tuple[str, str]:
    """Run `fn`; ("ok", "") or (exception class name, first line of its message)."""
    try:
        with time_limit(seconds):
            fn()
    except CaseTimeout as exc:
        return "hang", str(exc)
    except Exception as exc:  # every other type is reported, not raised: the caller decides
        lines = str(exc).splitlines()
        return type(exc).__name__, lines[0][:300] if lines else ""
    return "ok", ""


# =====================================================================================
# GGUF: a raw encoder (for what gguf-py refuses to write) and a map of a file's fields
# =====================================================================================

_SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}


def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


class Encoded(bytes):
    """A value's bytes, already encoded (for nestings too deep to encode recursively)."""


def gguf_value(vtype: int, value: Any) -> bytes:
    """A value's bytes (without its type). An ARRAY value is `(element_type, items)`; items may be arrays again."""
    if isinstance(value, Encoded):
        return value
    if vtype == V.STRING:
        return gguf_string(value)
    if vtype == V.ARRAY:
        item_type, items = value
        if isinstance(items, (bytes, bytearray)):
            return struct.pack("<IQ", item_type, len(items)) + bytes(items)
        return struct.pack("<IQ", item_type, len(items)) + b"".join(gguf_value(item_type, v) for v in items)
    return struct.pack(_SCALAR_FORMATS[V(vtype)], value)


def encode_gguf(metadata: list[tuple[str, int, Any]], tensors: Iterable[tuple[str, tuple[int, ...], int, bytes]] = (),
                alignment: int = 32) -> bytes:
    """A GGUF v3 file: `metadata` as (key, value type, value), `tensors` as (name, dims fastest first, type id, data).

    Tensor data is laid out in order, each at a multiple of `alignment` (which must
    match any general.alignment in `metadata`).
    """
    header = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    header += [gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value) for key, vtype, value in metadata]
    blobs, offset = [], 0
    for name, dims, type_id, data in tensors:
        header.append(gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset))
        padded = data + bytes(-len(data) % alignment)
        blobs.append(padded)
        offset += len(padded)
    head = b"".join(header)
    return head + bytes(-len(head) % alignment) + b"".join(blobs)


@dataclasses.dataclass(frozen=True)
class Field:
    """A fixed-size integer of a GGUF header: where it is, its struct format, what it is."""

    offset: int
    fmt: str  # "<I" or "<Q"
    kind: str  # version, tensor_count, kv_count, key_len, value_type, string_len, array_type, array_len,
    #            alignment, tensor_name_len, n_dims, dim, ggml_type, data_offset
    label: str
    value: int


@dataclasses.dataclass(frozen=True)
class GGUFMap:
    fields: list[Field]
    boundaries: list[int]  # offsets at which a structure ends (truncation points)
    data_start: int
    tensors: list[dict[str, Any]]  # name, type, dims, offset (relative), start, end (absolute)


def gguf_map(data: bytes) -> GGUFMap:
    """The fields of a valid little-endian GGUF file (written for our own base files, not a general reader)."""
    fields: list[Field] = []
    bounds = [4]
    pos = 4

    def take(fmt: str, kind: str, label: str, record: bool = True) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        if record:
            fields.append(Field(pos, fmt, kind, label, value))
        pos += struct.calcsize(fmt)
        if record:
            bounds.append(pos)
        return value

    def skip_string(kind: str, label: str, record: bool = True) -> str:
        nonlocal pos
        length = take("<Q", kind, label, record)
        text = data[pos:pos + length].decode()
        pos += length
        if record:
            bounds.append(pos)
        return text

    def skip_value(vtype: int, label: str, key: str, record: bool = True) -> Any:
        nonlocal pos
        if vtype == V.STRING:
            return skip_string("string_len", label, record)
        if vtype == V.ARRAY:
            item_type = take("<I", "array_type", label, record)
            count = take("<Q", "array_len", label, record)
            for i in range(count):
                # The fields of the first two items only: the others behave alike.
                skip_value(item_type, f"{label}[{i}]", key, record and i < 2)
            if record:
                bounds.append(pos)
            return None
        return take(_SCALAR_FORMATS[V(vtype)], "alignment" if key == "general.alignment" else "scalar", label,
                    record and key == "general.alignment")

    take("<I", "version", "version")
    n_tensors = take("<Q", "tensor_count", "tensor count")
    n_kv = take("<Q", "kv_count", "metadata count")
    alignment = 32
    for i in range(n_kv):
        key = skip_string("key_len", f"key #{i}")
        vtype = take("<I", "value_type", f"value type of {key!r}")
        value = skip_value(vtype, f"value of {key!r}", key)
        if key == "general.alignment":
            alignment = value
    infos = []
    for i in range(n_tensors):
        name = skip_string("tensor_name_len", f"name of tensor #{i}")
        n_dims = take("<I", "n_dims", f"n_dims of {name!r}")
        dims = [take("<Q", "dim", f"dim {d} of {name!r}") for d in range(n_dims)]
        type_id = take("<I", "ggml_type", f"type of {name!r}")
        offset = take("<Q", "data_offset", f"offset of {name!r}")
        infos.append(dict(name=name, type=type_id, dims=dims, offset=offset))
    data_start = -(-pos // alignment) * alignment
    bounds.append(data_start)
    for info in infos:
        block, size = GGML_QUANT_SIZES[Q(info["type"])]
        info["start"] = data_start + info["offset"]
        info["end"] = info["start"] + math.prod(info["dims"]) // block * size
        bounds += [info["start"], info["end"]]
    return GGUFMap(fields, sorted(set(bounds)), data_start, infos)


# Hostile values per field kind. Lengths and counts are also tried just past
# what the file holds; u64 values whose products overflow 64 bits are included.
_HUGE_U64 = (2**31, 2**32, 2**61 + 1, 2**62, 2**63, U64_MAX - 7, U64_MAX)
_UNKNOWN_VALUE_TYPES = (13, 14, 255, 2**31, U32_MAX)
_UNKNOWN_GGML_TYPES = (4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, U32_MAX)


def _field_values(field: Field, m: GGUFMap, size: int) -> list[int]:
    v, remaining = field.value, size - field.offset
    if field.kind == "version":
        return [0, 1, 2, 4, 3 << 24, U32_MAX]
    if field.kind in ("tensor_count", "kv_count"):
        return [0, 1, v - 1, v + 1, v * 2, size, *_HUGE_U64]
    if field.kind in ("key_len", "string_len", "tensor_name_len"):
        return [0, 1, v - 1, v + 1, remaining - 8, remaining - 7, size, *_HUGE_U64]
    if field.kind == "array_len":
        return [0, 1, v - 1, v + 1, remaining, *_HUGE_U64]
    if field.kind in ("value_type", "array_type"):
        return [t for t in range(13) if t != v] + list(_UNKNOWN_VALUE_TYPES)
    if field.kind == "alignment":
        return [0, 1, 3, 8, 64, 2**31, U32_MAX]
    if field.kind == "n_dims":
        return [0, v - 1, v + 1, 8, 9, 2**16, U32_MAX]
    if field.kind == "dim":
        return [0, 1, v + 1, v * 2, v * 256, 2**31, 2**32 + v, *_HUGE_U64]
    if field.kind == "ggml_type":
        return [int(t) for t in GGML_QUANT_SIZES if int(t) != v] + list(_UNKNOWN_GGML_TYPES)
    if field.kind == "data_offset":
        others = sorted({t["offset"] for t in m.tensors} - {v})
        return [v + 1, v + 16, v + 32, max(v - 32, 0), *others[:3], size - m.data_start, size, 2**63, U64_MAX - 31]
    raise ValueError(field.kind)


def _overwrite(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


def gguf_field_edits(data: bytes) -> list[tuple[Field, int]]:
    """(field, new value) for every header field of a valid file and every hostile value of its kind."""
    m = gguf_map(data)
    edits = []
    for field in m.fields:
        mask = (1 << (8 * struct.calcsize(field.fmt))) - 1
        # negative values as unsigned (a signed writer's -1 is 2**64-1); unique, in order
        for value in dict.fromkeys(v & mask for v in (*_field_values(field, m, len(data)), -1, -(2**31))):
            if value != field.value:
                edits.append((field, value))
    return edits


def apply_field_edit(data: bytes, field: Field, value: int) -> tuple[str, str, bytes]:
    return f"gguf/{field.kind}", f"{field.label}={value}", _overwrite(data, field.offset, field.fmt, value)


def gguf_field_mutations(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    """(category, label, file) for every header field set to every hostile value of its kind."""
    for field, value in gguf_field_edits(data):
        yield apply_field_edit(data, field, value)


def gguf_truncations(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    """The file cut at every structural boundary, one byte before it, and one after."""
    m = gguf_map(data)
    points = sorted({p + d for p in [0, *m.boundaries] for d in (-1, 0, 1)} & set(range(len(data))))
    for point in points:
        yield "gguf/truncate", f"truncated to {point} of {len(data)} bytes", data[:point]


def random_mutation(data: bytes, rng: random.Random, header_end: int | None = None) -> tuple[str, bytes]:
    """One seeded random mutation: flips, an overwritten window, an insertion, a deletion, appended garbage, a cut.

    `header_end` focuses half of the in-place mutations on the header, where a byte decides the layout.
    """
    buf = bytearray(data)
    n = len(buf)
    limit = min(header_end, n) if header_end and rng.random() < 0.5 else n

    def where() -> int:
        return rng.randrange(max(limit, 1))

    kind = rng.choice(("flip", "flip", "bytes", "window", "insert", "delete", "append", "cut"))
    if kind == "flip":
        spots = [where() for _ in range(rng.randint(1, 8))]
        for p in spots:
            buf[p] ^= 1 << rng.randrange(8)
        return f"bit flips at {spots}", bytes(buf)
    if kind == "bytes":
        spots = [where() for _ in range(rng.randint(1, 8))]
        for p in spots:
            buf[p] = rng.randrange(256)
        return f"random bytes at {spots}", bytes(buf)
    if kind == "window":
        p, value = where(), rng.choice((0, 1, 0x7F, 0xFF, 2**31, 2**32 - 1, 2**63, U64_MAX, rng.getrandbits(64)))
        width = rng.choice((1, 2, 4, 8))
        buf[p:p + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        return f"{width}-byte window at {p} = {value}", bytes(buf[:n])
    if kind == "insert":
        p, junk = where(), bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return f"{len(junk)} bytes inserted at {p}", bytes(buf[:p] + junk + buf[p:])
    if kind == "delete":
        p, k = where(), rng.randint(1, 16)
        return f"{k} bytes deleted at {p}", bytes(buf[:p] + buf[p + k:])
    if kind == "append":
        junk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64, 1000))))
        return f"{len(junk)} garbage bytes appended", bytes(buf) + junk
    p = rng.randrange(n)
    return f"cut at random point {p}", bytes(buf[:p])


# --- the GGUF base files ---------------------------------------------------------------

def gguf_base_tensors(seed: int = SEED) -> dict[str, tuple[np.ndarray, Q]]:
    """Tiny tensors of every type the engine dequantizes, a 5-D F32 one, and two it does not support."""
    rng = np.random.default_rng(seed)

    def floats(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def blocks(qtype: Q, n_blocks: int) -> np.ndarray:
        # Random bytes: the values may be anything (NaN included); only the errors matter here.
        return rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)

    tensors: dict[str, tuple[np.ndarray, Q]] = {
        "model.diffusion_model.patch_embedding.weight": (floats(3, 2, 1, 2, 2), Q.F32),
        "vec": (floats(5), Q.F32),
        "f16": (floats(2, 8), Q.F16),
        "bf16": (floats(2, 8), Q.BF16),
        "q8_0": (floats(2, 32), Q.Q8_0),
        "q4_0": (floats(1, 32), Q.Q4_0),
        "q4_1": (floats(1, 32), Q.Q4_1),
        "q5_0": (floats(1, 32), Q.Q5_0),
        "q5_1": (floats(1, 32), Q.Q5_1),
    }
    for qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS):
        tensors[qtype.name.lower()] = (blocks(qtype, 1), qtype)
    tensors["i32"] = (np.arange(3, dtype=np.int32), Q.I32)
    tensors["f64"] = (np.arange(2, dtype=np.float64), Q.F64)
    return tensors


GGUF_BASE_METADATA: dict[str, Any] = {
    "general.name": "fuzz base",
    "general.alignment": 32,
    "fuzz.int32": -7,
    "fuzz.int64": 2**40,
    "fuzz.uint64": 2**63 + 5,
    "fuzz.float32": 0.5,
    "fuzz.bool": True,
    "fuzz.bytes": b"\x00\x01\xff",
    "fuzz.strings": ["a", "", "\u00fcn\u00ef"],
    "fuzz.ints": [1, -2, 3],
    "fuzz.floats": [0.5, 1.5],
    "fuzz.bools": [True, False],
    "comfy.gguf.orig_shape.vec": [5],
}


Metadata = list[tuple[str, int, Any]]  # (key, GGUF value type, value) for the raw encoder
Tensors = list[tuple[str, tuple[int, ...], int, bytes]]  # (name, dims fastest first, GGML type id, data)


def gguf_every_type_parts(seed: int = SEED) -> tuple[Metadata, Tensors]:
    """The raw-encoder base's metadata (every scalar value type, a nested array, alignment 16) and tensors."""
    rng = np.random.default_rng(seed + 1)
    metadata = [
        ("general.architecture", V.STRING, "t5encoder"),
        ("general.alignment", V.UINT32, 16),
        ("all.uint8", V.UINT8, 200), ("all.int8", V.INT8, -100), ("all.uint16", V.UINT16, 60000),
        ("all.int16", V.INT16, -30000), ("all.uint32", V.UINT32, 4_000_000_000), ("all.int32", V.INT32, -2),
        ("all.float32", V.FLOAT32, 1.25), ("all.bool", V.BOOL, False), ("all.uint64", V.UINT64, 2**64 - 2),
        ("all.int64", V.INT64, -(2**62)), ("all.float64", V.FLOAT64, -0.125),
        ("all.nested", V.ARRAY, (V.ARRAY, [(V.INT16, [1, -2]), (V.INT16, [3])])),
        ("all.strings", V.ARRAY, (V.STRING, ["x", "yz"])),
    ]
    k_blocks = rng.integers(0, 256, GGML_QUANT_SIZES[Q.Q4_K][1], dtype=np.uint8).tobytes()
    tensors = [
        ("enc.blk.0.attn_q.weight", (2, 2, 1, 1, 2), int(Q.F32), rng.standard_normal(8).astype(np.float32).tobytes()),
        ("q4_k", (256,), int(Q.Q4_K), k_blocks),
        ("f16", (4,), int(Q.F16), rng.standard_normal(4).astype(np.float16).tobytes()),
    ]
    return metadata, tensors


def gguf_every_type_base(seed: int = SEED) -> bytes:
    return encode_gguf(*gguf_every_type_parts(seed), alignment=16)


def gguf_crafted(seed: int = SEED) -> Iterator[tuple[str, str, bytes]]:
    """Hostile metadata values no single-field edit produces: deep nesting, mistyped alignment and orig_shape."""
    metadata, tensors = gguf_every_type_parts(seed)

    def variant(key: str, vtype: int, value: Any, alignment: int = 16) -> bytes:
        entries = [e for e in metadata if e[0] != key] + [(key, vtype, value)]
        return encode_gguf(entries, tensors, alignment)

    # 12 bytes a level: 60 kB of arrays, each holding the next (the reader recurses per level)
    yield "gguf/crafted", "arrays nested 5000 deep", variant("all.nested", V.ARRAY, _nest(5000))
    yield "gguf/crafted", "arrays nested 9 deep", variant("all.nested", V.ARRAY, _nest(9))
    for vtype, value in ((V.STRING, "16"), (V.FLOAT32, 16.0), (V.BOOL, True), (V.INT32, -16), (V.UINT64, 2**63),
                         (V.ARRAY, (V.UINT32, [16]))):
        yield ("gguf/crafted", f"general.alignment = {value!r} ({V(vtype).name})",
               variant("general.alignment", vtype, value))
    yield "gguf/crafted", "general.architecture as INT32", variant("general.architecture", V.INT32, 3)
    key = "comfy.gguf.orig_shape.enc.blk.0.attn_q.weight"
    for vtype, value in ((V.ARRAY, (V.INT32, [0, 8])), (V.ARRAY, (V.INT32, [-8, -1])), (V.ARRAY, (V.INT32, [2, 4])),
                         (V.ARRAY, (V.INT64, [2**40])), (V.ARRAY, (V.UINT64, [2**63, 2])), (V.ARRAY, (V.STRING, ["8"])),
                         (V.ARRAY, (V.BOOL, [True] * 8)), (V.ARRAY, (V.INT32, [])), (V.INT32, 8), (V.STRING, "8"),
                         (V.ARRAY, (V.ARRAY, [(V.INT32, [8])]))):
        yield "gguf/crafted", f"orig_shape = {_short(value)}", variant(key, vtype, value)
    yield "gguf/crafted", "no metadata, no tensors", encode_gguf([], [])
    yield "gguf/crafted", "a tensor named twice", encode_gguf(metadata, tensors + tensors[:1], 16)
    yield "gguf/crafted", "a name and its prefixed twin", encode_gguf(
        metadata, tensors + [("model.diffusion_model." + tensors[1][0], *tensors[1][1:])], 16)


def _nest(depth: int) -> Encoded:
    """An ARRAY value: `depth` arrays of one element, each holding the next, around an INT32 [1]."""
    return Encoded(struct.pack("<IQ", V.ARRAY, 1) * (depth - 1) + struct.pack("<IQi", V.INT32, 1, 1))


def write_gguf_bases(directory: Path) -> list[Path]:
    from engine.gguf import write_gguf

    directory.mkdir(parents=True, exist_ok=True)
    first, second = directory / "base_write_gguf.gguf", directory / "base_every_type.gguf"
    write_gguf(first, "wan", gguf_base_tensors(), GGUF_BASE_METADATA)
    second.write_bytes(gguf_every_type_base())
    return [first, second]


def exercise_gguf(path: Path) -> None:
    """What the engine does with a GGUF: open it, list names/shapes/types, read metadata, dequantize everything."""
    import torch

    from engine.gguf import GGUFFile, UnsupportedQuantType

    with GGUFFile(path) as f:
        _ = (f.kind, f.architecture, f.version, f.n_params, f.n_bytes, repr(f))
        for key, value in f.metadata.items():
            _ = (f.value_type(key), repr(value))
        for name in f.tensor_names:
            _ = (f.qtype(name), f.shape(name), f.byte_range(name), f.raw(name))
        unsupported: list[UnsupportedQuantType] = []
        for name in f.tensor_names:  # every tensor, even after an unsupported one
            try:
                values = f.dequantize(name, torch.float32)
            except UnsupportedQuantType as exc:
                unsupported.append(exc)
                continue
            if tuple(values.shape) != tuple(f.shape(name)):
                raise AssertionError(f"{name}: dequantized shape {tuple(values.shape)} != {f.shape(name)}")
        if unsupported:
            raise unsupported[0]


GGUF_ALLOWED = ("ok", "GGUFFormatError", "UnsupportedQuantType")


def gguf_cases(bases: list[Path], n_random: int, seed: int = SEED) -> Iterator[tuple[str, str, bytes]]:
    """Every structure-aware mutation of every base, then `n_random` random ones."""
    datas = [p.read_bytes() for p in bases]
    for path, data in zip(bases, datas):
        for category, label, mutated in chain(gguf_field_mutations(data), gguf_truncations(data)):
            yield category, f"{path.name}: {label}", mutated
    yield from gguf_crafted(seed)
    rng = random.Random(seed)
    for i in range(n_random):
        k = rng.randrange(len(datas))
        data = datas[k]
        label, mutated = random_mutation(data, rng, header_end=gguf_map(data).data_start)
        yield "gguf/random", f"{bases[k].name}: #{i} {label}", mutated


# --- DiT files that still parse ---------------------------------------------------------

TINY_DIT = dict(dim=16, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=8, freq_dim=8)


def dit_base() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A tiny Wan DiT state dict (original names, seeded) and its metadata."""
    import torch

    from engine.tiny import random_state_dict
    from engine.wan.dit import HEAD_COUNT_KEY, WanConfig, WanModel

    cfg = WanConfig(**TINY_DIT)
    with torch.device("meta"):
        model = WanModel(cfg)
    state = random_state_dict(model, torch.Generator().manual_seed(SEED))
    return {k: v.numpy() for k, v in state.items()}, {HEAD_COUNT_KEY: cfg.num_heads}


def write_dit(path: Path, state: dict[str, np.ndarray], metadata: dict[str, Any],
              types: dict[str, Q] | None = None) -> None:
    """The community layout (engine.wan.convert.dit.community_qtype), with `types` overriding a tensor's type."""
    from engine.gguf import write_gguf
    from engine.wan.convert.dit import community_qtype

    tensors = {}
    for name, array in state.items():
        qtype = (types or {}).get(name) or community_qtype(name, array.shape, "Q8_0")
        tensors[name] = (array.astype(np.int32) if qtype == Q.I32 else array, qtype)
    write_gguf(path, "wan", tensors, metadata)


def dit_mutations(state: dict[str, np.ndarray], metadata: dict[str, Any]
                  ) -> Iterator[tuple[str, str, dict[str, np.ndarray], dict[str, Any], dict[str, Q]]]:
    """(category, label, state, metadata, type overrides): renamed, reshaped, retyped tensors, bad head counts."""
    from engine.wan.dit import HEAD_COUNT_KEY

    chosen = ["patch_embedding.weight", "blocks.1.self_attn.q.weight", "blocks.0.ffn.2.weight",
              "blocks.1.modulation", "head.head.weight", "blocks.0.norm3.bias", "time_projection.1.weight"]

    def renamed(old: str, new: str) -> dict[str, np.ndarray]:
        return {(new if k == old else k): v for k, v in state.items()}

    for name in chosen:
        other_block = name.replace("blocks.1.", "blocks.7.").replace("blocks.0.", "blocks.2.")
        for new in (name + "x", "extra." + name, other_block, "model.diffusion_model." + name):
            yield "dit/rename", f"{name} -> {new}", renamed(name, new), metadata, {}
        yield "dit/drop", f"without {name}", {k: v for k, v in state.items() if k != name}, metadata, {}
        array = state[name]
        shapes = {"flattened": (array.size,), "unit axis": (1, *array.shape), "transposed": array.shape[::-1],
                  "split": (2, array.size // 2) if array.size % 2 == 0 else (array.size,)}
        for how, shape in shapes.items():
            if tuple(shape) != array.shape:
                yield ("dit/reshape", f"{name} {how} {array.shape} -> {shape}", {**state, name: array.reshape(shape)},
                       metadata, {})
        axis = next(i for i, d in enumerate(array.shape) if d > 1)
        yield ("dit/reshape", f"{name} one short on axis {axis}", {**state, name: np.delete(array, -1, axis)},
               metadata, {})
        for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.I32):
            rows = array.shape[-1] if array.ndim else 1
            if qtype in (Q.Q8_0, Q.Q4_0) and rows % 32:
                continue
            yield "dit/retype", f"{name} as {qtype.name}", state, metadata, {name: qtype}
    yield "dit/rename", "an extra tensor", {**state, "blocks.0.extra.weight": np.zeros(4, np.float32)}, metadata, {}
    # One block index far beyond the others: a file of 2 blocks must not make a model of 10**8.
    huge = "blocks.99999999.self_attn.q.weight"
    yield ("dit/rename", f"blocks.1.self_attn.q.weight -> {huge}", renamed("blocks.1.self_attn.q.weight", huge),
           metadata, {})
    for head_count in ("two", "", [2, 2], 0, -2, 3, 2**40, 2.5, True, float("nan")):
        yield "dit/metadata", f"{HEAD_COUNT_KEY}={head_count!r}", state, {HEAD_COUNT_KEY: head_count}, {}
    yield "dit/metadata", f"no {HEAD_COUNT_KEY}", state, {}, {}


DIT_ALLOWED = ("ok", "ModelConfigError", "GGUFFormatError", "UnsupportedQuantType")


def exercise_dit(path: Path) -> None:
    from engine.wan.dit import load_dit

    load_dit(path)


# =====================================================================================
# safetensors
# =====================================================================================

def safetensors_split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_join(header: Any, payload: bytes, length: int | None = None, text: bytes | None = None) -> bytes:
    """A file from a header (any JSON value) or raw header `text`, with its true or a given length field."""
    if text is None:
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", (len(text) if length is None else length) & U64_MAX) + text + payload


_DTYPE_VALUES = ("F33", "", "f32", "BOOL", "U8", "I64", "F64", "F16", "BF16", "F8_E4M3", "F8_E5M2", "C64",
                 5, None, ["F32"])


def _shape_values(shape: list[int]) -> list[Any]:
    n = math.prod(shape)
    return [[], [n], [n, 1], [1, *shape], shape[::-1], [n + 1], [0], [-1], [-n], [2**63], [2**64], [U64_MAX, 0],
            [1.5], ["1"], None, 3, [shape]]


def _offset_values(begin: int, end: int, size: int) -> list[Any]:
    return [[end, begin], [begin, end + 1], [begin, end - 1], [begin + 1, end], [0, end], [begin, size],
            [begin, size + 1], [begin, 2**63], [begin, U64_MAX], [-1, end], [begin], [begin, end, end],
            [float(begin), float(end)], [str(begin), str(end)], None, [begin, begin]]


def safetensors_field_mutations(data: bytes, chosen: Iterable[str] = ()) -> Iterator[tuple[str, str, bytes]]:
    """The header length, the header JSON, and the dtype / shape / data_offsets of the first two entries and of
    `chosen`, each set to hostile values."""
    header, payload = safetensors_split(data)
    (n,) = struct.unpack_from("<Q", data)
    size = len(data)
    text = data[8:8 + n]
    for length in (0, 1, 2, 7, n - 1, n + 1, size - 8, size - 7, size, 100_000_001, 2**31, 2**63, U64_MAX):
        yield "safetensors/header_length", f"header length {length} (true {n})", struct.pack("<Q", length) + data[8:]
    raw_headers = {
        "empty": b"", "truncated JSON": text[: n // 2], "one byte short": text.rstrip()[:-1],
        "not UTF-8": b"\xff\xfe" + text[2:], "a list": b"[]", "a number": b"1", "a string": b'"x"', "null": b"null",
        "empty object": b"{}", "deeply nested": b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "duplicate keys": text.rstrip()[:-1] + b"," + text.rstrip()[1:], "NaN": b'{"x":NaN}',
        "trailing garbage": text.rstrip() + b"xyz", "NUL bytes": text.rstrip() + b"\x00\x00",
    }
    for how, raw in raw_headers.items():
        yield "safetensors/header_json", f"header {how}", safetensors_join(None, payload, text=raw)
    def with_entry(name: str, entry: Any) -> bytes:
        return safetensors_join({**header, name: entry}, payload)

    names = [k for k in header if k != "__metadata__"]
    names.sort(key=lambda k: header[k]["data_offsets"][0])
    for name in dict.fromkeys([*names[:2], *chosen]):
        entry = header[name]
        begin, end = entry["data_offsets"]
        for dtype in _DTYPE_VALUES:
            yield "safetensors/dtype", f"{name} dtype {dtype!r}", with_entry(name, {**entry, "dtype": dtype})
        for shape in _shape_values(entry["shape"]):
            yield "safetensors/shape", f"{name} shape {shape!r}", with_entry(name, {**entry, "shape": shape})
        for offsets in _offset_values(begin, end, len(payload)):
            yield ("safetensors/data_offsets", f"{name} data_offsets {offsets!r}",
                   with_entry(name, {**entry, "data_offsets": offsets}))
        for key in ("dtype", "shape", "data_offsets"):
            yield ("safetensors/entry", f"{name} without {key}",
                   with_entry(name, {k: v for k, v in entry.items() if k != key}))
        yield "safetensors/entry", f"{name} entry is a list", with_entry(name, [entry])
        yield "safetensors/entry", f"{name} with an extra field", with_entry(name, {**entry, "x": 1})
    if len(names) >= 2:  # two tensors claiming the same bytes
        a, b = names[:2]
        yield ("safetensors/data_offsets", f"{b} overlaps {a}",
               with_entry(b, {**header[b], "data_offsets": header[a]["data_offsets"]}))
    for meta in ([], {"format": 1}, {"format": {"a": "b"}}, "pt", None):
        yield ("safetensors/metadata", f"__metadata__ = {meta!r}",
               safetensors_join({**header, "__metadata__": meta}, payload))


def safetensors_truncations(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    header, payload = safetensors_split(data)
    (n,) = struct.unpack_from("<Q", data)
    points = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1}
    for name, entry in header.items():
        if name != "__metadata__":
            points |= {8 + n + entry["data_offsets"][1] - 1, 8 + n + entry["data_offsets"][0]}
    for p in sorted(q for q in points if 0 <= q < len(data)):
        yield "safetensors/truncate", f"truncated to {p} of {len(data)} bytes", data[:p]


def safetensors_cases(base: Path, n_random: int, chosen: Iterable[str] = (), seed: int = SEED
                      ) -> Iterator[tuple[str, str, bytes]]:
    data = base.read_bytes()
    for category, label, mutated in chain(safetensors_field_mutations(data, chosen), safetensors_truncations(data)):
        yield category, f"{base.name}: {label}", mutated
    rng = random.Random(seed)
    header_end = 8 + struct.unpack_from("<Q", data)[0]
    for i in range(n_random):
        label, mutated = random_mutation(data, rng, header_end=header_end)
        yield "safetensors/random", f"{base.name}: #{i} {label}", mutated


def state_dict_mutations(state: dict[str, Any], chosen: list[str], block_pattern: str
                         ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Valid safetensors files with the wrong content: tensors reshaped, emptied, retyped, renamed, dropped.

    `block_pattern` is the regex of a block index in the names ("encoder\\.block\\.(\\d+)\\.").
    """
    import torch

    for name in chosen:
        t = state[name]
        reshapes = {"flattened": (t.numel(),), "unit axis": (1, *t.shape), "transposed": tuple(t.shape[::-1]),
                    "scalar": ()}
        for how, shape in reshapes.items():
            if tuple(shape) != tuple(t.shape):
                value = t.reshape(-1)[:1].reshape(()) if shape == () else t.reshape(shape)
                yield "state/reshape", f"{name} {how} -> {list(shape)}", {**state, name: value.contiguous()}
        for k in range(t.dim()):  # one axis of size zero: zero bytes, still a valid file
            shape = list(t.shape)
            shape[k] = 0
            yield "state/reshape", f"{name} axis {k} of size 0", {**state, name: torch.zeros(shape)}
        for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
                      torch.bool, torch.float8_e4m3fn):
            yield "state/dtype", f"{name} as {dtype}", {**state, name: t.to(dtype)}
        match = re.search(block_pattern, name)
        new_names = [name + "x", "junk"]
        if match:
            new_names += [name[:match.start(1)] + big + name[match.end(1):] for big in ("7", "99999999")]
        for new in new_names:
            yield "state/rename", f"{name} -> {new}", {(new if k == name else k): v for k, v in state.items()}
        yield "state/drop", f"without {name}", {k: v for k, v in state.items() if k != name}
    yield "state/rename", "an extra tensor", {**state, "extra.weight": torch.zeros(2)}
    yield "state/drop", "no tensors at all", {}


def vae_state_dict() -> dict[str, Any]:
    """A tiny original-layout Wan2.1 VAE (encoder included, as real files hold): base_dim 4, 1 res block."""
    from engine.wan.convert.vae import tiny_vae_state_dict
    from engine.wan.vae import WanVAEConfig

    return tiny_vae_state_dict(SEED, WanVAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1))


def vae_crafted(state: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """VAE-specific content: stage widths of zero, an upsampler index that implies millions of residual blocks."""
    import torch

    def width_zero(name: str) -> bool:
        return name.startswith("decoder.upsamples.") and name.endswith("residual.2.weight")

    widths = {k: torch.zeros((0, *v.shape[1:])) if width_zero(k) else v for k, v in state.items()}
    yield "state/crafted", "every stage width 0", widths
    # Upsamplers 2, 5, 8 with 1 res block per stage; a first upsampler at index U means U-1 res blocks.
    u = 10**7
    keep = {k: v for k, v in state.items() if not k.startswith(("decoder.upsamples.5.", "decoder.upsamples.8."))}
    moved = {k.replace("decoder.upsamples.2.", f"decoder.upsamples.{u}.")
              .replace("decoder.upsamples.3.", f"decoder.upsamples.{u + 1}."): v for k, v in keep.items()}
    yield "state/crafted", f"first upsampler at index {u}", moved


def umt5_state_dict() -> dict[str, Any]:
    """A tiny umT5 encoder in the HF layout (`shared.weight`, `encoder.block.N.layer...`), seeded."""
    import torch

    from engine.tiny import random_state_dict
    from engine.wan.t5 import UMT5Config, UMT5Encoder

    with torch.device("meta"):
        model = UMT5Encoder(UMT5Config(vocab=32, dim=8, heads=2, head_dim=4, ffn_dim=16, num_layers=2))
    return random_state_dict(model, torch.Generator().manual_seed(SEED))


def umt5_crafted(state: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    import torch

    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    yield "state/crafted", "position bias with 0 heads", {**state, bias: torch.zeros(32, 0)}
    yield "state/crafted", "shared.weight [0, 2**40]", {**state, "shared.weight": torch.zeros(0, 2**40)}


def write_safetensors(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def exercise_vae(path: Path) -> None:
    from engine.wan.vae import load_vae

    load_vae(path)


def exercise_text_encoder(path: Path) -> None:
    from engine.wan.t5 import load_text_encoder

    load_text_encoder(path)


def exercise_file_role(path: Path) -> None:
    from engine.model_set import file_role

    file_role(path)


VAE_ALLOWED = ("ok", "VAEError")
TEXT_ENCODER_ALLOWED = ("ok", "TextEncoderError")
FILE_ROLE_ALLOWED = ("ok", "ModelSetError")


# =====================================================================================
# tokenizer metadata
# =====================================================================================

TOKENIZER_KEY = "tokenizer.ggml."
_KEY = TOKENIZER_KEY


def tokenizer_base_metadata() -> dict[str, Any]:
    """The tiny umT5 tokenizer's `tokenizer.ggml.*` metadata, as the embedded model's text-encoder GGUF holds it."""
    from engine.wan.convert.t5 import gguf_tokenizer_metadata, train_tiny_tokenizer

    return gguf_tokenizer_metadata(train_tiny_tokenizer())


def metadata_entries(metadata: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """The raw encoder's (key, type, value) entries for a metadata dict, typed as write_gguf types them."""
    entries: list[tuple[str, int, Any]] = [("general.architecture", V.STRING, "t5encoder")]
    for key, value in metadata.items():
        if isinstance(value, RawValue):
            entries.append((key, value.vtype, value.value))
        elif isinstance(value, (bytes, bytearray)):
            entries.append((key, V.ARRAY, (V.UINT8, bytes(value))))
        elif isinstance(value, bool):
            entries.append((key, V.BOOL, value))
        elif isinstance(value, int):
            vtype = V.INT32 if -(2**31) <= value < 2**31 else V.INT64 if -(2**63) <= value < 2**63 else V.UINT64
            entries.append((key, vtype, value))
        elif isinstance(value, float):
            entries.append((key, V.FLOAT32, value))
        elif isinstance(value, str):
            entries.append((key, V.STRING, value))
        else:
            items = list(value)
            first = items[0]
            item_type = (V.STRING if isinstance(first, str) else V.BOOL if isinstance(first, bool)
                         else V.FLOAT32 if isinstance(first, float) else V.INT32)
            entries.append((key, V.ARRAY, (item_type, items)))
    return entries


@dataclasses.dataclass(frozen=True)
class RawValue:
    """A metadata value written with exactly this GGUF type (what gguf-py will not write: empty or nested arrays)."""

    vtype: int
    value: Any


def tokenizer_mutations(meta: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(category, label, metadata) for every hostile change of the tokenizer metadata."""
    n = len(meta[_KEY + "tokens"])
    lists = ("tokens", "scores", "token_type")
    for key in lists:
        values = meta[_KEY + key]
        yield "tok/lengths", f"{key} one short", {**meta, _KEY + key: values[:-1]}
        yield "tok/lengths", f"{key} one extra", {**meta, _KEY + key: values + values[-1:]}
        yield "tok/lengths", f"{key} empty", {**meta, _KEY + key: RawValue(V.ARRAY, (V.INT32, []))}
        yield "tok/lengths", f"{key} of one element", {**meta, _KEY + key: values[:1]}
    empty = RawValue(V.ARRAY, (V.STRING, []))
    yield "tok/lengths", "all three lists empty", {**meta, **{_KEY + k: empty for k in lists}}
    yield "tok/lengths", "all three lists cut to 3", {**meta, **{_KEY + k: meta[_KEY + k][:3] for k in lists}}
    wrong_types = {
        "tokens": [list(range(n)), [float(i) for i in range(n)], RawValue(V.ARRAY, (V.ARRAY, [(V.UINT8, b"ab")] * n)),
                   RawValue(V.ARRAY, (V.ARRAY, [(V.INT32, [300, -1])] * n)), "abc", 5],
        "scores": [["x"] * n, [str(i) for i in range(n)], list(range(n)), [True] * n, "0.5", 0.5,
                   RawValue(V.ARRAY, (V.ARRAY, [(V.FLOAT32, [0.5])] * n))],
        "token_type": [["1"] * n, [1.5] * n, [True] * n, "1", 1, RawValue(V.ARRAY, (V.ARRAY, [(V.INT32, [1])] * n))],
    }
    for key, candidates in wrong_types.items():
        for value in candidates:
            yield "tok/types", f"{key} = {_short(value)}", {**meta, _KEY + key: value}
    for key in ("model", *lists, "eos_token_id", "unknown_token_id", "padding_token_id", "add_space_prefix",
                "remove_extra_whitespaces", "precompiled_charsmap"):
        yield "tok/missing", f"no {key}", {k: v for k, v in meta.items() if k != _KEY + key}
    for value in ("llama", "", "T5", 5, ["t5"]):
        yield "tok/values", f"model = {value!r}", {**meta, _KEY + "model": value}
    for key in ("eos_token_id", "padding_token_id", "unknown_token_id"):
        for value in (-1, n, n + 1, 2**31 - 1, 2**63, "1", 1.5, float("nan"), float("inf"), [1], True, 3):
            yield "tok/special_ids", f"{key} = {value!r}", {**meta, _KEY + key: value}
    types = meta[_KEY + "token_type"]
    tokens = meta[_KEY + "tokens"]
    scores = meta[_KEY + "scores"]
    type_changes = {
        "a type 0": [0] + types[1:], "a type 7": types[:-1] + [7], "a type -1": types[:-1] + [-1],
        "a type 2**31-1": types[:-1] + [2**31 - 1], "every token NORMAL": [1] * n,
        "two UNKNOWN tokens": [2 if i in (2, 3) else t for i, t in enumerate(types)],
        "a NORMAL piece typed BYTE": [6 if i == 400 else t for i, t in enumerate(types)],
        "every token CONTROL": [3] * n, "every token UNUSED but UNKNOWN": [2 if i == 2 else 5 for i in range(n)],
    }
    for how, value in type_changes.items():
        yield "tok/values", f"token_type: {how}", {**meta, _KEY + "token_type": value}
    token_changes = {
        "a duplicate piece": tokens[:5] + [tokens[4]] + tokens[6:], "an empty piece": tokens[:5] + [""] + tokens[6:],
        "a NUL piece": tokens[:5] + ["\x00"] + tokens[6:], "a 100 kB piece": tokens[:5] + ["x" * 100_000] + tokens[6:],
        "a whitespace piece": tokens[:5] + [" "] + tokens[6:], "the byte pieces renamed": [
            f"b{i}" if t == 6 else p for i, (p, t) in enumerate(zip(tokens, types))],
    }
    for how, value in token_changes.items():
        yield "tok/values", f"tokens: {how}", {**meta, _KEY + "tokens": value}
    for value in (float("nan"), float("inf"), float("-inf"), 3.4e38):
        yield "tok/values", f"scores: one {value}", {**meta, _KEY + "scores": scores[:5] + [value] + scores[6:]}
        yield "tok/values", f"scores: all {value}", {**meta, _KEY + "scores": [value] * n}
    for key in ("add_space_prefix", "remove_extra_whitespaces"):
        for value in ("no", "", 5, 0, [True], float("nan"), RawValue(V.ARRAY, (V.BOOL, []))):
            yield "tok/values", f"{key} = {value!r}", {**meta, _KEY + key: value}


def charsmap_mutations(meta: dict[str, Any], n_random: int, seed: int = SEED
                       ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The precompiled charsmap (a sentencepiece blob parsed in C++): garbage, cut, flipped, mistyped."""
    charsmap = bytes(meta[_KEY + "precompiled_charsmap"])
    (trie_size,) = struct.unpack_from("<I", charsmap)
    key = _KEY + "precompiled_charsmap"
    fixed = {
        "empty": RawValue(V.ARRAY, (V.UINT8, b"")), "4 bytes": charsmap[:4], "trie only": charsmap[:4 + trie_size],
        "cut in the trie": charsmap[:4 + trie_size // 2], "cut in the strings": charsmap[:-100],
        "trie size 0": struct.pack("<I", 0) + charsmap[4:],
        "trie size +1024": struct.pack("<I", trie_size + 1024) + charsmap[4:],
        "trie size huge": struct.pack("<I", U32_MAX) + charsmap[4:], "no NUL in the strings":
            charsmap[:4 + trie_size] + bytes(b or 0x41 for b in charsmap[4 + trie_size:]),
        "as a string": RawValue(V.STRING, "\u00e9" * 100),
        "as INT8 with negatives": RawValue(V.ARRAY, (V.INT8, [-1, -128, 5])),
        "as INT32 over 255": RawValue(V.ARRAY, (V.INT32, [300, 1, 2, 3])), "as a scalar": 7,
        "as floats": RawValue(V.ARRAY, (V.FLOAT32, [0.5, 1.5])),
        "as strings": RawValue(V.ARRAY, (V.STRING, ["ab", "c"])),
    }
    for how, value in fixed.items():
        yield "tok/charsmap", f"charsmap {how}", {**meta, key: value}
    rng = random.Random(seed)
    for i in range(n_random):
        kind = rng.choice(("garbage", "flip trie", "flip strings", "flip anywhere"))
        if kind == "garbage":
            blob = bytes(rng.randrange(256) for _ in range(rng.choice((5, 17, 1024 + 8, 4096))))
            if rng.random() < 0.5:  # a plausible trie size, so sentencepiece reads the garbage as a trie
                blob = struct.pack("<I", 1024 * rng.randint(0, (len(blob) - 4) // 1024)) + blob[4:]
        else:
            lo, hi = {"flip trie": (4, 4 + trie_size), "flip strings": (4 + trie_size, len(charsmap)),
                      "flip anywhere": (0, len(charsmap))}[kind]
            buf = bytearray(charsmap)
            for _ in range(rng.choice((1, 8, 64))):
                buf[rng.randrange(lo, hi)] = rng.randrange(256)
            blob = bytes(buf)
        yield "tok/charsmap", f"charsmap #{i} {kind}", {**meta, key: blob}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


TOKENIZER_ALLOWED = ("ok", "TokenizerError", "GGUFFormatError")
PROMPTS = ("A red fox runs across a snowy forest; cinematic lighting.", "", "   ",
           "\u4e00\u53ea\u5c0f\u732b\u5728\u8349\u5730\u4e0a\u5954\u8dd1", "\ufb01 \uff21\uff22\uff23 \u00bd \t\n x",
           "word " * 700)


def write_tokenizer_gguf(path: Path, metadata: dict[str, Any]) -> None:
    """The metadata as a text-encoder GGUF without tensors, by the raw encoder.

    For metadata `engine.gguf.write_gguf` can write, the bytes are the same as
    its output (pinned by test_fuzz_tokenizer); the raw encoder also writes what
    it refuses (empty, nested and mistyped arrays) and is ~20x faster on the
    240 kB charsmap, which gguf-py packs one element at a time.
    """
    path.write_bytes(encode_gguf(metadata_entries(metadata)))


def exercise_tokenizer(path: Path) -> None:
    """Build the tokenizer from the file and encode a few prompts; a tokenizer that loads must encode sanely."""
    from engine.gguf import GGUFFile
    from engine.wan.tokenizer import MAX_LENGTH, Tokenizer

    with GGUFFile(path) as f:
        tokenizer = Tokenizer.from_gguf(f)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        if not (1 <= len(ids) <= MAX_LENGTH and ids[-1] == tokenizer.eos_id
                and all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids)):
            raise AssertionError(f"encode({prompt[:20]!r}) gave {ids[:10]}... (eos {tokenizer.eos_id})")


# =====================================================================================
# campaigns: cases through a loader, outcomes counted
# =====================================================================================

@dataclasses.dataclass
class CampaignResult:
    counts: Counter  # (category, outcome) -> files
    unexpected: list[tuple[str, str, str, str]]  # category, label, outcome, message
    n_cases: int = 0

    def merge(self, other: "CampaignResult") -> "CampaignResult":
        return CampaignResult(self.counts + other.counts, self.unexpected + other.unexpected,
                              self.n_cases + other.n_cases)

    def summary(self, title: str) -> str:
        """A table: category, then files per outcome."""
        categories = sorted({c for c, _ in self.counts})
        lines = [f"{title}: {self.n_cases} runs of a loader on a mutated file, {len(self.unexpected)} unexpected"]
        for category in categories:
            outcomes = {o: n for (c, o), n in self.counts.items() if c == category}
            row = ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items(), key=lambda x: -x[1]))
            lines.append(f"  {category:34s} {sum(outcomes.values()):5d}: {row}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"counts": [[c, o, n] for (c, o), n in sorted(self.counts.items())],
                "unexpected": self.unexpected, "n_cases": self.n_cases}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CampaignResult":
        return cls(Counter({(c, o): n for c, o, n in data["counts"]}),
                   [tuple(u) for u in data["unexpected"]], data["n_cases"])


def run_cases(
    cases: Iterable[tuple[str, str, Callable[[Path], None], Path, tuple[str, ...]]],
    progress: Path | None = None,
    seconds: float = 5.0,
) -> CampaignResult:
    """Run (category, label, exercise, path, allowed) cases; count outcomes; keep the ones outside `allowed`."""
    result = CampaignResult(Counter(), [])
    log = open(progress, "a", buffering=1) if progress else None
    try:
        for category, label, exercise, path, allowed in cases:
            if log:
                log.write(f"{category}\t{label}\n")
            name, message = outcome(lambda: exercise(path), seconds)
            result.counts[category, name] += 1
            OUTCOMES[category, name] += 1
            result.n_cases += 1
            if name not in allowed:
                result.unexpected.append((category, label, name, message))
    finally:
        if log:
            log.close()
    return result


def _file_cases(directory: Path, suffix: str, cases: Iterable[tuple[str, str, bytes]],
                exercises: list[tuple[str, Callable[[Path], None], tuple[str, ...]]]) -> Iterator[tuple]:
    """Write each mutated file, hand it to every exercise (category prefixed), delete it."""
    for i, (category, label, data) in enumerate(cases):
        path = directory / f"case{i}{suffix}"
        path.write_bytes(data)
        for prefix, exercise, allowed in exercises:
            yield f"{prefix}{category}", label, exercise, path, allowed
        path.unlink()


GGUF_ROLE_ALLOWED = ("ok", "ModelSetError", "GGUFFormatError")


def campaign_gguf(directory: Path, n_random: int = 400, progress: Path | None = None) -> CampaignResult:
    """Every structure-aware, crafted and `n_random` random mutant of the two GGUF bases: read whole, and file_role."""
    bases = write_gguf_bases(directory / "bases")
    exercises = [("", exercise_gguf, GGUF_ALLOWED), ("role:", exercise_file_role, GGUF_ROLE_ALLOWED)]
    return run_cases(_file_cases(directory, ".gguf", gguf_cases(bases, n_random), exercises), progress=progress)


def campaign_dit(directory: Path, n_random: int = 60, progress: Path | None = None) -> CampaignResult:
    directory.mkdir(parents=True, exist_ok=True)
    state, metadata = dit_base()
    base = directory / "dit_base.gguf"
    write_dit(base, state, metadata)

    def parseable() -> Iterator[tuple[str, str, bytes]]:
        yield "dit/base", "the unmutated base", base.read_bytes()
        for category, label, st, meta, types in dit_mutations(state, metadata):
            path = directory / "dit_mutant.gguf"
            try:
                write_dit(path, st, meta, types)
            except ValueError as exc:  # write_gguf cannot express it (e.g. a list head count of mixed types)
                raise AssertionError(f"{label}: the case could not be written: {exc}") from exc
            data = path.read_bytes()
            path.unlink()
            yield category, label, data
        rng = random.Random(SEED)
        data = base.read_bytes()
        header_end = gguf_map(data).data_start
        for i in range(n_random):
            label, mutated = random_mutation(data, rng, header_end=header_end)
            yield "dit/random", f"#{i} {label}", mutated

    cases = _file_cases(directory, ".gguf", parseable(), [("", exercise_dit, DIT_ALLOWED)])
    return run_cases(cases, progress=progress)


# The tensors the loaders infer the model from, and a few more.
VAE_CHOSEN = ["decoder.conv1.weight", "decoder.upsamples.0.residual.2.weight", "decoder.upsamples.2.resample.1.weight",
              "decoder.head.2.weight", "conv2.weight", "decoder.middle.1.to_qkv.weight"]
UMT5_CHOSEN = ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "shared.weight",
               "encoder.block.1.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
               "encoder.final_layer_norm.weight"]


def campaign_safetensors(directory: Path, n_random: int = 150, progress: Path | None = None) -> CampaignResult:
    """The tiny VAE through load_vae and file_role, a tiny umT5 through load_text_encoder and file_role."""
    directory.mkdir(parents=True, exist_ok=True)
    vae_state, t5_state = vae_state_dict(), umt5_state_dict()
    vae_base, t5_base = directory / "vae_base.safetensors", directory / "umt5_base.safetensors"
    write_safetensors(vae_base, vae_state)
    write_safetensors(t5_base, t5_state)
    vae_exercises = [("vae:", exercise_vae, VAE_ALLOWED), ("role:", exercise_file_role, FILE_ROLE_ALLOWED)]
    t5_exercises = [("t5:", exercise_text_encoder, TEXT_ENCODER_ALLOWED),
                    ("role:", exercise_file_role, FILE_ROLE_ALLOWED)]

    def valid_files(variants: Iterable[tuple[str, str, dict[str, Any]]]) -> Iterator[tuple[str, str, bytes]]:
        path = directory / "variant.safetensors"
        for category, label, variant in variants:
            write_safetensors(path, variant)
            yield category, label, path.read_bytes()

    # Lazy chains: a campaign holds one mutated file at a time, however many it runs.
    vae_cases = chain(
        [("base", "the unmutated VAE", vae_base.read_bytes())],
        safetensors_cases(vae_base, n_random, VAE_CHOSEN[:2]),
        valid_files(state_dict_mutations(vae_state, VAE_CHOSEN, r"decoder\.upsamples\.(\d+)\.")),
        valid_files(vae_crafted(vae_state)),
    )
    t5_cases = chain(
        [("base", "the unmutated umT5", t5_base.read_bytes())],
        safetensors_cases(t5_base, n_random, UMT5_CHOSEN[:2], seed=SEED + 1),
        valid_files(state_dict_mutations(t5_state, UMT5_CHOSEN, r"encoder\.block\.(\d+)\.")),
        valid_files(umt5_crafted(t5_state)),
    )
    result = run_cases(_file_cases(directory, ".safetensors", vae_cases, vae_exercises), progress=progress)
    return result.merge(run_cases(_file_cases(directory, ".safetensors", t5_cases, t5_exercises), progress=progress))


def campaign_tokenizer(directory: Path, n_random: int = 40, progress: Path | None = None) -> CampaignResult:
    directory.mkdir(parents=True, exist_ok=True)
    meta = tokenizer_base_metadata()

    def files() -> Iterator[tuple[str, str, bytes]]:
        path = directory / "tokenizer.gguf"
        for category, label, variant in chain([("tok/base", "the unmutated tokenizer", meta)],
                                              tokenizer_mutations(meta), charsmap_mutations(meta, n_random)):
            write_tokenizer_gguf(path, variant)
            yield category, label, path.read_bytes()

    cases = _file_cases(directory, ".gguf", files(), [("", exercise_tokenizer, TOKENIZER_ALLOWED)])
    return run_cases(cases, progress=progress)


CAMPAIGNS: dict[str, Callable[..., CampaignResult]] = {
    "gguf": campaign_gguf, "dit": campaign_dit, "safetensors": campaign_safetensors, "tokenizer": campaign_tokenizer,
}


# --- the child process ----------------------------------------------------------------

def address_space() -> int:
    """This process's mapped address space in bytes (VmSize)."""
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmSize:\s+(\d+) kB", fh.read()).group(1)) * 1024


@dataclasses.dataclass
class ChildReport:
    returncode: int
    result: CampaignResult | None
    last_case: str  # the case running when the child stopped (a crash's reproducer)
    stderr: str
    headroom: int  # bytes of address space allowed beyond the child's start-up
    peak_rss_growth: int  # bytes the child's resident set grew by during the campaign
    seconds: float


def run_campaign(name: str, directory: Path, headroom_mb: int = 512, timeout: float = 120.0,
                 kwargs: dict[str, Any] | None = None) -> ChildReport:
    """Run campaign `name` in a child under RLIMIT_AS = start-up size + headroom_mb and a wall-clock timeout."""
    directory.mkdir(parents=True, exist_ok=True)
    progress = directory / "progress.txt"
    progress.write_text("")
    command = [sys.executable, str(Path(__file__).resolve()), name, str(directory), str(headroom_mb),
               json.dumps(kwargs or {})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = -signal.SIGKILL
        stdout, stderr = (out.decode() if isinstance(out, bytes) else (out or "") for out in (exc.stdout, exc.stderr))
        stderr += f"\ntimed out after {timeout} s"
    lines = progress.read_text().splitlines()
    last = lines[-1] if lines else ""
    report = None
    extra: dict[str, Any] = {}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            extra = json.loads(line)
            report = CampaignResult.from_json(extra)
            break
    return ChildReport(returncode, report, last, stderr[-4000:], extra.get("headroom", 0),
                       extra.get("peak_rss_growth", 0), time.monotonic() - start)


def _child_main(argv: list[str]) -> int:
    name, directory, headroom_mb = argv[0], Path(argv[1]), int(argv[2])
    kwargs = json.loads(argv[3]) if len(argv) > 3 else {}
    import torch  # everything a campaign imports, before the address space is measured

    import engine.gguf  # noqa: F401
    import engine.model_set  # noqa: F401
    import engine.wan.dit  # noqa: F401
    import engine.wan.t5  # noqa: F401
    import engine.wan.tokenizer  # noqa: F401
    import engine.wan.vae  # noqa: F401

    torch.set_num_threads(1)
    torch.zeros(64).sum()  # start torch's thread pools before the limit
    headroom = headroom_mb << 20
    limit = address_space() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = CampaignResult(Counter(), [])
    for part in name.split("+"):  # "gguf+dit": several campaigns for one start-up
        result = result.merge(CAMPAIGNS[part](directory / part, progress=directory / "progress.txt",
                                              **kwargs.get(part, {})))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({**result.to_json(), "headroom": headroom, "peak_rss_growth": max(0, rss_after - rss_before)}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
