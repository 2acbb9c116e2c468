"""Original-layout Wan2.2 VAE files: their tensor shapes, seeded random state dicts, a tiny file writer."""
from __future__ import annotations

import os

import torch

from engine.wan.convert.vae import random_vae_state_dict, write_vae_safetensors
from engine.wan.vae22 import Wan22VAE, Wan22VAEConfig

# The tiny Wan2.2 VAE of tests and `make-tiny-model`: the published layout
# (dim_mult, 48 latent channels, encoder and decoder of different widths) at
# widths 8 and 12, one residual block per encoder stage.
TINY_VAE22_CONFIG = Wan22VAEConfig(base_dim=8, decoder_base_dim=12, num_res_blocks=1)


def vae22_file_shapes(config: Wan22VAEConfig = Wan22VAEConfig()) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original-layout Wan2.2 VAE file and its shape, in the file's order.

    Read off the whole model (encoder, conv1, conv2, decoder) built on the meta device.
    """
    with torch.device("meta"):
        model = Wan22VAE(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def tiny_vae22_state_dict(seed: int, config: Wan22VAEConfig = TINY_VAE22_CONFIG) -> dict[str, torch.Tensor]:
    """A random original-layout Wan2.2 VAE state dict, float32 (`random_vae_state_dict`'s scales)."""
    return random_vae_state_dict(vae22_file_shapes(config), seed)


def write_tiny_vae22(path: str | os.PathLike[str], seed: int, config: Wan22VAEConfig = TINY_VAE22_CONFIG) -> None:
    """Write `tiny_vae22_state_dict(seed, config)` as an original-layout safetensors file (byte-identical per seed)."""
    write_vae_safetensors(tiny_vae22_state_dict(seed, config), path)
