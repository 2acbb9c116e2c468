"""Original-layout Wan2.1 VAE files: their tensor shapes, seeded random state dicts, the safetensors writer."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from engine.wan.vae import WanVAE, WanVAEConfig

# The embedded default model's VAE (`reelray make-tiny-model`, tests).
TINY_VAE_CONFIG = WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def vae_file_shapes(config: WanVAEConfig = WanVAEConfig()) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original-layout VAE file and its shape, in the file's order.

    Read off the whole model (encoder, conv1, conv2, decoder) built on the meta device.
    """
    with torch.device("meta"):
        model = WanVAE(config, encoder=True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def tiny_vae_state_dict(seed: int, config: WanVAEConfig = TINY_VAE_CONFIG) -> dict[str, torch.Tensor]:
    """A random original-layout Wan2.1 VAE state dict (encoder included, as real files hold), float32."""
    return random_vae_state_dict(vae_file_shapes(config), seed)


def random_vae_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes (a Wan2.1 or Wan2.2 VAE's original names), float32.

    Drawn in file order from one seeded CPU generator, so the same seed gives
    the same tensors. Scales keep a random model's activations sane: conv
    weights ~ N(0, 1/fan_in), each residual branch's last conv and the output
    convs damped so residual sums grow slowly and the video is not saturated;
    norms gamma ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith(".gamma"):
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.02 * noise
        else:
            damped = ".residual.6." in name or name.startswith(("decoder.head.2.", "encoder.head.2."))
            gain = 0.5 if damped else 1.0
            state[name] = noise * (gain / math.sqrt(math.prod(shape[1:])))
    return state


def write_vae_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write a VAE state dict as safetensors, byte-identical for identical input.

    Tensors go out under their names as given (the original layout) and in
    their dtypes; the file is written next to `path` and renamed, so a crash
    never leaves a half file under the real name.
    """
    path = Path(path)
    tensors = {name: state_dict[name].detach().to("cpu").contiguous() for name in sorted(state_dict)}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
