"""The Wan2.2 VAE (TI2V-5B) against diffusers' AutoencoderKLWan in its Wan2.2 configuration, on tiny random VAEs.

Each model is a random original-layout state dict (the names of vae2_2.py and
of Comfy-Org's wan2.2_vae.safetensors), written as a real file and loaded by
our loader; diffusers gets the same tensors under its own names (converted
here, as diffusers' conversion script is not installed).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.wan.vae22 as vae22
from engine.wan.convert.vae import tiny_vae_state_dict, write_vae_safetensors
from engine.wan.convert.vae22 import TINY_VAE22_CONFIG, tiny_vae22_state_dict, vae22_file_shapes, write_tiny_vae22
from engine.wan.vae import VAEError
from engine.wan.vae22 import LATENT_MEAN, LATENT_STD, Wan22VAE, Wan22VAEConfig, infer_config, load_vae22

# Float32 on both sides, the same ops in the same order up to reshapes: the
# differences are rounding only (seen: below 1e-6 on outputs of size ~0.3).
ORACLE_ATOL = 1e-5

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
    """Original Wan2.2 VAE name -> AutoencoderKLWan(is_residual=True) name.

    From diffusers' module tree: encoder stages are `down_blocks.i` with
    `resnets.j` and a `downsampler`, decoder stages `up_blocks.i` with
    `resnets.j` and an `upsampler`; conv1/conv2 are quant_conv/post_quant_conv.
    """
    top, tail = name.split(".", 1)
    if top in ("conv1", "conv2"):
        return ("quant_conv." if top == "conv1" else "post_quant_conv.") + tail
    side, block, rest = name.split(".", 2)
    if block == "conv1":
        return f"{side}.conv_in.{rest}"
    if block == "head":
        index, tail = rest.split(".", 1)
        return f"{side}.{'norm_out' if index == '0' else 'conv_out'}.{tail}"
    if block == "middle":
        index, tail = rest.split(".", 1)
        if index == "1":
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{int(index) // 2}.{RESNET_NAMES[tail]}"
    stage, inner, position, tail = rest.split(".", 3)
    assert inner == block, name
    blocks, resampler, res_count = (("down_blocks", "downsampler", num_res_blocks) if block == "downsamples"
                                    else ("up_blocks", "upsampler", num_res_blocks + 1))
    if int(position) < res_count:
        return f"{side}.{blocks}.{stage}.resnets.{position}.{RESNET_NAMES[tail]}"
    return f"{side}.{blocks}.{stage}.{resampler}.{tail}"


def diffusers_wan22_vae(config: Wan22VAEConfig):
    """AutoencoderKLWan as diffusers' convert_wan_to_diffusers.py configures the Wan2.2 VAE, at `config`'s widths."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=config.base_dim, decoder_base_dim=config.decoder_base_dim, z_dim=config.z_dim,
        dim_mult=list(config.dim_mult), num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temperal_downsample), is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))


