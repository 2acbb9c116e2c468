"""Wan2.1 VACE (1.3B, 14B): text to video, also under a control video, inside a mask, or from
reference images; one DiT with VACE blocks, umT5, the Wan2.1 VAE (encoder and decoder).

Files: QuantStack's `Wan2.1_14B_VACE-GGUF` (`Wan2.1_14B_VACE-Q8_0.gguf`) or a
1.3B VACE GGUF, the umT5-XXL encoder, `wan_2.1_vae.safetensors`.
Official Wan2.1 `wan/vace.py`, `wan/modules/vace_model.py`, `generate.py`:
50 steps, guidance 5.0, shift 16 (the official command line sets it for
VACE), context_scale 1.0, 81 frames at 16 fps; 832x480 here by default (the
1.3B's size; the 14B also renders 1280x720).

The 96 conditioning channels (`vace_context`), from the job's inputs:
- the control frames (zeros without a control video) split by the mask
  binarised at 0.5 (ones without a mask: white = generate): inactive =
  frames x (1 - m), reactive = frames x m, in [-1, 1] pixel space (masked-out
  pixels become mid-grey), each through the VAE encoder: 16 + 16 channels;
- each reference image alone through the encoder, with zeros as its reactive
  half, placed before the video's latent frames in the given order;
- the mask, each 8x8 pixel block as 64 channels, resized (nearest-exact) to
  the latent frames, zero for the reference frames.
The job's noise covers the reference frames too (one draw of [16, references
+ latent frames, h, w], references first); after sampling they are trimmed off.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, VaeFile, cfg_rows, check_finite, guided,
                                  single)
from engine.sampling import make_solver
from jobs.family import FamilySpec, InputSpec
from jobs.params import (ParamSpec, RenderParams, fps_param, frames_param, guidance_param, sampler_param,
                         shift_param, size_param, step_list_param, steps_param)

VAE_STRIDE = (4, 8, 8)
VACE_CHANNELS = 96  # 16 inactive + 16 reactive latent channels + 64 of the 8x8 mask


def context_scale_param() -> ParamSpec:
    return ParamSpec("context_scale", "float", 1.0, low=0.0, high=100.0,
                     help="strength of the VACE hints (0: the control, mask and references are ignored)")


VACE_INPUTS = (
    InputSpec("control_video", "video", required=False,
              help="the frames to follow (pose, depth, a video to inpaint ...), brought to the job's frames and size"),
    InputSpec("mask_video", "video", required=False, needs="control_video", same_size_as="control_video",
              help="white = generate, black = keep the control video's pixels; as long and as large as the control video"),
    InputSpec("reference_images", "images", required=False,
              help="images of a subject or style, each fitted onto a white canvas of the job's size"),
)

SPEC = FamilySpec(
    name="wan2.1-vace",
    title="Wan2.1 VACE",
    param_specs=(
        size_param("width", 832, multiple=16),
        size_param("height", 480, multiple=16),
        frames_param(81),
        steps_param(50),
        guidance_param("guidance", 5.0),
        shift_param(16.0),
        fps_param(16),
        sampler_param("unipc"),
        context_scale_param(),
        step_list_param(),
    ),
    inputs=VACE_INPUTS,
)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return single(dits, vaes, lambda d: d.config.vace_in_dim == VACE_CHANNELS, 16, SPEC.title)


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_vace_inputs(inputs: dict, params: RenderParams
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(frames [3, F, H, W] in [-1, 1], mask [1, F, H, W] in [0, 1], reference images [3, H, W] each)
    of a job: zero frames and a mask of ones without a control video (the official text-to-video)."""
    from engine.video_input import read_control, read_reference

    frames, height, width = params.frames, params.height, params.width
    control = inputs.get("control_video")
    if control:
        video, mask = read_control(control, inputs.get("mask_video"), frames, height, width)
    else:
        video, mask = torch.zeros(3, frames, height, width), torch.ones(1, frames, height, width)
    references = [read_reference(uri, height, width) for uri in _as_list(inputs.get("reference_images"))]
    return video, mask, references


