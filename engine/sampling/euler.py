"""Euler for flow matching: x_{i+1} = x_i + (σ_{i+1} - σ_i)·v.

The plain ODE step diffusers' `FlowMatchEulerDiscreteScheduler` takes
(deterministic, no churn). It needs no history, so any step_index may be given.
"""
import torch

from engine.sampling.schedule import check_schedule


class EulerSolver:
    order = 1

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        check_schedule(sigmas, timesteps)
        self.sigmas = sigmas.to(device="cpu", dtype=torch.float32)
        self.timesteps = timesteps

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """x_{i+1} from the model's velocity at (x_i, σ_i). float32 in, float32 out."""
        if not 0 <= step_index < len(self.timesteps):
            raise ValueError(f"EulerSolver: step_index {step_index} outside 0..{len(self.timesteps) - 1}")
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return sample.float() + dt * velocity.float()
