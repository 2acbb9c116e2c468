"""The Wan2.2 video VAE (TI2V-5B), as wan/modules/vae2_2.py (Wan-Video/Wan2.2) defines it.

Module attribute names are the original checkpoint names (`encoder.conv1`,
`encoder.downsamples.1.downsamples.2.time_conv`, `conv1`, `conv2`,
`decoder.upsamples.0.upsamples.3.resample.1`, ...), the names in Comfy-Org's
`wan2.2_vae.safetensors`, so the file loads without a renaming table.

What differs from the Wan2.1 VAE (engine/wan/vae.py, whose causal conv,
norm, residual and attention blocks and downsampler are reused here):
- the video is patchified 2x2 into 12 channels before the encoder, and the
  decoder's 12 output channels are unpatchified back to RGB;
- each stage is a residual block of its own: the encoder's stages add a
  parameter-free space/time-to-channel average of their input (`AvgDown3D`),
  the decoder's a channel-to-space/time duplicate (`DupUp3D`);
- the decoder's upsamplers keep their channels (Wan2.1 halves them), and the
  decoder has its own base width (256 against the encoder's 160);
- 48 latent channels, stride 4 in time and 16 in space.

Both directions are causal in time and chunked as the official `encode` and
`decode` are: the encoder sees frame 0, then 4 frames at a time, the decoder
one latent frame at a time, with each 3-frame causal conv carrying the last
CACHE_T frames of its input from chunk to chunk (engine.wan.vae.CausalConv3d).
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

from engine.gguf import GGUFFile
from engine.wan.vae import (
    PICKLE_SUFFIXES,
    AttentionBlock,
    CausalConv3d,
    Downsampler,
    FrameCache,
    ResidualBlock,
    RMSNorm,
    VAEError,
    per_frame,
)

# Per-channel statistics of the 48-channel latent (Wan2_2_VAE.__init__); the
# DiT works on (mu - mean) / std, the decoder on z.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# The video is cut into 2x2 patches: 3 colours x 4 pixels = 12 channels in and out.
PATCH_SIZE = 2
PATCH_CHANNELS = 3 * PATCH_SIZE * PATCH_SIZE


@dataclass(frozen=True)
class Wan22VAEConfig:
    """Hyper-parameters of the Wan2.2 VAE (`Wan2_2_VAE`, `_video_vae`); the defaults are the published model."""

    z_dim: int = 48
    base_dim: int = 160  # encoder width (the official `dim`)
    decoder_base_dim: int = 256  # decoder width (the official `dec_dim`)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # the official spelling

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temperal_downsample))

    @property
    def encoder_dims(self) -> list[int]:
        """Channels entering and leaving the encoder's stages: base_dim, then base_dim * dim_mult."""
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        """Channels entering and leaving the decoder's stages: the widest first, then dim_mult reversed."""
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width: the 2x2 patch, then 2x per downsampling stage (16)."""
        return PATCH_SIZE * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for the published VAE)."""
        return 2 ** sum(self.temperal_downsample)


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, 4C, F, H/2, W/2]; channel c*4 + 2*dx + dy holds pixel (2y+dy, 2x+dx).

    The column offset comes before the row offset, as vae2_2.py's
    `rearrange(x, "b c f (h q) (w r) -> b (c r q) f h w")` orders them.
    """
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // PATCH_SIZE, PATCH_SIZE, w // PATCH_SIZE, PATCH_SIZE)  # b c f h dy w dx
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH_SIZE**2, f, h // PATCH_SIZE, w // PATCH_SIZE)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `patchify`: [B, 4C, F, h, w] -> [B, C, F, 2h, 2w]."""
    b, cp, f, h, w = x.shape
    x = x.view(b, cp // PATCH_SIZE**2, PATCH_SIZE, PATCH_SIZE, f, h, w)  # b c dx dy f h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cp // PATCH_SIZE**2, f, h * PATCH_SIZE, w * PATCH_SIZE)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of an encoder stage: fold (time, space) blocks into channels, average groups.

    A chunk whose frame count is not a multiple of the time factor (the
    1-frame first chunk) is zero-padded in front, as the official code does.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        if in_dim * factor_t * factor_s**2 % out_dim:
            raise ValueError(f"AvgDown3D cannot average {in_dim} channels x {factor_t * factor_s**2} into {out_dim}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        # Channels become (c, dt, dy, dx); consecutive groups of them are averaged.
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, -1, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a decoder stage: repeat channels, unfold them into (time, space) blocks.

    On the first chunk only the last of the factor_t frames is kept, so the
    first latent frame gives one frame, as the main path's upsampler does.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        if out_dim * factor_t * factor_s**2 % in_dim:
            raise ValueError(f"DupUp3D cannot spread {in_dim} channels over {out_dim} x {factor_t * factor_s**2}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s**2 // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class Upsampler(nn.Module):
    """Decoder upsampler: 2x nearest in h, w and a 3x3 conv per frame, keeping the channels (Wan2.1's halves them).

    A temporal one first doubles the frame count with `time_conv`, whose
    2*dim output channels are two frames for each input frame; on the first
    chunk it is skipped, so the first latent frame gives one frame (the
    official 'Rep').
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None and not first_chunk:
            # [b, (2, c), t] -> [b, c, (t, 2)]: the two halves interleave in time.
            x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return per_frame(self.resample, x)


class DownBlock(nn.Module):
    """An encoder stage (Down_ResidualBlock): residual blocks, a downsampler, plus the AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_downsample: bool,
                 down_flag: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temperal_downsample else 1,
                                      factor_s=2 if down_flag else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down_flag:
            layers.append(Downsampler(out_dim, temporal=temperal_downsample))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Downsampler) else layer(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """A decoder stage (Up_ResidualBlock): residual blocks, an upsampler, plus the DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_upsample: bool,
                 up_flag: bool) -> None:
        super().__init__()
        # The last stage has neither an upsampler nor a shortcut: it is plain residual blocks.
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temperal_upsample else 1, factor_s=2)
                             if up_flag else None)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up_flag:
            layers.append(Upsampler(out_dim, temporal=temperal_upsample))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        shortcut = self.avg_shortcut(x, first_chunk) if self.avg_shortcut is not None else 0
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Upsampler) else layer(x, cache)
        return x + shortcut


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        dims = config.encoder_dims
        last_stage = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(PATCH_CHANNELS, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownBlock(in_dim, out_dim, config.num_res_blocks,
                      temperal_downsample=i != last_stage and config.temperal_downsample[i],
                      down_flag=i != last_stage)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))))
        self.middle = _middle(dims[-1])
        # The encoder predicts mean and log-variance: 2 * z_dim channels.
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], config.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache, first_chunk)
        for layer in self.middle:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        dims = config.decoder_dims
        last_stage = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*(
            UpBlock(in_dim, out_dim, config.num_res_blocks,
                    temperal_upsample=i != last_stage and config.temperal_upsample[i],
                    up_flag=i != last_stage)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))))
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], PATCH_CHANNELS, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Wan22VAE(nn.Module):
    """WanVAE_ of vae2_2.py: `encoder`, `conv1` (to mean/log-variance), `conv2` (post-quant), `decoder`."""

    def __init__(self, config: Wan22VAEConfig = Wan22VAEConfig()) -> None:
        super().__init__()
        if config.z_dim != len(LATENT_MEAN):
            raise ValueError(f"the Wan2.2 latent statistics are for z_dim {len(LATENT_MEAN)}, not {config.z_dim}")
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and 1/std as [1, z, 1, 1, 1] float32 (the official `scale`)."""
        device = self.conv2.weight.device
        mean = torch.tensor(LATENT_MEAN, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(LATENT_STD, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latent means [B, 48, (F-1)/4 + 1, H/16, W/16], float32.

        Returns (mu - mean) / std, the latents as the DiT sees them (no
        sampling). F must be 1 + 4k, H and W multiples of 16. Runs in the
        weights' dtype; each video of the batch is encoded alone.
        """
        if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(f"video must be float [B, 3, F, H, W] in [-1, 1], got {video.dtype} {list(video.shape)}")
        frames, height, width = video.shape[2:]
        ft, fs = self.config.temporal_factor, self.config.spatial_factor
        if frames % ft != 1 or height % fs or width % fs or min(height, width) == 0:
            raise ValueError(f"video of {frames} frames of {height}x{width}: the Wan2.2 VAE encodes "
                             f"{ft}k+1 frames whose height and width are positive multiples of {fs}")
        mean, inv_std = self._statistics()
        x = video.to(device=mean.device, dtype=self.conv1.weight.dtype)
        mu = torch.cat([self._encode_video(x[i:i + 1]) for i in range(x.shape[0])])
        # The official (mu - scale[0]) * scale[1] with scale = [mean, 1/std].
        return (mu.float() - mean) * inv_std

    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        x = patchify(video)
        cache: FrameCache = {}
        # Frame 0 alone, then 4 frames per chunk: one latent frame each.
        step = self.config.temporal_factor
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)]
        out = torch.cat([self.encoder(chunk, cache, first_chunk=(i == 0)) for i, chunk in enumerate(chunks)], dim=2)
        mu, _log_var = self.conv1(out).chunk(2, dim=1)
        return mu

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 48, T, h, w] -> video [B, 3, 1 + 4(T-1), 16h, 16w], float32 in [-1, 1].

        Runs in the weights' dtype (float32 as loaded by default, as the
        official code decodes). Videos are decoded one at a time, as the
        official `Wan2_2_VAE.decode` does, so a video's frames are
        bit-identical whatever else is in the batch.
        """
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, h, w], got {list(latents.shape)}")
        mean, inv_std = self._statistics()
        # The official decode's z / scale[1] + scale[0] with scale = [mean, 1/std].
        z = (latents.to(device=mean.device, dtype=torch.float32) / inv_std + mean).to(self.conv2.weight.dtype)
        videos = [self._decode_video(z[i:i + 1]) for i in range(z.shape[0])]
        return torch.cat(videos).float().clamp_(-1.0, 1.0)

    def _decode_video(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv2(z)
        cache: FrameCache = {}
        frames = [self.decoder(x[:, :, i:i + 1], cache, first_chunk=(i == 0)) for i in range(x.shape[2])]
        return unpatchify(torch.cat(frames, dim=2))


def infer_config(shapes: Mapping[str, Sequence[int]]) -> Wan22VAEConfig:
    """The config whose tensors have these shapes (original names).

    base_dim is the encoder's first width (`encoder.conv1`), dim_mult the
    encoder's stage widths over it, num_res_blocks the residual blocks of
    encoder stage 0, temperal_downsample which encoder stages hold a
    `time_conv`; decoder_base_dim is the decoder's last stage width over
    dim_mult[0]. Any other inconsistency shows up when the loader compares
    every tensor with the model built from this config.
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise VAEError(f"missing tensor {name!r} (needed to infer the VAE size)")
        found = tuple(shapes[name])
        if len(found) < 2 or min(found) <= 0:
            raise VAEError(f"tensor {name!r} has shape {list(found)}, not a convolution weight")
        return found

    def indices(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for name in shapes if (m := re.match(pattern, name))})

    z_dim = shape("decoder.conv1.weight")[1]
    if z_dim != len(LATENT_MEAN):
        hint = " (a Wan2.1 VAE: engine.wan.vae.load_vae reads it)" if z_dim == 16 else ""
        raise VAEError(f"decoder.conv1.weight takes {z_dim} latent channels; a Wan2.2 VAE takes {len(LATENT_MEAN)}{hint}")
    stages = indices(r"encoder\.downsamples\.(\d+)\.downsamples\.")
    if stages != list(range(len(stages))) or len(stages) < 2:
        raise VAEError(f"encoder.downsamples.N.downsamples.* tensors for N in {stages}, expected N = 0, 1, ... "
                       "(at least 2 stages): not a Wan2.2 VAE encoder")
    res_blocks = indices(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.")
    if not res_blocks or res_blocks != list(range(len(res_blocks))):
        raise VAEError(f"encoder stage 0 has residual blocks {res_blocks}, expected 0, 1, ...")
    num_res_blocks = len(res_blocks)

    base_dim = shape("encoder.conv1.weight")[0]
    widths = [shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] for i in stages]
    if any(w % base_dim for w in widths):
        raise VAEError(f"encoder stage widths {widths} are not multiples of encoder.conv1's {base_dim} channels")
    dim_mult = tuple(w // base_dim for w in widths)
    last = len(stages) - 1
    decoder_width = shape(f"decoder.upsamples.{last}.upsamples.0.residual.2.weight")[0]
    if decoder_width % dim_mult[0]:
        raise VAEError(f"decoder.upsamples.{last} has {decoder_width} channels, not a multiple of {dim_mult[0]}")
    temperal_downsample = tuple(
        any(name.startswith(f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.") for name in shapes)
        for i in stages[:-1])
    return Wan22VAEConfig(
        z_dim=z_dim,
        base_dim=base_dim,
        decoder_base_dim=decoder_width // dim_mult[0],
        dim_mult=dim_mult,
        num_res_blocks=num_res_blocks,
        temperal_downsample=temperal_downsample,
    )


def _build(path: Path, shapes: Mapping[str, tuple[int, ...]], fetch: Callable[[str], torch.Tensor]) -> Wan22VAE:
    """Check every tensor of the file against the model it describes, then assign them."""
    try:
        config = infer_config(shapes)
        with torch.device("meta"):
            model = Wan22VAE(config)
    except (VAEError, ValueError) as err:
        raise VAEError(f"{path}: {err}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name in expected:
        if name not in shapes:
            raise VAEError(f"{path}: missing tensor {name!r}")
    for name in shapes:
        if name not in expected:
            raise VAEError(f"{path}: unexpected tensor {name!r} for a Wan2.2 VAE with {config}")
    for name, want in expected.items():
        got = tuple(shapes[name])
        # GGUF writers may drop unit axes (gamma [dim, 1, 1, 1] stored as [dim]).
        if got != want and [d for d in got if d != 1] != [d for d in want if d != 1]:
            raise VAEError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
    state = {name: fetch(name).reshape(want) for name, want in expected.items()}
    model.load_state_dict(state, assign=True)  # keep the loaded tensors: no second copy
    return model.eval().requires_grad_(False)


def load_vae22(path: str | os.PathLike[str], device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Wan22VAE:
    """Load an original-layout Wan2.2 VAE (Comfy-Org's wan2.2_vae.safetensors, or a .gguf), encoder and decoder.

    The format is read from the file's first bytes; pickled checkpoints are refused.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise VAEError(f"{path}: pickled checkpoints ({path.suffix}) are not loaded (unpickling can run code); "
                       "use the .safetensors or .gguf VAE")
    if not path.is_file():
        raise VAEError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)

    if magic == b"GGUF":
        # Tensors handed out keep their pages of the map alive after the file closes.
        with GGUFFile(path) as gguf_file:
            shapes = {name: gguf_file.shape(name) for name in gguf_file.tensor_names}
            return _build(path, shapes, lambda name: gguf_file.dequantize(name, dtype, device))

    try:
        file = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise VAEError(f"{path}: neither a safetensors nor a GGUF file ({err})") from None
    with file:
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
        return _build(path, shapes, lambda name: file.get_tensor(name).to(device=device, dtype=dtype))
