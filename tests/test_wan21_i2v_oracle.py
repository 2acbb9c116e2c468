"""A whole Wan2.1 I2V-14B job, frame for frame: our render against diffusers' `WanImageToVideoPipeline`.

The tiny Wan2.1 I2V model set (`make_tiny_model(dir, family="wan2.1-i2v")`:
a 36 -> 16 DiT with the image branch, Q8_0 blocks; a CLIP vision tower in
clip_vision_h's layout; the Wan2.1 VAE; umT5), loaded by our `Engine` with
"dequantize_once". diffusers gets the same inputs and weights:

- DiT: our dequantized float32 tensors through diffusers' own
  `convert_wan_transformer_to_diffusers` into a `WanTransformer3DModel` with
  `image_dim` (the CLIP width) and `added_kv_proj_dim` (the DiT width, as the
  official `k_img` / `v_img` are dim -> dim);
- CLIP: transformers' `CLIPVisionModel.from_pretrained` reads our very file
  (exact GELU, as xlm-roberta-large-ViT-H-14), and a `CLIPImageProcessor`
  configured as Wan2.1-I2V's (ViT-H/14: 224, bicubic, CLIP mean / std).
  diffusers computes the image's features itself, `hidden_states[-2]`;
- VAE, text, noise, schedule: as in test_engine_oracle.py, whose helpers these
  are: the VAE file under diffusers' names, our text embeddings (with this
  family's negative prompt, "镜头晃动，" + the default one) as
  `prompt_embeds` / `negative_prompt_embeds`, our `initial_noise` as
  `latents`, our exact sigmas and timesteps in its UniPC scheduler.

The image is a 224x224 PNG and the video 224x224: the official code resizes
the image for CLIP (bicubic on [-1, 1] to 224x224) and for the VAE (bicubic
to the output size), diffusers with PIL (CLIP) and its VideoProcessor (VAE);
at these sizes every one of those resizes is the identity, so both sides see
the same pixels (checked below), and any difference is the model code's.

What remains between the two sides: diffusers runs cond and uncond as two
batch-1 forwards where we run one batch of 2, computes the timestep sinusoid
in float32 where we (like the official code) use float64, orders some float32
ops differently, and encodes and decodes with its own VAE code; its CLIP
processor rescales by 1/255 where we map to [-1, 1] and back.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image

from engine.families import wan21_i2v
from engine.families.base import initial_noise
from engine.image import i2v_a14b_image, read_image, to_unit_range
from engine.model_set import ModelSet
from engine.render import Engine
from engine.wan import clip as wan_clip
from engine.wan.dit import WanModel
from test_clip import hf_config
from test_engine_oracle import assert_on_our_schedule, diffusers_wan21_vae, render_keeping, run_diffusers, \
    scheduler_on_our_schedule
from test_family_oracles import Job, assert_job_matches, assert_same_pixels, max_diff, pil_image, write_image

# Final latents (|x| up to ~8): float32 op-order differences of 3 steps x 2 forwards, amplified by
# guidance 5, plus the image's latent through two float32 VAE encoders and the CLIP features through
# two float32 towers. Measured 2.5e-5.
LATENT_ATOL, LATENT_RTOL = 1e-4, 1e-5
# Decoded video in [0, 1]: the latents' difference through a float32 VAE. Measured 5.5e-6.
VIDEO_ATOL = 5e-5
# CLIP features (|x| up to 5.5) of one image: float32 on both sides, the same ops, except that
# transformers' processor rescales by 1/255 where we go through [-1, 1]. Measured 2e-6.
CLIP_ATOL = 1e-5
# A mistake counts as rejected when it moves the final latents this far.
REJECT = 100 * LATENT_ATOL
SIZE = 224  # CLIP's input size: the identity for every resize on both sides
FRAMES, STEPS = 5, 3
PROMPT = "a red fox running through fresh snow"
SEED = 13
OTHER_GUIDANCE = 2.0


def diffusers_i2v_transformer(dit):
    """diffusers' WanTransformer3DModel with the Wan2.1 I2V image branch, holding our DiT's float32 weights."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = dit.config
    assert cfg.image_dim is not None
    transformer = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim,
    )
    ours = {name: tensor.clone() for name, tensor in dit.state_dict().items()}
    # strict: every image-branch tensor (img_emb, k_img, v_img, norm_k_img) has its diffusers place.
    transformer.load_state_dict(convert_wan_transformer_to_diffusers(ours), strict=True)
    return transformer.eval().requires_grad_(False)


