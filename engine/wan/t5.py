"""The umT5-XXL text encoder of Wan2.1/2.2, with Hugging Face T5 attribute names.

The module tree mirrors `transformers`' `UMT5EncoderModel` (`shared`,
`encoder.block[i].layer[0].SelfAttention.q`, ...), so a safetensors file in
the HF layout (Comfy's `umt5_xxl_fp16.safetensors`) loads without renaming,
and a llama.cpp GGUF (`enc.blk.N.attn_q.weight`, ...) loads through the one
renaming table below.

umT5 differs from T5 in two ways that matter here: every layer has its own
relative-position bias (T5 shares layer 0's), and the FFN is gated-GELU. Like
all T5s, attention scores are not scaled by 1/sqrt(head_dim) (the scaling is
folded into the initialisation), and the layer norm is an RMS norm without
mean or bias whose variance is taken in float32.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from engine.gguf import GGUFFile, GGUFFormatError
from engine.gguf.linear import WeightPolicy, load_gguf_into
from engine.wan.tokenizer import Tokenizer

TEXT_LEN = 512  # Wan's text_len: the context the DiT attends to


class TextEncoderError(ValueError):
    """A text-encoder file that cannot be loaded: wrong format, missing or mis-shaped tensors."""


class _MissingTensor(TextEncoderError):
    def __init__(self, name: str) -> None:
        super().__init__(f"missing tensor {name!r}")
        self.name = name


@dataclass(frozen=True)
class UMT5Config:
    vocab: int
    dim: int
    heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


# google/umt5-xxl, the encoder every Wan2.1/2.2 model uses.
UMT5_XXL = UMT5Config(vocab=256384, dim=4096, heads=64, head_dim=64, ffn_dim=10240, num_layers=24)

_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
_BLOCK_NAME = re.compile(r"encoder\.block\.(\d+)\.")


def infer_config(shapes: Mapping[str, Sequence[int]]) -> UMT5Config:
    """The config from tensor shapes (HF names, PyTorch order): the one source safetensors and GGUF files share.

    heads come from the relative-position bias ([num_buckets, heads]), head_dim from
    q's output size. max_distance is stored in neither format: umT5's 128 is assumed.
    """
    def shape(name: str) -> Sequence[int]:
        if name not in shapes:
            raise _MissingTensor(name)
        if len(shapes[name]) != 2:
            raise TextEncoderError(f"tensor {name!r} has shape {list(shapes[name])}, expected a matrix")
        return shapes[name]

    embedding = next((n for n in _EMBEDDING_NAMES if n in shapes), _EMBEDDING_NAMES[0])
    vocab, dim = shape(embedding)
    num_buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner, _ = shape("encoder.block.0.layer.0.SelfAttention.q.weight")
    ffn_dim, _ = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    blocks = sorted({int(m.group(1)) for name in shapes if (m := _BLOCK_NAME.match(name))})
    if blocks != list(range(len(blocks))):  # before building encoder.block.0..<largest index>
        gap = next(i for i, b in enumerate(blocks) if i != b)
        raise TextEncoderError(f"encoder block indices run to {blocks[-1]} but 'encoder.block.{gap}.*' is missing")
    if min(vocab, dim, num_buckets, heads, inner, ffn_dim) <= 0:
        raise TextEncoderError(
            f"an axis of size 0: vocab {vocab}, dim {dim}, {num_buckets} buckets x {heads} heads, "
            f"q width {inner}, ffn {ffn_dim}"
        )
    if inner % heads:
        raise TextEncoderError(
            f"q projection width {inner} is not a multiple of the {heads} heads of the position bias"
        )
    return UMT5Config(
        vocab=vocab, dim=dim, heads=heads, head_dim=inner // heads, ffn_dim=ffn_dim,
        num_layers=len(blocks), num_buckets=num_buckets,
    )


class T5LayerNorm(nn.Module):
    """RMS norm: no mean, no bias; the variance in float32 even for half inputs."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """[length, length] bucket of (key position - query position), bidirectional (Mesh TensorFlow T5).

    Half the buckets for each direction; within a direction half of them are
    exact offsets 0..max_exact-1, the rest log-spaced up to max_distance.
    """
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    relative = relative.abs()
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    log_ratio = torch.log(relative.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        inner = config.heads * config.head_dim
        self.heads, self.head_dim = config.heads, config.head_dim
        self.q = nn.Linear(config.dim, inner, bias=False)
        self.k = nn.Linear(config.dim, inner, bias=False)
        self.v = nn.Linear(config.dim, inner, bias=False)
        self.o = nn.Linear(inner, config.dim, bias=False)
        self.relative_attention_bias = nn.Embedding(config.num_buckets, config.heads)

    def forward(self, x: Tensor, buckets: Tensor, key_padding: Tensor | None) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # No 1/sqrt(head_dim): T5 folds it into the weights' initialisation.
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)  # [heads, n, n]
        scores = (q @ k.transpose(-1, -2)).float() + bias.float()
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, None, :], torch.finfo(torch.float32).min)
        attn = scores.softmax(dim=-1).to(v.dtype)
        return self.o((attn @ v).transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, x: Tensor, buckets: Tensor, key_padding: Tensor | None) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), buckets, key_padding)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0(x)) * wi_1(x)): umT5's gated-GELU FFN."""

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.wi_1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.wo = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _fp16_clamp(x: Tensor) -> Tensor:
    # As the official Wan T5 and HF do: keep float16 activations finite.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config), T5LayerFF(config)])

    def forward(self, x: Tensor, buckets: Tensor, key_padding: Tensor | None) -> Tensor:
        x = _fp16_clamp(self.layer[0](x, buckets, key_padding))
        return _fp16_clamp(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList([T5Block(config) for _ in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.dim, config.eps)


class UMT5Encoder(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab, config.dim)
        self.encoder = T5Stack(config)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L] -> hidden [B, L, dim]; mask [B, L] (1 = token, 0 = padding) hides padded keys."""
        x = self.shared(ids)
        buckets = relative_position_buckets(ids.shape[1], self.config.num_buckets, self.config.max_distance, ids.device)
        key_padding = None if mask is None else mask.to(ids.device) == 0
        for block in self.encoder.block:
            x = block(x, buckets, key_padding)
        return self.encoder.final_layer_norm(x)


@torch.no_grad()
def encode_text(tokenizer: Tokenizer, encoder: UMT5Encoder, prompt: str, text_len: int = TEXT_LEN) -> Tensor:
    """Wan's text path: the prompt's hidden states [text_len, dim], zero beyond its tokens.

    The official code runs the encoder on the prompt padded to 512 with a mask
    and trims the output to the real token count; the masked padding does not
    reach the real tokens, so running the real tokens alone is the same
    computation on less work. The DiT later zero-pads the context to 512.
    """
    ids = tokenizer.encode(prompt, max_length=text_len)
    device = encoder.encoder.final_layer_norm.weight.device  # the token table may be a QuantizedEmbedding
    hidden = encoder(torch.tensor([ids], device=device))[0]
    out = hidden.new_zeros(text_len, hidden.shape[-1])
    out[: len(ids)] = hidden
    return out


# llama.cpp's T5 tensor names (gguf-py MODEL_TENSOR.ENC_*) <-> HF names.
_LLAMA_BLOCK_TO_HF = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_HF_BLOCK_TO_LLAMA = {hf: llama for llama, hf in _LLAMA_BLOCK_TO_HF.items()}
_LLAMA_TOP_TO_HF = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
_HF_TOP_TO_LLAMA = {hf: llama for llama, hf in _LLAMA_TOP_TO_HF.items()}
_LLAMA_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)\.(weight|bias)")


def llama_to_hf(name: str) -> str:
    """`enc.blk.3.attn_q.weight` -> `encoder.block.3.layer.0.SelfAttention.q.weight`; unknown names unchanged."""
    if m := _LLAMA_BLOCK.fullmatch(name):
        block, part, kind = m.groups()
        if part in _LLAMA_BLOCK_TO_HF:
            return f"encoder.block.{block}.{_LLAMA_BLOCK_TO_HF[part]}.{kind}"
        return name
    stem, _, kind = name.rpartition(".")
    return f"{_LLAMA_TOP_TO_HF[stem]}.{kind}" if stem in _LLAMA_TOP_TO_HF else name


def hf_to_llama(name: str) -> str:
    """The inverse of `llama_to_hf`; raises KeyError for a name llama.cpp has no slot for."""
    if m := _HF_BLOCK.fullmatch(name):
        block, part, kind = m.groups()
        if part in _HF_BLOCK_TO_LLAMA:
            return f"enc.blk.{block}.{_HF_BLOCK_TO_LLAMA[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem in _HF_TOP_TO_LLAMA:
        return f"{_HF_TOP_TO_LLAMA[stem]}.{kind}"
    if name == "encoder.embed_tokens.weight":
        return "token_embd.weight"
    raise KeyError(name)


def _infer_config_of(path: Path, shapes: Mapping[str, Sequence[int]], file_name: Callable[[str], str]) -> UMT5Config:
    try:
        return infer_config(shapes)
    except _MissingTensor as exc:
        raise TextEncoderError(f"{path}: missing tensor {file_name(exc.name)!r}") from None
    except TextEncoderError as exc:
        raise TextEncoderError(f"{path}: {exc}") from None


def _llama_name_or_same(name: str) -> str:
    try:
        return hf_to_llama(name)
    except KeyError:
        return name


def expected_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Name (HF layout) -> shape of every encoder tensor, in the module order."""
    with torch.device("meta"):
        model = UMT5Encoder(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(path: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Sequence[int]],
                   file_name: Callable[[str], str]) -> None:
    """Every model tensor present with its shape, nothing else; the error names the file and the tensor as stored."""
    for name, shape in expected.items():
        stored = file_name(name)
        if name not in found:
            raise TextEncoderError(f"{path}: missing tensor {stored!r} (expected shape {list(shape)})")
        if tuple(found[name]) != shape:
            raise TextEncoderError(
                f"{path}: tensor {stored!r} has shape {list(found[name])}, expected {list(shape)}"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        names = ", ".join(repr(file_name(n)) for n in unexpected[:5])
        raise TextEncoderError(f"{path}: unexpected tensors {names}{' ...' if len(unexpected) > 5 else ''}")


def _load_safetensors(path: Path, device: torch.device | str, dtype: torch.dtype) -> UMT5Encoder:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError kinds
        raise TextEncoderError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle as f:
        # model name -> name in the file. The token embedding may be stored as
        # shared.weight, encoder.embed_tokens.weight (tied copies) or both;
        # a full encoder-decoder checkpoint's decoder half is not ours to load.
        file_names: dict[str, str] = {}
        for name in f.keys():
            if name.startswith(("decoder.", "lm_head.")):
                continue
            if name == "encoder.embed_tokens.weight":
                file_names.setdefault("shared.weight", name)
                continue
            file_names[name] = name  # shared.weight wins over the tied copy
        shapes = {model_name: tuple(f.get_slice(name).get_shape()) for model_name, name in file_names.items()}
        config = _infer_config_of(path, shapes, lambda name: file_names.get(name, name))
        check_tensors(path, expected_shapes(config), shapes, lambda name: file_names.get(name, name))
        state: dict[str, Tensor] = {}
        for model_name, name in file_names.items():
            tensor = f.get_tensor(name)
            if not tensor.is_floating_point():
                raise TextEncoderError(f"{path}: tensor {name!r} has non-float dtype {tensor.dtype}")
            state[model_name] = tensor.to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    model.load_state_dict(state, assign=True)
    return model


def _decoder_half(llama_name: str) -> bool:
    # A full T5 conversion (architecture "t5") also holds dec.blk.N.* and the LM head.
    return llama_name.startswith(("dec.", "output."))


def _load_gguf(path: Path, device: torch.device | str, dtype: torch.dtype, policy: WeightPolicy) -> UMT5Encoder:
    try:
        f = GGUFFile(path)
    except GGUFFormatError as exc:
        raise TextEncoderError(str(exc)) from exc
    try:
        if f.kind != "umt5":
            raise TextEncoderError(f"{path}: a {f.kind!r} GGUF (general.architecture {f.architecture!r}), "
                                   "not a umT5 text encoder ('t5encoder')")
        shapes = {llama_to_hf(n): tuple(f.shape(n)) for n in f.tensor_names if not _decoder_half(n)}
        config = _infer_config_of(path, shapes, hf_to_llama)
        check_tensors(path, expected_shapes(config), shapes, _llama_name_or_same)
        with torch.device("meta"):
            model = UMT5Encoder(config)
        # F32 weights on the CPU stay views of the file's memory map, so f stays open with them.
        load_gguf_into(model, f, policy=policy, dtype=dtype, device=device, rename=llama_to_hf, skip=_decoder_half)
    except BaseException:
        f.close()
        raise
    return model


def load_text_encoder(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    policy: WeightPolicy = "dequantize_once",
) -> UMT5Encoder:
    """The umT5 encoder from a llama.cpp GGUF or an HF-layout safetensors file, ready for inference.

    `policy` applies to GGUF files ("dequantize_once" or "on_the_fly", see
    engine.gguf); safetensors weights are converted to `dtype` at load.
    Pickle-based files (.pth/.pt/.bin/.ckpt) are refused: loading them runs code.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise TextEncoderError(f"{path}: pickle checkpoints are not loaded (unpickling runs code); "
                               "convert it to .safetensors or .gguf")
    if suffix not in (".gguf", ".safetensors"):
        raise TextEncoderError(f"{path}: unknown text-encoder format {suffix!r} (expected .gguf or .safetensors)")
    if not path.is_file():
        raise TextEncoderError(f"{path}: no such file")
    if suffix == ".gguf":
        model = _load_gguf(path, device, dtype, policy)
    else:
        model = _load_safetensors(path, device, dtype)
    return model.eval().requires_grad_(False)