def mask_channels(mask: torch.Tensor, references: int) -> torch.Tensor:
    """[64, R + T, h, w]: mask [1, F, H, W], each 8x8 pixel block as 64 channels (row-in-block major),
    nearest-exact to the T = (F + 3) // 4 latent frames, zeros in front for R reference frames."""
    _, frames, height, width = mask.shape
    sh, sw = VAE_STRIDE[1:]
    h, w = height // sh, width // sw
    blocks = mask[0].view(frames, h, sh, w, sw).permute(2, 4, 0, 1, 3).reshape(sh * sw, frames, h, w)
    latent_frames = (frames + VAE_STRIDE[0] - 1) // VAE_STRIDE[0]
    blocks = F.interpolate(blocks.unsqueeze(0), size=(latent_frames, h, w), mode="nearest-exact")[0]
    return torch.cat([blocks.new_zeros(sh * sw, references, h, w), blocks], dim=1)


def vace_context(vae, video: torch.Tensor, mask: torch.Tensor, references: list[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """[96, R + T, h, w]: the inactive and reactive latents (reference latents in front, with
    zeros as their reactive half) and the mask's 64 channels (official vace_encode_frames,
    vace_encode_masks, vace_latent)."""
    video, mask = video.to(device), mask.to(device)
    binary = (mask > 0.5).to(video.dtype)
    with torch.no_grad():
        inactive = vae.encode((video * (1 - binary)).unsqueeze(0))[0]
        reactive = vae.encode((video * binary).unsqueeze(0))[0]
        latent = torch.cat([inactive, reactive])
        refs = []
        for image in references:  # each alone, one latent frame
            z = vae.encode(image.to(device)[:, None].unsqueeze(0))[0]
            refs.append(torch.cat([z, torch.zeros_like(z)]))
    latent = torch.cat([*refs, latent], dim=1)
    return torch.cat([latent, mask_channels(mask, len(references))])


class Wan21Vace:
    """One resident VACE DiT and the Wan2.1 VAE with its encoder."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str):
        from engine.wan.dit import load_dit
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.dit = load_dit(files["dit"], device=device, dtype=dtype, policy=policy)
        self.vae = load_vae(files["vae"], device=device, dtype=torch.float32, encoder=True)

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict, progress: ProgressFn | None = None) -> torch.Tensor:
        video, mask, references = read_vace_inputs(inputs, params)
        z = vace_context(self.vae, video, mask, references, self.device)
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *z.shape[1:]), self.device)  # reference frames included
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        rows = cfg_rows(params.guidance)  # guidance 1: the conditional forward alone
        context = torch.stack([cond, uncond])[:rows].to(self.dtype)
        conditioning = z.to(self.dtype).unsqueeze(0).expand(rows, -1, -1, -1, -1)
        for i, t in enumerate(solver.timesteps):
            x = latents.to(self.dtype).unsqueeze(0).expand(rows, *latents.shape)
            timestep = torch.full((rows,), float(t), device=self.device)
            with torch.no_grad():
                v = self.dit(x, timestep, context, vace_context=conditioning,
                             context_scale=params.context_scale).float()
            velocity = guided(v, params.guidance)
            latents = solver.step(velocity, i, latents)
            check_finite(latents, i + 1, params.steps)
            if progress is not None:
                progress(i + 1, params.steps)
        return latents[:, len(references):]  # the reference frames trimmed off

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(latents.unsqueeze(0))[0]


FAMILY = Family(
    spec=SPEC,
    roles=("dit", "vae"),
    recognise=recognise,
    pipeline=Wan21Vace,
    files_hint="QuantStack/Wan2.1_14B_VACE-GGUF (or a 1.3B VACE GGUF), the umT5-XXL encoder, wan_2.1_vae.safetensors",
)
