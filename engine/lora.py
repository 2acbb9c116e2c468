"""LoRAs for the Wan DiT: the file layouts people publish, read once, and applied for one job.

A LoRA file (safetensors) is read into a `LoraFile`: target -> the parts the
file gives for it. The prefixes `model.diffusion_model.`, `diffusion_model.`,
`transformer.` and `lora_unet_` are stripped; the layouts are

- ComfyUI / Kohya: `blocks.N.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha` (a scalar);
- PEFT: the same names with `lora_A` / `lora_B`;
- musubi-tuner: `lora_unet_blocks_N_self_attn_q.lora_down.weight`, dots written as underscores,
  so the target is found by matching the model's names with their dots replaced (at apply time);
- diffusers: `transformer.blocks.N.attn1.to_q.lora_A.weight`, mapped back to the original names
  (the reverse of diffusers' `convert_wan_transformer_to_diffusers`); `lora_B.bias` is a bias
  delta, scaled with its pair as peft does; a file diffusers saved with `lora_adapter_metadata`
  gets its `lora_alpha` (as diffusers reads it);
- the full deltas of extracted LoRAs (LightX2V and others): `<target>.diff` (weight),
  `<target>.diff_b` (bias), `blocks.N.diff_m` / `head.diff_m` (the modulation table; ComfyUI's
  generic `blocks.N.modulation.diff` is the same thing), a lone `head.head.diff`, and norm
  weights' `.diff` (applied, not dropped: they restore exactly like any parameter).

Scale, as ComfyUI: a low-rank pair adds strength x alpha / rank x (up @ down), rank the rows of
lora_down, alpha 1 x rank when the file has none; a full delta adds strength x delta.

`applied(model, [(lora, strength), ...])` installs LoRAs for the duration of a `with` block and
leaves the model exactly as it was: frames never depend on what the model rendered before, and
a quantized layer (`QuantizedLinear`, on_the_fly) is never re-quantized. Linear layers get a
side path, output + (x @ A^T) @ B^T (+ x @ D^T for full weight deltas), from a forward hook: the
module tree, its state dict and `model.to()` are untouched, and removing the hook is the whole
undo. Other parameters (modulation tables, biases, norm weights, the patch embedding) are
replaced by original + delta for the duration, and the original Parameter objects are put back.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import BinaryIO

import torch
import torch.nn as nn

from engine.gguf.linear import QuantizedLinear


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model; one line naming the file and the key(s)."""


PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
MUSUBI_PREFIX = "lora_unet_"

# Key suffix -> the part of its target it gives. `lora_B.bias` (diffusers, from a `diff_b` or
# trained with peft's lora_bias) is the bias of peft's lora_B layer: a bias delta that peft
# scales with the pair, by alpha / rank.
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_A.weight", "down"),
    (".lora_up.weight", "up"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".lora_B.bias", "up_bias"),
    (".diff_m", "diff_m"),
)
_PART_ORDER = ("down", "up", "alpha", "diff", "diff_b", "up_bias")
_PAIR_NAMES = {".lora_down.weight": ".lora_up.weight", ".lora_up.weight": ".lora_down.weight",
               ".lora_A.weight": ".lora_B.weight", ".lora_B.weight": ".lora_A.weight"}

# diffusers' names of the Wan DiT -> the original ones (diffusers swaps norm2 and norm3: its
# affine cross-attention norm is `norm2`; its VACE blocks call before/after_proj proj_in/proj_out).
_DIFFUSERS_TOP = {
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_DIFFUSERS_BLOCK = {
    **{f"attn1.to_{p}": f"self_attn.{p}" for p in "qkv"}, "attn1.to_out.0": "self_attn.o",
    **{f"attn2.to_{p}": f"cross_attn.{p}" for p in "qkv"}, "attn2.to_out.0": "cross_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "norm2": "norm3", "norm3": "norm2",
    "scale_shift_table": "modulation",
    "proj_in": "before_proj", "proj_out": "after_proj",
}
_BLOCK = re.compile(r"((?:vace_)?blocks\.\d+)\.(.+)")
# A name part only diffusers' layout has: a file with one is read as diffusers'.
_DIFFUSERS_PART = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|scale_shift_table|proj_in|proj_out)(\.|$)"
                             r"|(^|\.)ffn\.net\.")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers: the peft LoraConfig of the file, as JSON


