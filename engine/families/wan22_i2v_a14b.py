"""Wan2.2 I2V-A14B: image to video with two 14B experts, umT5, the Wan2.1 VAE (encoder and decoder).

Files: QuantStack's `Wan2.2-I2V-A14B-GGUF` (`HighNoise/...-HighNoise-<quant>.gguf`,
`LowNoise/...-LowNoise-<quant>.gguf`), the umT5-XXL encoder,
`wan_2.1_vae.safetensors`. No CLIP: the DiTs take 36 channels, 16 of noise,
4 of mask (1 on the first frame) and 16 of the image's latent.
Official `wan/configs/wan_i2v_A14B.py`, `wan/image2video.py`: boundary 0.900,
guidance 3.5 for both experts, shift 5.0, 40 steps, 81 frames at 16 fps; the
output size follows the image's aspect ratio at 1280x720's area unless the job
gives one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, RenderError, VaeFile, cfg_rows, check_finite,
                                  expert_pair, guided)
from engine.families.experts import ExpertPair
from engine.sampling import make_solver
from jobs.family import FamilySpec, InputSpec
from jobs.params import (ParamSpec, RenderParams, fps_param, frames_param, guidance_param, sampler_param,
                         shift_param, step_list_param, steps_param)

AREA = 1280 * 720  # official default max_area: the size a job without width/height gets
VAE_STRIDE = (4, 8, 8)
PATCH = 2

SPEC = FamilySpec(
    name="wan2.2-i2v-a14b",
    title="Wan2.2 I2V-A14B",
    lora_slots=("loras_high", "loras_low"),
    param_specs=(
        ParamSpec("width", "int", 0, low=0, high=4096, multiple=16,
                  help="pixels, a multiple of 16; 0 (default): from the image's aspect ratio at 1280x720's area"),
        ParamSpec("height", "int", 0, low=0, high=4096, multiple=16,
                  help="pixels, a multiple of 16; 0 (default): from the image's aspect ratio at 1280x720's area"),
        frames_param(81),
        steps_param(40),
        guidance_param("guidance", 3.5, help="guidance of the high-noise expert"),
        shift_param(5.0),
        fps_param(16),
        sampler_param("unipc"),
        guidance_param("guidance_2", 3.5, help="guidance of the low-noise expert"),
        ParamSpec("boundary", "float", 0.900, low=0.0, high=1.0,
                  help="the high-noise expert denoises while t >= boundary x 1000"),
        step_list_param(),
    ),
    inputs=(InputSpec("image", "image", required=True, help="the first frame: PNG, JPEG or WebP"),),
    paired_size=True,
)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return expert_pair(dits, vaes, lambda d: d.config.in_dim == 36 and d.config.out_dim == 16
                       and d.config.image_dim is None, 16, SPEC.title)


def output_size(params: RenderParams, image_height: int, image_width: int, area: int = AREA) -> tuple[int, int]:
    """(height, width): the job's, or the official rule's from the image (at `area` pixels) when the
    job gives 0x0. The Wan2.1 I2V family sizes its videos by the same rule."""
    from engine.image import i2v_a14b_output_size

    if params.width and params.height:
        return params.height, params.width
    if params.width or params.height:
        raise RenderError(f"width {params.width}, height {params.height}: give both, or neither (0: from the image)")
    return i2v_a14b_output_size(image_height, image_width, area, VAE_STRIDE[1], PATCH)


def first_frame_mask(frames: int, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """[4, T, h, w]: the official `msk`, 1 where a pixel frame is given (frame 0, repeated 4x to fill
    the first latent frame's 4 channels), 0 elsewhere."""
    t, h, w = grid
    mask = torch.zeros(1, frames + 3, h, w, device=device)
    mask[:, :4] = 1  # frame 0 counted four times, then frames 1..F-1
    return mask.view(t, 4, h, w).transpose(0, 1)


class Wan22I2VA14B:
    """The expert pair and the Wan2.1 VAE with its encoder (for the image's latent)."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str,
                 placement: str | None = None):
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.experts = ExpertPair(files["dit_high"], files["dit_low"], device, dtype, policy, placement)
        self.vae = load_vae(files["vae"], device=device, dtype=torch.float32, encoder=True)

    def condition(self, image: torch.Tensor, frames: int) -> torch.Tensor:
        """[20, T, h, w]: the first-frame mask and the latent of [image, then F-1 black frames]."""
        _, height, width = image.shape
        video = torch.cat([image[:, None], image.new_zeros(3, frames - 1, height, width)], dim=1)
        with torch.no_grad():
            latent = self.vae.encode(video.unsqueeze(0).to(self.device))[0]
        return torch.cat([first_frame_mask(frames, tuple(latent.shape[1:]), self.device), latent])

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict[str, str], progress: ProgressFn | None = None) -> torch.Tensor:
        from engine.image import i2v_a14b_image, read_image

        image = read_image(inputs["image"])
        height, width = output_size(params, image.shape[0], image.shape[1])
        y = self.condition(i2v_a14b_image(image, height, width), params.frames)
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *y.shape[1:]), self.device)
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        context = torch.stack([cond, uncond]).to(self.dtype)
        boundary = params.boundary * 1000
        for i, t in enumerate(solver.timesteps):
            high = t >= boundary
            dit = self.experts.use("high" if high else "low")
            guidance = params.guidance if high else params.guidance_2
            rows = cfg_rows(guidance)  # guidance 1: the conditional forward alone
            x = torch.cat([latents, y]).to(self.dtype).unsqueeze(0).expand(rows, -1, -1, -1, -1)
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
    pipeline=Wan22I2VA14B,
    files_hint="QuantStack/Wan2.2-I2V-A14B-GGUF HighNoise + LowNoise experts, the umT5-XXL encoder, wan_2.1_vae.safetensors",
)
