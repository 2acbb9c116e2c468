"""The official Wan flow schedule and the UniPC / Euler solvers, held to diffusers' schedulers."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from engine.sampling import EulerSolver, UniPCSolver, flow_schedule, make_solver
from engine.sampling.schedule import SIGMA_MAX

# Solver steps are compared to diffusers in float32; the coefficients are computed
# the same way, so the only allowed drift is float32 rounding.
SOLVER_RTOL = 1e-6
SOLVER_ATOL = 1e-6


def fake_velocity(sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the DiT: depends on both the sample and the noise level."""
    return 0.3 * sample + torch.sin(sigma) - 0.1 * sample**2


def test_official_schedule_first_timesteps_for_50_steps_shift_5():
    sigmas, timesteps = flow_schedule(50, 5.0)

    assert timesteps.dtype == torch.int64 and timesteps.shape == (50,)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert timesteps[:5].tolist() == [999, 995, 991, 987, 982]
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert bool((timesteps[1:] <= timesteps[:-1]).all())


def test_schedule_starts_at_the_float32_training_sigma_max():
    # Wan's scheduler stores its training sigmas as float32: sigma_max = float32(0.999), not 0.999.
    sigmas, timesteps = flow_schedule(4, 1.0)

    assert SIGMA_MAX == float(np.float32(0.999)) != 0.999
    assert sigmas[0].item() == float(np.float32(0.999))
    assert timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("steps, shift", [(50, 5.0), (40, 12.0), (30, 8.0), (7, 3.0), (1, 5.0)])
def test_schedule_matches_the_official_formula(steps, shift):
    # numpy.linspace(a, 0, n + 1)[i] = a + i * (-a / n); then s·σ / (1 + (s - 1)·σ), trunc(σ·1000).
    expected = []
    for i in range(steps):
        sigma = SIGMA_MAX + i * (-SIGMA_MAX / steps)
        expected.append(shift * sigma / (1 + (shift - 1) * sigma))

    sigmas, timesteps = flow_schedule(steps, shift)

    assert timesteps.tolist() == [math.trunc(s * 1000) for s in expected]
    # one float32 ulp (< 6e-8 below 1) between two float64 paths that are rounded to float32
    torch.testing.assert_close(sigmas[:-1], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=6e-8)
    assert sigmas[-1].item() == 0.0


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_flow_schedule_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match="steps"):
        flow_schedule(steps, 5.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
def test_flow_schedule_rejects_bad_shifts(shift):
    with pytest.raises(ValueError, match="shift"):
        flow_schedule(10, shift)


def diffusers_unipc(steps: int, shift: float) -> UniPCMultistepScheduler:
    """diffusers' UniPC with Wan's settings, fed the official (unshifted) sigmas so that it shifts them itself."""
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
    )
    scheduler.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1])
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("steps, shift", [(8, 5.0), (5, 3.0), (2, 1.0), (1, 5.0)])
def test_unipc_matches_diffusers_at_every_step(steps, shift):
    torch.manual_seed(0)
    reference = diffusers_unipc(steps, shift)
    ours = make_solver("unipc", steps, shift)
    # the same schedule on both sides, bit for bit
    assert torch.equal(reference.sigmas, ours.sigmas)
    assert torch.equal(reference.timesteps, ours.timesteps)

    x_ref = torch.randn(1, 4, 3, 6, 8)
    x_ours = x_ref.clone()
    for i, t in enumerate(ours.timesteps):
        sigma = ours.sigmas[i]
        x_ref = reference.step(fake_velocity(x_ref, sigma), t, x_ref).prev_sample
        x_ours = ours.step(fake_velocity(x_ours, sigma), i, x_ours)
        assert x_ours.dtype == torch.float32
        torch.testing.assert_close(x_ours, x_ref, rtol=SOLVER_RTOL, atol=SOLVER_ATOL, msg=f"step {i}")


@pytest.mark.parametrize("steps, shift", [(8, 5.0), (3, 12.0)])
def test_euler_matches_diffusers_flow_match_euler_at_every_step(steps, shift):
    torch.manual_seed(1)
    ours = make_solver("euler", steps, shift)
    # FlowMatchEulerDiscreteScheduler shifts whatever sigmas it is given: give it ours
    # (already shifted) with shift=1 so the shift is applied once.
    reference = FlowMatchEulerDiscreteScheduler(shift=1.0)
    reference.set_timesteps(sigmas=ours.sigmas[:-1].numpy())
    reference.set_begin_index(0)
    assert torch.equal(reference.sigmas, ours.sigmas)

    x_ref = torch.randn(1, 4, 3, 6, 8)
    x_ours = x_ref.clone()
    for i, t in enumerate(reference.timesteps):
        sigma = ours.sigmas[i]
        x_ref = reference.step(fake_velocity(x_ref, sigma), t, x_ref).prev_sample
        x_ours = ours.step(fake_velocity(x_ours, sigma), i, x_ours)
        torch.testing.assert_close(x_ours, x_ref, rtol=SOLVER_RTOL, atol=SOLVER_ATOL, msg=f"step {i}")


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_solvers_land_on_the_data_point_of_a_straight_flow(name):
    # x_σ = (1 - σ)·x0 + σ·noise has the exact velocity (x - x0) / σ; both solvers integrate
    # a straight path exactly, so they must end on x0 (float32 rounding: 1e-5).
    torch.manual_seed(2)
    x0 = torch.randn(2, 3, 4, 5)
    solver = make_solver(name, 6, 5.0)
    x = (1 - solver.sigmas[0]) * x0 + solver.sigmas[0] * torch.randn(2, 3, 4, 5)
    for i in range(len(solver.timesteps)):
        x = solver.step((x - x0) / solver.sigmas[i], i, x)
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_unipc_steps_must_be_taken_in_order():
    solver = make_solver("unipc", 4, 5.0)
    x = torch.zeros(2, 2)
    x = solver.step(torch.ones(2, 2), 0, x)
    with pytest.raises(ValueError, match="expected step_index 1, got 2"):
        solver.step(torch.ones(2, 2), 2, x)


def test_make_solver_uses_the_official_schedule():
    sigmas, timesteps = flow_schedule(12, 8.0)
    for name, kind in [("unipc", UniPCSolver), ("euler", EulerSolver)]:
        solver = make_solver(name, 12, 8.0)
        assert isinstance(solver, kind)
        assert torch.equal(solver.sigmas, sigmas) and torch.equal(solver.timesteps, timesteps)
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'"):
        make_solver("dpm++", 12, 8.0)


def test_solvers_reject_a_schedule_that_does_not_end_at_zero():
    sigmas, timesteps = flow_schedule(5, 5.0)
    with pytest.raises(ValueError, match="end in 0"):
        UniPCSolver(sigmas[:-1], timesteps[:-1])
    with pytest.raises(ValueError, match="sigmas \\[N\\+1\\] and timesteps \\[N\\]"):
        EulerSolver(sigmas, timesteps[:-1])
