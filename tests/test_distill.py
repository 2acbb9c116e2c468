"""Distilled sampling through every family's denoising loop: guidance 1.0 runs one forward per
step, and a `step_list` samples on LightX2V's step-distill schedule ("lcm": x0 then fresh noise,
"euler": x0 + σ_next·v).

Each family renders its tiny model set (`make_tiny_model(dir, family=...)`) with the `Engine`;
hooks on the DiT modules count the forwards and the rows (cond, uncond) each one runs. The
cond-only reference is the CFG loop itself with the DiT answering every batch with its
conditional row twice (uncond + g·(cond - uncond) is then cond, bit for bit): guidance 1.0
must give those frames exactly. The step-distill tests rebuild the sampling loop by hand
from the formulas and a raw CPU generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.families.wan21_t2v as wan21_t2v
from engine.families import FAMILIES
from engine.families.base import JobNoise
from engine.model_set import ModelSet
from engine.render import Engine
from engine.sampling import distill_schedule, make_solver
from jobs.params import DEFAULT_NEGATIVE_PROMPT

PROMPT, SEED, STEPS = "a red fox in snow", 11, 4
DISTILL = [0, 250, 500, 750]  # LightX2V's 4-step list (its [1000, 750, 500, 250])
TWO_EXPERTS = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-vace-fun-a14b")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A lazily built engine per family (tiny model set, float32, "dequantize_once")."""
    from engine.tiny import make_tiny_model

    root, built = tmp_path_factory.mktemp("distill"), {}

    def get(family: str) -> Engine:
        if family not in built:
            make_tiny_model(root / family, family=family)
            built[family] = Engine(ModelSet.from_dir(root / family))
        return built[family]

    return get


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """A smooth random 64x64 RGB PNG (the tiny models' size), for the image-to-video families."""
    generator = torch.Generator().manual_seed(5)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    path = tmp_path_factory.mktemp("image") / "first.png"
    Image.fromarray((fine[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)
    return str(path)


def dits(engine: Engine) -> dict[str, torch.nn.Module]:
    """The family's DiT modules by name: "dit", or "high" and "low"."""
    experts = getattr(engine.pipeline, "experts", None)
    return {"high": experts.high, "low": experts.low} if experts is not None else {"dit": engine.pipeline.dit}


def inputs_of(family: str, image: str) -> dict[str, str]:
    return {"image": image} if "i2v" in family else {}


class Forwards:
    """Every DiT forward of a render: (module name, rows of x, timestep values), from hooks.

    Checks that all batched inputs (context, CLIP tokens, VACE conditioning) have x's rows.
    With `cond_only` (names), those modules answer a batch with their first (conditional)
    row's output, computed alone, repeated for every row.
    """

    def __init__(self, engine: Engine, cond_only: tuple[str, ...] = ()):
        self.calls: list[tuple[str, int, list[float]]] = []
        self.handles = []
        for name, module in dits(engine).items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name, name in cond_only), with_kwargs=True))
            if name in cond_only:
                self.handles.append(module.register_forward_hook(self._repeat))

    def _pre(self, name: str, cond_only: bool):
        def hook(module, args, kwargs):
            x, t = args[0], args[1]
            rows = x.shape[0]
            batched = [a for a in (*args[2:], kwargs.get("vace_context")) if isinstance(a, torch.Tensor)]
            assert all(a.shape[0] == rows for a in batched) and t.shape[0] == rows
            self.calls.append((name, rows, t.flatten().tolist() if t.ndim == 1 else [t.max().item()]))
            if cond_only:
                self._batch = rows
                args = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                return args, kwargs
            return None
        return hook

    def _repeat(self, module, args, output):
        return output.expand(self._batch, *output.shape[1:]).clone()

    def rows(self) -> list[tuple[str, int]]:
        return [(name, rows) for name, rows, _ in self.calls]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def render(engine: Engine, params, inputs, seed: int = SEED, cond_only: tuple[str, ...] = ()):
    """(frames, final latents, forwards) of one job."""
    pipeline, kept = engine.pipeline, {}
    denoise = pipeline.denoise

    def keep(*args, **kwargs):
        kept["latents"] = denoise(*args, **kwargs)
        return kept["latents"]

    pipeline.denoise = keep
    try:
        with Forwards(engine, cond_only) as forwards:
            result = engine.render(PROMPT, seed, params, inputs=inputs)
    finally:
        del pipeline.denoise
    return result.frames, kept["latents"], forwards


