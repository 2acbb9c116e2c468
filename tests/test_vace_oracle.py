"""Whole VACE jobs, frame for frame: our render against diffusers' `WanVACEPipeline`.

The tiny Wan2.1 VACE set (`make_tiny_model(dir, family="wan2.1-vace")`: a DiT
with 4 main and 2 VACE blocks, Q8_0 blocks, the Wan2.1 VAE with its encoder,
umT5) and the tiny Wan2.2 VACE-Fun A14B pair, loaded by our `Engine` with
"dequantize_once". diffusers gets the same weights and inputs: the DiTs
through its own `convert_wan_transformer_to_diffusers` into
`WanVACETransformer3DModel`s, the VAE, text embeddings, noise and schedule as
in test_engine_oracle.py.

Inputs: the control and mask videos are MP4s (H.264, lossy) that our engine
reads itself; diffusers gets the frames our reader made of them (as PIL
images: exact, since they are whole uint8 values), at the job's size and
frame count, where its own resizing is the identity. The reference images are
PNGs of another size and aspect, so both sides fit them onto the white canvas
(the same bilinear formula). diffusers prepends each reference before the ones
already placed, so it puts several references in the reverse of the official
order (`wan/vace.py`: `torch.cat([*ref_latent, latent])`), which we follow: it
is given them reversed, and the test shows that the order matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.video import write_mp4
from engine.families.base import initial_noise
from jobs.params import DEFAULT_NEGATIVE_PROMPT
from test_engine_oracle import (assert_on_our_schedule, diffusers_wan21_vae, render_keeping, run_diffusers,
                                scheduler_on_our_schedule)
from test_family_oracles import PROMPT, SEED, Job, assert_job_matches, experts_per_step, family_engine, max_diff, \
    write_image
from test_vace import diffusers_vace

# Final latents (|x| up to ~6) after 3-4 steps x 2 forwards in float32, guidance 5, plus the
# conditioning through two float32 VAE encoders. See test_family_oracles.py; each test's figure.
LATENT_ATOL = 1e-4
# A mistake counts as rejected when it moves the final latents this far: 10x the tolerance, as the
# reference order reaches the video frames only through attention (measured 4e-3); the others 0.1-3.
REJECT = 10 * LATENT_ATOL
SIZE, FRAMES = 64, 9  # 8x8 latents, 3 latent frames


def write_control(tmp_path, name: str, seed: int) -> str:
    """A moving smooth-noise video: an input whose every frame the VAE responds to."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(FRAMES, 3, SIZE // 8, SIZE // 8, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    path = tmp_path / name
    write_mp4((fine.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy(), path, fps=16)
    return str(path)


def write_mask(tmp_path, name: str) -> str:
    """White (generate) on the right half, growing over time; black (keep) elsewhere."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    for i in range(FRAMES):
        frames[i, :, SIZE // 2 - 2 * i:] = 255
    path = tmp_path / name
    write_mp4(frames, path, fps=16)
    return str(path)


def pil_frames(video: torch.Tensor) -> list[Image.Image]:
    """[C, F, H, W] in [-1, 1] (C = 3) or [0, 1] (C = 1, a mask) -> F RGB PIL images of the same uint8 values."""
    if video.shape[0] == 1:
        u8 = (video * 255).round().expand(3, -1, -1, -1)
    else:
        u8 = ((video + 1) * 127.5).round()
    array = u8.permute(1, 2, 3, 0).to(torch.uint8).numpy()
    return [Image.fromarray(frame) for frame in array]


@torch.no_grad()
def render_job(engine, params, inputs: dict, references: int) -> Job:
    """`Engine.render` of a VACE job. The noise covers the reference frames (references first);
    the final latents kept are the video's, the reference frames trimmed off."""
    rendered, latents, video = render_keeping(engine, PROMPT, SEED, params, inputs=inputs)
    grid = ((FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    noise = initial_noise(SEED, (16, references + grid[0], *grid[1:]), "cpu")
    assert latents.shape == (16, *grid)
    assert (latents - noise[:, references:]).abs().max() > 1.0  # the denoising moved far from the noise
    return Job(engine, params, inputs, engine.embed(PROMPT), engine.embed(DEFAULT_NEGATIVE_PROMPT), noise,
               rendered, latents, video)


@dataclass
class Oracle:
    job: Job
    transformers: tuple  # (transformer, transformer_2 or None)
    vae: Any
    boundary: float | None
    video: list  # the control frames as our reader made them (PIL)
    mask: list
    references: list  # PIL images, in our (the official) order

    def run(self, output_type: str = "latent", reverse_references: bool = True, **changes):
        from diffusers import WanVACEPipeline

        p = self.job.params
        scheduler, solver = scheduler_on_our_schedule("unipc", p.steps, p.shift)
        transformer, transformer_2 = self.transformers
        pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=scheduler,
                               transformer=transformer, transformer_2=transformer_2, boundary_ratio=self.boundary)
        references = self.references[::-1] if reverse_references else self.references
        call = dict(video=self.video, mask=self.mask, reference_images=references or None,
                    conditioning_scale=p.context_scale, output_type=output_type)
        if transformer_2 is not None:
            call["guidance_scale_2"] = p.guidance_2
        call = self.job.call(**call)
        call.update(changes)
        with torch.no_grad():
            video, latents = run_diffusers(pipe, **call)
        assert_on_our_schedule(scheduler, solver)
        references = len(call["reference_images"] or [])
        return video, latents[:, references:]  # the video's latent frames, as ours


def make_oracle(tmp_path_factory, family: str, references: int, **params) -> Oracle:
    from engine.video_input import read_control, read_reference

    engine = family_engine(tmp_path_factory, family)
    files = tmp_path_factory.mktemp(f"{family}-inputs")
    control, mask = write_control(files, "control.mp4", seed=3), write_mask(files, "mask.mp4")
    refs = [write_image(files / f"ref{i}.png", 48, 32, seed=10 + i) for i in range(references)]
    inputs = {"control_video": control, "mask_video": mask}
    if refs:
        inputs["reference_images"] = refs
    p = engine.spec.params(width=SIZE, height=SIZE, frames=FRAMES, **params)
    job = render_job(engine, p, inputs, references)
    video, mask_t = read_control(control, mask, FRAMES, SIZE, SIZE)
    assert 0 < float((mask_t > 0.5).float().mean()) < 1  # some pixels kept, some generated
    placed = [read_reference(r, SIZE, SIZE) for r in refs]
    ref_pil = [Image.open(r).convert("RGB") for r in refs]
    for tensor in placed:  # white canvas bands left and right of the fitted 42x64 image
        assert torch.equal(tensor[:, :, :11], torch.ones(3, SIZE, 11))
    pipeline = engine.pipeline
    if hasattr(pipeline, "experts"):
        high, low = pipeline.experts.use("high"), pipeline.experts.use("low")
        transformers = (diffusers_vace(high.state_dict(), high.config), diffusers_vace(low.state_dict(), low.config))
        boundary = p.boundary
    else:
        transformers, boundary = (diffusers_vace(pipeline.dit.state_dict(), pipeline.dit.config), None), None
    vae = diffusers_wan21_vae(engine.models.files["vae"], pipeline.vae.config)
    return Oracle(job, transformers, vae, boundary, pil_frames(video), pil_frames(mask_t), ref_pil)


@pytest.fixture(scope="module")
def vace(tmp_path_factory) -> Oracle:
    """Wan2.1 VACE: a control video inside a mask, and two reference images."""
    return make_oracle(tmp_path_factory, "wan2.1-vace", references=2, steps=3, guidance=5.0, shift=16.0,
                       context_scale=1.0)


@pytest.fixture(scope="module")
def vace_theirs(vace):
    return vace.run(output_type="pt")


def test_vace_control_mask_and_references_match_diffusers(vace, vace_theirs):
    video, latents = vace_theirs
    # Measured: see the module's LATENT_ATOL.
    assert_job_matches(vace.job, video, latents)


@pytest.mark.parametrize("mistake", ["references in diffusers' order", "mask ignored", "no control video",
                                     "hints scaled to 0"])
def test_vace_oracle_rejects(vace, vace_theirs, mistake):
    """Each mistake moves diffusers' final latents far from ours: the inputs shape the render."""
    changes = {
        "references in diffusers' order": dict(reverse_references=False),
        "mask ignored": dict(mask=None),
        "no control video": dict(video=None, mask=None),
        "hints scaled to 0": dict(conditioning_scale=0.0),
    }[mistake]
    _, latents = vace.run(**changes)
    assert max_diff(vace.job.latents, latents) > REJECT


def test_vace_text_to_video_matches_diffusers(vace):
    """No inputs: zero control frames and a mask of ones, as the official code and diffusers do."""
    engine = vace.job.engine
    job = render_job(engine, vace.job.params, {}, 0)
    oracle = Oracle(job, vace.transformers, vace.vae, None, [], [], [])
    video, latents = oracle.run(output_type="pt", video=None, mask=None, reference_images=None)
    assert_job_matches(job, video, latents)
    assert max_diff(job.latents, vace.job.latents) > REJECT  # the inputs did change the render


@pytest.fixture(scope="module")
def vace_fun(tmp_path_factory) -> Oracle:
    """Wan2.2 VACE-Fun A14B: the same conditioning (one reference), the experts switching at 0.875."""
    return make_oracle(tmp_path_factory, "wan2.2-vace-fun-a14b", references=1, steps=4, guidance=5.0,
                       guidance_2=3.0, shift=16.0, boundary=0.875, context_scale=0.8)


def test_vace_fun_a14b_matches_diffusers(vace_fun):
    assert experts_per_step(vace_fun.job.params) == ["high", "high", "high", "low"]
    video, latents = vace_fun.run(output_type="pt")
    assert_job_matches(vace_fun.job, video, latents)


def test_vace_fun_a14b_oracle_rejects_swapped_experts(vace_fun):
    swapped = Oracle(vace_fun.job, vace_fun.transformers[::-1], vace_fun.vae, vace_fun.boundary,
                     vace_fun.video, vace_fun.mask, vace_fun.references)
    _, latents = swapped.run()
    assert max_diff(vace_fun.job.latents, latents) > REJECT
