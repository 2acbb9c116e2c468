"""Train a tiny Wan2.1-architecture VAE as an autoencoder on the toy world's clips.

The model is `engine.wan.vae.WanVAE` itself (encoder and decoder, original
tensor names, tiny widths), so the state dict this returns is written with
`write_vae_safetensors` and read back by `load_vae(path, encoder=True)` with
nothing renamed.

Training runs the engine's own causal chunked path with gradients: the first
frame alone, then 4 frames per chunk with each causal conv's frame cache
carried over, so the decoder learns exactly what `WanVAE.decode` runs.
Two phases:
- first, IMAGE_FRACTION of the steps on single frames (IMAGES_PER_CLIP x
  batch of them, from random clips and times): a one-frame clip is the
  causal VAE's first chunk, which trains every spatial weight (the bulk of
  the model: drawing the shapes) at a seventeenth of a clip's cost;
- then full 64x64 17-frame clips, so the temporal convs, every cached
  chunk and the temporal up/down-sampling are trained as the engine runs them.
Residual branches and attention outputs start at zero (each block the
identity), which measured stable at twice the learning rate; temporal
weights start so that each frame is coded on its own
(`start_frames_independent`), what the image phase trains.
Quality is measured on full 17-frame clips of held-out scenes.

The loss is the pixel MSE in [-1, 1] (an L1 keeps pushing on the
background's many slightly-off pixels and never draws the shape, measured)
plus a small KL term on the normalised latent, the one the DiT sees,
(mu - LATENT_MEAN) / LATENT_STD, with the latent sampled from the
posterior: the KL keeps the latent near unit scale and the sampling teaches
the decoder to tolerate small latent errors (the DiT's). The Wan2.1 latent
statistics are constants of `engine.wan.vae`, not tensors of the file, so
after training `fold_latent_statistics` rescales the quant conv (`conv1`)
and undoes it in the post-quant conv (`conv2`): the engine's `encode` then
gives latents of zero mean and unit variance per channel on the world's
clips, and `decode(encode(x))` is unchanged.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.toy.world import FRAMES, SIZE, held_out_scenes, render_clip, training_scenes
from engine.wan.convert.vae import random_vae_state_dict, vae_file_shapes, write_vae_safetensors
from engine.wan.vae import FrameCache, RMSNorm, WanVAE, WanVAEConfig, load_vae

# Widths picked by measuring on this CPU: base 8 learns the world faster per
# CPU-second than base 16 (which is also unstable at the same learning rate).
TOY_VAE_CONFIG = WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)

KL_WEIGHT = 1e-4  # per latent element, against the MSE per pixel
INITIAL_SIGMA = 0.05  # posterior std at the start, in normalised latent units
LEARNING_RATE = 2e-3  # with the residual branches started at zero (measured)
WARMUP_STEPS = 50
GRAD_CLIP = 1.0
FINETUNE_LR = 5e-4  # decoder-only steps (`finetune_decoder`), after the whole VAE is trained
IMAGE_FRACTION = 0.6  # first phase: single frames for this share of the steps ...
IMAGES_PER_CLIP = 4  # ... this many per clip of the batch
EVAL_CLIPS = 8  # held-out 17-frame clips for the PSNR
STATS_CLIPS = 16  # training clips whose latents set the per-channel statistics


def clip_tensor(clips: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 clips [F, H, W, 3] -> video batch [B, 3, F, H, W], float32 in [-1, 1]."""
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float()
    return video / 127.5 - 1.0


def training_batch(rng: np.random.Generator, batch: int, frames: int) -> torch.Tensor:
    """`batch` random windows of `frames` frames, each from a random training scene's clip."""
    scenes = training_scenes()
    clips = []
    for _ in range(batch):
        clip = render_clip(scenes[rng.integers(len(scenes))], rng)
        start = rng.integers(FRAMES - frames + 1)
        clips.append(clip[start:start + frames])
    return clip_tensor(clips)


