"""The Wan2.1 video VAE, as wan/modules/vae.py (Wan-Video/Wan2.1) defines it.

Module attribute names are the original checkpoint names (`conv2`,
`decoder.middle.1.to_qkv`, `encoder.downsamples.5.time_conv`, ...), so
`wan_2.1_vae.safetensors` loads without a renaming table. The decoding half
(`conv2`, `decoder`) is always built; the encoding half (`encoder`, `conv1`)
only when asked for (`load_vae(..., encoder=True)`), as only image-to-video
needs it.

Both halves are causal in time and run chunk by chunk, as the official
`WanVAE_` does: each causal conv with a 3-frame kernel keeps the last
CACHE_T=2 frames of its input from the previous chunk (a `FrameCache`), which
stand in for its zero padding. Decoding takes one latent frame at a time and
the temporal upsamplers skip their time conv on the first chunk (the official
'Rep' marker), so T latent frames give 1 + 4(T-1) video frames at 8x the
latent height and width. Encoding takes the first frame alone, then 4 frames
at a time, and the temporal downsamplers pass the first chunk's frame through
untouched, so 1 + 4(T-1) frames give T latent frames.
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
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.gguf import GGUFFile

# Frames of a causal conv's input carried from one chunk to the next: the
# time padding of a 3-frame kernel.
CACHE_T = 2

# Per-channel statistics of the 16-channel latent (WanVAE.__init__); the DiT
# works on (z - mean) / std, the decoder on z.
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Pickle-based checkpoints: unpickling can run arbitrary code, so never load them.
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")

# What one encode or decode keeps between chunks: causal conv -> its last input frames.
FrameCache = dict[nn.Module, torch.Tensor]


class VAEError(ValueError):
    """A VAE file that cannot be used: wrong format, missing, unexpected or mis-shaped tensor."""


@dataclass(frozen=True)
class WanVAEConfig:
    """Hyper-parameters of the Wan2.1 VAE (`_video_vae` cfg); the defaults are the published model."""

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # the official spelling
    dropout: float = 0.0

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temperal_downsample))

    @property
    def encoder_dims(self) -> list[int]:
        """Channels of the encoder's stem, then leaving each of its stages."""
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        """Channels entering the decoder's stages: the widest first, then dim_mult reversed."""
        return [self.base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width (8 for the published VAE)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for the published VAE)."""
        return 2 ** sum(self.temperal_downsample)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding lies wholly before the first frame, so frame t never sees t+1.

    With a `cache`, the previous chunk's last input frames replace that much
    of the zero padding, and this chunk's last CACHE_T frames are stored for
    the next one; decoding frame by frame then equals decoding the whole clip.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel_size)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.space_padding = (pw, pw, ph, ph)
        self.time_padding = 2 * pt

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        time_padding = self.time_padding
        if cache is not None and time_padding > 0:
            past = cache.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                time_padding -= past.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()
        return super().forward(F.pad(x, (*self.space_padding, time_padding, 0)))


class RMSNorm(nn.Module):
    """Wan's RMS_norm: unit L2 norm over channels, times sqrt(dim) and `gamma` (no bias in the VAE)."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        # gamma broadcasts over (h, w) for per-frame images, over (t, h, w) for videos.
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Sequential indices are the checkpoint's: residual.{0,3}.gamma, residual.{2,6}.weight.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (frames do not attend to each other)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [b*t, h*w, 3c]
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, c, h, w)
        return x + self.proj(out).view(b, t, c, h, w).transpose(1, 2)


class Upsampler(nn.Module):
    """Decoder upsampler: 2x nearest in h, w and a 3x3 conv halving the channels, per frame.

    A temporal one first doubles the frame count with `time_conv`, whose
    2*dim output channels are two frames for each input frame; on the first
    chunk it is skipped, so the first latent frame gives one frame (the
    official 'Rep').
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None and not first_chunk:
            # [b, (2, c), t] -> [b, c, (t, 2)]: the two halves interleave in time.
            x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            t = 2 * t
        return per_frame(self.resample, x)


class Downsampler(nn.Module):
    """Encoder downsampler: a stride-2 3x3 conv per frame, then for a temporal one a stride-2 conv in time.

    The spatial conv pads one zero row and column after the image only (the
    official ZeroPad2d((0, 1, 0, 1))). The time conv is unpadded: its
    window reaches back to the last frame of the previous chunk, so a chunk
    of 2n frames gives n; the first chunk's single frame passes through
    untouched, as in the official code.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = per_frame(self.resample, x)
        if self.time_conv is not None:
            past = cache.get(self.time_conv)
            cache[self.time_conv] = x[:, :, -1:].clone()
            if not first_chunk:
                x = self.time_conv(torch.cat([past, x], dim=2))
        return x


