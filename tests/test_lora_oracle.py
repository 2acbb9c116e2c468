"""A whole job with a LoRA, frame for frame: our render against diffusers' `WanPipeline` after
`pipe.load_lora_weights(file)`.

The tiny Wan2.1 T2V model and a ComfyUI-layout LoRA file (rank 8 on the attention and FFN layers
of both blocks, with alpha; `test_lora_jobs.write_lora`). diffusers converts the file with its
own ComfyUI-to-diffusers converter and applies it through peft; we apply it as our side path.
Everything else as in test_engine_oracle.py (our embeddings, noise and exact schedule).
"""
from __future__ import annotations

import pytest
import torch

from engine.model_set import ModelSet
from engine.render import Engine
from jobs.params import DEFAULT_NEGATIVE_PROMPT
from test_engine_oracle import (LATENT_ATOL, LATENT_RTOL, PROMPT, SEED, STEPS, VIDEO_ATOL, assert_frames_match,
                                assert_on_our_schedule, diffusers_transformer, diffusers_wan21_vae, render_keeping,
                                run_diffusers, scheduler_on_our_schedule, video_01, wan21_noise)
from test_lora_jobs import write_lora

STRENGTH = 0.8


@pytest.fixture(scope="module")
def oracle(tiny_model, tmp_path_factory):
    from engine.wan.convert.vae import TINY_VAE_CONFIG

    engine = Engine(ModelSet.from_dir(tiny_model), policy="dequantize_once")
    lora = write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", seed=5)
    params = engine.spec.params(steps=STEPS)
    with torch.no_grad():
        plain = render_keeping(engine, PROMPT, SEED, params)
        ours = render_keeping(engine, PROMPT, SEED, params, inputs={"loras": [f"{lora}:{STRENGTH}"]})
    vae = diffusers_wan21_vae(engine.models.files["vae"], TINY_VAE_CONFIG)
    return engine, lora, params, plain, ours, vae


def diffusers_run(oracle, strength: float | None):
    """diffusers' run of the job; `strength` None: without the LoRA."""
    from diffusers import WanPipeline

    engine, lora, params, _, _, vae = oracle
    scheduler, solver = scheduler_on_our_schedule("unipc", STEPS, params.shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                       transformer=diffusers_transformer(engine.pipeline.dit))
    if strength is not None:
        pipe.load_lora_weights(str(lora), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[strength])
    with torch.no_grad():
        out = run_diffusers(pipe, prompt_embeds=engine.embed(PROMPT)[None],
                            negative_prompt_embeds=engine.embed(DEFAULT_NEGATIVE_PROMPT)[None],
                            latents=wan21_noise(params)[None].clone(), height=params.height, width=params.width,
                            num_frames=params.frames, num_inference_steps=params.steps,
                            guidance_scale=params.guidance, output_type="pt")
    assert_on_our_schedule(scheduler, solver)
    return out


def test_a_job_with_a_comfyui_lora_matches_diffusers(oracle):
    _, _, params, plain, ours, _ = oracle
    rendered, latents, video = ours
    theirs_video, theirs_latents = diffusers_run(oracle, STRENGTH)
    torch.testing.assert_close(latents, theirs_latents, atol=LATENT_ATOL, rtol=LATENT_RTOL)
    torch.testing.assert_close(video_01(video), theirs_video, atol=VIDEO_ATOL, rtol=0)
    assert_frames_match(rendered, theirs_video, VIDEO_ATOL)
    # The LoRA changed the render far beyond the tolerance.
    assert (latents - plain[1]).abs().max() > 100 * LATENT_ATOL


def test_the_oracle_rejects_the_wrong_strength(oracle):
    _, latents, _ = oracle[4]
    _, wrong = diffusers_run(oracle, STRENGTH + 0.2)
    assert (latents - wrong).abs().max() > 100 * LATENT_ATOL