def held_out_clips(count: int = EVAL_CLIPS, seed: int = 1234) -> torch.Tensor:
    """Full 17-frame clips of `count` different held-out scenes (never trained on), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    scenes = held_out_scenes()
    picked = rng.choice(len(scenes), size=count, replace=count > len(scenes))
    return clip_tensor([render_clip(scenes[i], rng) for i in picked])


def posterior(model: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw posterior (mu, log-variance) of a video batch, with gradients.

    The chunking of `WanVAE._encode_video`: the first frame alone, then
    temporal_factor frames per chunk, one frame cache for the whole clip.
    """
    step = model.config.temporal_factor
    chunks = [video[:, :, :1]] + [video[:, :, i:i + step] for i in range(1, video.shape[2], step)]
    cache: FrameCache = {}
    h = torch.cat([model.encoder(chunk, cache, first_chunk=(i == 0)) for i, chunk in enumerate(chunks)], dim=2)
    return model.conv1(h).chunk(2, dim=1)


def latent_stats(model: WanVAE) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's fixed per-channel latent mean and std, shaped [1, C, 1, 1, 1]."""
    mean, std, _ = model._latent_stats()
    return mean, std


def shape_mask(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W]: True where a ground-truth frame differs from its background (the shape and its
    antialiased edge). The world keeps every shape MARGIN pixels clear of the edge, so each frame's
    corner pixel is its background colour."""
    return (video - video[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.25 / 127.5


def pixel_error(restored: torch.Tensor, video: torch.Tensor, shape_weight: float = 1.0) -> torch.Tensor:
    """The squared error of `restored` against `video`, averaged over pixels, with the shape's pixels
    (`shape_mask`) counted `shape_weight` times: sum(w e^2) / sum(w), so the loss keeps the plain
    MSE's scale. A shape covers ~10-20% of a frame and the background the rest, so at weight 1 a
    shape drawn in a colour close to its background's (red on brown, 117 RGB apart) costs little
    next to the background's many slightly-off pixels; measured, a VAE so trained returned every
    red shape on brown as plain brown (docs/quality.md). Weight 1 is the plain MSE, bit for bit."""
    if shape_weight == 1.0:
        return (restored - video).square().mean()
    return weighted_mean_square(restored - video, 1.0 + (shape_weight - 1.0) * shape_mask(video).float())


def weighted_mean_square(error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w e^2) / sum(w) over every element, `weight` broadcast against `error` (over channels):
    a weighted MSE on the plain MSE's scale (a uniform weight gives the MSE)."""
    return (weight * error.square()).mean() / weight.mean()


def training_loss(model: WanVAE, video: torch.Tensor, generator: torch.Generator,
                  shape_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, pixel MSE) of one batch through sampled latents and the chunked decoder; the loss's
    pixel term counts the shape's pixels `shape_weight` times (`pixel_error`)."""
    mu, logvar = posterior(model, video)
    logvar = logvar.clamp(-30.0, 20.0)
    mean, std = latent_stats(model)
    # The KL of the normalised latent, N((mu - mean) / std, var / std^2), against N(0, 1).
    mu_n, logvar_n = (mu - mean) / std, logvar - 2.0 * torch.log(std)
    kl = 0.5 * (mu_n.square() + logvar_n.exp() - 1.0 - logvar_n).mean()
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator)
    restored = model._decode_video(z)
    mse = (restored.detach() - video).square().mean()
    return pixel_error(restored, video, shape_weight) + KL_WEIGHT * kl, mse


