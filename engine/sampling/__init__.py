"""Flow-matching sampling: the official Wan schedule and the solvers that step along it.

The denoising loops live in `engine/families/`; a solver only turns the model's
velocity at step i into the sample for step i + 1:

    solver = make_solver("unipc", steps=50, shift=5.0)
    for i, t in enumerate(solver.timesteps):
        v = guided_velocity(x, t)
        x = solver.step(v, i, x)

With a `step_list` (a step-distilled model) the solver steps along
`distill_schedule(step_list, shift)` instead of the official schedule; "lcm"
draws fresh noise each step from the job's `noise`.
"""
from collections.abc import Sequence
from typing import Literal

from engine.sampling.euler import EulerSolver
from engine.sampling.lcm import LCMSolver, NoiseSource
from engine.sampling.schedule import distill_schedule, flow_schedule
from engine.sampling.unipc import UniPCSolver

Solver = UniPCSolver | EulerSolver | LCMSolver

SOLVERS: dict[str, type[UniPCSolver] | type[EulerSolver] | type[LCMSolver]] = {
    "unipc": UniPCSolver, "euler": EulerSolver, "lcm": LCMSolver}


def make_solver(name: Literal["unipc", "euler", "lcm"], steps: int, shift: float,
                step_list: Sequence[int] | None = None, noise: NoiseSource | None = None) -> Solver:
    """A fresh solver (one per sampling run) on the official schedule for `steps` and `shift`,
    or on the step-distill schedule of `step_list` (whose length `steps` must be).
    "lcm" needs `noise`, the job's random stream after its initial latent."""
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SOLVERS)}")
    if step_list is None:
        sigmas, timesteps = flow_schedule(steps, shift)
    else:
        if steps != len(step_list):
            raise ValueError(f"steps {steps} disagrees with step_list of {len(step_list)} entries")
        sigmas, timesteps = distill_schedule(step_list, shift)
    if name == "lcm":
        if noise is None:
            raise ValueError("the lcm sampler needs the job's noise (make_solver(..., noise=JobNoise(seed)))")
        return LCMSolver(sigmas, timesteps, noise)
    return SOLVERS[name](sigmas, timesteps)


__all__ = ["EulerSolver", "LCMSolver", "NoiseSource", "SOLVERS", "Solver", "UniPCSolver", "distill_schedule",
           "flow_schedule", "make_solver"]
