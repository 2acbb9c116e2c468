"""The Wan diffusion transformer (DiT), as wan/modules/model.py of Wan2.1 and Wan2.2 defines it.

One model for every variant: Wan2.1 T2V, the Wan2.2 A14B experts (T2V 16 -> 16
channels; I2V 36 -> 16, the caller concatenating [noise 16; mask 4; image
latent 16] along channels), Wan2.2 TI2V-5B (48 -> 48, one timestep per token
so the image's first frame can sit at t = 0), Wan2.1 I2V-14B (36 -> 16 as
I2V-A14B, plus an image branch: `img_emb` maps the 257 CLIP image tokens into
the context, and each cross-attention attends to them with its own `k_img` /
`v_img`), and VACE (Wan2.1 VACE 1.3B / 14B, the Wan2.2 VACE-Fun A14B experts:
a T2V model plus `vace_blocks` that turn a 96-channel conditioning latent into
hints added to the main blocks' outputs). Wan2.1 FLF2V files
(`img_emb.emb_pos`) are recognised and refused.

Module attribute names equal the names of the original checkpoint
(`blocks.N.self_attn.q.weight`, `head.modulation`, ...), which are also the
names in the community GGUF files (city96 / QuantStack), so a state dict loads
without a renaming table. The files carry no hyper-parameters: `infer_config`
reads them off the tensor shapes (every published Wan model has head dim 128).

Precision follows the official code: the residual stream, the time embedding
and projection, the modulation tables, the gated residual adds, the head and
the rotary embedding are float32 (the official `amp.autocast(float32)`
regions); the linear layers, the attention and the text and image embeddings
run in the compute dtype (the weights' dtype, e.g. bfloat16), their LayerNorms
in float32. In float32 every cast below is a no-op.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.gguf.linear import load_gguf_into
from engine.gguf.reader import GGUFFile


class ModelConfigError(ValueError):
    """A DiT state dict / file whose tensors do not make a Wan model we run (missing or mis-shaped
    tensor, or a variant not supported yet)."""


# --- configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = None  # width of the CLIP image tokens (1280) for Wan2.1 I2V; None: no image branch
    # VACE: the main blocks after which the VACE hints are added (hint k after block vace_layers[k]),
    # and the channels of the conditioning latent (96); None: not a VACE model.
    vace_layers: tuple[int, ...] | None = None
    vace_in_dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# Published sizes (wan/configs/*.py of Wan2.1 and Wan2.2). The Wan2.2 T2V-A14B
# experts have exactly the shapes of Wan2.1 T2V-14B; Wan2.1 I2V-14B and the
# I2V-A14B experts take 36 input channels (noise 16, mask 4, image latent 16),
# and only Wan2.1 I2V-14B has the image branch (CLIP ViT-H/14 tokens, 1280 wide).
_SHARED = dict(text_dim=4096, freq_dim=256, text_len=512, patch_size=(1, 2, 2), eps=1e-6)
WAN_CONFIGS: dict[str, WanConfig] = {
    "t2v-1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, **_SHARED),
    "t2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16, **_SHARED),
    "i2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16,
                         image_dim=1280, **_SHARED),
    "t2v-A14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16, **_SHARED),
    "i2v-A14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16, **_SHARED),
    "ti2v-5B": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, **_SHARED),
    # Wan2.1 VACE (official wan/configs/wan_t2v_*.py + vace_layers); the Wan2.2 VACE-Fun A14B
    # experts have the shapes of Wan2.1 VACE-14B.
    "vace-1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16,
                           vace_layers=tuple(range(0, 30, 2)), vace_in_dim=96, **_SHARED),
    "vace-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16,
                          vace_layers=tuple(range(0, 40, 5)), vace_in_dim=96, **_SHARED),
}

HEAD_DIM = 128  # every published Wan DiT
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches and the class token (Wan2.1 I2V)
HEAD_COUNT_KEY = "wan.attention.head_count"  # only tiny test models carry it
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_VACE_BLOCK = re.compile(r"vace_blocks\.(\d+)\.")


def config_name(cfg: WanConfig) -> str | None:
    """The first published size equal to `cfg` ("t2v-14B" for the shape-identical T2V-A14B experts), or None."""
    return next((name for name, known in WAN_CONFIGS.items() if known == cfg), None)


def expected_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Wan DiT with `cfg` (the original checkpoint layout)."""
    d, pt, ph, pw = cfg.dim, *cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    if cfg.image_dim is not None:
        c = cfg.image_dim
        for i, width in ((0, c), (4, d)):  # LayerNorms with weight and bias
            shapes[f"img_emb.proj.{i}.weight"] = (width,)
            shapes[f"img_emb.proj.{i}.bias"] = (width,)
        shapes["img_emb.proj.1.weight"] = (c, c)
        shapes["img_emb.proj.1.bias"] = (c,)
        shapes["img_emb.proj.3.weight"] = (d, c)
        shapes["img_emb.proj.3.bias"] = (d,)
    for i in range(cfg.num_layers):
        shapes.update(_block_shapes(cfg, f"blocks.{i}."))
    if cfg.vace_layers is not None:
        shapes["vace_patch_embedding.weight"] = (d, cfg.vace_in_dim, pt, ph, pw)
        shapes["vace_patch_embedding.bias"] = (d,)
        for k in range(len(cfg.vace_layers)):
            p = f"vace_blocks.{k}."
            shapes.update(_block_shapes(cfg, p))
            for proj in ("before_proj", "after_proj") if k == 0 else ("after_proj",):
                shapes[f"{p}{proj}.weight"] = (d, d)
                shapes[f"{p}{proj}.bias"] = (d,)
    shapes["head.head.weight"] = (cfg.out_dim * pt * ph * pw, d)
    shapes["head.head.bias"] = (cfg.out_dim * pt * ph * pw,)
    shapes["head.modulation"] = (1, 2, d)
    return shapes


