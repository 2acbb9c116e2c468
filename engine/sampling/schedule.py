"""The official Wan2.1 flow-matching noise schedule.

Follows `FlowUniPCMultistepScheduler` as `wan/text2video.py` drives it
(`shift=1` at construction, `set_timesteps(steps, shift=shift)`):

- the training sigmas are `1 - linspace(1, 1/1000, 1000)` stored as float32,
  so the largest one is float32(0.999) = 0.99900001287..., not 0.999;
- the sampling sigmas are `numpy.linspace(sigma_max, 0, steps + 1)[:-1]` in
  float64, shifted by `shift * s / (1 + (shift - 1) * s)` in float64;
- the timesteps the model sees are `sigma * 1000` in float64 truncated to
  int64 (for steps=50, shift=5: 999, 995, 991, 987, 982, ...);
- the sigmas are then cast to float32 with a final 0 appended.

numpy (not torch) does the float64 part because `torch.linspace` and
`numpy.linspace` can differ in the last bit, and the timesteps are truncated.

Step-distilled models (LightX2V's Wan step distillation,
`lightx2v/models/schedulers/wan/step_distill/scheduler.py`) are sampled at a few
fixed points of another table instead: `distill_schedule`.
"""
import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# sigmas[0] of the official training schedule, as it comes out of its float32 tensor.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def flow_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official shifted schedule: (sigmas float32 [steps + 1] ending in 0, timesteps int64 [steps])."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_schedule: steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"flow_schedule: shift must be a finite number > 0, got {shift!r}")

    sigmas = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sigmas, timesteps


def distill_schedule(step_list: tuple[int, ...] | list[int], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule of a step-distilled model: (sigmas float32 [N + 1] ending in 0, timesteps float64 [N]).

    `step_list` holds indices i into a 1000-entry table σ_i = shift·s / (1 + (shift - 1)·s)
    with s = 1 - i/1000 (LightX2V's `linspace(1, 0, 1001)[:-1]`, shifted; its
    `denoising_step_list` [1000, 750, 500, 250] is our [0, 250, 500, 750]). The timesteps
    are 1000·σ_i, not truncated: with shift 5, [0, 250, 500, 750] gives 1000, 937.5,
    833.33.., 625. Index 0 is σ = 1, pure noise.
    """
    indices = list(step_list)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < NUM_TRAIN_TIMESTEPS
                          for i in indices):
        raise ValueError(f"distill_schedule: step_list must be integers in 0..{NUM_TRAIN_TIMESTEPS - 1}, "
                         f"got {indices!r:.80}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"distill_schedule: shift must be a finite number > 0, got {shift!r}")
    s = 1.0 - np.asarray(indices, dtype=np.float64) / NUM_TRAIN_TIMESTEPS
    sigmas = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sigmas, timesteps


def check_schedule(sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Raise ValueError unless (sigmas, timesteps) is a schedule a solver can step through."""
    if sigmas.ndim != 1 or timesteps.ndim != 1 or len(sigmas) != len(timesteps) + 1 or len(timesteps) < 1:
        raise ValueError(
            f"schedule: need sigmas [N+1] and timesteps [N] with N >= 1, "
            f"got sigmas {tuple(sigmas.shape)} and timesteps {tuple(timesteps.shape)}"
        )
    # σ = 1 (pure noise) only at the first step: a step-distilled schedule may start there.
    if sigmas[-1] != 0 or not bool((sigmas[:-1] > 0).all() and sigmas[0] <= 1 and (sigmas[1:-1] < 1).all()):
        raise ValueError(f"schedule: sigmas must lie in (0, 1) (the first may be 1) and end in 0, "
                         f"got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"schedule: sigmas must decrease strictly, got {sigmas.tolist()}")
