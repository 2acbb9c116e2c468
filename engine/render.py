"""One process, one model set: prompt + seed + parameters + inputs in, uint8 frames out.

`Engine` loads a model set once (the umT5 encoder and tokenizer, which every
Wan family shares, and the family's pipeline: its DiT or expert pair and its
VAE) and keeps it resident; `Engine.render` runs one job. The denoising loops
are the families' own (`engine/families/`), written out one per family.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.families import get_family
from engine.families.base import ProgressFn, RenderError
from engine.model_set import ModelSet
from engine.video import frames_sha256, to_uint8
from jobs.identity import file_digest
from jobs.params import RenderParams

# On the CPU, torch's results depend on its intra-op thread count (measured:
# the umT5 path gives other bits with 1 thread than with 2). Frames must not
# depend on how many actors share a machine, so a CPU engine always computes
# with the same thread count; a CPU machine scales with more actors instead.
CPU_THREADS = 1


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
        lora_cache_bytes: int = 4 << 30,
        **pipeline_options,
    ):
        from engine.gguf import GGUFFile
        from engine.wan.t5 import load_text_encoder
        from engine.wan.tokenizer import Tokenizer

        self.models = models
        self.family = get_family(models.family)
        self.spec = models.spec
        self.device = torch.device(device)
        self.cpu_threads = cpu_threads
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        self.dtype = dtype
        models.check_fit()
        files = models.files
        if files["text_encoder"].suffix == ".gguf":
            with GGUFFile(files["text_encoder"]) as f:
                self.tokenizer = Tokenizer.from_gguf(f)
        elif "tokenizer" in files:
            self.tokenizer = Tokenizer.from_file(files["tokenizer"])
        else:
            raise RenderError(f"{files['text_encoder']}: a safetensors text encoder needs a tokenizer .model file")
        self.text_encoder = load_text_encoder(files["text_encoder"], device=self.device, dtype=dtype, policy=policy)
        self.pipeline = self.family.pipeline(files, self.device, dtype, policy, **pipeline_options)
        self.encoder_digest = f"{file_digest(files['text_encoder'])}:{self.tokenizer.digest}"
        self.embeddings = EmbeddingCache(cache_bytes)
        self.text_encoder_calls = 0
        from engine.lora import LoraCache

        self.loras = LoraCache(lora_cache_bytes)  # each LoRA file read once, while it fits

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """The DiT each LoRA input applies to: "loras" -> the DiT, "loras_high" / "loras_low" -> the experts."""
        experts = getattr(self.pipeline, "experts", None)
        if experts is not None:
            return {"loras_high": experts.high, "loras_low": experts.low}
        return {"loras": self.pipeline.dit}

    @contextlib.contextmanager
    def applied_loras(self, loras: Mapping[str, Sequence[tuple[str, float]]],
                      digests: Mapping[str, Sequence] | None = None) -> Iterator[None]:
        """The job's LoRAs ({LoRA input: [(path, strength)]}) on their DiTs while the job denoises, as a
        side path beside each layer (weights untouched; the model is exactly as before afterwards).

        `digests` ({LoRA input: [(sha256, strength)]}, a job's `input_digests()`): each file is then
        cached by its content and checked against it, so a file replaced under the same path during a
        run is never served from the cache as the old one, nor read as the job's."""
        from engine.lora import LoraError, applied

        targets = self.lora_targets()
        with contextlib.ExitStack() as stack:
            for name, refs in loras.items():
                shas = [entry[0] for entry in (digests or {}).get(name) or [(None,)] * len(refs)]
                if len(shas) != len(refs):
                    raise RenderError(f"input {name}: {len(refs)} LoRAs but {len(shas)} digests")
                try:
                    files = [(self.loras.get(path, sha), strength) for (path, strength), sha in zip(refs, shas)]
                    stack.enter_context(applied(targets[name], files))
                except LoraError as exc:
                    raise RenderError(str(exc)) from None
            yield

    @property
    def placement(self) -> dict | None:
        """Where a two-expert family keeps its experts (resident or swapped, and why); None otherwise."""
        experts = getattr(self.pipeline, "experts", None)
        return None if experts is None else dict(experts.placement)

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
        inputs: Mapping[str, str | Sequence[str]] | None = None,
        progress: ProgressFn | None = None,
        digests: Mapping[str, Sequence] | None = None,
    ) -> RenderResult:
        """One job: `inputs` maps the family's input names to local paths or URIs ("image",
        "control_video"), or to a list of them for a list input ("reference_images"; one string
        is a one-element list, an empty list none). `digests`: the job's input digests
        (`RenderJob.input_digests()`); the LoRA files are checked against theirs (applied_loras)."""
        if params is None:
            params = self.spec.defaults()
        else:  # checked again here: a RenderParams built by hand bypasses its family's bounds
            names = set(params)
            if names != set(self.spec.param_names):
                raise RenderError(f"the {self.spec.title} family takes parameters {list(self.spec.param_names)}; "
                                  f"missing {sorted(set(self.spec.param_names) - names)}, "
                                  f"not taken {sorted(names - set(self.spec.param_names))}")
            params = self.spec.params(**params)
        negative_prompt = negative_prompt or self.spec.negative_prompt
        inputs = dict(inputs or {})
        missing = [spec.name for spec in self.spec.inputs if spec.required and spec.name not in inputs]
        unknown = sorted(set(inputs) - set(self.spec.input_names))
        if missing or unknown:
            raise RenderError(f"the {self.spec.title} family needs inputs {list(self.spec.input_names) or 'none'}; "
                              f"missing {missing}, not taken {unknown}")
        try:  # one path per file input, a list of them for a list input, every `needs` met
            inputs = self.spec.check_inputs(inputs)
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        timings: dict[str, float] = {}

        start = time.perf_counter()
        cond = self.embed(prompt)
        uncond = self.embed(negative_prompt)
        timings["text_s"] = time.perf_counter() - start

        start = time.perf_counter()
        loras = {name: inputs.pop(name) for name in list(inputs) if self.spec.input_spec(name).kind == "loras"}
        with self.applied_loras(loras, digests):
            timings["lora_s"] = time.perf_counter() - start
            start = time.perf_counter()
            latents = self.pipeline.denoise(cond, uncond, seed, params, inputs, progress)
        timings["denoise_s"] = time.perf_counter() - start

        start = time.perf_counter()
        video = self.pipeline.decode(latents)
        if not torch.isfinite(video).all():
            raise RenderError("non-finite values in the decoded frames")
        frames = to_uint8(video)
        timings["decode_s"] = time.perf_counter() - start
        return RenderResult(frames=frames, frames_sha256=frames_sha256(frames), timings=timings)
