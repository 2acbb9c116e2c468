"""A whole Wan2.1 T2V job, denoised and decoded by our engine and by diffusers' WanPipeline.

Both sides get the same inputs and the same weights:

- weights: the embedded tiny model (`tiny_model`, Q8_0 blocks). Our engine
  loads it with "dequantize_once"; diffusers' WanTransformer3DModel gets those
  very float32 tensors through diffusers' own original-to-diffusers converter
  (`convert_wan_transformer_to_diffusers`), and AutoencoderKLWan the VAE file's
  tensors under diffusers' names (the mapping test_vae.py checks);
- text: our `Engine.embed` outputs as `prompt_embeds` / `negative_prompt_embeds`
  (the umT5 encoder is held to transformers in test_t5.py);
- noise: our `initial_noise` as `latents`;
- schedule: diffusers' scheduler is made to build exactly our sigmas and
  timesteps (the pipeline calls `set_timesteps(steps)` itself, so that call is
  redirected), and we assert it did.

Differences that remain: diffusers runs cond and uncond as two batch-1
forwards where we run one batch of 2, computes the timestep sinusoid in float32
where we (like the official code) use float64, and orders some float32 ops
differently. Over 3 steps that is ~2e-5 on latents of magnitude ~7.

The helpers here (the diffusers models built from ours, the redirected
scheduler, a render that keeps its latents) serve the Wan2.2 family oracles in
test_family_oracles.py too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.families.base import initial_noise, latent_grid
from engine.model_set import ModelSet
from engine.render import Engine, RenderResult
from engine.sampling import make_solver
from engine.sampling.schedule import SIGMA_MAX
from engine.video import to_uint8
from jobs.params import DEFAULT_NEGATIVE_PROMPT
from test_vae import diffusers_name as vae_diffusers_name

# Final latents (|x| up to ~7): float32 op-order differences of 3 steps x 2 forwards, amplified
# by guidance 5. Measured ~2e-5; a wrong guidance sign, a swapped cond/uncond or an
# off-by-one solver step changes them by O(1).
LATENT_ATOL, LATENT_RTOL = 1e-4, 1e-5
# Decoded video in [0, 1]: the latents' difference through a float32 VAE. Measured ~4e-6.
VIDEO_ATOL = 5e-5
STEPS = 3
PROMPT = "a red fox running through fresh snow"
SEED = 7


# --- shared with test_family_oracles.py ------------------------------------------------


def diffusers_transformer(dit):
    """diffusers' WanTransformer3DModel holding exactly our loaded DiT's (dequantized) float32 weights."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = dit.config
    transformer = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    )
    # Original names -> diffusers' own converter -> strict load (every name and shape).
    ours = {name: tensor.clone() for name, tensor in dit.state_dict().items()}
    transformer.load_state_dict(convert_wan_transformer_to_diffusers(ours), strict=True)
    return transformer.eval().requires_grad_(False)


def diffusers_wan21_vae(path, config):
    """AutoencoderKLWan (Wan2.1 layout) holding the tensors of the VAE file at `path`, encoder included."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                           num_res_blocks=config.num_res_blocks,
                           temperal_downsample=list(config.temperal_downsample))
    state = load_file(path)
    vae.load_state_dict({vae_diffusers_name(k, config.num_res_blocks): v for k, v in state.items()}, strict=True)
    return vae.eval().requires_grad_(False)


def scheduler_on_our_schedule(sampler: str, steps: int, shift: float):
    """A diffusers scheduler whose `set_timesteps(n)` (called by the pipeline) builds our exact schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    ours = make_solver(sampler, steps, shift)
    if sampler == "unipc":
        # Wan's settings; fed the official unshifted sigmas, it shifts them itself (test_sampling.py).
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        )
        schedule = dict(sigmas=np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1])
    else:
        # FlowMatchEuler shifts what it is given (shift=1: not at all) and would pass the
        # model sigma*1000 un-truncated; give it our sigmas and our (official) integer timesteps.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        schedule = dict(sigmas=ours.sigmas[:-1].numpy(), timesteps=ours.timesteps.numpy().astype(np.float32))
    set_timesteps = scheduler.set_timesteps

    def on_our_schedule(num_inference_steps=None, device=None, **_):
        assert num_inference_steps == steps
        set_timesteps(device=device, **schedule)

    scheduler.set_timesteps = on_our_schedule
    return scheduler, ours


def assert_on_our_schedule(scheduler, solver) -> None:
    """The pipeline's scheduler really stepped on our sigmas and timesteps, bit for bit."""
    assert torch.equal(scheduler.sigmas, solver.sigmas)
    assert torch.equal(scheduler.timesteps.to(torch.int64), solver.timesteps)


def render_keeping(engine: Engine, prompt: str, seed: int, params, inputs=None):
    """`Engine.render` of one job, plus the final latents [C, T, h, w] and the decoded video
    [3, F, H, W] in [-1, 1] it made on the way (kept from the family pipeline's own calls)."""
    pipeline, kept = engine.pipeline, {}
    denoise, decode = pipeline.denoise, pipeline.decode

    def keep_denoise(*args, **kwargs):
        kept["latents"] = denoise(*args, **kwargs)
        return kept["latents"]

    def keep_decode(latents):
        kept["video"] = decode(latents)
        return kept["video"]

    pipeline.denoise, pipeline.decode = keep_denoise, keep_decode
    try:
        result = engine.render(prompt, seed, params, inputs=inputs)
    finally:
        del pipeline.denoise, pipeline.decode  # back to the class's methods
    assert np.array_equal(result.frames, to_uint8(kept["video"]))
    return result, kept["latents"], kept["video"]