def expert_per_step(params) -> list[str]:
    solver = make_solver(params.sampler, params.steps, params.shift, params.step_list, JobNoise(0))
    return ["high" if t >= params.boundary * 1000 else "low" for t in solver.timesteps.tolist()]


# --- guidance 1.0: one forward per step ----------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_guidance_1_runs_the_conditional_forward_alone_and_uses_its_velocity(engines, image, family):
    engine = engines(family)
    inputs = inputs_of(family, image)
    two = family in TWO_EXPERTS
    one = engine.spec.params(steps=STEPS, guidance=1.0, **({"guidance_2": 1.0} if two else {}))
    cfg = engine.spec.params(steps=STEPS, guidance=5.0, **({"guidance_2": 5.0} if two else {}))

    frames, latents, forwards = render(engine, one, inputs)
    assert [rows for _, rows in forwards.rows()] == [1] * STEPS  # one batch-1 forward per step
    cfg_frames, cfg_latents, cfg_forwards = render(engine, cfg, inputs)
    assert [rows for _, rows in cfg_forwards.rows()] == [2] * STEPS  # the CFG pair per step
    assert forwards.rows() == [(name, 1) for name, _ in cfg_forwards.rows()]  # the same DiT each step

    # the cond-only computation: the CFG loop whose DiT gives cond for uncond too
    names = tuple(dits(engine))
    ref_frames, ref_latents, ref_forwards = render(engine, cfg, inputs, cond_only=names)
    assert [rows for _, rows in ref_forwards.rows()] == [2] * STEPS
    assert torch.equal(latents, ref_latents) and np.array_equal(frames, ref_frames)
    # and guidance matters here, so the equality is not trivial
    assert (latents - cfg_latents).abs().max() > 0.05
    assert not np.array_equal(frames, cfg_frames)


@pytest.mark.parametrize("family", TWO_EXPERTS)
@pytest.mark.parametrize("one_on", ["high", "low"])
def test_guidance_1_is_decided_per_expert(engines, image, family, one_on):
    engine = engines(family)
    inputs = inputs_of(family, image)
    guidance = {"guidance": 1.0 if one_on == "high" else 5.0, "guidance_2": 1.0 if one_on == "low" else 5.0}
    params = engine.spec.params(steps=STEPS, **guidance)
    experts = expert_per_step(params)
    assert set(experts) == {"high", "low"}  # this job exercises both experts

    frames, latents, forwards = render(engine, params, inputs)
    assert forwards.rows() == [(e, 1 if e == one_on else 2) for e in experts]
    # the expert at guidance 1 runs cond only, the other CFG at 5
    cfg = engine.spec.params(params, guidance=5.0, guidance_2=5.0)
    ref_frames, ref_latents, _ = render(engine, cfg, inputs, cond_only=(one_on,))
    assert torch.equal(latents, ref_latents) and np.array_equal(frames, ref_frames)
    _, cfg_latents, _ = render(engine, cfg, inputs)
    assert (latents - cfg_latents).abs().max() > 0.05


# --- step-distilled sampling ---------------------------------------------------------------


def by_hand(engine: Engine, params, seed: int, restart: bool = False) -> torch.Tensor:
    """Wan2.1 T2V's final latents on params' step_list at guidance 1, from the formulas: the
    initial latent and then each step's ε drawn in order from one CPU generator seeded with the seed
    (with `restart`, a mistake: each ε from a generator seeded afresh, i.e. the initial latent again)."""
    sigmas, timesteps = distill_schedule(params.step_list, params.shift)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (16, (params.frames - 1) // 4 + 1, params.height // 8, params.width // 8)
    x = torch.randn(shape, generator=generator)
    context = engine.embed(PROMPT)[None]
    for i, t in enumerate(timesteps.tolist()):
        with torch.no_grad():
            v = engine.pipeline.dit(x[None], torch.full((1,), t), context)[0].float()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if params.sampler == "lcm":
            x0 = x - sigma * v
            if restart:
                generator = torch.Generator("cpu").manual_seed(seed)
            x = (1 - sigma_next) * x0 + sigma_next * torch.randn(shape, generator=generator) if sigma_next > 0 else x0
        else:  # euler: the Wan2.2 distill step x0 + σ_next·v
            x = x + (sigma_next - sigma) * v
    return x


@pytest.mark.parametrize("sampler", ["lcm", "euler"])
def test_a_step_list_job_follows_the_distill_formulas_and_timesteps(engines, sampler):
    engine = engines("wan2.1-t2v")
    params = engine.spec.params(step_list=DISTILL, sampler=sampler, shift=5.0, guidance=1.0)
    assert params.steps == 4
    frames, latents, forwards = render(engine, params, {})
    # the DiT sees LightX2V's timesteps, untruncated, one batch-1 forward each
    seen = [t for _, _, t in forwards.calls]
    assert [rows for _, rows in forwards.rows()] == [1, 1, 1, 1]
    assert [ts[0] for ts in seen] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)
    expected = by_hand(engine, params, SEED)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)


