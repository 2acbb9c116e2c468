"""What every family module declares, and the pieces their denoising loops share.

A family module (`engine/families/wan22_t2v_a14b.py`, ...) defines one
`Family`: its torch-free `FamilySpec` (render parameters, inputs), the file
roles it needs, a recogniser that picks its files out of what a model
directory holds (from file headers; names only where contents cannot tell),
and a pipeline class that loads the weights once and renders a job with the
family's denoising loop written out.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from jobs.family import FamilySpec
from jobs.params import RenderParams

ProgressFn = Callable[[int, int], None]


class ModelSetError(ValueError):
    """The given files do not make one complete, unambiguous model set."""


class RenderError(RuntimeError):
    """A job that cannot produce a trustworthy video (bad shape, non-finite numbers, unusable input)."""


@dataclass(frozen=True)
class DitFile:
    """A Wan DiT file as its header describes it."""

    path: Path
    config: Any  # engine.wan.dit.WanConfig
    expert: str | None  # "high" / "low" when its name (or the role it was given) says so


@dataclass(frozen=True)
class VaeFile:
    path: Path
    z_dim: int  # latent channels: 16 for the Wan2.1 VAE, 48 for the Wan2.2 VAE


# QuantStack: `Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf` in `HighNoise/`; also
# `high_noise_model`, `low-noise`, ... in any case, with any separator.
_EXPERT_NAME = re.compile(r"(high|low)[\W_]*noise", re.IGNORECASE)


def expert_from_name(path: Path) -> str | None:
    """'high' or 'low' when the file's name (or else its folder's) says which noise expert it is."""
    for name in (path.name, path.parent.name):
        match = _EXPERT_NAME.search(name)
        if match:
            return match.group(1).lower()
    return None


class Pipeline(Protocol):
    """A family's loaded weights (DiT(s), VAE) and its denoising loop."""

    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, params: RenderParams,
                inputs: dict[str, str | list[str]], progress: ProgressFn | None) -> torch.Tensor:
        """Final latents [C, T, h, w] of one job, from the text embeddings [L, text_dim] and input paths."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Video [3, F, H, W] in [-1, 1]."""
        ...


@dataclass(frozen=True)
class Family:
    spec: FamilySpec
    roles: tuple[str, ...]  # files besides the text encoder and tokenizer, e.g. ("dit_high", "dit_low", "vae")
    # (DiT files, VAE files) -> {role: path} when these are this family's files, None when they
    # are not; ModelSetError for a near miss (a lone expert, a pair that does not match).
    recognise: Callable[[list[DitFile], list[VaeFile]], dict[str, Path] | None]
    pipeline: Callable[..., Pipeline]  # (files: {role: Path}, device, dtype, policy) -> Pipeline
    files_hint: str  # what a user downloads, for error messages and docs
    # Defaults that depend on which published file this is (Wan2.1 I2V 480P / 720P): DiT path -> {name: value}
    file_defaults: Callable[[Path], dict] | None = None


class JobNoise:
    """A job's random numbers: one CPU generator seeded with the job's seed (the same on every machine).

    The first draw is the starting latent; the "lcm" sampler continues the same
    stream, one latent-shaped draw per step, so a job stays one deterministic
    function of its seed.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def draw(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """The stream's next float32 standard normal of `shape`, moved to `device`."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device)


