"""Wan2.2 TI2V-5B: text to video, or image to video, with the Wan2.2 VAE (48 latent channels, 4x16x16).

Files: QuantStack's `Wan2.2-TI2V-5B-GGUF` (`Wan2.2-TI2V-5B-<quant>.gguf`),
the umT5-XXL encoder, Comfy-Org's `wan2.2_vae.safetensors`.
Official `wan/configs/wan_ti2v_5B.py`, `wan/textimage2video.py`: 1280x704
(or 704x1280; multiples of 32), 121 frames at 24 fps, 50 steps, guidance 5.0,
shift 5.0. The DiT takes a timestep per token. With an image, the image is
resized and centre-cropped to the output size (by default the image's aspect
ratio at 1280x704's area), encoded to the first latent frame, held there
through every step, and its tokens get timestep 0.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, RenderError, VaeFile, cfg_rows, check_finite,
                                  guided, single)
from engine.sampling import make_solver
from jobs.family import FamilySpec, InputSpec
from jobs.params import (ParamSpec, RenderParams, fps_param, frames_param, guidance_param, sampler_param,
                         shift_param, step_list_param, steps_param)

DEFAULT_SIZE = (704, 1280)  # (height, width) of text to video; its area sizes image to video
VAE_STRIDE = (4, 16, 16)
PATCH = 2

SPEC = FamilySpec(
    name="wan2.2-ti2v-5b",
    title="Wan2.2 TI2V-5B",
    param_specs=(
        ParamSpec("width", "int", 0, low=0, high=4096, multiple=32,
                  help="pixels, a multiple of 32; 0 (default): 1280, or with an image its aspect at 1280x704's area"),
        ParamSpec("height", "int", 0, low=0, high=4096, multiple=32,
                  help="pixels, a multiple of 32; 0 (default): 704, or with an image its aspect at 1280x704's area"),
        frames_param(121),
        steps_param(50),
        guidance_param("guidance", 5.0),
        shift_param(5.0),
        fps_param(24),
        sampler_param("unipc"),
        step_list_param(),
    ),
    inputs=(InputSpec("image", "image", required=False, help="optional first frame: PNG, JPEG or WebP"),),
    paired_size=True,
)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return single(dits, vaes, lambda d: d.config.in_dim == 48 and d.config.out_dim == 48, 48, SPEC.title)


def output_size(params: RenderParams, image: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width): the job's; else with an image (height, width) the official `best_output_size`
    at the default area; else the default 704x1280."""
    from engine.image import ti2v_output_size

    if params.width and params.height:
        return params.height, params.width
    if params.width or params.height:
        raise RenderError(f"width {params.width}, height {params.height}: give both, or neither")
    if image is None:
        return DEFAULT_SIZE
    return ti2v_output_size(image[0], image[1], DEFAULT_SIZE[0] * DEFAULT_SIZE[1], VAE_STRIDE[1], PATCH)


class Wan22TI2V5B:
    """One resident DiT (48 channels in and out) and the Wan2.2 VAE."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str):
        from engine.wan.dit import load_dit
        from engine.wan.vae22 import load_vae22

        self.device, self.dtype = device, dtype
        self.dit = load_dit(files["dit"], device=device, dtype=dtype, policy=policy)
        self.vae = load_vae22(files["vae"], device=device, dtype=torch.float32)

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict[str, str], progress: ProgressFn | None = None) -> torch.Tensor:
        from engine.image import read_image, ti2v_image

        image = read_image(inputs["image"]) if "image" in inputs else None
        height, width = output_size(params, None if image is None else image.shape[:2])
        grid = ((params.frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1], width // VAE_STRIDE[2])
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((48, *grid), self.device)

        # mask: 0 where the latent is given (the image's frame), 1 where it is denoised.
        mask = torch.ones_like(latents)
        first = torch.zeros_like(latents)
        if image is not None:
            with torch.no_grad():
                frame = ti2v_image(image, height, width)[:, None].unsqueeze(0).to(self.device)
                first[:, :1] = self.vae.encode(frame)[0]
            mask[:, 0] = 0
        latents = (1 - mask) * first + mask * latents

        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        rows = cfg_rows(params.guidance)  # guidance 1: the conditional forward alone
        context = torch.stack([cond, uncond])[:rows].to(self.dtype)
        token_mask = mask[0, :, ::PATCH, ::PATCH].flatten()  # one value per patch token
        for i, t in enumerate(solver.timesteps):
            x = latents.to(self.dtype).unsqueeze(0).expand(rows, *latents.shape)
            timestep = (token_mask * float(t)).unsqueeze(0).expand(rows, -1)
            with torch.no_grad():
                v = self.dit(x, timestep, context).float()
            velocity = guided(v, params.guidance)
            latents = solver.step(velocity, i, latents)
            latents = (1 - mask) * first + mask * latents
            check_finite(latents, i + 1, params.steps)
            if progress is not None:
                progress(i + 1, params.steps)
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(latents.unsqueeze(0))[0]


FAMILY = Family(
    spec=SPEC,
    roles=("dit", "vae"),
    recognise=recognise,
    pipeline=Wan22TI2V5B,
    files_hint="QuantStack/Wan2.2-TI2V-5B-GGUF, the umT5-XXL encoder, Comfy-Org wan2.2_vae.safetensors",
)