# --- the file -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """What one file gives for one target (a module, or a parameter such as `blocks.N.modulation`)."""

    keys: tuple[str, ...]  # the file's keys for this target, for messages
    down: torch.Tensor | None = None  # lora_down / lora_A: [rank, in] (a conv: [rank, in, kt, kh, kw])
    up: torch.Tensor | None = None  # lora_up / lora_B: [out, rank] (a conv: [out, rank, 1, 1, 1])
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight (or parameter) delta
    diff_b: torch.Tensor | None = None  # bias delta at strength 1 (a lora_B.bias: times alpha / rank)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank for the low-rank pair at strength 1 (1 when the file gives no alpha)."""
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file, model-independent: target -> parts. Targets carry the original Wan names
    (`blocks.3.cross_attn.k_img`, `blocks.3.modulation`, `head.head`); a musubi file keeps its
    underscore names (`blocks_3_cross_attn_k_img`), matched against the model when applied."""

    path: str
    targets: Mapping[str, LoraTarget] = field(repr=False)
    layout: str  # "comfy", "peft", "musubi", "diffusers" or "diff" (full deltas only), for messages
    sha256: str  # of the file's bytes ('' when read from the header alone, read_lora_header)
    nbytes: int  # of the tensors, for the cache


def read_lora(path: str | os.PathLike, fs_open: Callable[[str], BinaryIO] | None = None) -> LoraFile:
    """Read a LoRA safetensors file (a local path or a pyarrow URI; `fs_open(path)` opens it instead
    when given). LoraError for a file that is not safetensors, has no LoRA keys or keys this
    reader does not know, a lora_down without its lora_up (or the reverse), a rank mismatch ..."""
    name = os.fspath(path)
    data = _read_bytes(name, fs_open)
    return _parse(name, data)


def _read_bytes(name: str, fs_open: Callable[[str], BinaryIO] | None) -> bytes:
    if fs_open is not None:
        try:
            with fs_open(name) as f:
                return f.read()
        except OSError as exc:
            raise LoraError(f"{name}: cannot read the LoRA file ({_first_line(exc)})") from None
    import pyarrow as pa

    from jobs.inputs import InputError, find_input

    try:
        file = find_input(name)
        with file.fs.open_input_file(file.path) as f:
            return f.read()
    except InputError as exc:
        raise LoraError(f"LoRA {_first_line(exc)}") from None
    except (OSError, pa.ArrowException) as exc:
        raise LoraError(f"{name}: cannot read the LoRA file ({_first_line(exc)})") from None


def _parse(name: str, data: bytes) -> LoraFile:
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception) for any bad header
        raise LoraError(f"{name}: not a safetensors file ({_first_line(exc)})") from None
    return _from_tensors(name, tensors, data, hashlib.sha256(data).hexdigest(),
                         sum(t.numel() * t.element_size() for t in tensors.values()))


# safetensors' dtype names -> torch's (those a LoRA file may hold; the integer ones are refused later).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_lora_header(path: str | os.PathLike) -> LoraFile:
    """A LoRA file as `read_lora` parses it, from its safetensors header alone: every tensor on the
    meta device (shapes and dtypes, no weights read) except the alpha scalars, read from the file.

    For checking a file against a model before anything renders (`check_lora`); the same LoraError
    as `read_lora` for whatever the header shows (no LoRA keys, unknown keys, a lone lora_down, a
    rank mismatch ...). Its `sha256` is empty: the bytes are not read.
    """
    import pyarrow as pa

    from jobs.inputs import InputError, find_input

    name = os.fspath(path)
    try:
        file = find_input(name)
        with file.fs.open_input_file(file.path) as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= size <= min(file.size - 8, 256 << 20):
                raise LoraError(f"{name}: not a safetensors file (no valid header)")
            raw = f.read(size)
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise LoraError(f"{name}: not a safetensors file (its header is not a JSON object)")
            header.pop("__metadata__", None)
            tensors = {}
            for key, entry in header.items():
                try:
                    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                    shape = [int(d) for d in entry["shape"]]
                    start, end = (int(o) for o in entry["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise LoraError(f"{name}: not a safetensors file ({key!r} has no valid dtype, shape and "
                                    f"data_offsets in the header)") from None
                count = math.prod(shape)
                if min(shape, default=0) < 0 or end - start != count * dtype.itemsize or end > file.size - 8 - size:
                    raise LoraError(f"{name}: not a safetensors file ({key!r}: its data_offsets do not hold "
                                    f"{shape} {entry['dtype']} values inside the file)")
                if key.endswith(".alpha") and count == 1:  # the one value a check needs
                    value = f.read_at(end - start, 8 + size + start)
                    tensors[key] = torch.frombuffer(bytearray(value), dtype=dtype).reshape(shape).clone()
                else:
                    tensors[key] = torch.empty(shape, dtype=dtype, device="meta")
    except InputError as exc:
        raise LoraError(f"LoRA {_first_line(exc)}") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        if isinstance(exc, LoraError):
            raise
        raise LoraError(f"{name}: not a safetensors file ({_first_line(exc)})") from None
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return _from_tensors(name, tensors, head + raw, "", nbytes)


def check_lora(model: nn.Module, lora: LoraFile) -> None:
    """LoraError naming the file and a key unless every key of `lora` fits a layer of `model`, as
    `applied` checks it (`model` may live on the meta device, `lora` come from `read_lora_header`)."""
    _plan(model, [(lora, 0.0)])  # strength 0: checked, nothing computed


def _from_tensors(name: str, tensors: dict[str, torch.Tensor], data: bytes, sha256: str, nbytes: int) -> LoraFile:
    """`data`: the file's bytes, or at least its 8-byte length and header (for the metadata alpha)."""
    if not tensors:
        raise LoraError(f"{name}: no LoRA keys (the file holds no tensors)")
    tensors = {key: tensors[key] for key in sorted(tensors)}  # safetensors gives no fixed order: messages need one

    stripped = {key: _strip(key) for key in tensors}
    diffusers = any(_DIFFUSERS_PART.search(body) for body, musubi in stripped.values() if not musubi)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in tensors.items():
        body, musubi = stripped[key]
        suffix, part = next(((s, p) for s, p in _SUFFIXES if body.endswith(s) and len(body) > len(s)), (None, None))
        if part is None:
            unknown.append(key)
            continue
        target = body[: -len(suffix)]
        if part == "diff_m":  # LightX2V: blocks.N.diff_m is the delta of blocks.N.modulation
            target, part = target + ("_modulation" if musubi else ".modulation"), "diff"
        if diffusers and not musubi:
            target = _from_diffusers(target)
        if not tensor.is_floating_point():
            raise LoraError(f"{name}: {key!r} holds {tensor.dtype} values, not floating point")
        slot = parts.setdefault(target, {})
        if part in slot:
            raise LoraError(f"{name}: {key!r} and {slot[part][0]!r} both give the {part} of {target!r}")
        slot[part] = (key, tensor)
    if unknown:
        if len(unknown) == len(tensors):
            raise LoraError(f"{name}: no LoRA keys ({len(tensors)} tensors, e.g. {unknown[0]!r})")
        raise LoraError(f"{name}: {len(unknown)} key{'s are' if len(unknown) > 1 else ' is'} not LoRA tensors this "
                        f"reader knows (lora_down/lora_up, lora_A/lora_B, alpha, diff, diff_b, diff_m), "
                        f"e.g. {unknown[0]!r}")

    metadata_alpha = _metadata_alpha(name, data)
    targets = {target: _target(name, target, slot, metadata_alpha) for target, slot in parts.items()}
    musubi = any(m for _, m in stripped.values())
    pairs = [key for key in tensors if key.endswith((".lora_A.weight", ".lora_B.weight"))]
    layout = ("musubi" if musubi else "diffusers" if diffusers else "peft" if pairs
              else "comfy" if any(t.down is not None for t in targets.values()) else "diff")
    return LoraFile(path=name, targets=MappingProxyType(targets), layout=layout, sha256=sha256, nbytes=nbytes)


