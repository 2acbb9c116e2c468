"""One process, one model: prompt + seed + parameters in, uint8 frames out.

`Engine` loads a model set once (DiT, umT5 encoder + tokenizer, VAE) and keeps
it resident; `Engine.render` runs one job. The denoising loop is `denoise`,
written out so that it reads top to bottom: noise, then per step two DiT
forwards (cond and uncond), guidance, solver step.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine.model_set import ModelSet, check_compatible
from engine.sampling import make_solver
from engine.video import frames_sha256, to_uint8
from jobs.identity import file_digest
from jobs.params import DEFAULT_NEGATIVE_PROMPT, RenderParams

LATENT_CHANNELS = 16
# On the CPU, torch's results depend on its intra-op thread count (measured:
# the umT5 path gives other bits with 1 thread than with 2). Frames must not
# depend on how many actors share a machine, so a CPU engine always computes
# with the same thread count; a CPU machine scales with more actors instead.
CPU_THREADS = 1
VAE_STRIDE = (4, 8, 8)

ProgressFn = Callable[[int, int], None]


class RenderError(RuntimeError):
    """A job that cannot produce a trustworthy video (bad shape, non-finite numbers)."""


@dataclass
class RenderResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    frames_sha256: str
    timings: dict[str, float] = field(default_factory=dict)


class EmbeddingCache:
    """LRU of text embeddings bounded in bytes, keyed by (encoder digest, cleaned prompt)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def initial_noise(seed: int, params: RenderParams, device: torch.device | str = "cpu") -> torch.Tensor:
    """The job's starting latent: drawn by a CPU generator, so it is the same on every machine."""
    shape = (
        LATENT_CHANNELS,
        (params.frames - 1) // VAE_STRIDE[0] + 1,
        params.height // VAE_STRIDE[1],
        params.width // VAE_STRIDE[2],
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def denoise(
    dit: torch.nn.Module,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    params: RenderParams,
    dtype: torch.dtype,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Flow-matching sampling with classifier-free guidance; returns float32 latents [16, T, h, w]."""
    solver = make_solver(params.sampler, params.steps, params.shift)
    latents = noise
    context = torch.stack([cond, uncond]).to(dtype)
    for i, t in enumerate(solver.timesteps):
        x = latents.to(dtype).unsqueeze(0).expand(2, *latents.shape)
        timestep = torch.full((2,), float(t), device=latents.device)
        with torch.no_grad():
            v_cond, v_uncond = dit(x, timestep, context).float()
        velocity = v_uncond + params.guidance * (v_cond - v_uncond)
        latents = solver.step(velocity, i, latents)
        if not torch.isfinite(latents).all():
            raise RenderError(f"non-finite latents after step {i + 1}/{params.steps}")
        if progress is not None:
            progress(i + 1, params.steps)
    return latents


class Engine:
    """A resident model set that renders jobs one at a time."""

    def __init__(
        self,
        models: ModelSet,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        policy: str = "dequantize_once",
        cache_bytes: int = 1 << 30,
        cpu_threads: int = CPU_THREADS,
    ):
        from engine.gguf import GGUFFile
        from engine.wan.dit import load_dit
        from engine.wan.t5 import load_text_encoder
        from engine.wan.tokenizer import Tokenizer
        from engine.wan.vae import load_vae

        self.models = models
        self.device = torch.device(device)
        self.cpu_threads = cpu_threads
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        self.dtype = dtype
        self.defaults = models.render_defaults()
        if models.text_encoder.suffix == ".gguf":
            with GGUFFile(models.text_encoder) as f:
                self.tokenizer = Tokenizer.from_gguf(f)
        elif models.tokenizer is not None:
            self.tokenizer = Tokenizer.from_file(models.tokenizer)
        else:
            raise RenderError(f"{models.text_encoder}: a safetensors text encoder needs a tokenizer .model file")
        self.text_encoder = load_text_encoder(models.text_encoder, device=self.device, dtype=dtype, policy=policy)
        self.dit = load_dit(models.dit, device=self.device, dtype=dtype, policy=policy)
        self.vae = load_vae(models.vae, device=self.device, dtype=torch.float32)
        check_compatible(models, self.dit.config, self.text_encoder.config.dim, self.vae.config.z_dim)
        self.encoder_digest = f"{file_digest(models.text_encoder)}:{self.tokenizer.digest}"
        self.embeddings = EmbeddingCache(cache_bytes)
        self.text_encoder_calls = 0

    def embed(self, prompt: str) -> torch.Tensor:
        """Wan's text path ([text_len, text_dim], zero-padded), cached by encoder and cleaned prompt."""
        from engine.wan.t5 import encode_text
        from engine.wan.tokenizer import clean_prompt

        key = (self.encoder_digest, clean_prompt(prompt))
        cached = self.embeddings.get(key)
        if cached is not None:
            return cached
        with torch.no_grad():
            embedding = encode_text(self.tokenizer, self.text_encoder, prompt).float()
        self.text_encoder_calls += 1
        self.embeddings.put(key, embedding)
        return embedding

    def render(
        self,
        prompt: str,
        seed: int,
        params: RenderParams | None = None,
        negative_prompt: str | None = None,
        progress: ProgressFn | None = None,
    ) -> RenderResult:
        params = params or self.defaults
        negative_prompt = negative_prompt or DEFAULT_NEGATIVE_PROMPT
        timings: dict[str, float] = {}

        start = time.perf_counter()
        cond = self.embed(prompt)
        uncond = self.embed(negative_prompt)
        timings["text_s"] = time.perf_counter() - start

        start = time.perf_counter()
        noise = initial_noise(seed, params, self.device)
        latents = denoise(self.dit, noise, cond, uncond, params, self.dtype, progress)
        timings["denoise_s"] = time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            video = self.vae.decode(latents.unsqueeze(0))[0]
        if not torch.isfinite(video).all():
            raise RenderError("non-finite values in the decoded frames")
        frames = to_uint8(video)
        timings["decode_s"] = time.perf_counter() - start
        return RenderResult(frames=frames, frames_sha256=frames_sha256(frames), timings=timings)
