"""Memory-mapped GGUF reader.

Layout (little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x     (key: string, value type: u32, value)
    n_tensors x (name: string, n_dims: u32, dims: n_dims x u64 (fastest first), type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

A string is a u64 byte length followed by UTF-8 bytes; an array is an element
type u32, a u64 count and the elements. Opening a file parses the header only:
the tensor data stays in the page cache behind a private (copy-on-write) memory
map, and `raw(name)` is a view of it. Every count and length read from the
header is checked against the bytes left in the file before anything is built
from it, so a corrupt or hostile header cannot make the reader allocate memory.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.gguf.dequant import dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 8  # arrays of arrays: gguf-py reads any depth, llama.cpp none; each level is a Python call here

# Names in some community files carry the ComfyUI state-dict prefix.
NAME_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# The tensors that only a Wan DiT has (wan/modules/model.py).
WAN_SIGNATURE = ("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation")
UMT5_ARCHITECTURES = ("t5", "t5encoder")
UMT5_SIGNATURE = "enc.blk.0.attn_q.weight"

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_STRING_MIN_BYTES = 8  # the u64 length
_ARRAY_MIN_BYTES = 12  # element type + count
_KV_MIN_BYTES = _STRING_MIN_BYTES + 4 + 1  # empty key, value type, smallest value
_TENSOR_INFO_MIN_BYTES = _STRING_MIN_BYTES + 4 + 8 + 4 + 8  # empty name, one dim


class GGUFFormatError(ValueError):
    """A GGUF file is malformed, or does not hold what the model needs."""

    def __init__(self, path: str | os.PathLike[str], message: str, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        where = f"{self.path}: tensor {tensor!r}: " if tensor is not None else f"{self.path}: "
        super().__init__(where + message)


class TensorInfo(NamedTuple):
    name: str  # without the "model.diffusion_model." prefix
    file_name: str  # as stored in the file
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical, PyTorch order
    start: int  # absolute file offsets of the data
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Sequential little-endian reads from the mapped header, bounds-checked."""

    def __init__(self, buf: mmap.mmap, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise GGUFFormatError(
                self.path, f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.remaining} left (file size {self.size})"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, what)
        data = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(self.path, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise GGUFFormatError(self.path, f"unknown metadata value type {vtype} for {what}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        return self.scalar(_SCALAR_FORMATS[vtype], what)

    def array(self, what: str, depth: int = 0) -> list[Any]:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFFormatError(self.path, f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item_type = self.scalar("<I", f"element type of {what}")
        count = self.scalar("<Q", f"length of {what}")
        try:
            item_type = GGUFValueType(item_type)
        except ValueError:
            raise GGUFFormatError(self.path, f"unknown metadata value type {item_type} in array {what}") from None
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[item_type]
            n_bytes = count * struct.calcsize(fmt)
            self.need(n_bytes, f"{count} elements of {what}")
            items = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
            self.pos += n_bytes
            return items
        min_item = _STRING_MIN_BYTES if item_type == GGUFValueType.STRING else _ARRAY_MIN_BYTES
        self.need(count * min_item, f"{count} elements of {what}")
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]


class GGUFFile:
    """A GGUF file opened read-only through a memory map.

    >>> f = GGUFFile("wan2.1-t2v-1.3b-Q4_K_M.gguf")
    >>> f.kind, f.qtype("blocks.0.ffn.0.weight"), f.shape("patch_embedding.weight")
    ('wan_dit', <GGMLQuantizationType.Q4_K: 12>, (1536, 16, 1, 2, 2))
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(4)
            if len(head) < 4 and GGUF_MAGIC.startswith(head):
                raise GGUFFormatError(self.path, f"truncated file: {size} bytes, no GGUF header")
            if head != GGUF_MAGIC:
                raise GGUFFormatError(self.path, f"not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
            # A private mapping: torch views of it are writable without touching the file.
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        self._array = np.frombuffer(self._mmap, dtype=np.uint8)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # --- parsing ---------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.size, str(self.path))
        cur.pos = 4
        self.version: int = cur.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFFormatError(
                self.path, f"unsupported GGUF version {self.version}{hint}; supported: {SUPPORTED_VERSIONS}"
            )
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Counts are checked against the bytes left before any loop or allocation.
        if n_kv * _KV_MIN_BYTES > cur.remaining:
            raise GGUFFormatError(
                self.path, f"header declares {n_kv} metadata entries but only {cur.remaining} bytes follow"
            )
        if n_tensors * _TENSOR_INFO_MIN_BYTES > cur.remaining:
            raise GGUFFormatError(
                self.path, f"header declares {n_tensors} tensors but only {cur.remaining} bytes follow"
            )

        metadata: dict[str, Any] = {}
        self._value_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in metadata:
                raise GGUFFormatError(self.path, f"duplicate metadata key {key!r}")
            vtype = cur.scalar("<I", f"value type of {key!r}")
            metadata[key] = cur.value(vtype, f"metadata {key!r}")
            self._value_types[key] = GGUFValueType(vtype)
        self.metadata = metadata
        self.alignment = self._alignment()

        raw_infos = []
        for i in range(n_tensors):
            file_name = cur.string(f"name of tensor #{i}")
            n_dims = cur.scalar("<I", f"dimension count of {file_name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFormatError(
                    self.path, f"absurd dimension count {n_dims} (1..{MAX_DIMS})", file_name.removeprefix(NAME_PREFIX)
                )
            cur.need(8 * n_dims + 12, f"dimensions of {file_name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._mmap, cur.pos)
            cur.pos += 8 * n_dims
            type_id = cur.scalar("<I", f"type of {file_name!r}")
            offset = cur.scalar("<Q", f"offset of {file_name!r}")
            raw_infos.append((file_name, dims, type_id, offset))
        data_start = -(-cur.pos // self.alignment) * self.alignment
        self.data_start = data_start

        self._tensors: dict[str, TensorInfo] = {}
        self._file_names: dict[str, str] = {}
        for file_name, dims, type_id, offset in raw_infos:
            info = self._tensor_info(file_name, dims, type_id, offset)
            if info.name in self._tensors:
                raise GGUFFormatError(self.path, "duplicate tensor name", info.name)
            self._tensors[info.name] = info
            self._file_names[file_name] = info.name
        self._check_no_overlap()

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (isinstance(alignment, bool) or not isinstance(alignment, int)
                or alignment <= 0 or alignment & (alignment - 1)):
            raise GGUFFormatError(self.path, f"general.alignment must be a power of two, got {alignment!r}")
        return alignment

    def _tensor_info(self, file_name: str, dims: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        name = file_name.removeprefix(NAME_PREFIX)
        if any(d <= 0 or d >= 2**62 for d in dims):
            raise GGUFFormatError(self.path, f"absurd dimensions {list(dims)}", name)
        n_elements = math.prod(dims)
        if n_elements >= 2**62:
            raise GGUFFormatError(self.path, f"element count of dimensions {list(dims)} overflows", name)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(self.path, f"unknown GGML type id {type_id}", name) from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size != 0:
            raise GGUFFormatError(
                self.path, f"rows of {dims[0]} values are not a multiple of the {qtype.name} block size {block_size}",
                name,
            )
        n_bytes = n_elements // block_size * type_size
        if offset % self.alignment != 0:
            raise GGUFFormatError(
                self.path, f"data offset {offset} is not a multiple of the alignment {self.alignment}", name
            )
        start = self.data_start + offset
        end = start + n_bytes
        if end > self.size:
            raise GGUFFormatError(
                self.path, f"data lies outside the file: {qtype.name} {list(dims[::-1])} needs bytes "
                f"{start}..{end}, the file has {self.size}", name
            )
        return TensorInfo(name, file_name, qtype, self._logical_shape(name, file_name, dims, n_elements), start, end)

    def _logical_shape(self, name: str, file_name: str, dims: tuple[int, ...], n_elements: int) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-varying first; PyTorch lists them last.
        orig = self.metadata.get(ORIG_SHAPE_KEY + file_name, self.metadata.get(ORIG_SHAPE_KEY + name))
        if orig is None:
            return tuple(reversed(dims))
        valid = isinstance(orig, list) and orig and all(type(d) is int and d > 0 for d in orig)
        if not valid or math.prod(orig) != n_elements:
            raise GGUFFormatError(
                self.path, f"{ORIG_SHAPE_KEY}{file_name} = {orig!r} does not fit the {n_elements} stored elements", name
            )
        return tuple(orig)

    def _check_no_overlap(self) -> None:
        """Each tensor's bytes (from its shape and type) must end before the next tensor's data begins."""
        ordered = sorted(self._tensors.values(), key=lambda t: t.start)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.start:
                raise GGUFFormatError(
                    self.path, f"{a.qtype.name} shape {list(a.shape)} needs {a.end - a.start} bytes, "
                    f"but tensor {b.name!r} starts {b.start - a.start} bytes after it", a.name
                )

    # --- queries -----------------------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def kind(self) -> str:
        """"wan_dit", "umt5" or "unknown", from the architecture or, failing that, the tensor names."""
        arch = self.architecture
        if arch == "wan" or all(n in self._tensors for n in WAN_SIGNATURE):
            return "wan_dit"
        if arch in UMT5_ARCHITECTURES or UMT5_SIGNATURE in self._tensors:
            return "umt5"
        return "unknown"

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order, without the `model.diffusion_model.` prefix."""
        return list(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            info = self._tensors.get(self._file_names.get(name, ""))
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return info

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self.tensor_info(name).qtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensor_info(name).shape

    def byte_range(self, name: str) -> tuple[int, int]:
        info = self.tensor_info(name)
        return info.start, info.end

    def value_type(self, key: str) -> GGUFValueType:
        """The GGUF type a metadata value was stored with (ARRAY for lists)."""
        return self._value_types[key]

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self._tensors.values())

    @property
    def n_bytes(self) -> int:
        return sum(t.end - t.start for t in self._tensors.values())

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes as a uint8 tensor viewing the memory map (no copy)."""
        if self._array is None:
            raise ValueError(f"{self.path}: file is closed")
        info = self.tensor_info(name)
        return torch.from_numpy(self._array[info.start:info.end])

    def dequantize(
        self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The tensor's values in its logical shape, as `dtype` on `device`.

        Stored float tensors of the requested dtype on the CPU come back as views of
        the (private) memory map; everything else is computed on `device`.
        """
        info = self.tensor_info(name)
        raw = self.raw(name)
        if torch.device(device).type != "cpu":
            raw = raw.to(device)
        return dequantize(raw, info.qtype, info.shape, dtype, name=info.name)

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Drop the file's memory map. Tensors already returned keep their pages alive."""
        self._array = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views handed out still use the mapping; it goes when they do
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, kind={self.kind!r}, tensors={len(self._tensors)})"