def run_diffusers(pipe, on_step=None, **call):
    """One diffusers pipeline call: (its video [F, 3, H, W] in [0, 1], or its latents [C, T, h, w] with
    output_type="latent"; and the latents [C, T, h, w] after its last step as its step callback saw
    them). `on_step(latents)`, when given, sees the latents [1, C, T, h, w] after every step."""
    pipe.set_progress_bar_config(disable=True)
    final: dict[str, torch.Tensor] = {}

    def keep_latents(pipeline, i, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        if on_step is not None:
            on_step(final["latents"])
        return kwargs

    out = pipe(callback_on_step_end=keep_latents, **call).frames[0]
    return out, final["latents"][0]


def video_01(video: torch.Tensor) -> torch.Tensor:
    """Our decoded video [3, F, H, W] in [-1, 1] as diffusers' "pt" output: [F, 3, H, W] in [0, 1]."""
    return (video * 0.5 + 0.5).clamp(0, 1).permute(1, 0, 2, 3)


def assert_frames_match(rendered: RenderResult, theirs_video: torch.Tensor, atol: float) -> None:
    """Our render's video and diffusers' agree to `atol` in [0, 1]; as uint8 frames they are equal
    except a rare value sitting on a rounding boundary (off by one)."""
    frames = rendered.frames  # uint8 [F, H, W, 3]
    assert theirs_video.shape == (frames.shape[0], 3, frames.shape[1], frames.shape[2])
    ours = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(ours, theirs_video, atol=atol + 0.5 / 255, rtol=0)
    theirs_u8 = (theirs_video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    off = np.abs(frames.astype(np.int16) - theirs_u8.astype(np.int16))
    assert off.max() <= 1 and (off > 0).mean() < 1e-3


# --- Wan2.1 T2V ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(ModelSet.from_dir(tiny_model), policy="dequantize_once")


@pytest.fixture(scope="module")
def diffusers_models(engine):
    from engine.wan.convert.vae import TINY_VAE_CONFIG

    vae = diffusers_wan21_vae(engine.models.files["vae"], TINY_VAE_CONFIG)
    return diffusers_transformer(engine.pipeline.dit), vae


def wan21_noise(params) -> torch.Tensor:
    return initial_noise(SEED, (16, *latent_grid(params, 4, 8)), "cpu")


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
@torch.no_grad()
def test_whole_job_matches_diffusers_wan_pipeline(engine, diffusers_models, sampler):
    from diffusers import WanPipeline

    transformer, vae = diffusers_models
    params = engine.spec.params(steps=STEPS, sampler=sampler)
    cond = engine.embed(PROMPT)
    uncond = engine.embed(DEFAULT_NEGATIVE_PROMPT)
    noise = wan21_noise(params)

    rendered, latents, video = render_keeping(engine, PROMPT, SEED, params)
    # The default negative prompt is the one given to diffusers below.
    assert rendered.frames_sha256 == engine.render(PROMPT, SEED, params, DEFAULT_NEGATIVE_PROMPT).frames_sha256

    scheduler, solver = scheduler_on_our_schedule(sampler, STEPS, params.shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    theirs_video, theirs_latents = run_diffusers(
        pipe, prompt_embeds=cond[None], negative_prompt_embeds=uncond[None], latents=noise[None].clone(),
        height=params.height, width=params.width, num_frames=params.frames,
        num_inference_steps=params.steps, guidance_scale=params.guidance, output_type="pt",
    )  # [F, 3, H, W] in [0, 1]
    assert_on_our_schedule(scheduler, solver)

    # The denoising moved far from the noise, so agreeing is not trivial.
    assert (latents - noise).abs().max() > 1.0
    torch.testing.assert_close(latents, theirs_latents, atol=LATENT_ATOL, rtol=LATENT_RTOL)

    # Decoding: WanPipeline de-normalises with latents / (1 / std) + mean, our decode with
    # z * std + mean; then diffusers maps [-1, 1] to [0, 1] as our to_uint8 does before rounding.
    assert theirs_video.shape == (params.frames, 3, params.height, params.width)
    torch.testing.assert_close(video_01(video), theirs_video, atol=VIDEO_ATOL, rtol=0)
    assert_frames_match(rendered, theirs_video, VIDEO_ATOL)


@torch.no_grad()
def test_the_oracle_tells_guidance_apart(engine, diffusers_models):
    # The comparison above is sensitive: the same pipeline at another guidance scale lands
    # far outside the tolerance from our result.
    from diffusers import WanPipeline

    transformer, vae = diffusers_models
    params = engine.spec.params(steps=STEPS)
    cond, uncond = engine.embed(PROMPT), engine.embed(DEFAULT_NEGATIVE_PROMPT)
    noise = wan21_noise(params)
    ours = engine.pipeline.denoise(cond, uncond, SEED, params, {})
    scheduler, _ = scheduler_on_our_schedule("unipc", STEPS, params.shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    call = dict(prompt_embeds=cond[None], negative_prompt_embeds=uncond[None],
                height=params.height, width=params.width, num_frames=params.frames,
                num_inference_steps=params.steps, output_type="latent")
    right, _ = run_diffusers(pipe, latents=noise[None].clone(), guidance_scale=params.guidance, **call)
    wrong, _ = run_diffusers(pipe, latents=noise[None].clone(), guidance_scale=params.guidance + 0.5, **call)
    torch.testing.assert_close(ours, right, atol=LATENT_ATOL, rtol=LATENT_RTOL)
    assert (ours - wrong).abs().max() > 100 * LATENT_ATOL
