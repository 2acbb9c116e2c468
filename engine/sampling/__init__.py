"""Flow-matching sampling: the official Wan schedule and the solvers that step along it.

The denoising loop lives in `engine/render.py`; a solver only turns the model's
velocity at step i into the sample for step i + 1:

    solver = make_solver("unipc", steps=50, shift=5.0)
    for i, t in enumerate(solver.timesteps):
        v = guided_velocity(x, t)
        x = solver.step(v, i, x)
"""
from typing import Literal

from engine.sampling.euler import EulerSolver
from engine.sampling.schedule import flow_schedule
from engine.sampling.unipc import UniPCSolver

Solver = UniPCSolver | EulerSolver

SOLVERS: dict[str, type[UniPCSolver] | type[EulerSolver]] = {"unipc": UniPCSolver, "euler": EulerSolver}


def make_solver(name: Literal["unipc", "euler"], steps: int, shift: float) -> Solver:
    """A fresh solver on the official schedule for `steps` and `shift` (one per sampling run)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SOLVERS)}")
    sigmas, timesteps = flow_schedule(steps, shift)
    return SOLVERS[name](sigmas, timesteps)


__all__ = ["EulerSolver", "SOLVERS", "Solver", "UniPCSolver", "flow_schedule", "make_solver"]
