"""The official Wan flow schedule and the UniPC / Euler solvers, held to diffusers' schedulers; the
step-distill schedule and the lcm step (LightX2V), held to their formulas."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from engine.sampling import EulerSolver, LCMSolver, UniPCSolver, distill_schedule, flow_schedule, make_solver
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


# --- step-distilled sampling (LightX2V's Wan step distillation) --------------------------


class FixedNoise:
    """A noise stream that hands out given tensors in order (and records the draws asked for)."""

    def __init__(self, *draws: torch.Tensor):
        self.draws = list(draws)
        self.asked: list[tuple] = []

    def draw(self, shape, device):
        self.asked.append((tuple(shape), torch.device(device).type))
        return self.draws.pop(0)


# A 2-step example by hand: shift 3, step_list [0, 500] -> s = 1, 0.5 -> σ = 1, 1.5 / 2 = 0.75, then 0.
X = torch.tensor([[2.0, -1.0]])
V0, V1 = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, -2.0]])
EPS = torch.tensor([[4.0, 8.0]])


def test_distill_schedule_of_the_hand_example():
    sigmas, timesteps = distill_schedule([0, 500], 3.0)
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == [1.0, 0.75, 0.0]
    assert timesteps.dtype == torch.float64 and timesteps.tolist() == [1000.0, 750.0]


def test_lcm_on_a_step_list_is_x0_then_fresh_noise_to_the_next_sigma():
    noise = FixedNoise(EPS)
    solver = make_solver("lcm", 2, 3.0, step_list=[0, 500], noise=noise)
    assert isinstance(solver, LCMSolver)
    # step 0: x0 = x - 1·v0 = [1.5, -2]; x1 = (1 - 0.75)·x0 + 0.75·ε = [0.375 + 3, -0.5 + 6]
    x1 = solver.step(V0, 0, X)
    assert x1.tolist() == [[3.375, 5.5]]
    assert noise.asked == [((1, 2), "cpu")]
    # step 1 (the last): x0 = x1 - 0.75·v1 = [2.625, 7], no noise after σ = 0
    x2 = solver.step(V1, 1, x1)
    assert x2.tolist() == [[2.625, 7.0]]
    assert noise.asked == [((1, 2), "cpu")] and noise.draws == []


def test_euler_on_a_step_list_is_the_wan22_distill_step_x0_plus_next_sigma_times_v():
    solver = make_solver("euler", 2, 3.0, step_list=[0, 500])
    assert isinstance(solver, EulerSolver)
    x1 = solver.step(V0, 0, X)
    # Wan2.2 distill: x0 + σ_next·v = (x - 1·v0) + 0.75·v0 = [1.5 + 0.375, -2 + 0.75]
    assert x1.tolist() == [[1.875, -1.25]]
    assert torch.equal(x1, (X - 1.0 * V0) + 0.75 * V0)
    x2 = solver.step(V1, 1, x1)
    assert x2.tolist() == [[1.125, 0.25]]  # x1 - 0.75·v1: the data estimate at the last step


def test_lightx2v_default_list_gives_its_timesteps_at_shift_5():
    sigmas, timesteps = distill_schedule([0, 250, 500, 750], 5.0)
    assert timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    assert timesteps[0].item() == 1000.0 and timesteps[1].item() == 937.5 and timesteps[3].item() == 625.0
    assert sigmas.tolist() == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0], abs=1e-7)
    # LightX2V computes the table in float32: linspace(1, 0, 1001)[:-1], shifted; its
    # denoising_step_list [1000, 750, 500, 250] picks entries 1000 - x.
    table = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = 5.0 * table / (1 + 4.0 * table)
    theirs = table[[1000 - x for x in (1000, 750, 500, 250)]]
    torch.testing.assert_close(sigmas[:-1], theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps.float(), theirs * 1000, rtol=0, atol=1e-3)
    # the solvers see these timesteps, untruncated
    assert torch.equal(make_solver("euler", 4, 5.0, step_list=[0, 250, 500, 750]).timesteps, timesteps)


def test_make_solver_checks_the_step_list_against_steps_and_lcm_needs_the_noise():
    with pytest.raises(ValueError, match="steps 8 disagrees with step_list of 4 entries"):
        make_solver("euler", 8, 5.0, step_list=[0, 250, 500, 750])
    with pytest.raises(ValueError, match="the lcm sampler needs the job's noise"):
        make_solver("lcm", 4, 5.0, step_list=[0, 250, 500, 750])
    with pytest.raises(ValueError, match="step_list must be integers in 0..999"):
        distill_schedule([0, 1000], 5.0)


def test_lcm_without_a_step_list_runs_on_the_official_schedule():
    sigmas, timesteps = flow_schedule(6, 5.0)
    solver = make_solver("lcm", 6, 5.0, noise=FixedNoise())
    assert torch.equal(solver.sigmas, sigmas) and torch.equal(solver.timesteps, timesteps)


def test_lcm_steps_must_be_taken_in_order():
    solver = make_solver("lcm", 3, 5.0, noise=FixedNoise(torch.zeros(2, 2), torch.zeros(2, 2)))
    x = solver.step(torch.ones(2, 2), 0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expected step_index 1, got 2"):
        solver.step(torch.ones(2, 2), 2, x)


def test_the_schedule_check_accepts_sigma_1_at_the_first_step_only():
    one_first = torch.tensor([1.0, 0.5, 0.0])
    EulerSolver(one_first, torch.tensor([1000.0, 500.0]))
    with pytest.raises(ValueError, match="the first may be 1"):
        EulerSolver(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1000.0, 1000.0]))
    with pytest.raises(ValueError, match="the first may be 1"):
        EulerSolver(torch.tensor([1.5, 0.5, 0.0]), torch.tensor([1500.0, 500.0]))


@pytest.mark.parametrize("name", ["unipc", "euler", "lcm"])
@pytest.mark.parametrize("step_list", [[0, 250, 500, 750], [0, 100, 300, 500, 700, 900], [120, 640]])
def test_solvers_on_a_step_list_land_on_the_data_point_of_a_straight_flow(name, step_list):
    # As for the official schedule; from σ = 1 UniPC reaches back to a point where λ = -inf (its
    # order-2 corrector then takes the limit), and lcm re-noises with fresh draws on the way.
    torch.manual_seed(3)
    x0 = torch.randn(2, 3, 4, 5)
    generator = torch.Generator().manual_seed(9)

    class Noise:
        def draw(self, shape, device):
            return torch.randn(shape, generator=generator).to(device)

    solver = make_solver(name, len(step_list), 5.0, step_list=step_list, noise=Noise())
    x = (1 - solver.sigmas[0]) * x0 + solver.sigmas[0] * torch.randn(2, 3, 4, 5)
    for i in range(len(solver.timesteps)):
        x = solver.step((x - x0) / solver.sigmas[i], i, x)
        assert torch.isfinite(x).all(), f"step {i}"
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_unipc_from_sigma_1_is_the_limit_of_the_official_formulas(monkeypatch):
    # At σ = 1 the log-SNR is -inf. Our steps must equal the official formulas evaluated with a
    # huge but finite log-SNR there instead (the 2x2 solve included): the limit, not another rule
    # (a corrector weight of 0.5 instead of b1 at step 2 is off by 1e-2 here).
    import engine.sampling.unipc as unipc

    sigmas, timesteps = distill_schedule([0, 250, 500, 750, 900], 5.0)
    torch.manual_seed(4)
    start = torch.randn(1, 4, 3, 6, 8)

    def velocity(x, sigma):  # strongly sigma-dependent, so the corrector's terms matter
        return 0.3 * x + 2 * torch.sin(8 * sigma) - 0.1 * x**2

    def run() -> torch.Tensor:
        solver = UniPCSolver(sigmas, timesteps)
        x = start.clone()
        for i in range(len(timesteps)):
            x = solver.step(velocity(x, sigmas[i]), i, x)
        return x

    at_one = run()
    assert torch.isfinite(at_one).all() and at_one.abs().max() > 1
    official = unipc._log_snr
    monkeypatch.setattr(unipc, "_log_snr", lambda s: torch.where(s == 1, torch.tensor(-1e6), official(s)))
    torch.testing.assert_close(at_one, run(), rtol=0, atol=1e-5)