def seeded(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def seeded_video(frames: int, height: int = 32, width: int = 48, seed: int = 3) -> torch.Tensor:
    """A smooth random video in [-1, 1] (low-resolution noise, upsampled), as images are smoother than noise."""
    coarse = seeded(1, 3 * frames, height // 8, width // 8, seed=seed)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (fine.view(1, 3, frames, height, width) + 0.1 * seeded(1, 3, frames, height, width, seed=seed + 1)).tanh()


STATS = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("vae22") / "wan2.2_vae.safetensors"
    write_tiny_vae22(path, seed=0)
    return path, tiny_vae22_state_dict(0)


@pytest.fixture(scope="module")
def tiny_vae(tiny_file) -> Wan22VAE:
    return load_vae22(tiny_file[0])


@pytest.fixture(scope="module")
def oracle(tiny_file):
    """diffusers' encode and decode of the tiny model, on normalised latents as the pipeline sees them."""
    model = diffusers_wan22_vae(TINY_VAE22_CONFIG)
    converted = {diffusers_name(k, TINY_VAE22_CONFIG.num_res_blocks): v for k, v in tiny_file[1].items()}
    model.load_state_dict(converted, strict=True)  # every name and shape, encoder included
    model.eval()
    mean, std = STATS

    @torch.no_grad()
    def encode(video):
        # As WanImageToVideoPipeline.prepare_latents: (argmax latent - mean) * (1 / std).
        return (model.encode(video).latent_dist.mode() - mean) * (1.0 / std)

    @torch.no_grad()
    def decode(latents):
        return model.decode(latents / (1.0 / std) + mean, return_dict=False)[0]

    return encode, decode


def test_file_layout_is_diffusers_wan22_vae_at_published_size():
    from diffusers import AutoencoderKLWan  # noqa: F401  (imported before the meta device is entered)

    ours = vae22_file_shapes(Wan22VAEConfig())
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in diffusers_wan22_vae(Wan22VAEConfig()).state_dict().items()}
    assert {diffusers_name(k, 2): v for k, v in ours.items()} == theirs
    assert len(ours) == 196
    assert sum(torch.Size(s).numel() for s in ours.values()) == 704_688_668
    assert ours["encoder.conv1.weight"] == (160, 12, 3, 3, 3)
    assert ours["conv1.weight"] == (96, 96, 1, 1, 1)
    assert ours["decoder.conv1.weight"] == (1024, 48, 3, 3, 3)
    assert ours["encoder.downsamples.1.downsamples.2.time_conv.weight"] == (320, 320, 3, 1, 1)
    assert ours["decoder.upsamples.0.upsamples.3.time_conv.weight"] == (2048, 1024, 3, 1, 1)
    assert ours["decoder.upsamples.2.upsamples.3.resample.1.weight"] == (512, 512, 3, 3)
    assert ours["decoder.head.2.weight"] == (12, 256, 3, 3, 3)


@pytest.mark.parametrize("config", [
    Wan22VAEConfig(), TINY_VAE22_CONFIG,
    Wan22VAEConfig(base_dim=4, decoder_base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=3,
                   temperal_downsample=(True, False)),
], ids=["published", "tiny", "other"])
def test_infer_config_from_shapes(config):
    assert infer_config(vae22_file_shapes(config)) == config


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_diffusers(tiny_vae, oracle, latent_frames):
    latents = seeded(1, 48, latent_frames, 2, 3)
    ours = tiny_vae.decode(latents)
    theirs = oracle[1](latents)
    assert ours.shape == theirs.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 48)
    # The random model must not saturate, or the clamp would hide differences.
    assert (ours.abs() < 1).float().mean() > 0.99 and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(tiny_vae, oracle, frames):
    video = seeded_video(frames)
    ours = tiny_vae.encode(video)
    theirs = oracle[0](video)
    assert ours.shape == theirs.shape == (1, 48, 1 + (frames - 1) // 4, 2, 3)
    assert ours.dtype == torch.float32 and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)


def _swapped_patchify(video):
    # Row offset before column offset: the wrong channel order, (c q r) instead of (c r q).
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, 4 * c, f, h // 2, w // 2)


