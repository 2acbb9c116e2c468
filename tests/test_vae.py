"""The Wan2.1 VAE decoder against diffusers' AutoencoderKLWan, on tiny random VAEs.

Each model is a random original-layout state dict (encoder included, as the
real file holds), written as a real safetensors file and loaded by our
loader; diffusers gets the same tensors under its names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.wan.vae import (
    LATENT_MEAN,
    LATENT_STD,
    TINY_VAE_CONFIG,
    VAEError,
    WanVAE,
    WanVAEConfig,
    infer_config,
    load_vae,
    tiny_vae_state_dict,
    vae_file_shapes,
    write_vae_safetensors,
)

# Float32 on both sides, same op order up to reshapes: differences are rounding only.
ORACLE_ATOL = 1e-5

# The published Wan2.1 VAE's stage widths with base 8: like the real file it has
# one channel-changing residual block in the decoder (upsamples.4.shortcut), the
# layout diffusers' converter is written for (num_res_blocks=2).
CONVERTER_CONFIG = WanVAEConfig(base_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=2)

RESNET_NAMES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}


def diffusers_name(name: str, num_res_blocks: int) -> str:
    """Original Wan VAE name -> AutoencoderKLWan name, for any num_res_blocks."""
    parts = name.split(".")
    if parts[0] in ("conv1", "conv2"):
        return {"conv1": "quant_conv", "conv2": "post_quant_conv"}[parts[0]] + "." + parts[1]
    side, block, rest = parts[0], parts[1], parts[2:]
    tail = ".".join(rest[1:])
    if block == "conv1":
        return f"{side}.conv_in.{rest[0]}"
    if block == "head":
        return f"{side}.{'norm_out' if rest[0] == '0' else 'conv_out'}.{tail}"
    if block == "middle":
        index = int(rest[0])
        if index == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{index // 2}.{RESNET_NAMES[tail]}"
    if block == "downsamples":
        return f"encoder.down_blocks.{rest[0]}.{RESNET_NAMES.get(tail, tail)}"
    assert block == "upsamples", name
    stage, position = divmod(int(rest[0]), num_res_blocks + 2)
    if position <= num_res_blocks:
        return f"decoder.up_blocks.{stage}.resnets.{position}.{RESNET_NAMES[tail]}"
    return f"decoder.up_blocks.{stage}.upsamplers.0.{tail}"


def diffusers_vae(state: dict[str, torch.Tensor], config: WanVAEConfig):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(
        base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks, temperal_downsample=list(config.temperal_downsample))
    converted = {diffusers_name(k, config.num_res_blocks): v for k, v in state.items()}
    # strict: every name and shape of the whole file (encoder included) must match.
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_decode(model, latents: torch.Tensor) -> torch.Tensor:
    # AutoencoderKLWan.decode takes de-normalised latents; WanPipeline does
    # `latents / (1 / std) + mean` before calling it.
    mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return model.decode(latents / (1.0 / std) + mean, return_dict=False)[0]


def seeded_latents(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = tiny_vae_state_dict(0)
    path = tmp_path_factory.mktemp("vae") / "wan_2.1_vae.safetensors"
    write_vae_safetensors(state, path)
    return path, state


@pytest.fixture(scope="module")
def tiny_vae(tiny_file) -> WanVAE:
    return load_vae(tiny_file[0])


def test_name_mapping_agrees_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = tiny_vae_state_dict(0, CONVERTER_CONFIG)
    ours = {diffusers_name(k, CONVERTER_CONFIG.num_res_blocks): v for k, v in state.items()}
    theirs = convert_wan_vae_to_diffusers(dict(state))
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k] is theirs[k] for k in ours)


def test_file_layout_has_the_published_tensor_count_and_size():
    shapes = vae_file_shapes(WanVAEConfig())
    # Wan2.1_VAE.pth: 194 tensors, 126,892,531 parameters (as diffusers' AutoencoderKLWan()).
    assert len(shapes) == 194
    assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)


@pytest.mark.parametrize("config", [WanVAEConfig(), TINY_VAE_CONFIG, CONVERTER_CONFIG], ids=["published", "tiny", "res2"])
def test_infer_config_from_shapes(config):
    assert infer_config(vae_file_shapes(config)) == config


def test_decode_matches_diffusers(tiny_file, tiny_vae):
    torch.manual_seed(0)
    latents = seeded_latents(1, 16, 3, 8, 8)
    ours = tiny_vae.decode(latents)
    theirs = diffusers_decode(diffusers_vae(tiny_file[1], TINY_VAE_CONFIG), latents)
    assert ours.shape == theirs.shape == (1, 3, 9, 64, 64)
    # The random model must not saturate, or the clamp would hide differences.
    assert (ours.abs() < 1).float().mean() > 0.99 and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)


def test_decode_matches_diffusers_with_two_res_blocks(tmp_path):
    state = tiny_vae_state_dict(3, CONVERTER_CONFIG)
    write_vae_safetensors(state, tmp_path / "vae.safetensors")
    latents = seeded_latents(1, 16, 3, 4, 4, seed=11)
    ours = load_vae(tmp_path / "vae.safetensors").decode(latents)
    theirs = diffusers_decode(diffusers_vae(state, CONVERTER_CONFIG), latents)
    assert ours.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)


@pytest.mark.parametrize("latent_frames, video_frames", [(1, 1), (2, 5), (4, 13)])
def test_frame_count_is_one_plus_four_per_extra_latent_frame(tiny_vae, latent_frames, video_frames):
    video = tiny_vae.decode(seeded_latents(1, 16, latent_frames, 2, 3))
    assert video.shape == (1, 3, video_frames, 16, 24)
    assert video.dtype == torch.float32


def test_decoding_is_causal_in_time(tiny_vae):
    # Frames decoded from the first two latent frames do not change when more follow.
    latents = seeded_latents(1, 16, 4, 4, 4)
    head = tiny_vae.decode(latents[:, :, :2])
    full = tiny_vae.decode(latents)
    torch.testing.assert_close(full[:, :, :5], head, atol=1e-6, rtol=0)
    assert not torch.allclose(full[:, :, 5:9], full[:, :, 1:5])


def test_batch_items_decode_bit_identically_alone(tiny_vae):
    latents = seeded_latents(2, 16, 2, 4, 4)
    both = tiny_vae.decode(latents)
    assert torch.equal(both[1:], tiny_vae.decode(latents[1:]))
    assert not torch.allclose(both[0], both[1])


def test_output_is_clamped_to_unit_range(tiny_file):
    vae = load_vae(tiny_file[0])
    # The decoder's norms make it scale-free in its input: push the output conv instead.
    vae.decoder.head[2].bias.copy_(torch.tensor([5.0, -5.0, 0.0]))
    video = vae.decode(seeded_latents(1, 16, 2, 4, 4))
    assert torch.all(video[:, 0] == 1.0) and torch.all(video[:, 1] == -1.0)
    assert video[:, 2].abs().max() < 1.0


def test_encoder_is_not_needed(tmp_path, tiny_file, tiny_vae):
    decoding_only = {k: v for k, v in tiny_file[1].items() if k.startswith(("decoder.", "conv2."))}
    write_vae_safetensors(decoding_only, tmp_path / "decoder.safetensors")
    vae = load_vae(tmp_path / "decoder.safetensors")
    assert not any(name.startswith(("encoder.", "conv1.")) for name in vae.state_dict())
    latents = seeded_latents(1, 16, 2, 4, 4)
    assert torch.equal(vae.decode(latents), tiny_vae.decode(latents))


def test_missing_decoder_tensor_is_named(tmp_path, tiny_file):
    state = dict(tiny_file[1])
    del state["decoder.middle.1.proj.weight"]
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    with pytest.raises(VAEError, match=r"vae\.safetensors.*missing tensor 'decoder\.middle\.1\.proj\.weight'"):
        load_vae(path)


def test_misshaped_tensor_is_named(tmp_path, tiny_file):
    state = dict(tiny_file[1])
    state["decoder.head.2.weight"] = torch.zeros(3, 8, 3, 3, 1)
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    with pytest.raises(VAEError, match=r"'decoder\.head\.2\.weight' has shape \[3, 8, 3, 3, 1\], expected \[3, 8, 3, 3, 3\]"):
        load_vae(path)


def test_other_latent_widths_are_refused(tmp_path, tiny_file):
    # The Wan2.2 VAE decodes 48 channels; its statistics and layout differ.
    state = dict(tiny_file[1])
    state["decoder.conv1.weight"] = torch.zeros(16, 48, 3, 3, 3)
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    with pytest.raises(VAEError, match="decoder.conv1.weight takes 48 latent channels"):
        load_vae(path)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt"])
def test_pickled_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    torch.save({"decoder.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(VAEError, match=f"Wan2.1_VAE\\{suffix}: pickled checkpoints"):
        load_vae(path)


def test_not_a_weights_file_is_refused(tmp_path):
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(VAEError, match="neither a safetensors nor a GGUF file"):
        load_vae(path)


def test_write_is_byte_identical_for_the_same_seed(tmp_path):
    write_vae_safetensors(tiny_vae_state_dict(5), tmp_path / "a.safetensors")
    write_vae_safetensors(tiny_vae_state_dict(5), tmp_path / "b.safetensors")
    write_vae_safetensors(tiny_vae_state_dict(6), tmp_path / "c.safetensors")
    a, b, c = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    assert not list(tmp_path.glob("*.partial"))


def test_gguf_vae_decodes_as_the_safetensors_one(tmp_path, tiny_file):
    from gguf import GGMLQuantizationType as Q

    from engine.gguf import write_gguf

    # As a converted VAE would be: conv/linear weights F16, gammas and biases F32.
    state = tiny_file[1]
    tensors = {name: (t.numpy(), Q.F16 if name.endswith(".weight") else Q.F32) for name, t in state.items()}
    write_gguf(tmp_path / "vae.gguf", "wan_vae", tensors)
    rounded = {name: t.half().float() if name.endswith(".weight") else t for name, t in state.items()}
    write_vae_safetensors(rounded, tmp_path / "vae.safetensors")

    latents = seeded_latents(1, 16, 2, 4, 4)
    from_gguf = load_vae(tmp_path / "vae.gguf").decode(latents)
    assert torch.equal(from_gguf, load_vae(tmp_path / "vae.safetensors").decode(latents))
    assert not torch.equal(from_gguf, load_vae(tiny_file[0]).decode(latents))  # the F16 rounding is real