def _block_shapes(cfg: WanConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of one transformer block whose names start with `p`."""
    d = cfg.dim
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}{attn}.{proj}.weight"] = (d, d)
            shapes[f"{p}{attn}.{proj}.bias"] = (d,)
        if cfg.qk_norm:
            shapes[f"{p}{attn}.norm_q.weight"] = (d,)
            shapes[f"{p}{attn}.norm_k.weight"] = (d,)
    if cfg.image_dim is not None:
        for proj in ("k_img", "v_img"):
            shapes[f"{p}cross_attn.{proj}.weight"] = (d, d)
            shapes[f"{p}cross_attn.{proj}.bias"] = (d,)
        if cfg.qk_norm:
            shapes[f"{p}cross_attn.norm_k_img.weight"] = (d,)
    if cfg.cross_attn_norm:
        shapes[f"{p}norm3.weight"] = (d,)
        shapes[f"{p}norm3.bias"] = (d,)
    shapes[f"{p}ffn.0.weight"] = (cfg.ffn_dim, d)
    shapes[f"{p}ffn.0.bias"] = (cfg.ffn_dim,)
    shapes[f"{p}ffn.2.weight"] = (d, cfg.ffn_dim)
    shapes[f"{p}ffn.2.bias"] = (d,)
    shapes[f"{p}modulation"] = (1, 6, d)
    return shapes


def _squeeze_leading(shape: tuple[int, ...]) -> tuple[int, ...]:
    # A modulation table may be stored [6, dim] instead of [1, 6, dim].
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


# Variants with modules `WanModel` does not have yet -> name parts only their files hold
# (Wan2.1 FLF2V files are Wan2.1 I2V models given two images: the same branch plus
# a position embedding over the 2 x 257 image tokens).
UNSUPPORTED_VARIANTS = {
    "Wan2.1 FLF2V": ("img_emb.emb_pos",),
}
# Name parts of the Wan2.1 I2V image branch (`img_emb`, and per block `cross_attn.k_img` ...).
_IMAGE_BRANCH = ("img_emb.", ".cross_attn.k_img.", ".cross_attn.v_img.", ".cross_attn.norm_k_img.")


def infer_config(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, Any] | None = None) -> WanConfig:
    """The `WanConfig` of a DiT state dict, from its tensor shapes (PyTorch order).

    Published files carry no hyper-parameters; the head count is dim // 128
    unless `metadata` has `wan.attention.head_count` (tiny test models).
    A file with any tensor of the image branch (`img_emb.*`,
    `blocks.N.cross_attn.k_img` ...) is a Wan2.1 I2V model and must have all of
    it; `image_dim` is the input width of `img_emb.proj.1`. A file with
    `vace_blocks.K` is a VACE model: the files do not say after which main
    blocks the K hints go, so they are spread evenly, block i x (layers // K)
    (1.3B: 30 layers, 15 VACE blocks -> 0, 2, ..., 28; 14B and VACE-Fun A14B:
    40 and 8 -> 0, 5, ..., 35, the official `vace_layers`). Checks every
    tensor the model needs; raises `ModelConfigError` naming the first one
    missing or mis-shaped, or the variant (Wan2.1 FLF2V) that is not supported yet.
    """
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    for variant, parts in UNSUPPORTED_VARIANTS.items():
        if found := next((name for name in sorted(shapes) if any(part in name for part in parts)), None):
            raise ModelConfigError(f"a {variant} DiT (it has {found!r}): {variant} is not supported yet")

    def need(name: str, ndim: int) -> tuple[int, ...]:
        if name not in shapes:
            raise ModelConfigError(f"tensor {name!r} is missing: not a Wan DiT state dict")
        if len(shapes[name]) != ndim:
            raise ModelConfigError(f"tensor {name!r} has shape {list(shapes[name])}, expected {ndim} dimensions")
        return shapes[name]

    dim, in_dim, *patch = need("patch_embedding.weight", 5)
    patch_size = tuple(patch)
    text_dim = need("text_embedding.0.weight", 2)[1]
    freq_dim = need("time_embedding.0.weight", 2)[1]
    ffn_dim = need("blocks.0.ffn.0.weight", 2)[0]
    head_out = need("head.head.weight", 2)[0]
    if head_out % math.prod(patch_size):
        raise ModelConfigError(
            f"tensor 'head.head.weight' has {head_out} rows, not a multiple of the patch volume {patch_size}"
        )
    blocks = sorted({int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))})
    if blocks != list(range(len(blocks))):  # before planning blocks.0..blocks.<largest index>
        gap = next(i for i, b in enumerate(blocks) if i != b)
        raise ModelConfigError(f"block indices run to {blocks[-1]} but 'blocks.{gap}.*' is missing")
    num_layers = len(blocks)
    image_dim = None
    if any(part in name for name in shapes for part in _IMAGE_BRANCH):
        image_dim = need("img_emb.proj.1.weight", 2)[1]
    vace_layers = vace_in_dim = None
    vace_blocks = sorted({int(m.group(1)) for name in shapes if (m := _VACE_BLOCK.match(name))})
    if vace_blocks or "vace_patch_embedding.weight" in shapes:
        if vace_blocks != list(range(len(vace_blocks))):
            gap = next(i for i, b in enumerate(vace_blocks) if i != b)
            raise ModelConfigError(f"VACE block indices run to {vace_blocks[-1]} but 'vace_blocks.{gap}.*' is missing")
        if not vace_blocks or len(vace_blocks) > num_layers:
            raise ModelConfigError(f"a VACE DiT with {len(vace_blocks)} VACE blocks ('vace_blocks.N.*') for "
                                   f"{num_layers} main blocks: expected between 1 and {num_layers}")
        step = num_layers // len(vace_blocks)
        vace_layers = tuple(range(0, step * len(vace_blocks), step))
        vace_in_dim = need("vace_patch_embedding.weight", 5)[1]

    head_count = (metadata or {}).get(HEAD_COUNT_KEY)
    if head_count is not None:
        if type(head_count) is not int:
            raise ModelConfigError(f"metadata {HEAD_COUNT_KEY!r} = {head_count!r} is not an integer")
        num_heads = head_count
    elif dim % HEAD_DIM == 0:
        num_heads = dim // HEAD_DIM
    else:
        raise ModelConfigError(
            f"dim {dim} (from 'patch_embedding.weight') is not a multiple of the head dim {HEAD_DIM}, "
            f"and the metadata has no {HEAD_COUNT_KEY!r}"
        )
    if num_heads <= 0 or dim % num_heads or (dim // num_heads) % 2:
        raise ModelConfigError(f"dim {dim} does not split into {num_heads} heads of an even size")

    cfg = WanConfig(
        dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_dim=in_dim,
        out_dim=head_out // math.prod(patch_size), text_dim=text_dim, freq_dim=freq_dim,
        patch_size=patch_size, eps=1e-6,
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes, image_dim=image_dim,
        vace_layers=vace_layers, vace_in_dim=vace_in_dim,
    )
    for name, shape in expected_shapes(cfg).items():
        if name not in shapes:
            raise ModelConfigError(f"tensor {name!r} is missing (a Wan DiT with {num_layers} blocks needs it)")
        if _squeeze_leading(shapes[name]) != _squeeze_leading(shape):
            raise ModelConfigError(f"tensor {name!r} has shape {list(shapes[name])}, expected {list(shape)}")
    return cfg


# --- embeddings -----------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float32: cos half first, 10000^(-i/half), computed in float64 (official)."""
    half = dim // 2
    t = t.to(torch.float64)
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, inv)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head dims given to frames / height / width: d - 4(d//6), 2(d//6), 2(d//6) (44/42/42 for d=128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_table(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """complex64 [f*h*w, 1, head_dim/2]: e^(i * pos * theta^(-2j/n)) per axis, angles in float64 (official)."""
    f, h, w = grid
    parts = []
    for n, axis_dim in zip(grid, rope_axis_dims(head_dim)):
        inv = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        parts.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv))
    angles = torch.cat([
        parts[0].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, L, heads, d] by freqs [L, 1, d/2] in float32 (a complex multiply)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2)


