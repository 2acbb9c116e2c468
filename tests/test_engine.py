"""The whole engine on the embedded tiny model: prompt + seed + parameters in, frames out.

Every test renders with the model set `reelray make-tiny-model` writes (the
session fixture `tiny_model`: DiT and umT5 GGUF with Q8_0 blocks, VAE
safetensors), at its own defaults (64x64, 9 frames, 4 UniPC steps) or smaller.
Frames are compared bit for bit through `frames_sha256`; the numerical oracle
(diffusers' WanPipeline) is in test_engine_oracle.py.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.families.wan21_t2v as wan21
from engine.families.base import initial_noise
from engine.gguf.linear import QuantizedLinear
from engine.model_set import ModelSet, ModelSetError
from engine.render import EmbeddingCache, Engine, RenderError
from engine.tiny import make_tiny_model
from engine.video import frames_sha256, probe_mp4, read_mp4
from jobs.params import DEFAULT_NEGATIVE_PROMPT
from run_helpers import write_tiny_dit

REPO = Path(__file__).resolve().parents[1]
SHA256 = re.compile(r"frames_sha256 ([0-9a-f]{64})")


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    """One resident engine for the tests that only read from it (its cache fills up as they run)."""
    return Engine(ModelSet.from_dir(tiny_model))


def fresh_engine(tiny_model: Path, **options) -> Engine:
    """An engine of its own, for tests that count, patch or size its state (loading takes ~0.1 s)."""
    return Engine(ModelSet.from_dir(tiny_model), **options)


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element counter of `module`'s forward calls, kept by a hook (not by the engine's own bookkeeping)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


# --- determinism ----------------------------------------------------------------------


def test_same_job_twice_in_one_engine_gives_the_same_frames(engine):
    first = engine.render("a lighthouse at dusk", seed=11)
    second = engine.render("a lighthouse at dusk", seed=11)
    assert first.frames.shape == (9, 64, 64, 3) and first.frames.dtype == np.uint8
    assert first.frames_sha256 == second.frames_sha256 == frames_sha256(second.frames)
    assert np.array_equal(first.frames, second.frames)
    # The frames are a picture, not a constant: a random tiny model still spreads its values.
    assert first.frames.std() > 5


def test_frames_do_not_depend_on_the_jobs_rendered_before(tiny_model, engine):
    # `engine` has rendered other jobs (and cached their embeddings); a fresh one has not.
    engine.render("a busy street", seed=1)
    engine.render("a lighthouse at dusk", seed=2, params=engine.spec.params(sampler="euler"))
    warm = engine.render("a quiet harbour", seed=5)
    cold = fresh_engine(tiny_model).render("a quiet harbour", seed=5)
    assert warm.frames_sha256 == cold.frames_sha256


def test_render_in_a_separate_process_gives_the_same_frames_and_a_playable_mp4(tiny_model, engine, tmp_path):
    out = tmp_path / "videos" / "job.mp4"
    command = [sys.executable, "-m", "pipeline.cli", "render", "--model", str(tiny_model),
               "--prompt", "a paper boat on a river", "--seed", "3", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = SHA256.search(proc.stdout)
    assert printed, proc.stdout

    here = engine.render("a paper boat on a river", seed=3)
    assert printed.group(1) == here.frames_sha256

    assert probe_mp4(out)["fps"] == 16
    decoded = read_mp4(out)
    assert decoded.shape == (9, 64, 64, 3) and decoded.dtype == np.uint8
    # H.264 at crf 18 is lossy and the tiny model's frames are high-frequency noise (std ~30):
    # the decoded video stays within a mean error of 16 of the frames it was encoded from,
    # and is much closer to them than to the frames of another seed.
    error = np.abs(decoded.astype(np.int16) - here.frames.astype(np.int16)).mean()
    other = engine.render("a paper boat on a river", seed=4).frames
    assert error < 16
    assert error < 0.5 * np.abs(decoded.astype(np.int16) - other.astype(np.int16)).mean()
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_different_seed_gives_different_frames(engine):
    a = engine.render("a lighthouse at dusk", seed=11)
    b = engine.render("a lighthouse at dusk", seed=12)
    assert a.frames_sha256 != b.frames_sha256
    assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean() > 5


class NoiseDrawn(Exception):
    """Raised in place of the denoising loop once the initial noise is drawn."""


@pytest.mark.parametrize("width, height, frames", [(64, 64, 9), (96, 48, 5), (16, 32, 1), (832, 480, 81)])
def test_initial_noise_is_drawn_by_a_cpu_generator_seeded_with_the_job_seed(engine, monkeypatch, width, height, frames):
    params = engine.spec.params(width=width, height=height, frames=frames)
    shape = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1234))
    noise = initial_noise(1234, shape, "cpu")
    assert noise.shape == shape and noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)
    # The global RNG plays no part.
    torch.manual_seed(0)
    assert torch.equal(initial_noise(1234, shape, "cpu"), expected)
    assert not torch.equal(initial_noise(1235, shape, "cpu"), expected)

    # The Wan2.1 pipeline draws its latent this way, with the job's seed and the shape of the job's
    # size (16 channels, VAE stride 4x8x8); stopped there, so the 832x480x81 case costs no denoising.
    drawn = []

    class Record:  # the pipeline's JobNoise: its first draw is the initial noise
        def __init__(self, seed):
            self.seed = seed

        def draw(self, latent_shape, device):
            drawn.append((self.seed, tuple(latent_shape), torch.device(device).type))
            raise NoiseDrawn

    monkeypatch.setattr(wan21, "JobNoise", Record)
    with pytest.raises(NoiseDrawn):
        engine.render("a lighthouse at dusk", seed=1234, params=params)
    assert drawn == [(1234, shape, "cpu")]


# --- text embeddings --------------------------------------------------------------------


def test_text_encoder_runs_once_per_distinct_prompt_across_seeds(tiny_model):
    engine = fresh_engine(tiny_model)
    calls = count_calls(engine.text_encoder)
    prompts = ["a red fox in snow", "a tram at night", "waves on rocks"]
    seeds = [0, 1]
    params = engine.spec.params(steps=1, frames=1, width=32, height=32)
    for prompt in prompts:
        for seed in seeds:
            engine.render(prompt, seed, params)
    # P prompts + the default negative prompt, whatever the number of seeds.
    assert calls[0] == len(prompts) + 1 == engine.text_encoder_calls
    lookups = 2 * len(prompts) * len(seeds)  # prompt and negative prompt per job
    assert engine.embeddings.misses == len(prompts) + 1
    assert engine.embeddings.hits == lookups - (len(prompts) + 1)
    assert engine.embeddings.hit_rate == pytest.approx(8 / 12)
    assert len(engine.embeddings) == len(prompts) + 1

    # The cache key is the cleaned prompt: whitespace variants are one entry, another text is not.
    engine.embed("  a red fox \n in snow ")
    assert calls[0] == len(prompts) + 1
    engine.embed("a red fox in the snow")
    assert calls[0] == len(prompts) + 2


def test_embedding_cache_evicts_the_least_recently_used_by_bytes(tiny_model):
    probe = fresh_engine(tiny_model).embed("x")
    entry = probe.numel() * probe.element_size()
    assert entry == 512 * 64 * 4  # [text_len, text_dim] float32

    engine = fresh_engine(tiny_model, cache_bytes=int(2.5 * entry))  # room for two embeddings
    calls = count_calls(engine.text_encoder)
    a = engine.embed("prompt a")
    engine.embed("prompt b")
    engine.embed("prompt a")  # hit: a becomes the most recently used
    assert calls[0] == 2
    engine.embed("prompt c")  # evicts b, the least recently used
    assert calls[0] == 3 and len(engine.embeddings) == 2 and engine.embeddings.bytes == 2 * entry
    engine.embed("prompt a")
    assert calls[0] == 3  # a survived
    engine.embed("prompt b")
    assert calls[0] == 4  # b was evicted and is encoded again (evicting c)
    engine.embed("prompt c")
    assert calls[0] == 5
    # A recomputed embedding is the same tensor, bit for bit.
    assert torch.equal(engine.embed("prompt a"), a)
    assert engine.embeddings.bytes <= engine.embeddings.max_bytes


def test_embedding_larger_than_the_whole_cache_is_not_kept(tiny_model):
    engine = fresh_engine(tiny_model, cache_bytes=1000)
    calls = count_calls(engine.text_encoder)
    first = engine.embed("prompt a")
    second = engine.embed("prompt a")
    assert calls[0] == 2 and len(engine.embeddings) == 0 and engine.embeddings.bytes == 0
    assert torch.equal(first, second)


def test_embedding_cache_alone_counts_bytes_and_hits():
    cache = EmbeddingCache(max_bytes=3 * 400)
    tensors = {k: torch.full((100,), float(i)) for i, k in enumerate("abcd")}  # 400 bytes each
    for k in "abc":
        cache.put(("enc", k), tensors[k])
    assert cache.get(("enc", "a")) is tensors["a"]
    cache.put(("enc", "d"), tensors["d"])  # b is the least recently used now
    assert cache.get(("enc", "b")) is None
    assert [cache.get(("enc", k)) is tensors[k] for k in "acd"] == [True, True, True]
    assert (cache.hits, cache.misses, cache.bytes, len(cache)) == (4, 1, 1200, 3)
    cache.put(("enc", "a"), tensors["a"])  # re-putting a key does not count it twice
    assert cache.bytes == 1200 and len(cache) == 3
    # Keys differ by encoder too: the same prompt under another encoder is another entry.
    assert cache.get(("other", "a")) is None


def test_default_negative_prompt_is_used_when_none_is_given(tiny_model):
    engine = fresh_engine(tiny_model)
    calls = count_calls(engine.text_encoder)
    contexts: list[torch.Tensor] = []
    engine.pipeline.dit.register_forward_pre_hook(lambda module, args: contexts.append(args[2].clone()))
    params = engine.spec.params(steps=2)

    implicit = engine.render("a kite", seed=4, params=params)
    assert calls[0] == 2  # the prompt and the default negative prompt
    # Every DiT call sees [cond, uncond]; uncond is the official negative prompt's embedding.
    assert len(contexts) == 2
    expected_uncond = engine.embed(DEFAULT_NEGATIVE_PROMPT)
    for context in contexts:
        assert context.shape == (2, 512, 64)
        assert torch.equal(context[0], engine.embed("a kite"))
        assert torch.equal(context[1], expected_uncond)
    explicit = engine.render("a kite", seed=4, params=params, negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    assert calls[0] == 2  # the very embedding cached by the implicit render
    other = engine.render("a kite", seed=4, params=params, negative_prompt="blurry")
    assert calls[0] == 3
    assert implicit.frames_sha256 == explicit.frames_sha256 != other.frames_sha256


# --- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"frames": 10}, {"frames": 0}, {"frames": 8}, {"width": 65}, {"height": 40}, {"width": 0},
    {"height": 8192}, {"steps": 0}, {"guidance": float("nan")}, {"shift": 0.0}, {"sampler": "ddim"},
])
def test_invalid_parameters_are_refused_before_any_work(engine, change):
    # Engine.render takes a RenderParams built by the family's spec, which refuses an invalid
    # value: the job is refused where its parameters are read, before a text encoder or DiT call.
    (name, value), = change.items()
    calls_before = engine.text_encoder_calls
    with pytest.raises(ValueError) as raised:  # the CLI reports ValueErrors in one line
        engine.spec.params(**change)
    assert str(raised.value).startswith(f"{name}: must be ") and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="^must be "):
        engine.spec.check_param(name, value)
    # A change on top of other valid parameters is checked too.
    with pytest.raises(ValueError, match=f"^{name}: "):
        engine.spec.params(engine.spec.params(steps=2), **change)
    # RenderParams built by hand, around the spec, is checked again by render itself.
    from jobs.params import RenderParams

    with pytest.raises(ValueError, match=f"^{name}: must be "):
        engine.render("a cat", 0, RenderParams({**engine.spec.defaults(), **change}))
    assert engine.text_encoder_calls == calls_before


def test_parameters_of_another_family_are_refused_before_any_work(engine):
    from engine.families import FAMILIES
    from engine.render import RenderError

    a14b = FAMILIES["wan2.2-t2v-a14b"].spec.defaults()
    calls_before = engine.text_encoder_calls
    with pytest.raises(RenderError, match=r"not taken \['boundary', 'guidance_2'\]"):
        engine.render("a cat", 0, a14b)
    assert engine.text_encoder_calls == calls_before


def test_euler_renders_and_differs_from_unipc(engine):
    unipc = engine.render("a kite", seed=9)
    euler = engine.render("a kite", seed=9, params=engine.spec.params(sampler="euler"))
    again = engine.render("a kite", seed=9, params=engine.spec.params(sampler="euler"))
    assert euler.frames.shape == unipc.frames.shape == (9, 64, 64, 3)
    assert euler.frames_sha256 == again.frames_sha256 != unipc.frames_sha256


def test_steps_size_and_frames_shape_the_output(engine):
    result = engine.render("a kite", seed=9, params=engine.spec.params(width=96, height=32, frames=5, steps=2))
    assert result.frames.shape == (5, 32, 96, 3)
    assert set(result.timings) == {"text_s", "lora_s", "denoise_s", "decode_s"}
    assert all(v >= 0 for v in result.timings.values())


def test_progress_reports_every_step(engine):
    seen: list[tuple[int, int]] = []
    engine.render("a kite", seed=9, params=engine.spec.params(steps=3), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_both_weight_policies_give_identical_frames(tiny_model, engine):
    on_the_fly = fresh_engine(tiny_model, policy="on_the_fly")
    # The policy really differs: block weights stay quantized (Q8_0 blocks) under on_the_fly.
    quantized = [m for m in on_the_fly.pipeline.dit.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.qtype.name == "Q8_0" for m in quantized)
    assert not any(isinstance(m, QuantizedLinear) for m in engine.pipeline.dit.modules())
    for sampler in ("unipc", "euler"):
        params = engine.spec.params(sampler=sampler)
        assert (on_the_fly.render("a kite", 9, params).frames_sha256
                == engine.render("a kite", 9, params).frames_sha256)


# --- non-finite numbers -----------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1e38, 1e30])
def test_overflowing_guidance_raises_render_error(engine, guidance):
    # Finite and valid as a parameter, but (v_cond - v_uncond) * 1e30 overflows float32 in the solver.
    with pytest.raises(RenderError, match=r"non-finite latents after step \d+/4"):
        engine.render("a kite", seed=9, params=engine.spec.params(guidance=guidance))
    # The engine is still usable afterwards.
    assert engine.render("a kite", seed=9).frames_sha256 == engine.render("a kite", seed=9).frames_sha256


def test_nan_dit_weight_raises_render_error_at_the_first_step(tiny_model):
    engine = fresh_engine(tiny_model)
    with torch.no_grad():
        engine.pipeline.dit.head.head.bias[0] = float("nan")
    steps = []
    with pytest.raises(RenderError, match=r"non-finite latents after step 1/4"):
        engine.render("a kite", seed=9, progress=lambda d, t: steps.append(d))
    assert steps == []  # stopped before reporting any step as done


def test_nan_vae_weight_raises_render_error(tiny_model):
    engine = fresh_engine(tiny_model)
    with torch.no_grad():
        engine.pipeline.vae.conv2.bias[0] = float("nan")
    with pytest.raises(RenderError, match="non-finite values in the decoded frames"):
        engine.render("a kite", seed=9)


def test_non_finite_render_writes_no_file(tiny_model, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "out" / "job.mp4"
    status = main(["render", "--model", str(tiny_model), "--prompt", "a kite", "--seed", "9",
                   "--device", "cpu", "--guidance", "1e38", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("reelray: error: non-finite latents after step")
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --- the embedded tiny model ----------------------------------------------------------


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_make_tiny_model_is_byte_identical_across_runs(tiny_model, tmp_path):
    # Q8_0 (the default) against the session's copy, Q4_0 against itself.
    again = make_tiny_model(tmp_path / "q8_0")
    assert {p.name for p in again.values()} == set(file_hashes(tiny_model))
    assert file_hashes(tmp_path / "q8_0") == file_hashes(tiny_model)

    first = make_tiny_model(tmp_path / "q4_0-a", quant="Q4_0")
    second = make_tiny_model(tmp_path / "q4_0-b", quant="Q4_0")
    assert file_hashes(tmp_path / "q4_0-a") == file_hashes(tmp_path / "q4_0-b")
    assert len(file_hashes(tmp_path / "q4_0-a")) == 3

    # The quant type changes the GGUF files (really quantized differently) but not the VAE.
    assert first["dit"].stat().st_size < again["dit"].stat().st_size
    assert hashlib.sha256(first["vae"].read_bytes()).digest() == hashlib.sha256(again["vae"].read_bytes()).digest()
    assert ModelSet.from_dir(tmp_path / "q4_0-a").digest() != ModelSet.from_dir(tiny_model).digest()
    assert ModelSet.from_dir(tmp_path / "q4_0-a").digest() == ModelSet.from_dir(tmp_path / "q4_0-b").digest()
    assert second["dit"].name.endswith("Q4_0.gguf")


def test_a_q4_0_tiny_model_renders_close_to_but_not_equal_to_q8_0(tmp_path, engine):
    make_tiny_model(tmp_path, quant="Q4_0")
    q4 = Engine(ModelSet.from_dir(tmp_path)).render("a kite", seed=9)
    q8 = engine.render("a kite", seed=9)
    assert q4.frames_sha256 != q8.frames_sha256
    # Same seeded weights, coarser rounding: the same picture give or take the quantization noise.
    diff = np.abs(q4.frames.astype(np.int16) - q8.frames.astype(np.int16)).mean()
    seed_diff = np.abs(q8.frames.astype(np.int16) - engine.render("a kite", seed=10).frames.astype(np.int16)).mean()
    assert diff < 0.5 * seed_diff


def test_unknown_tiny_quant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Q4_K"):
        make_tiny_model(tmp_path, quant="Q4_K")
    assert not any(tmp_path.iterdir())


def mismatched_files(tiny_model: Path, tmp_path: Path, **changes) -> tuple[Path, dict[str, Path]]:
    """A tiny DiT with `changes` to its config, beside the tiny model's text encoder and VAE."""
    models = ModelSet.from_dir(tiny_model)
    models.check_fit()
    assert Engine(models).text_encoder.config.dim == 64  # the tiny umT5 width the latent case keeps
    dit = write_tiny_dit(tmp_path / "mismatched-Q8_0.gguf", **changes)
    return dit, {"dit": dit, "text_encoder": models.files["text_encoder"], "vae": models.files["vae"]}