def transformers_clip(path, folder, config):
    """transformers' CLIPVisionModel read by `from_pretrained` from our CLIP file (copied as model.safetensors)."""
    from transformers import CLIPVisionModel

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / "model.safetensors")
    hf_config(config).save_pretrained(folder)  # exact GELU, our width / heads / layers
    model, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval().requires_grad_(False)


def vit_h_image_processor():
    """CLIPImageProcessor set as Wan2.1-I2V-14B's (diffusers' image_processor/preprocessor_config.json)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC,
                                 do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                                 rescale_factor=1 / 255, do_normalize=True, image_mean=list(wan_clip.CLIP_MEAN),
                                 image_std=list(wan_clip.CLIP_STD), do_convert_rgb=True)


@dataclass
class Oracle:
    job: Job  # our render of the job (guidance 5), with what diffusers needs to render it too
    transformer: Any
    vae: Any
    image_encoder: Any  # transformers' CLIPVisionModel with our CLIP file's weights
    image_processor: Any
    other_image: str  # another PNG of the same size

    def pipe(self):
        """diffusers' Wan2.1 I2V pipeline on our schedule, computing the image's CLIP features itself."""
        from diffusers import WanImageToVideoPipeline

        scheduler, solver = scheduler_on_our_schedule("unipc", STEPS, self.job.params.shift)
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=scheduler,
                                       image_processor=self.image_processor, image_encoder=self.image_encoder,
                                       transformer=self.transformer)
        return pipe, scheduler, solver

    def run(self, output_type: str = "latent", **changes):
        pipe, scheduler, solver = self.pipe()
        out = run_diffusers(pipe, **self.job.call(image=pil_image(self.job.inputs["image"]), output_type=output_type,
                                                  **changes))
        assert_on_our_schedule(scheduler, solver)
        return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    from engine.tiny import make_tiny_model
    from engine.wan.convert.clip import TINY_CLIP_CONFIG

    directory = tmp_path_factory.mktemp("wan21-i2v")
    make_tiny_model(directory, family="wan2.1-i2v")
    engine = Engine(ModelSet.from_dir(directory), policy="dequantize_once")
    assert engine.models.family == "wan2.1-i2v"
    pipeline = engine.pipeline
    pictures = tmp_path_factory.mktemp("wan21-i2v-images")
    image = write_image(pictures / "first.png", SIZE, SIZE, seed=1)
    other = write_image(pictures / "other.png", SIZE, SIZE, seed=2)
    params = engine.spec.params(width=SIZE, height=SIZE, frames=FRAMES, steps=STEPS, guidance=5.0, shift=5.0)
    with torch.no_grad():
        rendered, latents, video = render_keeping(engine, PROMPT, SEED, params, inputs={"image": image})
    noise = initial_noise(SEED, (16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8), "cpu")
    assert latents.shape == noise.shape
    assert (latents - noise).abs().max() > 1.0  # the denoising moved far from the noise
    # The family's own negative prompt, as Engine.render used it.
    assert engine.spec.negative_prompt.startswith("镜头晃动，")
    job = Job(engine, params, {"image": image}, engine.embed(PROMPT), engine.embed(engine.spec.negative_prompt), noise,
              rendered, latents, video)
    image_encoder = transformers_clip(engine.models.files["image_encoder"], tmp_path_factory.mktemp("hf-clip"),
                                      TINY_CLIP_CONFIG)
    return Oracle(job, diffusers_i2v_transformer(pipeline.dit),
                  diffusers_wan21_vae(engine.models.files["vae"], pipeline.vae.config), image_encoder,
                  vit_h_image_processor(), other)


@dataclass
class Theirs:
    video: torch.Tensor  # [F, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [16, T, h, w] after the last step
    image_embeds: torch.Tensor  # [257, image_dim]: the CLIP features diffusers computed and used
    condition: torch.Tensor  # [20, T, h, w]: diffusers' first-frame mask and image latent


@pytest.fixture(scope="module")
def theirs(oracle) -> Theirs:
    """diffusers' run of the job at guidance 5, keeping the CLIP features and condition it built."""
    pipe, scheduler, solver = oracle.pipe()
    kept, encode_image, prepare_latents = {}, pipe.encode_image, pipe.prepare_latents

    def keep_image_embeds(*args, **kwargs):
        kept["image_embeds"] = encode_image(*args, **kwargs)
        return kept["image_embeds"]

    def keep_condition(*args, **kwargs):
        latents, condition = prepare_latents(*args, **kwargs)
        kept["condition"] = condition
        return latents, condition

    pipe.encode_image, pipe.prepare_latents = keep_image_embeds, keep_condition
    job = oracle.job
    with torch.no_grad():
        video, latents = run_diffusers(pipe, **job.call(image=pil_image(job.inputs["image"]), output_type="pt"))
    assert_on_our_schedule(scheduler, solver)
    return Theirs(video, latents, kept["image_embeds"][0], kept["condition"][0])


