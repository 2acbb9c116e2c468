"""The Wan2.1 step-distill step ("lcm"): jump to the data estimate, then re-noise to the next sigma.

LightX2V's Wan2.1 step-distilled models (`WanStepDistillScheduler.step_post`
as first released, a consistency-model step):

    x0 = x_i - σ_i·v
    x_{i+1} = (1 - σ_{i+1})·x0 + σ_{i+1}·ε    (ε ~ N(0, I), fresh each step)

and x_{i+1} = x0 at the last step (σ_{i+1} = 0). The Wan2.2 distill step,
x0 + σ_{i+1}·v, is exactly the Euler step (`EulerSolver`).

ε comes from the job's noise (`engine.families.base.JobNoise`): the CPU
generator that drew the initial latent, continued, one latent-shaped draw per
step in step order, so a job's frames are the same on every machine.
"""
from typing import Protocol

import torch

from engine.sampling.schedule import check_schedule


class NoiseSource(Protocol):
    def draw(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """A float32 standard normal of `shape` on `device`, continuing the job's random stream."""
        ...


class LCMSolver:
    """Stateless apart from the noise stream: `step` called with step_index 0, 1, 2, ... in order."""

    order = 1

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor, noise: NoiseSource):
        check_schedule(sigmas, timesteps)
        self.sigmas = sigmas.to(device="cpu", dtype=torch.float32)
        self.timesteps = timesteps
        self.noise = noise
        self._next_index = 0

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """x_{i+1} from the model's velocity at (x_i, σ_i). float32 in, float32 out."""
        # In order: each step's ε is the next draw of the job's stream.
        if step_index != self._next_index:
            raise ValueError(f"LCMSolver draws noise each step: expected step_index {self._next_index}, "
                             f"got {step_index} (use a new solver for each sampling run)")
        self._next_index += 1
        x0 = sample.float() - self.sigmas[step_index] * velocity.float()
        sigma_next = self.sigmas[step_index + 1]
        if sigma_next == 0:
            return x0
        eps = self.noise.draw(tuple(sample.shape), sample.device)
        return (1 - sigma_next) * x0 + sigma_next * eps