def _swapped_unpatchify(x):
    b, cp, f, h, w = x.shape
    x = x.view(b, cp // 4, 2, 2, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, cp // 4, f, 2 * h, 2 * w)


MISTAKES = {
    "patchify order": ("encode", "patchify", _swapped_patchify),
    "unpatchify order": ("decode", "unpatchify", _swapped_unpatchify),
    "no encoder stage shortcut": ("encode", "AvgDown3D.forward", lambda self, x: 0.0),
    "no decoder stage shortcut": ("decode", "DupUp3D.forward", lambda self, x, first_chunk: 0.0),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_oracle_rejects_a_deliberate_mistake(tiny_vae, oracle, monkeypatch, mistake):
    direction, target, replacement = MISTAKES[mistake]
    owner, _, attr = target.rpartition(".")
    monkeypatch.setattr(getattr(vae22, owner) if owner else vae22, attr, replacement)
    if direction == "encode":
        video = seeded_video(5)
        ours, theirs = tiny_vae.encode(video), oracle[0](video)
    else:
        latents = seeded(1, 48, 2, 2, 3)
        ours, theirs = tiny_vae.decode(latents), oracle[1](latents)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() > 100 * ORACLE_ATOL


def test_encoding_and_decoding_are_causal_in_time(tiny_vae):
    # Latents of the first 5 frames do not change when 4 more follow, nor frames of the first 2 latents.
    # (Equal up to rounding: convs over more frames may sum in another order.)
    video = seeded_video(9, 16, 32)
    torch.testing.assert_close(tiny_vae.encode(video)[:, :, :2], tiny_vae.encode(video[:, :, :5]),
                               atol=ORACLE_ATOL, rtol=0)
    latents = seeded(1, 48, 3, 1, 2)
    torch.testing.assert_close(tiny_vae.decode(latents)[:, :, :5], tiny_vae.decode(latents[:, :, :2]),
                               atol=ORACLE_ATOL, rtol=0)


def test_batch_items_are_processed_bit_identically_alone(tiny_vae):
    latents = seeded(2, 48, 2, 2, 2)
    both = tiny_vae.decode(latents)
    assert torch.equal(both[1:], tiny_vae.decode(latents[1:]))
    assert not torch.allclose(both[0], both[1])
    video = seeded_video(5, 32, 32).expand(2, -1, -1, -1, -1).clone()
    video[0] = video[0].flip(-1)
    latents = tiny_vae.encode(video)
    assert torch.equal(latents[1:], tiny_vae.encode(video[1:]))
    assert not torch.allclose(latents[0], latents[1])


def test_output_is_clamped_and_unpatchified_per_colour(tiny_file, tiny_vae):
    vae = load_vae22(tiny_file[0])
    # The 12 output channels are 4 pixels of red, then green, then blue: push red up and green down.
    vae.decoder.head[2].bias[:4] += 5.0
    vae.decoder.head[2].bias[4:8] -= 5.0
    latents = seeded(1, 48, 2, 2, 2)
    video = vae.decode(latents)
    assert torch.all(video[:, 0] == 1.0) and torch.all(video[:, 1] == -1.0)
    assert torch.equal(video[:, 2], tiny_vae.decode(latents)[:, 2])


@pytest.mark.parametrize("shape", [(1, 3, 4, 32, 32), (1, 3, 0, 32, 32), (1, 3, 5, 24, 32), (1, 3, 5, 32, 40),
                                   (1, 3, 5, 0, 32)])
def test_sizes_that_do_not_fit_are_refused(tiny_vae, shape):
    with pytest.raises(ValueError, match=r"^video of \d+ frames of \d+x\d+: the Wan2\.2 VAE encodes 4k\+1 frames "
                                         r"whose height and width are positive multiples of 16$"):
        tiny_vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("video", [torch.zeros(1, 4, 5, 32, 32), torch.zeros(3, 5, 32, 32),
                                   torch.zeros(1, 3, 5, 32, 32, dtype=torch.uint8)])
def test_videos_that_are_not_float_rgb_are_refused(tiny_vae, video):
    with pytest.raises(ValueError, match=r"^video must be float \[B, 3, F, H, W\] in \[-1, 1\], got torch\."):
        tiny_vae.encode(video)


def test_latents_of_another_width_are_refused(tiny_vae):
    with pytest.raises(ValueError, match=r"latents must be \[B, 48, T, h, w\], got \[1, 16, 2, 2, 2\]"):
        tiny_vae.decode(torch.zeros(1, 16, 2, 2, 2))


def test_file_round_trip_keeps_every_tensor(tmp_path, tiny_file, tiny_vae):
    loaded = tiny_vae.state_dict()
    assert loaded.keys() == tiny_file[1].keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_file[1].items())
    write_tiny_vae22(tmp_path / "again.safetensors", seed=0)
    write_tiny_vae22(tmp_path / "other.safetensors", seed=1)
    assert (tmp_path / "again.safetensors").read_bytes() == tiny_file[0].read_bytes()
    assert (tmp_path / "other.safetensors").read_bytes() != tiny_file[0].read_bytes()


def test_gguf_vae_decodes_as_the_safetensors_one(tmp_path, tiny_file, tiny_vae):
    from gguf import GGMLQuantizationType as Q

    from engine.gguf import write_gguf

    # As a converted VAE would be: conv weights F16, gammas and biases F32.
    state = tiny_file[1]
    tensors = {name: (t.numpy(), Q.F16 if name.endswith(".weight") else Q.F32) for name, t in state.items()}
    write_gguf(tmp_path / "vae.gguf", "wan_vae", tensors)
    rounded = {name: t.half().float() if name.endswith(".weight") else t for name, t in state.items()}
    write_vae_safetensors(rounded, tmp_path / "vae.safetensors")

    from_gguf = load_vae22(tmp_path / "vae.gguf")
    from_safetensors = load_vae22(tmp_path / "vae.safetensors")
    latents, video = seeded(1, 48, 2, 2, 2), seeded_video(5, 32, 32)
    assert torch.equal(from_gguf.decode(latents), from_safetensors.decode(latents))
    assert torch.equal(from_gguf.encode(video), from_safetensors.encode(video))
    assert not torch.equal(from_gguf.decode(latents), tiny_vae.decode(latents))  # the F16 rounding is real


def test_bfloat16_weights_give_float32_outputs_near_the_float32_ones(tiny_file, tiny_vae):
    vae = load_vae22(tiny_file[0], dtype=torch.bfloat16)
    assert vae.decoder.conv1.weight.dtype == torch.bfloat16
    latents, video = seeded(1, 48, 2, 2, 2), seeded_video(5, 32, 32)
    frames, encoded = vae.decode(latents), vae.encode(video)
    assert frames.dtype == encoded.dtype == torch.float32
    assert (frames - tiny_vae.decode(latents)).abs().mean() < 0.05
    assert (encoded - tiny_vae.encode(video)).abs().mean() < 0.05


@pytest.mark.parametrize("name", ["encoder.downsamples.2.downsamples.1.time_conv.weight", "decoder.middle.1.proj.weight",
                                  "conv1.bias", "decoder.upsamples.1.upsamples.2.time_conv.bias"])
def test_missing_tensor_is_named(tmp_path, tiny_file, name):
    state = dict(tiny_file[1])
    del state[name]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(VAEError, match=rf"vae\.safetensors: missing tensor '{re.escape(name)}'$"):
        load_vae22(tmp_path / "vae.safetensors")


def test_misshaped_tensor_is_named(tmp_path, tiny_file):
    state = dict(tiny_file[1])
    state["decoder.head.2.weight"] = torch.zeros(3, 12, 3, 3, 3)
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(VAEError, match=r"'decoder\.head\.2\.weight' has shape \[3, 12, 3, 3, 3\], "
                                       r"expected \[12, 12, 3, 3, 3\]$"):
        load_vae22(tmp_path / "vae.safetensors")


def test_wan21_vae_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    write_vae_safetensors(tiny_vae_state_dict(0), path)
    with pytest.raises(VAEError, match=r"wan_2\.1_vae\.safetensors: decoder\.conv1\.weight takes 16 latent channels; "
                                       r"a Wan2\.2 VAE takes 48 \(a Wan2\.1 VAE"):
        load_vae22(path)


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_pickled_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"Wan2.2_VAE{suffix}"
    torch.save({"decoder.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(VAEError, match=f"Wan2.2_VAE\\{suffix}: pickled checkpoints"):
        load_vae22(path)


def test_not_a_weights_file_is_refused(tmp_path):
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(VAEError, match="neither a safetensors nor a GGUF file"):
        load_vae22(path)