def per_frame(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply 2-D layers to each frame of a video [b, c, t, h, w]."""
    b, c, t, h, w = x.shape
    frames = layers(x.transpose(1, 2).reshape(b * t, c, h, w))
    return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)


class Encoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.encoder_dims
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)

        # A flat list, as the checkpoint numbers it: per stage num_res_blocks
        # residual blocks, then (except after the last stage) one downsampler.
        downsamples: list[nn.Module] = []
        last_stage = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if i != last_stage:
                downsamples.append(Downsampler(out_dim, temporal=config.temperal_downsample[i]))
        self.downsamples = nn.Sequential(*downsamples)
        width = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(width, width, config.dropout), AttentionBlock(width),
            ResidualBlock(width, width, config.dropout))
        # 2 * z_dim outputs: the posterior's mean and log-variance.
        self.head = nn.Sequential(
            RMSNorm(width, images=False), nn.SiLU(), CausalConv3d(width, 2 * config.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Downsampler) else layer(x, cache)
        for layer in self.middle:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.decoder_dims
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], config.dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], config.dropout))

        # A flat list, as the checkpoint numbers it: per stage num_res_blocks + 1
        # residual blocks, then (except after the last stage) one upsampler.
        upsamples: list[nn.Module] = []
        last_stage = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            for _ in range(config.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if i != last_stage:
                upsamples.append(Upsampler(out_dim, temporal=config.temperal_upsample[i]))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FrameCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, Upsampler) else layer(x, cache)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAE(nn.Module):
    """WanVAE_: `encoder` and `conv1` (quant conv) encode, `conv2` (post-quant conv) and `decoder` decode.

    With encoder=False only the decoding half is built (`encoder` and `conv1`
    are None). Attributes are registered in the official order, so the state
    dict lists tensors as the original file does.
    """

    def __init__(self, config: WanVAEConfig = WanVAEConfig(), encoder: bool = False) -> None:
        super().__init__()
        if config.z_dim != len(LATENT_MEAN):
            raise ValueError(f"the Wan2.1 latent statistics are for z_dim {len(LATENT_MEAN)}, not {config.z_dim}")
        self.config = config
        z2 = 2 * config.z_dim
        self.encoder = Encoder3d(config) if encoder else None
        self.conv1 = CausalConv3d(z2, z2, 1) if encoder else None
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        weight = self.conv2.weight
        stats = dict(dtype=weight.dtype, device=weight.device)
        mean = torch.tensor(LATENT_MEAN, **stats).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENT_STD, **stats).view(1, -1, 1, 1, 1)
        return mean, std, stats

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + k, H/8, W/8], float32.

        The latent is the posterior mean (no sampling), normalised as the DiT
        sees it, (mu - mean) / std, as the official `WanVAE.encode` returns
        it. Runs in the weights' dtype; videos are encoded one at a time, as
        the official code does, so a video's latents do not depend on the batch.
        """
        if self.encoder is None:
            raise ValueError("this WanVAE was built without its encoder: load it with load_vae(path, encoder=True)")
        if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(f"video must be float [B, 3, F, H, W] in [-1, 1], got {video.dtype} {list(video.shape)}")
        frames, height, width = video.shape[2:]
        ft, fs = self.config.temporal_factor, self.config.spatial_factor
        if (frames - 1) % ft or height % fs or width % fs or min(height, width) == 0:
            raise ValueError(f"video of {frames} frames of {height}x{width}: the Wan2.1 VAE encodes "
                             f"{ft}k+1 frames whose height and width are positive multiples of {fs}")
        mean, std, stats = self._latent_stats()
        mu = torch.cat([self._encode_video(video[i:i + 1].to(**stats)) for i in range(video.shape[0])])
        # The official (mu - scale[0]) * scale[1] with scale = [mean, 1/std].
        return ((mu - mean) * (1.0 / std)).float()

    def _encode_video(self, x: torch.Tensor) -> torch.Tensor:
        # The first frame alone, then temporal_factor frames per chunk: one latent frame each.
        step = self.config.temporal_factor
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)]
        cache: FrameCache = {}
        out = torch.cat([self.encoder(chunk, cache, first_chunk=(i == 0)) for i, chunk in enumerate(chunks)], dim=2)
        return self.conv1(out)[:, :self.config.z_dim]  # mu; the log-variance is not used

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w], float32 in [-1, 1].

        Runs in the weights' dtype (float32 as loaded by default, as the
        official code decodes). Videos are decoded one at a time, as the
        official `WanVAE.decode` does, so a video's frames are bit-identical
        whatever else is in the batch.
        """
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, h, w], got {list(latents.shape)}")
        mean, std, stats = self._latent_stats()
        # The official decode's z / scale[1] + scale[0] with scale = [mean, 1/std].
        z = latents.to(**stats) * std + mean
        videos = [self._decode_video(z[i:i + 1]) for i in range(z.shape[0])]
        return torch.cat(videos).float().clamp_(-1.0, 1.0)

    def _decode_video(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv2(z)
        cache: FrameCache = {}
        frames = [self.decoder(x[:, :, i:i + 1], cache, first_chunk=(i == 0)) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2)


def _is_read(name: str, encoder: bool) -> bool:
    """Whether load_vae reads this tensor: the decoding half always, the encoding half on request."""
    return name.startswith(("decoder.", "conv2.", *(("encoder.", "conv1.") if encoder else ())))


def infer_config(shapes: Mapping[str, Sequence[int]]) -> WanVAEConfig:
    """The config whose decoder has these tensor shapes (original names; other names are ignored).

    Stage k's first residual block is `decoder.upsamples.{k*(n+2)}` for n res
    blocks, and the first upsampler sits at index n+1. base_dim and dim_mult
    are only defined up to a common factor: base_dim is taken as the gcd of
    the stage widths (96 -> (1, 2, 4, 4) for the published VAE).
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise VAEError(f"missing tensor {name!r} (needed to infer the VAE size)")
        found = tuple(shapes[name])
        if len(found) < 2 or min(found) <= 0:
            raise VAEError(f"tensor {name!r} has shape {list(found)}, not a convolution weight")
        return found

    z_dim = shape("decoder.conv1.weight")[1]
    if z_dim != len(LATENT_MEAN):
        raise VAEError(f"decoder.conv1.weight takes {z_dim} latent channels; a Wan2.1 VAE takes {len(LATENT_MEAN)}")
    upsampler_indices = sorted({int(name.split(".")[2]) for name in shapes
                                if re.match(r"decoder\.upsamples\.\d+\.resample\.", name)})
    if not upsampler_indices:
        raise VAEError("no decoder.upsamples.N.resample tensors: not a Wan2.1 VAE decoder")
    num_res_blocks = upsampler_indices[0] - 1
    stride = num_res_blocks + 2  # residual blocks + 1, then the upsampler
    num_stages = len(upsampler_indices) + 1
    # Every residual block holds tensors: a far upsampler index must not plan millions of them.
    if num_res_blocks < 0 or (num_res_blocks + 1) * num_stages > len(shapes):
        raise VAEError(f"the first upsampler is decoder.upsamples.{upsampler_indices[0]}: "
                       f"{num_stages} stages of {num_res_blocks + 1} residual blocks cannot come from {len(shapes)} tensors")
    widths = [shape(f"decoder.upsamples.{k * stride}.residual.2.weight")[0] for k in range(num_stages)]
    temperal_upsample = [any(name.startswith(f"decoder.upsamples.{k * stride + num_res_blocks + 1}.time_conv.")
                             for name in shapes) for k in range(num_stages - 1)]
    base_dim = math.gcd(*widths)
    return WanVAEConfig(
        z_dim=z_dim,
        base_dim=base_dim,
        dim_mult=tuple(w // base_dim for w in reversed(widths)),
        num_res_blocks=num_res_blocks,
        temperal_downsample=tuple(reversed(temperal_upsample)),
    )


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _build(path: Path, shapes: Mapping[str, tuple[int, ...]],
           fetch: Callable[[str], torch.Tensor], encoder: bool) -> WanVAE:
    """Check the file's tensors against the model its decoder describes, then assign them."""
    try:
        config = infer_config(shapes)
    except VAEError as err:
        raise VAEError(f"{path}: {err}") from None
    with torch.device("meta"):
        model = WanVAE(config, encoder=encoder)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name in expected:
        if name not in shapes:
            raise VAEError(f"{path}: missing tensor {name!r}")
    for name in shapes:
        if name not in expected:
            halves = "encoder and decoder" if encoder else "decoder"
            raise VAEError(f"{path}: unexpected tensor {name!r} for a Wan2.1 VAE {halves} with {config}")
    for name, want in expected.items():
        got = tuple(shapes[name])
        # GGUF writers may drop unit axes (gamma [dim, 1, 1, 1] stored as [dim]).
        if got != want and _squeezed(got) != _squeezed(want):
            raise VAEError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
    state = {name: fetch(name).reshape(want) for name, want in expected.items()}
    model.load_state_dict(state, assign=True)  # keep the loaded tensors: no second copy
    return model.eval().requires_grad_(False)


def load_vae(path: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, encoder: bool = False) -> WanVAE:
    """Load an original-layout Wan2.1 VAE (.safetensors or .gguf), by default its decoding half only.

    The format is read from the file's first bytes; `decoder.*` and `conv2.*`
    are read (memory-mapped), and with encoder=True also `encoder.*` and
    `conv1.*`, checked against the size the decoder implies. Otherwise the
    encoder's tensors are never read, not even their shapes.
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
            shapes = {name: gguf_file.shape(name) for name in gguf_file.tensor_names if _is_read(name, encoder)}
            return _build(path, shapes, lambda name: gguf_file.dequantize(name, dtype, device), encoder)

    try:
        file = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise VAEError(f"{path}: neither a safetensors nor a GGUF file ({err})") from None
    with file:
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys() if _is_read(name, encoder)}
        return _build(path, shapes, lambda name: file.get_tensor(name).to(device=device, dtype=dtype), encoder)