def _strip(key: str) -> tuple[str, bool]:
    """(the key without its layout prefix, whether it is a musubi `lora_unet_` key)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], prefix == MUSUBI_PREFIX
    return key, False


def _from_diffusers(name: str) -> str:
    if name in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _DIFFUSERS_BLOCK:
        return f"{m.group(1)}.{_DIFFUSERS_BLOCK[m.group(2)]}"
    return name


def wan_tensor_names(names: Iterable[str]) -> dict[str, str]:
    """{tensor name of a DiT checkpoint: its original Wan name}, for a whole checkpoint's names.

    The prefixes `model.diffusion_model.`, `diffusion_model.` and `transformer.` are dropped; a
    checkpoint in diffusers' layout (a name with `attn1`, `condition_embedder`, `scale_shift_table`,
    `ffn.net.` ...) has its names mapped back as LoRA targets are (`blocks.0.attn1.to_q.weight` ->
    `blocks.0.self_attn.q.weight`, `blocks.0.norm2.weight` -> `blocks.0.norm3.weight`,
    `scale_shift_table` -> `head.modulation`). The layout is decided for the whole checkpoint, as
    for a LoRA file: in the original layout `norm2` stays `norm2`.
    """
    stripped = {}
    for name in names:
        prefix = next((p for p in PREFIXES if p != MUSUBI_PREFIX and name.startswith(p)), "")
        stripped[name] = name[len(prefix):]
    if not any(_DIFFUSERS_PART.search(body) for body in stripped.values()):
        return stripped
    return {name: _from_diffusers_tensor(body) for name, body in stripped.items()}


def _from_diffusers_tensor(name: str) -> str:
    mapped = _from_diffusers(name)  # a parameter named itself: scale_shift_table
    if mapped != name:
        return mapped
    module, dot, leaf = name.rpartition(".")
    return f"{_from_diffusers(module)}.{leaf}" if dot else name


def _target(name: str, target: str, slot: dict[str, tuple[str, torch.Tensor]],
            metadata_alpha: Callable[[int], float] | None) -> LoraTarget:
    keys = tuple(slot[part][0] for part in _PART_ORDER if part in slot)
    down, up, alpha = slot.get("down"), slot.get("up"), slot.get("alpha")
    if (down is None) != (up is None):
        key = (down or up)[0]
        suffix = next(s for s in _PAIR_NAMES if key.endswith(s))
        raise LoraError(f"{name}: {key!r} has no matching {key[: -len(suffix)] + _PAIR_NAMES[suffix]!r}")
    if alpha is not None and down is None:
        raise LoraError(f"{name}: {alpha[0]!r} has no lora_down/lora_up pair to scale")
    alpha_value = None
    if down is not None:
        (down_key, d), (up_key, u) = down, up
        if d.ndim < 2 or u.ndim < 2:
            bad_key, bad = (down_key, d) if d.ndim < 2 else (up_key, u)
            raise LoraError(f"{name}: {bad_key!r} has shape {list(bad.shape)}, not a matrix")
        if u.shape[1] != d.shape[0]:
            raise LoraError(f"{name}: rank mismatch for {target!r}: {down_key!r} has {d.shape[0]} rows "
                            f"({list(d.shape)}), {up_key!r} has {u.shape[1]} columns ({list(u.shape)})")
        if alpha is not None:
            if alpha[1].numel() != 1:
                raise LoraError(f"{name}: {alpha[0]!r} has shape {list(alpha[1].shape)}, not a scalar")
            alpha_value = float(alpha[1].item())
        elif metadata_alpha is not None:
            alpha_value = metadata_alpha(d.shape[0])
        if alpha_value is not None and not math.isfinite(alpha_value):
            raise LoraError(f"{name}: the alpha of {target!r} is {alpha_value}")
    diff_b = slot["diff_b"][1] if "diff_b" in slot else None
    if "up_bias" in slot:
        if diff_b is not None:
            raise LoraError(f"{name}: {slot['up_bias'][0]!r} and {slot['diff_b'][0]!r} both give the bias delta "
                            f"of {target!r}")
        diff_b = slot["up_bias"][1]
        if alpha_value is not None:
            diff_b = diff_b.float() * (alpha_value / down[1].shape[0])
    return LoraTarget(
        keys=keys, down=None if down is None else down[1], up=None if up is None else up[1], alpha=alpha_value,
        diff=slot["diff"][1] if "diff" in slot else None, diff_b=diff_b,
    )


def _metadata_alpha(name: str, data: bytes) -> Callable[[int], float] | None:
    """rank -> alpha from diffusers' `lora_adapter_metadata` (the LoraConfig it saved), or None.

    diffusers (peft) scales a pair by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    """
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8: 8 + size]).get("__metadata__") or {}
        raw = header.get(_METADATA_KEY)
        if raw is None:
            return None
        config = json.loads(raw)
    except (struct.error, ValueError, AttributeError) as exc:
        raise LoraError(f"{name}: unreadable {_METADATA_KEY!r} metadata ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{name}: {_METADATA_KEY!r} metadata is not a JSON object")
    # A pipeline's save_lora_weights prefixes the config's keys with the component ("transformer.").
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("use_dora"):
        raise LoraError(f"{name}: a DoRA adapter ({_METADATA_KEY} use_dora): not supported")
    if config.get("alpha_pattern"):
        raise LoraError(f"{name}: per-layer alphas ({_METADATA_KEY} alpha_pattern): not supported")
    lora_alpha = config.get("lora_alpha")
    if lora_alpha is None:
        return None
    if not isinstance(lora_alpha, (int, float)):
        raise LoraError(f"{name}: {_METADATA_KEY} lora_alpha = {lora_alpha!r} is not a number")
    if config.get("use_rslora"):
        return lambda rank: lora_alpha * math.sqrt(rank)  # alpha / rank = lora_alpha / sqrt(rank)
    return lambda rank: float(lora_alpha)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the cache ------------------------------------------------------------------------


class LoraCache:
    """Parsed LoRA files, LRU, bounded to `max_bytes` of tensors; keyed by the content digest
    (by the path when no digest is given). A file larger than the bound is read but not kept."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], LoraFile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, sha256: str | None = None) -> LoraFile:
        key = ("sha256", sha256) if sha256 is not None else ("path", os.fspath(path))
        with self._lock:
            lora = self._entries.get(key)
            if lora is not None:
                self.hits += 1
                self._entries.move_to_end(key)
                return lora
            self.misses += 1
        lora = read_lora(path)
        if sha256 is not None and lora.sha256 != sha256:
            raise LoraError(f"{path}: its bytes have sha256 {lora.sha256}, not {sha256} "
                            f"(the file changed since it was named)")
        with self._lock:
            if lora.nbytes <= self.max_bytes and key not in self._entries:
                self._entries[key] = lora
                self.bytes += lora.nbytes
                while self.bytes > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self.bytes -= evicted.nbytes
        return lora

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Whether a digest (or a path read without one) is cached."""
        return ("sha256", key) in self._entries or ("path", key) in self._entries


# --- applying -------------------------------------------------------------------------


class _SidePath:
    """What LoRAs add to one linear layer's output: (x @ A^T) @ B^T with the pairs of all LoRAs
    concatenated along the rank (each A scaled by strength x alpha / rank), plus x @ D^T for the
    sum of the full weight deltas. Kept as float32 masters; the copies the layer computes with
    (its device and compute dtype) are made on first use, one per device, as experts move."""

    def __init__(self, down: torch.Tensor | None, up: torch.Tensor | None, dense: torch.Tensor | None):
        self.master = (down, up, dense)
        self.copies: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor | None, ...]] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        copies = self.copies.get((device, dtype))
        if copies is None:
            copies = tuple(None if t is None else t.to(device=device, dtype=dtype) for t in self.master)
            self.copies[(device, dtype)] = copies
        return copies

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        down, up, dense = self.on(output.device, output.dtype)  # the layer's compute dtype: x's
        x = x.to(output.dtype)
        # In place on the layer's fresh output: one read and one write of it per term (addmm's
        # beta = 1), no [tokens, out] temporary.
        out = output.contiguous()
        flat, xs = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        if down is not None:
            flat.addmm_(xs @ down.T, up.T)
        if dense is not None:
            flat.addmm_(xs, dense.T)
        return out


@dataclass
class _Plan:
    side_paths: dict[nn.Module, _SidePath]
    parameters: dict[tuple[nn.Module, str], torch.Tensor]  # (owner, name) -> float32 delta


@contextlib.contextmanager
def applied(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> Iterator[None]:
    """Installs the LoRAs (strength each) on `model` for the duration; on exit the model is exactly as before.

    Every key of every file is checked against the model before anything is installed: a key
    that matches no layer, or a shape that does not fit its layer, is a LoraError. Several LoRAs
    on one layer add up in order. Works under both weight policies (`nn.Linear`,
    `QuantizedLinear`) and for every family's `WanModel` (VACE blocks, the I2V image branch).
    """
    plan = _plan(model, loras)
    undo: list[Callable[[], None]] = []
    try:
        for module, side_path in plan.side_paths.items():
            undo.append(module.register_forward_hook(side_path, with_kwargs=True).remove)
        for (owner, attr), delta in plan.parameters.items():
            original = owner._parameters[attr]
            merged = (original.detach().float() + delta.to(original.device)).to(original.dtype)
            setattr(owner, attr, nn.Parameter(merged, requires_grad=original.requires_grad))
            undo.append(functools.partial(_put_back, owner, attr, original))
        yield
    finally:
        for step in reversed(undo):
            step()


def dense_deltas(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> dict[str, Callable[[], torch.Tensor]]:
    """What the LoRAs add to each parameter of `model`, for merging them into the weights.

    {parameter name: a function computing its float32 delta, in the parameter's shape}: for a linear
    weight the sum of strength x alpha / rank x up @ down over the LoRAs, plus strength x each full
    `.diff`; for every other parameter (biases, norms, modulation tables, the patch embedding) what
    `applied` adds to it. Every key is checked as `applied` checks it (a key that matches no layer
    is a LoraError naming the file and the key). `model` may live on the meta device; a delta is
    only made when its function is called, so a caller can merge one weight at a time.
    """
    plan = _plan(model, loras)
    names = {module: name for name, module in model.named_modules()}
    deltas: dict[str, Callable[[], torch.Tensor]] = {}
    for (owner, attr), delta in plan.parameters.items():
        deltas[f"{names[owner]}.{attr}" if names[owner] else attr] = functools.partial(torch.Tensor.clone, delta)
    for module, side_path in plan.side_paths.items():
        if any(t is not None for t in side_path.master):  # a layer given a bias delta alone has an empty side path
            deltas[f"{names[module]}.weight"] = functools.partial(_weight_delta, *side_path.master)
    return deltas


def _weight_delta(down: torch.Tensor | None, up: torch.Tensor | None, dense: torch.Tensor | None) -> torch.Tensor:
    # The side path adds (x @ down^T) @ up^T + x @ dense^T: the weight delta is up @ down + dense.
    if down is None:
        return dense.clone()
    product = up @ down
    return product if dense is None else product.add_(dense)


def _put_back(owner: nn.Module, attr: str, original: nn.Parameter) -> None:
    current = owner._parameters[attr]
    if current.device != original.device:
        # The model moved (an expert swapped out) while the merged copy was installed:
        # the original goes where `model.to()` would have taken it.
        original.data = original.data.to(current.device)
    setattr(owner, attr, original)


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _plan(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> _Plan:
    """Check every LoRA against the model (LoraError on the first file with a problem), then sum
    what each layer gets, in float32."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    underscored: dict[str, str | None] = {}
    for dotted in (*modules, *params):
        flat = dotted.replace(".", "_")
        underscored[flat] = None if underscored.get(flat, dotted) != dotted else dotted  # None: two names

    def site(target: str) -> tuple[str, nn.Module, str] | None:
        """("linear", layer, ""), ("module", module with a weight, ""), ("param", owner, name) or None."""
        if target not in modules and target not in params:
            target = underscored.get(target) or ""
        if target in modules and target:
            module = modules[target]
            if isinstance(module, (nn.Linear, QuantizedLinear)):
                return "linear", module, ""
            if isinstance(module._parameters.get("weight"), nn.Parameter):
                return "module", module, ""
            return None
        if target in params:
            owner, _, attr = target.rpartition(".")
            return "param", modules[owner], attr
        return None

    checked = []
    for lora, strength in loras:
        if not isinstance(lora, LoraFile):
            raise TypeError(f"applied() takes (LoraFile, strength) pairs, got {type(lora).__name__}")
        strength = float(strength)
        if not math.isfinite(strength):
            raise LoraError(f"{lora.path}: strength {strength} is not a finite number")
        unmatched, sites = [], []
        for target, parts in lora.targets.items():
            where = site(target)
            if where is None:
                unmatched.extend(parts.keys)
            else:
                sites.append((target, parts, where))
        if unmatched:
            n = len(unmatched)
            raise LoraError(f"{lora.path}: {n} key{'s match' if n > 1 else ' matches'} no layer of this model, "
                            f"e.g. {unmatched[0]!r}")
        for target, parts, where in sites:
            _check_shapes(lora.path, target, parts, where)
        checked.append((strength, sites))

    side: dict[nn.Module, list] = {}  # layer -> [downs, ups, dense]
    parameters: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def add(owner: nn.Module, attr: str, delta: torch.Tensor) -> None:
        shape = owner._parameters[attr].shape
        delta = delta.reshape(shape)
        key = (owner, attr)
        parameters[key] = delta if key not in parameters else parameters[key] + delta

    for strength, sites in checked:
        if strength == 0:
            continue
        for target, parts, (kind, owner, attr) in sites:
            if kind == "param":
                add(owner, attr, strength * parts.diff.float())
                continue
            if parts.diff_b is not None:
                add(owner, "bias", strength * parts.diff_b.float())
            if kind == "module":
                if parts.down is not None:
                    product = parts.up.flatten(1).float() @ parts.down.flatten(1).float()
                    add(owner, "weight", strength * parts.scale * product)
                if parts.diff is not None:
                    add(owner, "weight", strength * parts.diff.float())
                continue
            downs, ups, dense = side.setdefault(owner, [[], [], None])
            if parts.down is not None:
                downs.append(parts.down.float() * (strength * parts.scale))
                ups.append(parts.up.float())
            if parts.diff is not None:
                term = strength * parts.diff.float()
                side[owner][2] = term if dense is None else dense + term
    side_paths = {
        module: _SidePath(torch.cat(downs) if downs else None, torch.cat(ups, dim=1) if ups else None, dense)
        for module, (downs, ups, dense) in side.items()
    }
    return _Plan(side_paths, parameters)


def _check_shapes(path: str, target: str, parts: LoraTarget, where: tuple[str, nn.Module, str]) -> None:
    kind, owner, attr = where

    def fail(key_part: str, have: Sequence[int], want: Sequence[int]) -> None:
        key = next((k for k in parts.keys if _part_of(k) == key_part), parts.keys[0])
        raise LoraError(f"{path}: {key!r} has shape {list(have)}, but {target!r} takes {list(want)}")

    if kind == "param":
        param = owner._parameters[attr]
        if parts.down is not None or parts.diff_b is not None:
            key = next(k for k in parts.keys if _part_of(k) in ("down", "diff_b"))
            raise LoraError(f"{path}: {key!r}: {target!r} is a parameter, it takes a full delta (.diff) only")
        if _squeezed(parts.diff.shape) != _squeezed(param.shape):
            fail("diff", parts.diff.shape, param.shape)
        return
    bias = owner._parameters.get("bias")
    if parts.diff_b is not None:
        if bias is None:
            key = next(k for k in parts.keys if _part_of(k) == "diff_b")
            raise LoraError(f"{path}: {key!r}: layer {target!r} has no bias")
        if _squeezed(parts.diff_b.shape) != _squeezed(bias.shape):
            fail("diff_b", parts.diff_b.shape, bias.shape)
    if kind == "linear":
        out_features, in_features = owner.out_features, owner.in_features
        if parts.down is not None:
            rank = parts.rank
            if tuple(parts.down.shape) != (rank, in_features):
                fail("down", parts.down.shape, (rank, in_features))
            if tuple(parts.up.shape) != (out_features, rank):
                fail("up", parts.up.shape, (out_features, rank))
        if parts.diff is not None and tuple(parts.diff.shape) != (out_features, in_features):
            fail("diff", parts.diff.shape, (out_features, in_features))
        return
    weight = owner._parameters["weight"]
    if parts.down is not None:
        rank = parts.rank
        if weight.ndim < 2 or tuple(parts.down.shape[1:]) != tuple(weight.shape[1:]):
            fail("down", parts.down.shape, (rank, *weight.shape[1:]))
        if parts.up.shape[0] != weight.shape[0] or any(d != 1 for d in parts.up.shape[2:]):
            fail("up", parts.up.shape, (weight.shape[0], rank, *[1] * (weight.ndim - 2)))
    if parts.diff is not None and _squeezed(parts.diff.shape) != _squeezed(weight.shape):
        fail("diff", parts.diff.shape, weight.shape)


def _part_of(key: str) -> str | None:
    part = next((part for suffix, part in _SUFFIXES if key.endswith(suffix)), None)
    return {"diff_m": "diff", "up_bias": "diff_b"}.get(part, part)
