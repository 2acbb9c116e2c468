"""Loading GGUF weights into modules built on the meta device.

Two policies, chosen by memory, with the same model code:

- "dequantize_once": every weight is dequantized to the compute dtype at load.
- "on_the_fly": an `nn.Linear` whose weight is quantized in the file becomes a
  `QuantizedLinear` that keeps the raw blocks (a view of the memory map on the
  CPU) and dequantizes them in each forward; a quantized `nn.Embedding` (the
  umT5 token table, 256k x 4096 in the real encoder) becomes a
  `QuantizedEmbedding` that dequantizes only the rows it looks up.
"""
from __future__ import annotations

import os
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from torch import nn

from engine.gguf.dequant import dequantize
from engine.gguf.reader import GGUFFile, GGUFFormatError

WeightPolicy = Literal["dequantize_once", "on_the_fly"]

# Stored as plain floats: nothing is gained by keeping them "quantized".
FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})


class QuantizedLinear(nn.Module):
    """`y = x @ W.T + b` with W kept as GGML blocks and dequantized to `x.dtype` per call."""

    def __init__(
        self,
        raw: torch.Tensor,
        qtype: GGMLQuantizationType,
        shape: tuple[int, int],
        bias: torch.Tensor | None = None,
        name: str | None = None,
    ):
        super().__init__()
        if raw.dtype != torch.uint8:
            raise TypeError(f"QuantizedLinear needs uint8 raw blocks, got {raw.dtype}")
        self.qtype = GGMLQuantizationType(qtype)
        self.out_features, self.in_features = shape
        self.name = name
        # Not persistent: the blocks come from the GGUF file, never from a state dict.
        self.register_buffer("raw", raw, persistent=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The weight `[out_features, in_features]` as `dtype`, computed on `device` (default: where the blocks are)."""
        raw = self.raw if device is None else self.raw.to(device)
        return dequantize(raw, self.qtype, (self.out_features, self.in_features), dtype, name=self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype, x.device)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype.name}, bias={self.bias is not None}")


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` over GGML blocks: a lookup dequantizes just the rows of the ids asked for.

    GGML quantizes each row on its own (a row's length is a whole number of
    blocks), so row i is bytes [i*row_bytes, (i+1)*row_bytes) of the tensor and
    gathering raw rows then dequantizing them gives exactly the rows of the
    fully dequantized table.
    """

    def __init__(
        self,
        raw: torch.Tensor,
        qtype: GGMLQuantizationType,
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ):
        super().__init__()
        if raw.dtype != torch.uint8:
            raise TypeError(f"QuantizedEmbedding needs uint8 raw blocks, got {raw.dtype}")
        self.qtype = GGMLQuantizationType(qtype)
        self.num_embeddings, self.embedding_dim = shape
        self.name = name
        if raw.numel() % self.num_embeddings:
            raise ValueError(f"{name}: {raw.numel()} bytes do not split into {self.num_embeddings} rows")
        self.register_buffer("raw", raw.reshape(self.num_embeddings, -1), persistent=False)
        self.dtype = dtype  # what a lookup returns

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.raw.index_select(0, ids.reshape(-1).to(self.raw.device))
        values = dequantize(rows.reshape(-1), self.qtype, (rows.shape[0], self.embedding_dim), self.dtype, name=self.name)
        return values.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _listed(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def load_gguf_into(
    module: nn.Module,
    gguf_file: GGUFFile | str | os.PathLike[str],
    *,
    policy: WeightPolicy = "dequantize_once",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Materialise `module` (built under `torch.device("meta")`) from a GGUF file; returns it.

    Each file tensor (name without the `model.diffusion_model.` prefix, through
    `rename` when given) fills the parameter or persistent buffer of that name,
    dequantized to `dtype` on `device`. A file shape that differs from the
    module's only by size-1 axes (e.g. `.modulation` stored `[1, 6, dim]`) is
    reshaped. `skip(name)` (the file's name) drops file tensors the module does
    not use. Missing, unexpected or mis-shaped tensors raise `GGUFFormatError`
    before anything is loaded. Non-persistent buffers are the module's business.
    """
    if policy not in ("dequantize_once", "on_the_fly"):
        raise ValueError(f"unknown weight policy {policy!r}; use 'dequantize_once' or 'on_the_fly'")
    f = gguf_file if isinstance(gguf_file, GGUFFile) else GGUFFile(gguf_file)
    device = torch.device(device)

    # Every name of every parameter / persistent buffer; tied tensors share an id.
    expected = module.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(key)

    plan: dict[str, str] = {}  # module name -> file name
    unexpected: list[str] = []
    for file_name in f.tensor_names:
        if skip is not None and skip(file_name):
            continue
        target = rename(file_name) if rename is not None else file_name
        if target not in expected:
            unexpected.append(file_name if target == file_name else f"{file_name} (as {target})")
            continue
        if target in plan:
            raise GGUFFormatError(f.path, f"maps onto {target!r}, already filled by {plan[target]!r}", file_name)
        want, have = tuple(expected[target].shape), f.shape(file_name)
        if want != have and _squeezed(want) != _squeezed(have):
            raise GGUFFormatError(
                f.path, f"file shape {list(have)} does not match module shape {list(want)} ({target})", file_name
            )
        plan[target] = file_name
    if unexpected:
        raise GGUFFormatError(f.path, f"tensors the module does not have: {_listed(unexpected)}",
                              unexpected[0] if len(unexpected) == 1 else None)
    loaded = {id(expected[t]) for t in plan}
    missing = [names[0] for key_id, names in aliases.items() if key_id not in loaded]
    if missing:
        raise GGUFFormatError(f.path, f"module tensors missing from the file: {_listed(missing)}",
                              missing[0] if len(missing) == 1 else None)

    for target, file_name in plan.items():
        owner, attr = _owner(module, target)
        qtype = f.qtype(file_name)
        quantized = None
        if policy == "on_the_fly" and attr == "weight" and qtype not in FLOAT_TYPES:
            if type(owner) is nn.Linear:
                quantized = QuantizedLinear(f.raw(file_name).to(device), qtype,
                                            (owner.out_features, owner.in_features), bias=owner.bias, name=file_name)
            elif type(owner) is nn.Embedding and len(aliases[id(expected[target])]) == 1:  # a tied table stays dense
                quantized = QuantizedEmbedding(f.raw(file_name).to(device), qtype,
                                               (owner.num_embeddings, owner.embedding_dim), dtype=dtype, name=file_name)
        if quantized is not None:
            parent, child = _owner(module, target.rpartition(".")[0])
            setattr(parent, child, quantized)
            continue
        want = tuple(expected[target].shape)
        value = f.dequantize(file_name, dtype=dtype, device=device).reshape(want)
        tensor = expected[target]
        if isinstance(tensor, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        for alias in aliases[id(tensor)]:  # tied names all get the one new tensor
            alias_owner, alias_attr = _owner(module, alias)
            if isinstance(value, nn.Parameter):
                setattr(alias_owner, alias_attr, value)
            else:
                alias_owner._buffers[alias_attr] = value

    still_meta = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if still_meta:
        raise GGUFFormatError(f.path, f"module tensors were not loaded: {_listed(still_meta)}")
    return module