@torch.no_grad()
def reconstruction_psnr(model: WanVAE, video: torch.Tensor) -> float:
    """PSNR in dB of decode(encode(video)) through the engine's own calls, pixels in [0, 1]."""
    restored = model.decode(model.encode(video))
    mse = ((restored - video) / 2.0).square().mean().item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def normalised_latents(model: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """The engine's normalised latents [B, C, T, h, w] of a batch, a few videos at a time."""
    return torch.cat([model.encode(video[i:i + 8]) for i in range(0, video.shape[0], 8)])


@torch.no_grad()
def fold_latent_statistics(model: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make `model.encode` give zero-mean unit-variance latents per channel on `video`; decode(encode) is unchanged.

    With m, s the per-channel mean and std of the current normalised
    latents, the quant conv's mu rows become (mu - mean - m * std) / s + mean
    (its log-variance rows shift by -2 log s), and the post-quant conv takes
    the inverse map first, so the decoder sees the same tensor as before.
    Returns (m, s) measured before the fold.
    """
    z = normalised_latents(model, video)
    m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    mean, std = (t.flatten() for t in latent_stats(model))
    c = model.config.z_dim
    # New raw mu = a * old raw mu + b, per channel.
    a = 1.0 / s
    b = mean - a * (mean + m * std)
    w1, b1 = model.conv1.weight, model.conv1.bias
    w1[:c] *= a.view(-1, 1, 1, 1, 1)
    b1[:c] = a * b1[:c] + b
    b1[c:] -= 2.0 * torch.log(s)
    # conv2 sees old mu = (new mu - b) / a: fold that into its input side.
    w2, b2 = model.conv2.weight, model.conv2.bias
    b2 += (w2.flatten(1) @ (-b / a))
    w2 /= a.view(1, -1, 1, 1, 1)
    return m, s


@torch.no_grad()
def start_nearly_deterministic(model: WanVAE) -> None:
    """Make the posterior's std INITIAL_SIGMA (in normalised units) everywhere.

    A random quant conv's log-variance rows give noise as large as the
    latent itself; the decoder then learns to ignore the latent and training
    stalls for hundreds of steps (measured).
    """
    c = model.config.z_dim
    _, std = latent_stats(model)
    model.conv1.weight[c:] = 0.0
    model.conv1.bias[c:] = 2.0 * torch.log(INITIAL_SIGMA * std.flatten())


@torch.no_grad()
def start_residuals_at_identity(model: WanVAE) -> None:
    """Zero each residual branch's last conv and each attention's output projection.

    Every residual block and attention block then starts as the identity (or
    its 1x1 shortcut), so the signal and the gradients pass the whole depth
    unchanged at step 0; measured, training is stable at twice the learning rate.
    """
    for name, tensor in model.named_parameters():
        if ".residual.6." in name or (".middle.1.proj." in name):
            tensor.zero_()


@torch.no_grad()
def start_frames_independent(model: WanVAE) -> None:
    """Start every temporal weight so that each frame is coded on its own, as the image phase trains it.

    The causal 3-D convs' taps on past frames are zeroed (a single frame sees
    only zero padding there, so the image phase neither uses nor trains them);
    the encoder's temporal downsamplers pass the later frame of each pair on,
    and the decoder's temporal upsamplers copy each frame into both of theirs.
    When the video phase starts, a chunk of 4 frames is then coded as its last
    frame and decoded as 4 copies of it, instead of through random temporal
    weights (which measured set the held-out PSNR back to ~10 dB).
    """
    from engine.wan.vae import CausalConv3d, Downsampler, Upsampler

    for module in model.modules():
        if isinstance(module, CausalConv3d) and module.weight.shape[2] == 3:
            module.weight[:, :, :2] = 0.0
    for module in model.modules():
        if isinstance(module, (Downsampler, Upsampler)) and module.time_conv is not None:
            conv = module.time_conv
            conv.weight.zero_()
            conv.bias.zero_()
            dim = conv.weight.shape[1]
            eye = torch.eye(dim)
            for half in range(conv.weight.shape[0] // dim):  # the upsampler's two output frames
                conv.weight[half * dim:(half + 1) * dim, :, 2, 0, 0] = eye


def _summed_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # F.normalize's x / max(|x|, 1e-12), with the norm as rsqrt of a plain sum of squares
    return x * torch.rsqrt(x.square().sum(1, keepdim=True).clamp_min(1e-24)) * norm.scale * norm.gamma


def use_summed_norms(model: torch.nn.Module) -> None:
    """Training only: every RMSNorm of `model` computes x * rsqrt(sum of x² over channels) instead of
    `F.normalize(x, dim=1)`. The same values (to ~1e-7) and gradients; on this CPU `F.normalize`'s
    strided reduction over channels was a fifth of a VAE training step, and this form runs its
    forward and backward ~5x faster (a video step 0.84 -> 0.68 s, docs/quality.md, session 10).
    Float32 training only (a float16 sum of squares can overflow), and not for the engine, which
    keeps the reference's formula. The rounding differs, so a run with it is not bit-identical to
    one without (the committed VAE was trained with it; the earlier recipe's without)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(_summed_norm, module)


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(steps - WARMUP_STEPS, 1)
    return LEARNING_RATE * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def video_phase_start(steps: int) -> int:
    """The first step of `train_vae`'s video phase: the steps before it train on single frames."""
    return min(steps, math.ceil(IMAGE_FRACTION * steps))  # an integer n < x exactly when n < ceil(x)


def phase_learning_rate(step: int, steps: int, video_warmup: int = 0) -> float:
    """`learning_rate`, warmed up again over `video_warmup` steps from the first video step on.

    The temporal taps get no gradient while the VAE sees single frames, so Adam's first updates
    to them at the switch are several times the learning rate: measured, the pixel MSE jumps
    from 0.004 to 0.31 over the first 25 video steps. Over 50 steps of re-warm-up the first 10
    video steps averaged 0.032 instead of 0.197 (docs/quality.md, session 12). 0: no re-warm-up.
    """
    rate = learning_rate(step, steps)
    switch = video_phase_start(steps)
    if video_warmup and step >= switch:
        rate *= min(1.0, (step - switch + 1) / video_warmup)
    return rate


def train_vae(steps: int, seed: int = 0, config: WanVAEConfig = TOY_VAE_CONFIG, batch: int = 2,
              log: Callable[[str], None] = print, log_every: int = 25,
              eval_every: int = 0, summed_norms: bool = False,
              shape_weight: float = 1.0, video_warmup: int = 0) -> dict[str, torch.Tensor]:
    """Train a Wan2.1 VAE on the toy world for `steps` Adam steps; its state dict in original names.

    A step is `IMAGES_PER_CLIP * batch` single frames for the first
    IMAGE_FRACTION of the steps, then `batch` full clips.
    Seeded and CPU-only: the initial weights are `random_vae_state_dict(shapes,
    seed)`, the clips and the latent noise come from generators seeded by
    `seed`, so a seed and a thread count give the same tensors bit for bit.
    Logs the loss every `log_every` steps (and the held-out PSNR every
    `eval_every` steps, if set), then the latent statistics it folds in and
    the final held-out reconstruction PSNR. `summed_norms`: `use_summed_norms` (faster, other rounding).
    `shape_weight`: the loss counts the shape's pixels that many times (`pixel_error`).
    `video_warmup`: the learning rate is warmed up again over that many steps at the switch to
    full clips (`phase_learning_rate`).
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    if not shape_weight >= 1.0:
        raise ValueError(f"shape_weight must be >= 1, got {shape_weight}")
    if video_warmup < 0:
        raise ValueError(f"video_warmup must be >= 0, got {video_warmup}")
    if (FRAMES - 1) % config.temporal_factor or SIZE % config.spatial_factor:
        raise ValueError(f"a VAE of temporal factor {config.temporal_factor} and spatial factor "
                         f"{config.spatial_factor} cannot encode the world's {FRAMES} frames of {SIZE}x{SIZE}")
    model = WanVAE(config, encoder=True)
    model.load_state_dict(random_vae_state_dict(vae_file_shapes(config), seed))
    start_nearly_deterministic(model)
    start_residuals_at_identity(model)
    start_frames_independent(model)
    if summed_norms:
        use_summed_norms(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)

    evaluation = held_out_clips()
    start = time.perf_counter()
    running = 0.0
    switch = video_phase_start(steps)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = phase_learning_rate(step, steps, video_warmup)
        if step < switch:
            video = training_batch(rng, IMAGES_PER_CLIP * batch, 1)
        else:
            video = training_batch(rng, batch, FRAMES)
        loss, mse = training_loss(model, video, noise, shape_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if GRAD_CLIP:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        running += mse.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            log(f"vae step {step + 1:5d}/{steps}  mse {running / count:.5f}  loss {loss.item():.5f}  "
                f"{time.perf_counter() - start:7.1f} s")
            running = 0.0
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            log(f"vae step {step + 1:5d}/{steps}  held-out PSNR {reconstruction_psnr(model, evaluation):.2f} dB")
            model.train()

    model.eval()
    stats_rng = np.random.default_rng([seed, 1])
    m, s = fold_latent_statistics(model, training_batch(stats_rng, STATS_CLIPS, FRAMES))
    log("latent statistics folded into conv1/conv2: per-channel mean was "
        f"[{', '.join(f'{v:.2f}' for v in m)}], std [{', '.join(f'{v:.2f}' for v in s)}]")
    log(f"held-out reconstruction PSNR {reconstruction_psnr(model, evaluation):.2f} dB "
        f"({EVAL_CLIPS} clips of {FRAMES} frames)")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def finetune_decoder(vae_path: str | Path, steps: int, seed: int = 0, batch: int = 2,
                     log: Callable[[str], None] = print, log_every: int = 25,
                     eval_every: int = 0, summed_norms: bool = False,
                     shape_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Train only the decoder side (conv2 and the decoder) of a written toy VAE on full clips; its state dict.

    The encoder and the quant conv stay as they are, so the latents (what a
    DiT is trained on) do not change: the toy DiT can be trained on them
    while the decoder keeps improving. Latents are the posterior mean plus
    noise of INITIAL_SIGMA (normalised units), so the decoder tolerates a
    DiT's small errors. `summed_norms`: `use_summed_norms`. `shape_weight`: as `train_vae`'s.
    """
    if not shape_weight >= 1.0:
        raise ValueError(f"shape_weight must be >= 1, got {shape_weight}")
    model = load_vae(vae_path, encoder=True)
    if summed_norms:
        use_summed_norms(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(("decoder.", "conv2.")))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=FINETUNE_LR)
    rng = np.random.default_rng([seed, 2])
    noise = torch.Generator().manual_seed(seed)
    _, std = latent_stats(model)
    evaluation = held_out_clips()
    start = time.perf_counter()
    running = 0.0
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps) * FINETUNE_LR / LEARNING_RATE
        video = training_batch(rng, batch, FRAMES)
        with torch.no_grad():
            mu, _ = posterior(model, video)
        z = mu + INITIAL_SIGMA * std * torch.randn(mu.shape, generator=noise)
        restored = model._decode_video(z)
        loss = pixel_error(restored, video, shape_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, GRAD_CLIP)
        optimizer.step()
        running += (restored.detach() - video).square().mean().item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"decoder step {step + 1:5d}/{steps}  mse {running / ((step % log_every) + 1):.5f}  "
                f"{time.perf_counter() - start:7.1f} s")
            running = 0.0
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            log(f"decoder step {step + 1:5d}/{steps}  held-out PSNR {reconstruction_psnr(model, evaluation):.2f} dB")
            model.train()
    model.eval()
    log(f"held-out reconstruction PSNR {reconstruction_psnr(model, evaluation):.2f} dB ({EVAL_CLIPS} clips of {FRAMES} frames)")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.toy.train_vae",
                                     description="Train the toy world's Wan2.1 VAE and write it as safetensors.")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="wan_2.1_vae_toy.safetensors")
    parser.add_argument("--summed-norms", action="store_true", help="RMS norms as x * rsqrt(sum x^2): "
                        "~5x faster norms, other rounding (the committed VAE's recipe; the earlier one ran without)")
    parser.add_argument("--shape-weight", type=float, default=1.0, help="count the shape's pixels this many "
                        "times in the loss (1: the plain MSE; the committed VAE: 5)")
    parser.add_argument("--video-warmup", type=int, default=0, help="warm the learning rate up again over "
                        "this many steps at the switch from single frames to clips (0: none; the committed VAE: 50)")
    parser.add_argument("--finetune-decoder", metavar="VAE", help="instead: go on training only the decoder of "
                        "this written toy VAE (its latents stay the same)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.finetune_decoder:
        state = finetune_decoder(args.finetune_decoder, args.steps, seed=args.seed, batch=args.batch,
                                 summed_norms=args.summed_norms, shape_weight=args.shape_weight)
    else:
        state = train_vae(args.steps, seed=args.seed, config=TOY_VAE_CONFIG, batch=args.batch,
                          summed_norms=args.summed_norms, shape_weight=args.shape_weight,
                          video_warmup=args.video_warmup)
    write_vae_safetensors(state, args.out)
    model = load_vae(args.out, encoder=True)
    clips = held_out_clips()
    z = normalised_latents(model, clips)
    print(f"wrote {args.out}; re-loaded with load_vae(encoder=True): held-out PSNR "
          f"{reconstruction_psnr(model, clips):.2f} dB, latent mean {z.mean():.3f} std {z.std():.3f} "
          f"(per channel std {z.std(dim=(0, 2, 3, 4)).min():.2f}..{z.std(dim=(0, 2, 3, 4)).max():.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