def our_clip_features(oracle: Oracle, path: str) -> torch.Tensor:
    """Our pipeline's CLIP context [257, image_dim] of the image at `path`, as its denoise computes it."""
    return wan_clip.encode_image(oracle.job.engine.pipeline.clip, to_unit_range(read_image(path)))


# --- the inputs both sides see -------------------------------------------------------------------------


@torch.no_grad()
def test_clip_features_match_transformers_for_the_image(oracle, theirs):
    # Tolerance CLIP_ATOL; measured 2e-6 on features up to 5.5 (another image's are 6.5 away).
    ours = our_clip_features(oracle, oracle.job.inputs["image"])
    assert ours.shape == (257, oracle.job.engine.pipeline.dit.config.image_dim)
    # diffusers' own encode_image (processor, tower, hidden_states[-2]) is what its run used.
    torch.testing.assert_close(ours, theirs.image_embeds, atol=CLIP_ATOL, rtol=0)
    # The processor's 224x224 pixels and ours are the same (both resizes are the identity).
    hf_pixels = oracle.image_processor(images=pil_image(oracle.job.inputs["image"]), return_tensors="pt")
    ours_pixels = wan_clip.preprocess(to_unit_range(read_image(oracle.job.inputs["image"])))
    torch.testing.assert_close(ours_pixels, hf_pixels["pixel_values"], atol=1e-5, rtol=0)
    # The features see the image: another one's are far away.
    assert max_diff(ours, our_clip_features(oracle, oracle.other_image)) > 1000 * CLIP_ATOL


