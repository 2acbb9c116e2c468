"""The CLIP image encoder Wan2.1 I2V/FLF2V-14B conditions on, with Hugging Face CLIP attribute names.

It is the visual tower of open-clip's xlm-roberta-large-ViT-H-14 (the
official `clip_xlm_roberta_vit_h_14`, wan/modules/clip.py): a pre-norm ViT,
patch 14 on 224x224 images, a class token and 16x16 patches (257 tokens),
width 1280, 32 layers of 16 heads, MLP 5120 with exact GELU (not
quick_gelu), layer-norm eps 1e-5. Wan takes `visual(x, use_31_block=True)`:
the residual stream after the first 31 of the 32 blocks, with no post-norm
and no projection (diffusers: `CLIPVisionModel(...).hidden_states[-2]`).

The module tree is transformers' `CLIPVisionModel` (`vision_model.embeddings.
patch_embedding`, `vision_model.pre_layrnorm` -- their spelling --,
`vision_model.encoder.layers.N.self_attn.q_proj`, `.layer_norm1`,
`.mlp.fc1`, ...), the layout of Comfy-Org's `clip_vision_h.safetensors`, so
that file loads without renaming. open-clip's own layout
(`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
...) loads through the one renaming table below, the fused q/k/v split in three.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.gguf import GGUFFile, GGUFFormatError

# OpenAI CLIP's pixel statistics, which open-clip's ViT-H/14 keeps (wan/modules/clip.py `_clip`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Every published CLIP ViT (B/32 to bigG/14) has 64- or 80-wide heads; ViT-H/14 has 80 (1280 = 16 x 80).
VIT_H_HEAD_DIM = 80

# Where a file may record its head count, which the tensor shapes do not fix
# (llama.cpp's mmproj key; our writer puts it in safetensors metadata too).
HEAD_COUNT_KEY = "clip.vision.attention.head_count"

# Pickle-based checkpoints (the official models_clip_*.pth): unpickling can run code, so never load them.
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


class ClipVisionError(ValueError):
    """A CLIP vision file that cannot be used: wrong format or layout, missing, unexpected or mis-shaped tensor."""


@dataclass(frozen=True)
class ClipVisionConfig:
    """Hyper-parameters of a CLIP vision tower; the defaults are open-clip's ViT-H/14."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_positions(self) -> int:
        """The class token and one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


# The published encoder: xlm-roberta-large-ViT-H-14's visual tower (= clip_vision_h.safetensors).
CLIP_VIT_H_14 = ClipVisionConfig()


class LayerNorm(nn.LayerNorm):
    """Layer norm taken in float32 whatever the weights' dtype, as the official `LayerNorm` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, 256, dim]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class ClipMLP(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU: xlm-roberta-large-ViT-H-14 is built with activation='gelu', not quick_gelu.
        return self.fc2(F.gelu(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_layers))


class ClipVisionTransformer(nn.Module):
    """Embeddings, pre-norm and blocks; the post-norm and projection are left out, as Wan never uses them."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # transformers' spelling
        self.encoder = ClipEncoder(config)


class ClipVisionEncoder(nn.Module):
    """The CLIP vision tower, returning the penultimate layer's tokens (Wan's `use_31_block=True`)."""

    def __init__(self, config: ClipVisionConfig = CLIP_VIT_H_14) -> None:
        super().__init__()
        self.config = config
        self.vision_model = ClipVisionTransformer(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels [B, 3, S, S] (S = image_size) -> float32 features [B, S^2/patch^2 + 1, hidden]."""
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}] (see preprocess), got {list(pixels.shape)}")
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixels.to(model.embeddings.class_embedding.dtype)))
        for layer in model.encoder.layers[:-1]:  # every block but the last
            x = layer(x)
        return x.float()


def preprocess(image: torch.Tensor, size: int = CLIP_VIT_H_14.image_size) -> torch.Tensor:
    """An image [3, H, W] in [-1, 1] -> CLIP pixels [1, 3, size, size], as the official `CLIPModel.visual`.

    That is: bicubic resize of the [-1, 1] values straight to size x size (no
    crop, aspect ratio not kept, align_corners=False, no antialias, no clamp
    of the overshoot), then x * 0.5 + 0.5 to [0, 1], then (x - mean) / std
    with CLIP's statistics.
    """
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be float [3, H, W] in [-1, 1], got {image.dtype} {list(image.shape)}")
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(encoder: ClipVisionEncoder, image: torch.Tensor) -> torch.Tensor:
    """An image [3, H, W] in [-1, 1] -> Wan's CLIP context [257, hidden], float32."""
    device = encoder.vision_model.embeddings.class_embedding.device
    return encoder(preprocess(image.to(device), encoder.config.image_size))[0]