# --- layers ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """WanRMSNorm: over the full dim (all heads), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


class LayerNorm(nn.Module):
    """WanLayerNorm: float32; `norm1`, `norm2`, `head.norm` have no weights, `norm3` has."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), weight, bias, self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, Lq, heads, d] q, [B, Lk, heads, d] k/v -> [B, Lq, heads * d] (heads concatenated)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return y.transpose(1, 2).flatten(2)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, L, heads, d] q/k/v -> [B, L, dim] projected output."""
        return self.o(attention(q, k, v))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads)
        k = self.norm_k(self.k(x)).unflatten(2, heads)
        v = self.v(x).unflatten(2, heads)
        # RoPE in float32, attention back in the compute dtype (official: rope_apply, then flash attention).
        q = apply_rope(q, freqs).to(v.dtype)
        k = apply_rope(k, freqs).to(v.dtype)
        return self.attend(q, k, v)


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention: queries from the video tokens, keys/values from the (padded) text context."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads)
        k = self.norm_k(self.k(context)).unflatten(2, heads)
        v = self.v(context).unflatten(2, heads)
        return self.attend(q, k, v)


class WanI2VCrossAttention(WanCrossAttention):
    """Wan2.1 I2V cross-attention: the context is [image tokens; `text_len` text tokens]. The same
    queries attend to the text (k, v, norm_k) and, separately, to the image (k_img, v_img,
    norm_k_img); `o` projects the sum of the two (official WanI2VCrossAttention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, text_len: int):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.text_len = text_len
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        # Official: the image tokens are whatever precedes the last text_len (512) tokens.
        image, text = context[:, :-self.text_len], context[:, -self.text_len:]
        q = self.norm_q(self.q(x)).unflatten(2, heads)
        k = self.norm_k(self.k(text)).unflatten(2, heads)
        v = self.v(text).unflatten(2, heads)
        k_img = self.norm_k_img(self.k_img(image)).unflatten(2, heads)
        v_img = self.v_img(image).unflatten(2, heads)
        return self.o(attention(q, k, v) + attention(q, k_img, v_img))


class MLPProj(nn.Module):
    """`img_emb`: CLIP image tokens [B, N, image_dim] -> context tokens [B, N, dim] (official MLPProj:
    LayerNorm, Linear, exact GELU, Linear, LayerNorm; torch's LayerNorm defaults, affine, eps 1e-5)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(image_dim, 1e-5, elementwise_affine=True), nn.Linear(image_dim, image_dim), nn.GELU(),
            nn.Linear(image_dim, dim), LayerNorm(dim, 1e-5, elementwise_affine=True),
        )

    def forward(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Returns `dtype`: the norms compute in float32 (autocast's rule for layer_norm), the linears in `dtype`."""
        norm_in, fc1, gelu, fc2, norm_out = self.proj
        return norm_out(fc2(gelu(fc1(norm_in(image).to(dtype))))).to(dtype)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        if cfg.image_dim is None:
            self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        else:
            self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.text_len)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, index: torch.Tensor, freqs: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] float32 residual stream (updated in place); e0 [U, 6, dim] float32, the
        projected time embedding of U distinct timesteps, and index [B, 1 or L] which one each
        sample (or token) has.

        Each of the six modulation vectors is gathered per token only when it is used: with
        per-token timesteps (TI2V-5B at 1280x704x121: 27,280 tokens) a [B, L, 6, dim] table
        would be 4 GB for a CFG batch of 2, a gathered vector is a sixth of that and transient.
        """
        dtype = context.dtype
        mod = self.modulation.float()[0] + e0  # [U, 6, dim]: shift, scale, gate, then the FFN's

        def vector(k: int) -> torch.Tensor:
            return mod[:, k][index]  # [B, 1 or L, dim]

        y = self.self_attn(torch.addcmul(vector(0), self.norm1(x), 1 + vector(1)).to(dtype), freqs)
        x.addcmul_(y, vector(2))
        x.add_(self.cross_attn(self.norm3(x).to(dtype), context))
        y = self.ffn(torch.addcmul(vector(3), self.norm2(x), 1 + vector(4)).to(dtype))
        x.addcmul_(y, vector(5))
        return x


class VaceBlock(WanAttentionBlock):
    """A VACE block (official VaceWanAttentionBlock): a full Wan block over the conditioning
    stream c; block 0 first adds `before_proj(c)` to the embedded video tokens, and every
    block's `after_proj` of its output is the hint for one main block."""

    def __init__(self, cfg: WanConfig, first: bool):
        super().__init__(cfg)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] float32; e [U, dim] float32, the time embedding (before projection) of U
        distinct timesteps, index [B, 1 or L] which one each sample (or token) has."""
        mod = self.modulation.float()[0] + e.unsqueeze(1)  # [U, 2, dim]
        shift, scale = mod[:, 0][index], mod[:, 1][index]
        return _in_own_dtype(self.head, torch.addcmul(shift, self.norm(x), 1 + scale))


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its first floating parameter (float32 if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an official float32 region: input in the module's dtype (float32 as loaded), output float32."""
    return module(x.to(_module_dtype(module))).float()