def test_a_dit_whose_latents_the_vae_cannot_decode_is_refused_from_headers(tiny_model, tmp_path):
    # 48-channel latents are Wan2.2 TI2V-5B's, decoded by the 48-channel Wan2.2 VAE; the tiny
    # model's VAE is the 16-channel Wan2.1 one. Recognition refuses the set, from the headers.
    dit, files = mismatched_files(tiny_model, tmp_path, in_dim=48, out_dim=48)
    with pytest.raises(ModelSetError, match=r"Wan2\.2 TI2V-5B DiT needs a VAE with 48-channel latents") as refused:
        ModelSet.from_files(files)
    assert str(dit) in str(refused.value) and "\n" not in str(refused.value)
    # Asked for as Wan2.1 T2V it is no Wan2.1 DiT: refused naming what was found.
    with pytest.raises(ModelSetError, match=r"48->48 channels.*16 latent channels.*the wan2\.1-t2v family") as refused:
        ModelSet.from_files(files, family="wan2.1-t2v")
    assert dit.name in str(refused.value) and "\n" not in str(refused.value)


def test_a_dit_whose_text_width_the_encoder_does_not_give_is_refused_from_headers_and_at_load(tiny_model, tmp_path):
    message = r"expects 32-wide text embeddings.*produces 64-wide"
    dit, files = mismatched_files(tiny_model, tmp_path, text_dim=32)
    mismatched = ModelSet.from_files(files)
    with pytest.raises(ModelSetError, match=message) as refused:
        mismatched.check_fit()
    assert str(dit) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ModelSetError, match=message):  # an Engine built without the driver's check refuses too
        Engine(mismatched)
