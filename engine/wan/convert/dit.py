"""Community-layout Wan DiT GGUF files (city96 / QuantStack): which type each tensor takes, and the writer."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from engine.gguf.writer import write_gguf

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