# --- the model ------------------------------------------------------------------------


def is_float32_param(name: str) -> bool:
    """Parameters that stay float32 whatever the compute dtype: the official float32 regions
    (time embedding and projection, modulation tables, head), and the tiny LayerNorm affines
    (norm3, the image embedding's two norms)."""
    return (
        name.startswith(("time_embedding.", "time_projection.", "head.", "img_emb.proj.0.", "img_emb.proj.4."))
        or name.endswith("modulation")
        or ".norm3." in name
    )


class WanModel(nn.Module):
    """The Wan DiT: latents, timesteps, text context (and, for Wan2.1 I2V, CLIP image tokens) in,
    the flow-matching velocity out."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if cfg.image_dim is not None:
            self.img_emb = MLPProj(cfg.image_dim, dim)
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        if cfg.vace_layers is not None:
            self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, dim, kernel_size=cfg.patch_size,
                                                  stride=cfg.patch_size)
            self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=k == 0) for k in range(len(cfg.vace_layers)))
        self.head = Head(cfg)
        # RoPE tables, built on first use per (grid, device): not buffers, so the
        # model can be built on the meta device and filled from a file.
        self._rope_cache: dict[tuple[tuple[int, int, int], torch.device], torch.Tensor] = {}

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_table(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def embed_time(self, t: torch.Tensor, batch: int, tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t [B] or [B, L] -> (e [U, dim] for the head, e0 [U, 6, dim] for the blocks, float32, and
        index [B, 1 or L]): the embeddings of the U distinct timesteps, and which one each sample
        (or token) has.

        Per-token timesteps (Wan2.2 TI2V) take few distinct values (0 on the
        image's first frame, t elsewhere), so each distinct value is embedded
        once and the layers gather the rows per token as they use them.
        """
        if t.shape == (batch,):
            values, index = t, torch.arange(batch, device=t.device).unsqueeze(1)
        elif t.shape == (batch, tokens):
            values, index = t.unique(return_inverse=True)
        else:
            raise ValueError(f"t has shape {list(t.shape)}; expected [{batch}] (one timestep per sample) "
                             f"or [{batch}, {tokens}] (one per patch token)")
        e = _in_own_dtype(self.time_embedding, sinusoidal_embedding(values, self.config.freq_dim))
        e0 = _in_own_dtype(self.time_projection, e).unflatten(1, (6, self.config.dim))
        return e, e0, index

    def embed_context(self, context: torch.Tensor, clip_features: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """The context the cross-attentions see, in `dtype`: the text zero-padded to text_len and
        embedded, after the embedded image tokens when the model has the image branch."""
        # Text: zero-padded to text_len and attended in full, padding included (official).
        context = F.pad(context.to(dtype), (0, 0, 0, self.config.text_len - context.shape[1]))
        context = self.text_embedding(context)
        if clip_features is None:
            return context
        # Official: context = concat([img_emb(clip_fea), context]), image tokens first.
        return torch.cat([self.img_emb(clip_features, dtype), context], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_features: torch.Tensor | None = None, vace_context: torch.Tensor | None = None,
                context_scale: float = 1.0) -> torch.Tensor:
        """x [B, in_dim, F, H, W], t [B] or [B, f*h*w] (one per patch token, in (frame, row, column) order),
        context [B, <=text_len, text_dim], clip_features [B, 257, image_dim] (Wan2.1 I2V only: the
        CLIP ViT-H/14 penultimate-layer tokens of the image), vace_context [B, vace_in_dim, F, H, W]
        (VACE only: the conditioning latent, its hints scaled by `context_scale`)
        -> velocity [B, out_dim, F, H, W] float32."""
        cfg = self.config
        batch, channels, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if channels != cfg.in_dim:
            raise ValueError(f"x has {channels} channels, the DiT takes {cfg.in_dim}")
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent {frames}x{height}x{width} is not a multiple of the patch size {cfg.patch_size}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}")
        if cfg.image_dim is None and clip_features is not None:
            raise ValueError("clip_features given, but this DiT has no image branch (img_emb): "
                             "only Wan2.1 I2V takes them")
        if cfg.image_dim is not None:
            want = f"[{batch}, {IMAGE_TOKENS}, {cfg.image_dim}]"
            if clip_features is None:
                raise ValueError(f"this DiT (Wan2.1 I2V) needs clip_features {want}, the CLIP tokens of the image")
            if clip_features.ndim != 3 or clip_features.shape[0] != batch or clip_features.shape[1] == 0 \
                    or clip_features.shape[2] != cfg.image_dim:
                raise ValueError(f"clip_features has shape {list(clip_features.shape)}; expected {want}")
        if cfg.vace_layers is None and vace_context is not None:
            raise ValueError("vace_context given, but this DiT has no VACE blocks: only VACE models take it")
        if cfg.vace_layers is not None:
            want = [batch, cfg.vace_in_dim, frames, height, width]
            if vace_context is None:
                raise ValueError(f"this DiT (VACE) needs vace_context {want}, the conditioning latent")
            if list(vace_context.shape) != want:
                raise ValueError(f"vace_context has shape {list(vace_context.shape)}; expected {want}")
        grid = (frames // pt, height // ph, width // pw)
        # Time: sinusoid -> MLP -> six modulation vectors per block, all float32.
        e, e0, index = self.embed_time(t.to(x.device), batch, math.prod(grid))

        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))
        # The residual stream is float32 (official: bf16 + bf16 * float32 gate).
        x = x.flatten(2).transpose(1, 2).float().contiguous()

        context = self.embed_context(context, clip_features, dtype)

        freqs = self.rope(grid, x.device)
        if cfg.vace_layers is None:
            for block in self.blocks:
                x = block(x, e0, index, freqs, context)
        else:
            x = self.blocks_with_hints(x, e0, index, freqs, context, vace_context, context_scale)
        x = self.head(x, e, index)

        # Unpatchify: [B, f*h*w, pt*ph*pw*c] -> [B, c, f*pt, h*ph, w*pw].
        f, h, w = grid
        x = x.view(batch, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, cfg.out_dim, f * pt, h * ph, w * pw)


    def blocks_with_hints(self, x: torch.Tensor, e0: torch.Tensor, index: torch.Tensor, freqs: torch.Tensor,
                          context: torch.Tensor, vace_context: torch.Tensor, context_scale: float) -> torch.Tensor:
        """The main blocks, main block vace_layers[k] followed by `+ hint_k * context_scale`.

        The official code runs all VACE blocks first and keeps every hint (8 to
        15 tensors the size of the residual stream). The VACE chain reads the
        video tokens only at its start, so here VACE block k runs just before its
        hint is added: the same operations on the same values, holding one
        conditioning stream and one hint at a time.
        """
        dtype = context.dtype
        c = self.vace_patch_embedding(vace_context.to(dtype)).flatten(2).transpose(1, 2)
        first = self.vace_blocks[0].before_proj
        c = (first(c).float() + x).contiguous()  # official: c = before_proj(c) + x, x the embedded video tokens
        hints = dict(zip(self.config.vace_layers, self.vace_blocks))
        for i, block in enumerate(self.blocks):
            x = block(x, e0, index, freqs, context)
            if i in hints:
                vace_block = hints[i]
                c = vace_block(c, e0, index, freqs, context)
                x = x + vace_block.after_proj(c.to(dtype)).float() * context_scale
        return x