# --- loading --------------------------------------------------------------------------------------

# open-clip visual-tower names -> transformers names (ComfyUI's `convert_to_transformers` does the same).
OPEN_CLIP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
}
OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Read by nothing: the post-norm and projection to the joint embedding (and,
# outside `visual.` / `vision_model.`, any text tower and logit scale).
OPEN_CLIP_UNUSED = ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj")
TRANSFORMERS_READ = ("vision_model.embeddings.", "vision_model.pre_layrnorm.", "vision_model.encoder.")
TRANSFORMERS_UNUSED = ("vision_model.embeddings.position_ids",)  # a buffer older transformers saved

# A model tensor comes from a file tensor, whole (part None) or as one third of a fused q/k/v.
Source = tuple[str, int | None]


def _sources(names: Sequence[str]) -> dict[str, Source]:
    """transformers name -> where it is in the file, for every file tensor the encoder reads.

    Tensors it does not read are left out; tensors under a read prefix that no
    layout knows are kept under their own name, to be reported as unexpected.
    """
    sources: dict[str, Source] = {}
    if any(name.startswith("visual.transformer.resblocks.") for name in names):  # open-clip
        for name in names:
            if not name.startswith("visual.") or name in OPEN_CLIP_UNUSED:
                continue
            if name in OPEN_CLIP_NAMES:
                sources[OPEN_CLIP_NAMES[name]] = (name, None)
                continue
            fused = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name)
            block = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name)
            if fused:
                for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    sources[f"vision_model.encoder.layers.{fused[1]}.self_attn.{proj}.{fused[2]}"] = (name, part)
            elif block and block[2] in OPEN_CLIP_BLOCK_NAMES:
                sources[f"vision_model.encoder.layers.{block[1]}.{OPEN_CLIP_BLOCK_NAMES[block[2]]}.{block[3]}"] = (
                    name, None)
            else:
                sources[name] = (name, None)  # reported as unexpected
        return sources
    if any(name.startswith("vision_model.") for name in names):  # transformers
        return {name: (name, None) for name in names
                if name.startswith(TRANSFORMERS_READ) and name not in TRANSFORMERS_UNUSED}
    shown = ", ".join(repr(n) for n in list(names)[:3])
    raise ClipVisionError("neither a transformers CLIP vision layout (vision_model.*) nor an open-clip one "
                          f"(visual.transformer.resblocks.*): tensors {shown}{' ...' if len(names) > 3 else ''}")


