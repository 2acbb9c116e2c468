"""Wan2.1 I2V-14B: image to video with one 14B DiT, a CLIP image encoder, umT5 and the Wan2.1 VAE.

Files: city96's `Wan2.1-I2V-14B-480P-gguf` or `-720P-gguf`
(`wan2.1-i2v-14b-480p-Q8_0.gguf`), the umT5-XXL encoder, Comfy-Org's
`clip_vision_h.safetensors` and `wan_2.1_vae.safetensors`. The DiT takes 36
channels (16 noise, 4 first-frame mask, 16 image latent, as Wan2.2 I2V-A14B)
and, through its `img_emb` branch, the CLIP features of the image: 257 tokens
placed before the text context.
Official Wan2.1 `wan/configs/wan_i2v_14B.py`, `wan/image2video.py`, `generate.py`:
40 steps, guidance 5.0, shift 3.0 for the 480P file and 5.0 for the 720P one
(`generate.py` `_validate_args`), 81 frames at 16 fps, the negative prompt prefixed with "镜头晃动，" (camera shake);
the size follows the image's aspect ratio at 832x480's area for the 480P file
and 1280x720's for the 720P file (`area`), unless the job gives one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.base import (DitFile, Family, JobNoise, ProgressFn, VaeFile, cfg_rows, check_finite, guided,
                                  single)
from engine.families.wan22_i2v_a14b import first_frame_mask, output_size
from engine.sampling import make_solver
from jobs.family import FamilySpec, InputSpec
from jobs.params import (DEFAULT_NEGATIVE_PROMPT, ParamSpec, RenderParams, fps_param, frames_param, guidance_param,
                         sampler_param, shift_param, step_list_param, steps_param)

AREA_480P, AREA_720P = 832 * 480, 1280 * 720

SPEC = FamilySpec(
    name="wan2.1-i2v",
    title="Wan2.1 I2V",
    param_specs=(
        ParamSpec("width", "int", 0, low=0, high=4096, multiple=16,
                  help="pixels, a multiple of 16; 0 (default): from the image's aspect ratio at `area`"),
        ParamSpec("height", "int", 0, low=0, high=4096, multiple=16,
                  help="pixels, a multiple of 16; 0 (default): from the image's aspect ratio at `area`"),
        frames_param(81),
        steps_param(40),
        guidance_param("guidance", 5.0),
        shift_param(3.0),  # the 480P file's; the 720P file's is 5.0 (file_defaults)
        fps_param(16),
        sampler_param("unipc"),
        ParamSpec("area", "int", AREA_480P, low=256, high=4096 * 4096,
                  help="pixels of a video sized from its image: 832x480 (480P file) or 1280x720 (720P file)"),
        step_list_param(),
    ),
    inputs=(InputSpec("image", "image", required=True, help="the first frame: PNG, JPEG or WebP"),),
    negative_prompt="镜头晃动，" + DEFAULT_NEGATIVE_PROMPT,  # official wan_i2v_14B.sample_neg_prompt
    paired_size=True,
)

VAE_STRIDE = (4, 8, 8)


def recognise(dits: list[DitFile], vaes: list[VaeFile]) -> dict[str, Path] | None:
    return single(dits, vaes, lambda d: d.config.in_dim == 36 and d.config.image_dim is not None, 16, SPEC.title)


def file_defaults(dit: Path) -> dict:
    """The 720P file (`...-720p-...gguf`) renders at 1280x720's area with shift 5.0; the 480P one at
    832x480's with shift 3.0 (official `generate.py`: shift 3.0 for i2v at 832*480)."""
    return {"area": AREA_720P, "shift": 5.0} if "720p" in dit.name.lower() else {}


class Wan21I2V:
    """One resident DiT with its image branch, the CLIP image encoder, the Wan2.1 VAE with its encoder."""

    def __init__(self, files: dict[str, Path], device: torch.device, dtype: torch.dtype, policy: str):
        from engine.wan.clip import load_clip_vision
        from engine.wan.dit import load_dit
        from engine.wan.vae import load_vae

        self.device, self.dtype = device, dtype
        self.dit = load_dit(files["dit"], device=device, dtype=dtype, policy=policy)
        self.clip = load_clip_vision(files["image_encoder"], device=device, dtype=torch.float32)
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
        from engine.image import i2v_a14b_image, read_image, to_unit_range
        from engine.wan.clip import encode_image

        image = read_image(inputs["image"])
        height, width = output_size(params, image.shape[0], image.shape[1], params.area)
        with torch.no_grad():  # official: CLIP sees the whole image (its own resize), the VAE the resized one
            clip = encode_image(self.clip, to_unit_range(image).to(self.device))
        y = self.condition(i2v_a14b_image(image, height, width), params.frames)
        noise = JobNoise(seed)  # the starting latent, then (sampler "lcm") each step's fresh noise
        latents = noise.draw((16, *y.shape[1:]), self.device)
        solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, noise)
        rows = cfg_rows(params.guidance)  # guidance 1: the conditional forward alone
        context = torch.stack([cond, uncond])[:rows].to(self.dtype)
        image_context = clip.unsqueeze(0).expand(rows, -1, -1).to(self.dtype)
        for i, t in enumerate(solver.timesteps):
            x = torch.cat([latents, y]).to(self.dtype).unsqueeze(0).expand(rows, -1, -1, -1, -1)
            timestep = torch.full((rows,), float(t), device=self.device)
            with torch.no_grad():
                v = self.dit(x, timestep, context, image_context).float()
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
    roles=("dit", "vae", "image_encoder"),
    recognise=recognise,
    pipeline=Wan21I2V,
    files_hint="city96/Wan2.1-I2V-14B-480P-gguf (or -720P-gguf), the umT5-XXL encoder, clip_vision_h.safetensors, "
               "wan_2.1_vae.safetensors",
    file_defaults=file_defaults,
)