# --- loading --------------------------------------------------------------------------


def load_dit(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    policy: str = "dequantize_once",
) -> WanModel:
    """Load a Wan DiT GGUF (community layout) as an eval-mode `WanModel` computing in `dtype`.

    `policy` is the GGUF layer's weight policy: "dequantize_once" (dense
    weights in `dtype`) or "on_the_fly" (quantized weights stay quantized and
    are dequantized in each forward). The official float32 regions are loaded
    in float32 whatever `dtype` is.
    """
    f = GGUFFile(path)  # names come without the `model.diffusion_model.` prefix
    try:
        cfg = infer_config({name: f.shape(name) for name in f.tensor_names}, f.metadata)
        with torch.device("meta"):
            model = WanModel(cfg)
    except ModelConfigError as err:
        raise ModelConfigError(f"{os.fspath(path)}: {err}") from None
    load_gguf_into(model, f, policy=policy, dtype=dtype, device=device)

    if dtype != torch.float32:
        # The official code computes these in float32 from float32 weights
        # (its autocast(float32) regions): re-read them from the file in float32.
        for name, param in list(model.named_parameters()):
            if is_float32_param(name):
                module_name, _, leaf = name.rpartition(".")
                weight = f.dequantize(name, torch.float32, device).reshape(param.shape)
                setattr(model.get_submodule(module_name), leaf, nn.Parameter(weight, requires_grad=False))
    return model.eval().requires_grad_(False)
