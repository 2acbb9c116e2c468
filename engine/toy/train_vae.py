"""Train a tiny Wan2.1-architecture VAE as an autoencoder on the toy world's clips.

The model is `engine.wan.vae.WanVAE` itself (encoder and decoder, original
tensor names, tiny widths), so the state dict this returns is written with
`write_vae_safetensors` and read back by `load_vae(path, encoder=True)` with
nothing renamed.

Training runs the engine's own causal chunked path with gradients: the first
frame alone, then 4 frames per chunk with each causal conv's frame cache
carried over, so the decoder learns exactly what `WanVAE.decode` runs. Each
clip is a random window of 1 + 4k frames (k = `CLIP_CHUNKS`) of a 17-frame
world clip: windows of a constant-velocity clip are clips of the world too,
and two chunks after the first already exercise every cached path, at half
the cost of 17 frames. Quality is always measured on full 17-frame clips of
held-out scenes.

The loss is L1 on pixels in [-1, 1] plus a small KL term on the normalised
latent, the one the DiT sees, (mu - LATENT_MEAN) / LATENT_STD, with the
latent sampled from the posterior: the KL keeps the latent near unit scale
and the sampling teaches the decoder to tolerate small latent errors (the
DiT's). The Wan2.1 latent statistics are constants of `engine.wan.vae`, not
tensors of the file, so after training `fold_latent_statistics` rescales the
quant conv (`conv1`) and undoes it in the post-quant conv (`conv2`): the
engine's `encode` then gives latents of zero mean and unit variance per
channel on the world's clips, and `decode(encode(x))` is unchanged.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.toy.world import FRAMES, SIZE, held_out_scenes, render_clip, training_scenes
from engine.wan.convert.vae import random_vae_state_dict, vae_file_shapes, write_vae_safetensors
from engine.wan.vae import LATENT_MEAN, LATENT_STD, FrameCache, WanVAE, WanVAEConfig, load_vae

# Widths picked by measuring loss per CPU-second on the world's clips (see
# `main`'s help): base 16 with (1, 2, 2, 2) is ~0.8M parameters.
TOY_VAE_CONFIG = WanVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)

CLIP_CHUNKS = 4  # training windows of 1 + 4 * CLIP_CHUNKS frames
KL_WEIGHT = 1e-3  # per latent element, against the L1 per pixel
INITIAL_SIGMA = 0.05  # posterior std at the start, in normalised latent units
LEARNING_RATE = 1.5e-3
GRAD_CLIP = 1.0
SHAPE_WEIGHT = 10.0
CROP = 32
CROP_FRACTION = 0.7
CROPS_PER_CLIP = 4
WARMUP_STEPS = 20
EVAL_CLIPS = 8  # held-out 17-frame clips for the PSNR
STATS_CLIPS = 48  # training clips whose latents set the per-channel statistics


def clip_tensor(clips: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 clips [F, H, W, 3] -> video batch [B, 3, F, H, W], float32 in [-1, 1]."""
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float()
    return video / 127.5 - 1.0


def training_batch(rng: np.random.Generator, batch: int, frames: int, crop: int = SIZE) -> torch.Tensor:
    """`batch` random windows of `frames` frames and `crop` pixels square, each from a random training scene's clip.

    A crop is centred (to the 8-pixel latent grid, give or take one cell) on
    the shape in the window's middle frame: a random crop would mostly show
    plain background, which the model learns first anyway.
    """
    scenes = training_scenes()
    clips = []
    for _ in range(batch):
        clip = render_clip(scenes[rng.integers(len(scenes))], rng)
        start = rng.integers(FRAMES - frames + 1)
        window = clip[start:start + frames]
        if crop < SIZE:
            middle = window[frames // 2]
            # The corner pixel is always background: the shape keeps a margin from the edge.
            ys, xs = np.nonzero((middle != middle[0, 0]).any(axis=-1))
            jitter = rng.integers(-1, 2, size=2)
            y, x = (int(np.clip(8 * (round((c.mean() - crop / 2) / 8) + j), 0, SIZE - crop))
                    for c, j in ((ys, jitter[0]), (xs, jitter[1])))
            window = window[:, y:y + crop, x:x + crop]
        clips.append(window)
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
    """[B, F, H, W]: 1 where a pixel differs from its frame's background (the per-channel median), else 0."""
    background = video.flatten(3).median(dim=-1).values[..., None, None]
    return ((video - background).abs().amax(dim=1) > 0.02).float()


def training_loss(model: WanVAE, video: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, pixel MSE) of one batch through sampled latents and the chunked decoder.

    The reconstruction term is an MSE with the shape's pixels weighted
    SHAPE_WEIGHT times more: the shape is ~4% of the pixels, and without the
    weight the model spends hundreds of steps on the background alone.
    """
    mu, logvar = posterior(model, video)
    logvar = logvar.clamp(-30.0, 20.0)
    mean, std = latent_stats(model)
    # The KL of the normalised latent, N((mu - mean) / std, var / std^2), against N(0, 1).
    mu_n, logvar_n = (mu - mean) / std, logvar - 2.0 * torch.log(std)
    kl = 0.5 * (mu_n.square() + logvar_n.exp() - 1.0 - logvar_n).mean()
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator)
    error = (model._decode_video(z) - video).square()
    weight = (1.0 + SHAPE_WEIGHT * shape_mask(video)).unsqueeze(1)
    reconstruction = (weight * error).mean() / weight.mean()
    return reconstruction + KL_WEIGHT * kl, error.mean().detach()


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


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(steps - WARMUP_STEPS, 1)
    return LEARNING_RATE * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def train_vae(steps: int, seed: int = 0, config: WanVAEConfig = TOY_VAE_CONFIG, batch: int = 2,
              log: Callable[[str], None] = print, log_every: int = 25, eval_every: int = 0,
              clip_chunks: int = CLIP_CHUNKS) -> dict[str, torch.Tensor]:
    """Train a Wan2.1 VAE on the toy world for `steps` Adam steps; its state dict in original names.

    Seeded and CPU-only: the initial weights are `random_vae_state_dict(shapes,
    seed)`, the clips and the latent noise come from generators seeded by
    `seed`, so a seed and a thread count give the same tensors bit for bit.
    Logs the loss every `log_every` steps (and the held-out PSNR every
    `eval_every` steps, if set), then the latent statistics it folds in and
    the final held-out reconstruction PSNR.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    frames = 1 + config.temporal_factor * clip_chunks
    if frames > FRAMES:
        raise ValueError(f"clip_chunks={clip_chunks} needs {frames} frames; the world's clips have {FRAMES}")
    model = WanVAE(config, encoder=True)
    model.load_state_dict(random_vae_state_dict(vae_file_shapes(config), seed))
    start_nearly_deterministic(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)

    evaluation = held_out_clips()
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        if step < CROP_FRACTION * steps:
            video = training_batch(rng, CROPS_PER_CLIP * batch, frames, CROP)
        else:
            video = training_batch(rng, batch, frames)
        loss, mse = training_loss(model, video, noise)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.toy.train_vae",
                                     description="Train the toy world's Wan2.1 VAE and write it as safetensors.")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="wan_2.1_vae_toy.safetensors")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    state = train_vae(args.steps, seed=args.seed, config=TOY_VAE_CONFIG, batch=args.batch)
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