def infer_config(shapes: Mapping[str, Sequence[int]], num_heads: int | None = None) -> ClipVisionConfig:
    """The config these tensor shapes (transformers names) describe.

    Width and patch come from the patch embedding, image size from the number
    of positions, layers from the `encoder.layers.N` indices, MLP width from
    layer 0's fc1. The head count is not in any shape: it is `num_heads` when
    given, else hidden / 80 (ViT-H/14's head width), else an error.
    """
    def shape(name: str, ndim: int) -> tuple[int, ...]:
        if name not in shapes:
            raise ClipVisionError(f"missing tensor {name!r} (needed to infer the encoder's size)")
        found = tuple(shapes[name])
        if len(found) != ndim or min(found) <= 0:
            raise ClipVisionError(f"tensor {name!r} has shape {list(found)}, expected {ndim} non-empty axes")
        return found

    hidden, channels, patch, patch_w = shape("vision_model.embeddings.patch_embedding.weight", 4)
    if channels != 3 or patch != patch_w:
        raise ClipVisionError(f"vision_model.embeddings.patch_embedding.weight has shape "
                              f"{[hidden, channels, patch, patch_w]}, expected [hidden, 3, patch, patch]")
    positions = shape("vision_model.embeddings.position_embedding.weight", 2)[0]
    side = round((positions - 1) ** 0.5)
    if side * side + 1 != positions:
        raise ClipVisionError(f"vision_model.embeddings.position_embedding.weight has {positions} positions, "
                              "not a class token plus a square grid of patches")
    layers = {int(m[1]) for name in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name))}
    if not layers:
        raise ClipVisionError("no vision_model.encoder.layers.N tensors")
    for index in range(len(layers)):
        if index not in layers:
            raise ClipVisionError(f"missing tensor 'vision_model.encoder.layers.{index}.layer_norm1.weight' "
                                  f"(layers up to {max(layers)} are present)")
    intermediate = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)[0]
    if num_heads is None:
        if hidden % VIT_H_HEAD_DIM:
            raise ClipVisionError(f"width {hidden} is not a multiple of ViT-H's 80-wide heads and the file does "
                                  f"not record {HEAD_COUNT_KEY!r}: pass num_heads")
        num_heads = hidden // VIT_H_HEAD_DIM
    if num_heads <= 0 or hidden % num_heads:
        raise ClipVisionError(f"width {hidden} does not split into {num_heads} heads")
    return ClipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_layers=len(layers),
                            num_heads=num_heads, patch_size=patch, image_size=side * patch)


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _build(path: Path, file_shapes: Mapping[str, tuple[int, ...]], fetch: Callable[[str], torch.Tensor],
           num_heads: int | None) -> ClipVisionEncoder:
    """Check the file's tensors against the encoder they describe, then assign them."""
    try:
        sources = _sources(list(file_shapes))
        shapes = {}
        for name, (stored, part) in sources.items():
            shape = tuple(file_shapes[stored])
            if part is not None:  # a third of the fused q/k/v along its first axis
                if not shape or shape[0] % 3:
                    raise ClipVisionError(f"fused tensor {stored!r} has shape {list(shape)}, "
                                          "not three stacked q/k/v projections")
                shape = (shape[0] // 3, *shape[1:])
            shapes[name] = shape
        config = infer_config(shapes, num_heads)
    except ClipVisionError as err:
        raise ClipVisionError(f"{path}: {err}") from None
    with torch.device("meta"):
        model = ClipVisionEncoder(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name in expected:
        if name not in shapes:
            raise ClipVisionError(f"{path}: missing tensor {name!r}")
    for name in shapes:
        if name not in expected:
            raise ClipVisionError(f"{path}: unexpected tensor {sources[name][0]!r} for a CLIP vision tower "
                                  f"with {config}")
    for name, want in expected.items():
        got = shapes[name]
        # GGUF writers may drop unit axes.
        if got != want and _squeezed(got) != _squeezed(want):
            stored, part = sources[name]
            thirds = " (for each third of the fused q/k/v)" if part is not None else ""
            raise ClipVisionError(f"{path}: tensor {stored!r} has shape {list(file_shapes[stored])}, "
                                  f"expected {list(want)}{thirds}")
    state = {}
    for name, want in expected.items():
        stored, part = sources[name]
        tensor = fetch(stored)
        state[name] = (tensor.chunk(3)[part] if part is not None else tensor).reshape(want)
    model.load_state_dict(state, assign=True)  # keep the loaded tensors: no second copy
    return model.eval().requires_grad_(False)


def _head_count(path: Path, value: object) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ClipVisionError(f"{path}: metadata {HEAD_COUNT_KEY!r} is {value!r}, not a head count") from None


def load_clip_vision(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, num_heads: int | None = None) -> ClipVisionEncoder:
    """Load a CLIP vision tower (.safetensors or .gguf, memory-mapped) as Wan's image encoder.

    Layouts: transformers (`vision_model.*`, Comfy-Org's clip_vision_h) and
    open-clip (`visual.*`). Not read, and not errors: the post-norm
    (`vision_model.post_layernorm.*` / `visual.ln_post.*`), the projection
    (`visual_projection.weight` / `visual.proj`), the `position_ids` buffer,
    and everything outside the vision tower (a text tower, `logit_scale`).
    Heads: `num_heads` if given, else the file's `clip.vision.attention.head_count`
    (safetensors metadata or GGUF key), else hidden / 80 as in ViT-H/14.
    Pickles (.pth, .bin, ...) are refused: unpickling can run code.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ClipVisionError(f"{path}: pickled checkpoints ({path.suffix}) are not loaded (unpickling can run code); "
                              "use a .safetensors or .gguf CLIP vision file")
    if not path.is_file():
        raise ClipVisionError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)

    if magic == b"GGUF":
        try:
            gguf_file = GGUFFile(path)
        except GGUFFormatError as err:
            raise ClipVisionError(str(err).replace("\n", " ")) from None
        # Tensors handed out keep their pages of the map alive after the file closes.
        with gguf_file:
            heads = num_heads if num_heads is not None else _head_count(path, gguf_file.metadata.get(HEAD_COUNT_KEY))
            shapes = {name: tuple(gguf_file.shape(name)) for name in gguf_file.tensor_names}
            return _build(path, shapes, lambda name: gguf_file.dequantize(name, dtype, device), heads)

    try:
        file = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ClipVisionError(f"{path}: neither a safetensors nor a GGUF file ({err})") from None
    with file:
        heads = num_heads if num_heads is not None else _head_count(path, (file.metadata() or {}).get(HEAD_COUNT_KEY))
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
        return _build(path, shapes, lambda name: file.get_tensor(name).to(device=device, dtype=dtype), heads)
