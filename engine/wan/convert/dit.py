"""Community-layout Wan DiT GGUF files (city96 / QuantStack): which type each tensor takes, the writer,
and `quantize_checkpoint`, which streams a safetensors DiT (LoRAs merged) into such a file."""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from engine.gguf.quantize import QuantizeError, quant_type, quantize
from engine.gguf.writer import write_gguf, write_gguf_stream

# Substrings of names the community converters never quantize (city96 convert.py
# keeps them in high precision; the patched llama-quantize skips them).
NEVER_QUANTIZED = ("modulation", "patch_embedding", "text_embedding", "time_projection", "time_embedding",
                   "img_emb", "head")
_SMALL_TENSOR = 1024  # convert.py QUANTIZATION_THRESHOLD: at most this many elements -> F32
_BLOCK = re.compile(r"(vace_)?blocks\.\d+\.")  # only weights inside the transformer (and VACE) blocks are quantized


def community_qtype(name: str, shape: tuple[int, ...], quant: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """The GGML type a community Wan GGUF stores tensor `name` in, for a file quantized to `quant`.

    Only 2-D weights inside `blocks.N` take `quant`; 1-D, small (<= 1024
    elements) and never-quantized tensors are F32; a row that is not a whole
    number of `quant` blocks falls back to F16 (as the patched llama-quantize does).
    """
    qtype = GGMLQuantizationType[quant] if isinstance(quant, str) else GGMLQuantizationType(quant)
    if (
        len(shape) != 2
        or math.prod(shape) <= _SMALL_TENSOR
        or not _BLOCK.match(name)
        or any(part in name for part in NEVER_QUANTIZED)
    ):
        return GGMLQuantizationType.F32
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return GGMLQuantizationType.F16
    return qtype


def write_dit_gguf(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    quant: str = "Q8_0",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a DiT state dict (original Wan names) as a community-layout GGUF.

    `general.architecture = "wan"`, names unchanged, shapes unchanged (5-D
    `patch_embedding`, 3-D `.modulation`), types from `community_qtype`.
    """
    tensors = {}
    for name, tensor in state_dict.items():
        array = tensor.detach().to("cpu", torch.float32).numpy()
        tensors[name] = (array, community_qtype(name, tuple(array.shape), quant))
    write_gguf(path, "wan", tensors, metadata=metadata)


# --- quantizing a checkpoint ---------------------------------------------------------------

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, which llama-quantize writes as general.quantization_version
_SIGNATURE = "blocks.0.self_attn.q.weight"
# safetensors dtypes -> bytes per value, for the tally (any float type torch reads is accepted).
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TypeTally:
    """What one GGML type took in a quantized file: tensors, checkpoint bytes in, file bytes out, seconds."""

    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def _carried_metadata(src: str, found: Mapping[str, str]) -> dict[str, Any]:
    """The checkpoint metadata keys reelray reads from a DiT GGUF, typed as the GGUF holds them."""
    from engine.model_set import DEFAULTS_KEY
    from engine.wan.dit import HEAD_COUNT_KEY

    carried: dict[str, Any] = {}
    if HEAD_COUNT_KEY in found:
        try:
            carried[HEAD_COUNT_KEY] = int(found[HEAD_COUNT_KEY])
        except ValueError:
            raise QuantizeError(f"{src}: metadata {HEAD_COUNT_KEY!r} = {found[HEAD_COUNT_KEY]!r} is not an integer") from None
    if DEFAULTS_KEY in found:
        carried[DEFAULTS_KEY] = found[DEFAULTS_KEY]
    return carried


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quant: str | GGMLQuantizationType = "Q4_K",
    loras: Sequence[tuple[Any, float]] = (),
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, TypeTally]:
    """Quantize a Wan DiT safetensors checkpoint into a community-layout GGUF; {type name: tally}.

    reelray's own keys in the checkpoint's safetensors metadata (the head count
    and the render defaults of a tiny model, e.g. the toy world's) are carried
    into the GGUF's; `metadata` adds or overrides keys.

    The checkpoint may use the original Wan names or diffusers' (`engine.lora.wan_tensor_names`);
    the file gets the original names, in the model's tensor order, with `community_qtype` types
    for `quant`. `loras` ((LoraFile, strength) pairs, `engine.lora.read_lora`) are merged into the
    float32 weights before they are quantized. Tensors are read, merged, quantized and written one
    at a time: memory holds one tensor, not the model. Errors (no such file, not safetensors, not a
    Wan DiT, a LoRA key that matches no tensor, a NaN in a weight) are one line naming the file,
    the key or the tensor.
    """
    from safetensors import safe_open

    from engine.lora import dense_deltas, wan_tensor_names
    from engine.wan.dit import HEAD_COUNT_KEY, ModelConfigError, WanModel, expected_shapes, infer_config

    src, dst = os.fspath(src), os.fspath(dst)
    try:
        qtype = quant_type(quant)
    except QuantizeError as exc:
        raise QuantizeError(f"{dst}: {exc}") from None
    if not os.path.isfile(src):
        raise QuantizeError(f"{src}: no such file")
    try:
        f = safe_open(src, framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError for any bad header
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"{src}: not a safetensors file ({why})") from None
    with f:
        original = wan_tensor_names(f.keys())
        source: dict[str, str] = {}  # original name -> the checkpoint's
        for name, wan_name in original.items():
            if wan_name in source:
                raise QuantizeError(f"{src}: tensors {source[wan_name]!r} and {name!r} are both {wan_name!r}")
            source[wan_name] = name
        if _SIGNATURE not in source:
            raise QuantizeError(f"{src}: not a Wan DiT (no {_SIGNATURE!r}, nor diffusers' 'blocks.0.attn1.to_q.weight')")
        slices = {wan_name: f.get_slice(name) for wan_name, name in source.items()}
        for wan_name, piece in slices.items():
            if piece.get_dtype() not in _FLOAT_DTYPES:
                raise QuantizeError(f"{src}: tensor {source[wan_name]!r} holds {piece.get_dtype()} values, not floats")
        shapes = {wan_name: tuple(piece.get_shape()) for wan_name, piece in slices.items()}
        try:
            # The head count is in no checkpoint and changes no tensor: checked as one head.
            cfg = infer_config(shapes, {HEAD_COUNT_KEY: 1})
        except ModelConfigError as exc:
            raise QuantizeError(f"{src}: {exc}") from None
        order = list(expected_shapes(cfg))
        known = set(order)
        if extra := [source[n] for n in shapes if n not in known]:
            raise QuantizeError(f"{src}: tensor {extra[0]!r} is not part of a Wan DiT"
                                + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))
        deltas = {}
        if loras:
            with torch.device("meta"):
                deltas = dense_deltas(WanModel(cfg), loras)
        layout = {name: (shapes[name], community_qtype(name, shapes[name], qtype)) for name in order}
        tallies: dict[str, TypeTally] = {}

        def blocks() -> Iterator[tuple[str, Any]]:
            for name in order:
                shape, tensor_type = layout[name]
                tally = tallies.setdefault(tensor_type.name, TypeTally())
                start = time.perf_counter()
                values = f.get_tensor(source[name]).to(torch.float32)
                if name in deltas:
                    values = values + deltas[name]().reshape(values.shape)
                raw = quantize(values, tensor_type, name=source[name])
                tally.tensors += 1
                tally.bytes_in += math.prod(shape) * _FLOAT_DTYPES[slices[name].get_dtype()]
                tally.bytes_out += raw.nbytes
                tally.seconds += time.perf_counter() - start
                yield name, raw

        parent = os.path.dirname(os.path.abspath(dst))
        os.makedirs(parent, exist_ok=True)
        carried = _carried_metadata(src, f.metadata() or {})
        write_gguf_stream(dst, "wan", layout, blocks(),
                          metadata={"general.quantization_version": QUANTIZATION_VERSION, **carried,
                                    **(metadata or {})})
    return tallies