@torch.no_grad()
def test_condition_matches_diffusers(oracle, theirs):
    # The 20 conditioning channels: the first-frame mask exactly, the image's latent to the latent
    # tolerance (measured 2.4e-7 on values up to 1.3).
    job = oracle.job
    p, path = job.params, job.inputs["image"]
    frame = i2v_a14b_image(read_image(path), p.height, p.width)
    assert_same_pixels(frame, path, p, spatial=8)  # the official bicubic resize and diffusers': the identity
    ours = job.engine.pipeline.condition(frame, p.frames)
    assert ours.shape == theirs.condition.shape == (20, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    assert torch.equal(ours[:4], theirs.condition[:4].to(ours.dtype))
    assert ours[:4, 0].eq(1).all() and ours[:4, 1:].eq(0).all()
    torch.testing.assert_close(ours[4:], theirs.condition[4:], atol=LATENT_ATOL, rtol=LATENT_RTOL)


# --- the whole job -------------------------------------------------------------------------------------


@torch.no_grad()
def test_render_matches_diffusers_wan_i2v_pipeline(oracle, theirs):
    # Tolerances LATENT_ATOL / VIDEO_ATOL; measured 2.5e-5 on latents up to ~8, 5.5e-6 on the video.
    # Engine.render's uint8 frames are our decode's through to_uint8 (render_keeping), and equal
    # diffusers' video rounded to uint8 but for rounding ties (assert_frames_match; measured: off
    # by one on 1e-4 of the values).
    assert_job_matches(oracle.job, theirs.video, theirs.latents)


@torch.no_grad()
def test_another_guidance_matches_and_guidance_matters(oracle, theirs):
    # Both sides at guidance 2 agree, and each lands far from its own guidance-5 result.
    # Measured: 1.4e-5 agreement, 3.5 between guidances (REJECT 0.01).
    job = oracle.job
    params = job.engine.spec.params(job.params, guidance=OTHER_GUIDANCE)
    ours = job.engine.pipeline.denoise(job.cond, job.uncond, SEED, params, job.inputs)
    other, _ = oracle.run(guidance_scale=OTHER_GUIDANCE)
    torch.testing.assert_close(ours, other, atol=LATENT_ATOL, rtol=LATENT_RTOL)
    assert max_diff(other, theirs.latents) > REJECT
    assert max_diff(ours, job.latents) > REJECT


# --- deliberate mistakes in our pipeline, each rejected by the comparison ---------------------------------


def denoise(oracle: Oracle) -> torch.Tensor:
    job = oracle.job
    return job.engine.pipeline.denoise(job.cond, job.uncond, SEED, job.params, job.inputs)


@torch.no_grad()
def test_oracle_rejects_another_images_clip_features(oracle, theirs, monkeypatch):
    # CLIP sees the other image, the VAE the right one. Measured 0.025 (REJECT 0.01): the tiny
    # model's image branch is a weak pull (features 6.5 apart move the latents that little).
    other = to_unit_range(read_image(oracle.other_image))
    right = wan_clip.encode_image
    monkeypatch.setattr(wan_clip, "encode_image", lambda encoder, image: right(encoder, other))
    assert max_diff(denoise(oracle), theirs.latents) > REJECT


@pytest.mark.parametrize("mistake", ["zero features", "no image branch"])
@torch.no_grad()
def test_oracle_rejects_dropped_image_tokens(oracle, theirs, monkeypatch, mistake):
    # Zero CLIP features (img_emb still runs, on nothing), or the DiT without its image branch
    # (text-only cross-attention, the same other weights). Measured 0.2 / 1.9 (REJECT 0.01).
    if mistake == "zero features":
        right = wan_clip.encode_image
        monkeypatch.setattr(wan_clip, "encode_image", lambda encoder, image: torch.zeros_like(right(encoder, image)))
    else:
        dit = oracle.job.engine.pipeline.dit
        text_only = WanModel(dataclasses.replace(dit.config, image_dim=None))
        text_only.load_state_dict({n: v for n, v in dit.state_dict().items() if "img" not in n}, strict=True)
        text_only.eval().requires_grad_(False)
        monkeypatch.setattr(oracle.job.engine.pipeline, "dit", lambda x, t, context, clip: text_only(x, t, context))
    assert max_diff(denoise(oracle), theirs.latents) > REJECT


@torch.no_grad()
def test_oracle_rejects_first_frame_mask_off_by_one_frame(oracle, theirs, monkeypatch):
    # The mask also marks pixel frame 1 as given. Measured 1.6 (REJECT 0.01).
    right = wan21_i2v.first_frame_mask

    def off_by_one(frames, grid, device):
        t, h, w = grid
        mask = right(frames, grid, device).transpose(0, 1).reshape(4 * t, h, w)  # frame 0 four times, 1, 2, ...
        mask[4] = 1
        return mask.view(t, 4, h, w).transpose(0, 1)

    monkeypatch.setattr(wan21_i2v, "first_frame_mask", off_by_one)
    assert max_diff(denoise(oracle), theirs.latents) > REJECT
