"""CLIP vision files: their tensor shapes, seeded random state dicts, the open-clip layout, the safetensors writer."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from engine.wan.clip import CLIP_VIT_H_14, HEAD_COUNT_KEY, OPEN_CLIP_BLOCK_NAMES, OPEN_CLIP_NAMES, ClipVisionConfig, \
    ClipVisionEncoder

# The embedded tiny model's image encoder (tests): ViT-H's shape of image, patch and token count, tiny width.
TINY_CLIP_CONFIG = ClipVisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                                    patch_size=14, image_size=224)

# Width of the joint image-text embedding `visual_projection` maps to (1024 for ViT-H/14; unused by Wan).
PROJECTION_DIM = 1024


def clip_vision_file_shapes(config: ClipVisionConfig = CLIP_VIT_H_14,
                            projection_dim: int = PROJECTION_DIM) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers-layout CLIP vision file (clip_vision_h's layout) and its shape.

    The encoder's tensors, read off the model built on the meta device, then
    the two a real file also holds and the encoder ignores: the post-norm and
    the projection.
    """
    with torch.device("meta"):
        model = ClipVisionEncoder(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes["vision_model.post_layernorm.weight"] = (config.hidden_size,)
    shapes["vision_model.post_layernorm.bias"] = (config.hidden_size,)
    shapes["visual_projection.weight"] = (projection_dim, config.hidden_size)
    return shapes


def tiny_clip_vision_state_dict(seed: int, config: ClipVisionConfig = TINY_CLIP_CONFIG,
                                projection_dim: int = 32) -> dict[str, torch.Tensor]:
    """A random transformers-layout CLIP vision state dict, float32, post-norm and projection included.

    Drawn in file order from one seeded CPU generator. Scales keep a random
    model's features responsive: linear and conv weights ~ N(0, 1/fan_in) (so
    GELU inputs are O(1), where exact and quick GELU differ), norm weights
    ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2), class and position embeddings
    ~ N(0, 0.5^2).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in clip_vision_file_shapes(config, projection_dim).items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("class_embedding", "position_embedding.weight")):
            state[name] = 0.5 * noise
        elif name.endswith(".bias"):
            state[name] = 0.02 * noise
        elif "norm" in name:
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
    return state


def open_clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers-layout state dict in open-clip's `visual.*` names (q/k/v fused into in_proj).

    The inverse of the renaming load_clip_vision does; the projection is
    stored transposed, as open-clip's `visual.proj` is [hidden, projection].
    """
    to_open_clip = {hf: oc for oc, hf in OPEN_CLIP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        layer = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in to_open_clip:
            out[to_open_clip[name]] = tensor
        elif name.startswith("vision_model.post_layernorm."):
            out["visual.ln_post." + name.rsplit(".", 1)[1]] = tensor
        elif name == "visual_projection.weight":
            out["visual.proj"] = tensor.t().contiguous()
        elif layer and layer[2] == "self_attn.q_proj":
            prefix = f"vision_model.encoder.layers.{layer[1]}.self_attn."
            out[f"visual.transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}"] = torch.cat(
                [state[f"{prefix}{proj}.{layer[3]}"] for proj in ("q_proj", "k_proj", "v_proj")])
        elif layer and layer[2] in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused with q_proj above
        elif layer:
            block = {hf: oc for oc, hf in OPEN_CLIP_BLOCK_NAMES.items()}[layer[2]]
            out[f"visual.transformer.resblocks.{layer[1]}.{block}.{layer[3]}"] = tensor
        else:
            raise ValueError(f"no open-clip name for tensor {name!r}")
    return out


def write_clip_vision_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                                  num_heads: int | None = None) -> None:
    """Write a CLIP vision state dict as safetensors, byte-identical for identical input.

    Tensors go out under their names as given, in their dtypes; `num_heads`,
    when given, is recorded as metadata `clip.vision.attention.head_count`
    (the one size the shapes do not fix). Written next to `path` and renamed,
    so a crash never leaves a half file under the real name.
    """
    path = Path(path)
    tensors = {name: state_dict[name].detach().to("cpu").contiguous() for name in sorted(state_dict)}
    metadata = {"format": "pt"}
    if num_heads is not None:
        metadata[HEAD_COUNT_KEY] = str(num_heads)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
