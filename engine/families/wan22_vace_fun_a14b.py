"""Wan2.2 VACE-Fun A14B: Wan2.1 VACE's conditioning on two Wan2.2 A14B experts (high noise, low noise).

Files: QuantStack's `Wan2.2-VACE-Fun-A14B-GGUF`, a `HighNoise/` and a
`LowNoise/` file (identical shapes: the names tell them apart, as for the
other A14B families), the umT5-XXL encoder, `wan_2.1_vae.safetensors`.
The experts have Wan2.1 VACE-14B's shapes (8 VACE blocks after main blocks
0, 5, ..., 35) and take the same 96-channel conditioning, inputs and
parameters (`engine/families/wan21_vace.py`); the high-noise expert denoises
while t >= boundary x 1000 (boundary 0.875, diffusers' Wan2.2 VACE-Fun
config) with `guidance`, the low-noise one the rest with `guidance_2`.
Defaults as Wan2.1 VACE's: 50 steps, guidance 5.0 for both, shift 16,
context_scale 1.0, 832x480, 81 frames at 16 fps.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, VaeFile, cfg_rows, check_finite, expert_pair,
                                  guided)
from engine.families.experts import ExpertPair
from engine.families.wan21_vace import VACE_CHANNELS, VACE_INPUTS, context_scale_param, read_vace_inputs, vace_context
from engine.sampling import make_solver
from jobs.family import FamilySpec
from jobs.params import (ParamSpec, RenderParams, fps_param, frames_param, guidance_param, sampler_param,
                         shift_param, size_param, step_list_param, steps_param)

SPEC = FamilySpec(
    name="wan2.2-vace-fun-a14b",
    title="Wan2.2 VACE-Fun A14B",
    lora_slots=("loras_high", "loras_low"),
    param_specs=(
        size_param("width", 832, multiple=16),
        size_param("height", 480, multiple=16),
        frames_param(81),
        steps_param(50),
        guidance_param("guidance", 5.0, help="guidance of the high-noise expert"),
        shift_param(16.0),
        fps_param(16),
        sampler_param("unipc"),
        context_scale_param(),
        guidance_param("guidance_2", 5.0, help="guidance of the low-noise expert"),
        ParamSpec("boundary", "float", 0.875, low=0.0, high=1.0,
                  help="the high-noise expert denoises while t >= boundary x 1000"),
        step_list_param(),
    ),
    inputs=VACE_INPUTS,
)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return expert_pair(dits, vaes, lambda d: d.config.vace_in_dim == VACE_CHANNELS, 16, SPEC.title)


class Wan22VaceFunA14B:
    """The expert pair (`ExpertPair`) and the Wan2.1 VAE with its encoder."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str,
                 placement: str | None = None):
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.experts = ExpertPair(files["dit_high"], files["dit_low"], device, dtype, policy, placement)
        self.vae = load_vae(files["vae"], device=device, dtype=torch.float32, encoder=True)

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict, progress: ProgressFn | None = None) -> torch.Tensor:
        video, mask, references = read_vace_inputs(inputs, params)
        z = vace_context(self.vae, video, mask, references, self.device)
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *z.shape[1:]), self.device)  # reference frames included
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        context = torch.stack([cond, uncond]).to(self.dtype)
        conditioning = z.to(self.dtype).unsqueeze(0).expand(2, -1, -1, -1, -1)
        boundary = params.boundary * 1000
        for i, t in enumerate(solver.timesteps):
            high = t >= boundary
            dit = self.experts.use("high" if high else "low")
            guidance = params.guidance if high else params.guidance_2
            rows = cfg_rows(guidance)  # guidance 1: the conditional forward alone
            x = latents.to(self.dtype).unsqueeze(0).expand(rows, *latents.shape)
            timestep = torch.full((rows,), float(t), device=self.device)
            with torch.no_grad():
                v = dit(x, timestep, context[:rows], vace_context=conditioning[:rows],
                        context_scale=params.context_scale).float()
            velocity = guided(v, guidance)
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
    roles=("dit_high", "dit_low", "vae"),
    recognise=recognise,
    pipeline=Wan22VaceFunA14B,
    files_hint="QuantStack/Wan2.2-VACE-Fun-A14B-GGUF HighNoise + LowNoise experts, the umT5-XXL encoder, "
               "wan_2.1_vae.safetensors",
)