def initial_noise(seed: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """The job's starting latent: the first draw of its `JobNoise`."""
    return JobNoise(seed).draw(shape, device)


def cfg_rows(guidance: float) -> int:
    """How many rows of (cond, uncond) a step runs through the DiT: 1 at guidance exactly 1.0,
    where classifier-free guidance is the conditional velocity alone (distilled models), else 2."""
    return 1 if guidance == 1.0 else 2


def guided(velocity: torch.Tensor, guidance: float) -> torch.Tensor:
    """The step's velocity from the DiT's output for the first `cfg_rows(guidance)` rows of
    (cond, uncond): the conditional one alone, or uncond + guidance x (cond - uncond)."""
    if cfg_rows(guidance) == 1:
        return velocity[0]
    v_cond, v_uncond = velocity
    return v_uncond + guidance * (v_cond - v_uncond)


def check_finite(latents: torch.Tensor, step: int, steps: int) -> None:
    if not torch.isfinite(latents).all():
        raise RenderError(f"non-finite latents after step {step}/{steps}")


def latent_grid(params: RenderParams, temporal: int, spatial: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a video of params' size."""
    return (params.frames - 1) // temporal + 1, params.height // spatial, params.width // spatial


def single(dits: list[DitFile], vaes: list[VaeFile], dit_ok: Callable[[DitFile], bool], z_dim: int,
           title: str) -> dict[str, Path] | None:
    """The recogniser of a one-DiT family: exactly one DiT that `dit_ok` accepts, not named as a
    noise expert, and exactly one VAE with `z_dim` latent channels."""
    mine = [d for d in dits if dit_ok(d) and d.expert is None]
    vae = [v for v in vaes if v.z_dim == z_dim]
    if len(mine) != 1 or len(dits) != 1:
        return None
    if not vae:
        raise ModelSetError(f"{mine[0].path}: a {title} DiT needs a VAE with {z_dim}-channel latents; none found")
    if len(vae) > 1:
        raise ModelSetError(f"more than one {title} VAE ({', '.join(v.path.name for v in vae)}); name one with --vae")
    return {"dit": mine[0].path, "vae": vae[0].path}


def _shape(dit: DitFile) -> str:
    c = dit.config
    return f"{c.in_dim}->{c.out_dim} channels, dim {c.dim}, {c.num_layers} layers"


def expert_pair(dits: list[DitFile], vaes: list[VaeFile], dit_ok: Callable[[DitFile], bool], z_dim: int,
                title: str) -> dict[str, Path] | None:
    """The recogniser of a two-expert family: a high- and a low-noise DiT of identical shapes
    that `dit_ok` accepts, and one VAE with `z_dim` latent channels."""
    mine = [d for d in dits if dit_ok(d)]
    if not mine or any(d.expert is None for d in mine):
        return None  # unnamed DiTs are another family's, or an error ModelSet reports
    # Partners are looked for among all named DiTs, so a pair of two shapes is refused as such.
    high = [d for d in dits if d.expert == "high"]
    low = [d for d in dits if d.expert == "low"]
    if len(high) > 1 or len(low) > 1:
        extra = high if len(high) > 1 else low
        raise ModelSetError(f"more than one {extra[0].expert}-noise expert ({', '.join(str(d.path) for d in extra)}); "
                            "name the pair with --dit-high and --dit-low")
    if not low:
        raise ModelSetError(f"{high[0].path}: the {title} high-noise expert's partner, the low-noise expert, is missing "
                            "(QuantStack ships it as ...-LowNoise-<quant>.gguf in LowNoise/)")
    if not high:
        raise ModelSetError(f"{low[0].path}: the {title} low-noise expert's partner, the high-noise expert, is missing "
                            "(QuantStack ships it as ...-HighNoise-<quant>.gguf in HighNoise/)")
    if high[0].config != low[0].config:
        raise ModelSetError(f"{high[0].path} and {low[0].path}: the two experts differ in shape "
                            f"({_shape(high[0])} vs {_shape(low[0])}); they are not one {title} pair")
    vae = [v for v in vaes if v.z_dim == z_dim]
    if not vae:
        raise ModelSetError(f"the {title} experts need a VAE with {z_dim}-channel latents; none found")
    if len(vae) > 1:
        raise ModelSetError(f"more than one VAE ({', '.join(v.path.name for v in vae)}); name one with --vae")
    return {"dit_high": high[0].path, "dit_low": low[0].path, "vae": vae[0].path}