def test_lcm_draws_its_noise_after_the_initial_latent_and_is_reproducible(engines, monkeypatch):
    engine = engines("wan2.1-t2v")
    lcm = engine.spec.params(step_list=DISTILL, sampler="lcm", shift=5.0, guidance=1.0)
    draws = []

    class Spy(JobNoise):
        def draw(self, shape, device):
            draws.append(tuple(shape))
            return super().draw(shape, device)

    monkeypatch.setattr(wan21_t2v, "JobNoise", Spy)
    frames, latents, _ = render(engine, lcm, {})
    shape = (16, 3, 8, 8)  # 64x64x9 frames
    assert draws == [shape] * 4  # the initial latent, then one ε per step but the last (σ_next = 0)
    monkeypatch.undo()

    again, _, _ = render(engine, lcm, {})
    assert np.array_equal(frames, again)  # the job is a function of its seed
    euler, euler_latents, _ = render(engine, engine.spec.params(lcm, sampler="euler"), {})
    assert not np.array_equal(frames, euler) and (latents - euler_latents).abs().max() > 0.05
    other_seed, _, _ = render(engine, lcm, {}, seed=SEED + 1)
    assert not np.array_equal(frames, other_seed)
    # the ε continue the generator of the initial latent (by_hand agrees, see above); ε drawn
    # from a generator seeded afresh each step would land elsewhere
    torch.testing.assert_close(latents, by_hand(engine, lcm, SEED), rtol=0, atol=1e-6)
    assert (latents - by_hand(engine, lcm, SEED, restart=True)).abs().max() > 0.05
    # the first draw is the initial_noise of every other sampler
    from engine.families.base import initial_noise

    noise = JobNoise(SEED)
    assert torch.equal(noise.draw(shape, "cpu"), initial_noise(SEED, shape, "cpu"))
    assert not torch.equal(noise.draw(shape, "cpu"), initial_noise(SEED, shape, "cpu"))


def test_lcm_without_a_step_list_runs_on_the_official_schedule(engines):
    engine = engines("wan2.1-t2v")
    params = engine.spec.params(sampler="lcm", steps=3)
    assert params.step_list is None
    _, _, forwards = render(engine, params, {})
    official = make_solver("unipc", 3, params.shift).timesteps.tolist()
    assert [ts[0] for _, _, ts in forwards.calls] == [float(t) for t in official]


def test_an_expert_pair_on_a_step_list_switches_at_the_boundary(engines):
    engine = engines("wan2.2-t2v-a14b")
    params = engine.spec.params(step_list=DISTILL, sampler="euler", shift=5.0, boundary=0.875,
                                guidance=1.0, guidance_2=1.0)
    _, latents, forwards = render(engine, params, {})
    # t = 1000, 937.5 >= 875: high noise; 833.3, 625: low noise; one forward each
    assert forwards.rows() == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]
    assert torch.isfinite(latents).all()


# --- the command line ----------------------------------------------------------------------


def test_render_flags_step_list_and_lcm():
    from pipeline.cli import CLIError, build_parser, param_overrides

    spec = FAMILIES["wan2.1-t2v"].spec

    def args(*flags):
        return build_parser().parse_args(["render", "--prompt", "p", "--out", "x.mp4", *flags])

    overrides = param_overrides(args("--step-list", "0,250,500,750", "--sampler", "lcm", "--guidance", "1"))
    assert overrides == {"step_list": [0, 250, 500, 750], "sampler": "lcm", "guidance": 1.0}
    params = spec.params(**overrides)
    assert (params.step_list, params.steps, params.sampler) == ((0, 250, 500, 750), 4, "lcm")
    with pytest.raises(ValueError, match="^steps 8 disagrees with step_list of 4 entries$"):
        spec.params(**param_overrides(args("--step-list", "0,250,500,750", "--steps", "8")))
    with pytest.raises(CLIError, match="--step-list 0;250: expected comma-separated integers"):
        param_overrides(args("--step-list", "0;250"))
    with pytest.raises(ValueError, match="step_list: must increase strictly"):
        spec.params(**param_overrides(args("--step-list", "500,250")))
    assert "step_list" not in param_overrides(args())
