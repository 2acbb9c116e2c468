"""Wan2.1 T2V (1.3B, 14B): one DiT, umT5, the Wan2.1 VAE; text to video.

Files: city96's `Wan2.1-T2V-{1.3B,14B}-gguf` (`wan2.1-t2v-14b-Q8_0.gguf`),
the umT5-XXL encoder GGUF, Comfy-Org's `wan_2.1_vae.safetensors`.
Defaults (official `wan/configs`, `generate.py`): 832x480, 81 frames at 16 fps,
50 UniPC steps, guidance 5.0, shift 5.0.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, VaeFile, cfg_rows, check_finite, guided,
                                  latent_grid, single)
from engine.sampling import make_solver
from jobs.family import FamilySpec
from jobs.params import (RenderParams, fps_param, frames_param, guidance_param, sampler_param, shift_param,
                         size_param, step_list_param, steps_param)

SPEC = FamilySpec(
    name="wan2.1-t2v",
    title="Wan2.1 T2V",
    param_specs=(
        size_param("width", 832, multiple=16),
        size_param("height", 480, multiple=16),
        frames_param(81),
        steps_param(50),
        guidance_param("guidance", 5.0),
        shift_param(5.0),
        fps_param(16),
        sampler_param("unipc"),
        step_list_param(),
    ),
)

VAE_STRIDE = (4, 8, 8)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return single(dits, vaes, lambda d: d.config.in_dim == 16 and d.config.out_dim == 16
                  and d.config.vace_layers is None, 16, SPEC.title)


class Wan21T2V:
    """One resident DiT and the Wan2.1 VAE decoder."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str):
        from engine.wan.dit import load_dit
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.dit = load_dit(files["dit"], device=device, dtype=dtype, policy=policy)
        self.vae = load_vae(files["vae"], device=device, dtype=torch.float32)

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict[str, str], progress: ProgressFn | None = None) -> torch.Tensor:
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *latent_grid(params, VAE_STRIDE[0], VAE_STRIDE[1])), self.device)
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        rows = cfg_rows(params.guidance)  # guidance 1: the conditional forward alone
        context = torch.stack([cond, uncond])[:rows].to(self.dtype)
        for i, t in enumerate(solver.timesteps):
            x = latents.to(self.dtype).unsqueeze(0).expand(rows, *latents.shape)
            timestep = torch.full((rows,), float(t), device=self.device)
            with torch.no_grad():
                v = self.dit(x, timestep, context).float()
            velocity = guided(v, params.guidance)
            latents = solver.step(velocity, i, latents)
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
    pipeline=Wan21T2V,
    files_hint="one Wan2.1 T2V DiT GGUF (city96/Wan2.1-T2V-14B-gguf), the umT5-XXL encoder, wan_2.1_vae.safetensors",
)
