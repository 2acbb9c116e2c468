"""Wan2.2 T2V-A14B: two 14B experts (high noise, low noise), umT5, the Wan2.1 VAE.

Files: QuantStack's `Wan2.2-T2V-A14B-GGUF`: `HighNoise/Wan2.2-T2V-A14B-HighNoise-<quant>.gguf`
and `LowNoise/Wan2.2-T2V-A14B-LowNoise-<quant>.gguf` (identical shapes: the
names tell them apart), the umT5-XXL encoder, `wan_2.1_vae.safetensors`.
Official `wan/configs/wan_t2v_A14B.py`, `wan/text2video.py`: the high-noise
expert denoises while t >= boundary x 1000 (boundary 0.875) with guidance
4.0, the low-noise expert the rest with guidance 3.0; shift 12, 40 steps,
1280x720, 81 frames at 16 fps.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, VaeFile, cfg_rows, check_finite, expert_pair,
                                  guided, latent_grid)
from engine.families.experts import ExpertPair
from engine.sampling import make_solver
from jobs.family import FamilySpec
from jobs.params import (ParamSpec, RenderParams, fps_param, frames_param, guidance_param, sampler_param,
                         shift_param, size_param, step_list_param, steps_param)

SPEC = FamilySpec(
    name="wan2.2-t2v-a14b",
    title="Wan2.2 T2V-A14B",
    lora_slots=("loras_high", "loras_low"),
    param_specs=(
        size_param("width", 1280, multiple=16),
        size_param("height", 720, multiple=16),
        frames_param(81),
        steps_param(40),
        guidance_param("guidance", 4.0, help="guidance of the high-noise expert"),
        shift_param(12.0),
        fps_param(16),
        sampler_param("unipc"),
        guidance_param("guidance_2", 3.0, help="guidance of the low-noise expert"),
        ParamSpec("boundary", "float", 0.875, low=0.0, high=1.0,
                  help="the high-noise expert denoises while t >= boundary x 1000"),
        step_list_param(),
    ),
)

VAE_STRIDE = (4, 8, 8)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return expert_pair(dits, vaes, lambda d: d.config.in_dim == 16 and d.config.out_dim == 16
                       and d.config.vace_layers is None, 16, SPEC.title)


class Wan22T2VA14B:
    """The expert pair (`ExpertPair`) and the Wan2.1 VAE decoder."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str,
                 placement: str | None = None):
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.experts = ExpertPair(files["dit_high"], files["dit_low"], device, dtype, policy, placement)
        self.vae = load_vae(files["vae"], device=device, dtype=torch.float32)

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict[str, str], progress: ProgressFn | None = None) -> torch.Tensor:
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *latent_grid(params, VAE_STRIDE[0], VAE_STRIDE[1])), self.device)
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        context = torch.stack([cond, uncond]).to(self.dtype)
        boundary = params.boundary * 1000
        for i, t in enumerate(solver.timesteps):
            high = t >= boundary
            dit = self.experts.use("high" if high else "low")
            guidance = params.guidance if high else params.guidance_2
            rows = cfg_rows(guidance)  # guidance 1: the conditional forward alone
            x = latents.to(self.dtype).unsqueeze(0).expand(rows, *latents.shape)
            timestep = torch.full((rows,), float(t), device=self.device)
            with torch.no_grad():
                v = dit(x, timestep, context[:rows]).float()
            velocity = guided(v, guidance)
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
    roles=("dit_high", "dit_low", "vae"),
    recognise=recognise,
    pipeline=Wan22T2VA14B,
    files_hint="QuantStack/Wan2.2-T2V-A14B-GGUF HighNoise + LowNoise experts, the umT5-XXL encoder, wan_2.1_vae.safetensors",
)
