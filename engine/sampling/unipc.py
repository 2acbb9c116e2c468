"""UniPC (order 2, B(h) = e^h - 1) for flow matching: Wan2.1's default sampler.

Follows the official `FlowUniPCMultistepScheduler` (wan/utils/fm_solvers_unipc.py,
itself diffusers' `UniPCMultistepScheduler` converted to flow matching) with
its Wan settings: `solver_order=2`, `solver_type="bh2"`, `predict_x0=True`,
`lower_order_final=True`, no thresholding, corrector always on.

Flow matching interpolates x_σ = (1 - σ)·x0 + σ·noise and the model predicts the
velocity v = noise - x0, so every step first turns v into a data estimate
x0 = x - σ·v. In UniPC's terms α = 1 - σ and the log-SNR is λ = log(α / σ).

A step i, given the model's velocity at (x_i, σ_i):
  1. UniC corrector: re-derive x_i from x_{i-1} with the fresh x0 estimate
     (order = the predictor order used at step i - 1);
  2. UniP predictor: x_{i+1} from x_i and the last one or two x0 estimates;
     order 1 at the first step (no history yet) and at the last step.

A step-distilled schedule may start at σ = 1 (pure noise), where λ = -inf.
The first-order terms have finite limits there (e^{-h} - 1 -> -1), and so do
the second-order ones that reach back to it: with r1 -> -inf the predictor's
D1 -> 0 and the corrector's rho_c -> (0, b1). The corrector takes that limit
explicitly rather than hand a 2x2 system with an infinite entry to LAPACK.

The scalar coefficients are computed like the reference, on 0-dim float32
tensors, so that our samples match it to float32 rounding. They stay on the
CPU whatever the sample's device (a 0-dim CPU tensor broadcasts onto a CUDA
one), so they are the same numbers on every machine and cost no transfers.
"""
import torch

from engine.sampling.schedule import check_schedule


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α / σ) with α = 1 - σ; +inf at σ = 0 (the last step handles it)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCSolver:
    """Multistep: one instance per sampling run, `step` called with step_index 0, 1, 2, ... in order."""

    order = 2

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        check_schedule(sigmas, timesteps)
        self.sigmas = sigmas.to(device="cpu", dtype=torch.float32)
        self.timesteps = timesteps
        self._next_index = 0
        self._x0_history: list[torch.Tensor] = []  # the last `order` data estimates, oldest first
        self._last_sample: torch.Tensor | None = None  # x_{i-1}, the predictor's input at the previous step
        self._last_order = 0  # the predictor order used at the previous step

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """x_{i+1} from the model's velocity at (x_i, σ_i). float32 in, float32 out."""
        if step_index != self._next_index:
            raise ValueError(
                f"UniPCSolver is multistep: expected step_index {self._next_index}, got {step_index} "
                f"(use a new solver for each sampling run)"
            )
        sample = sample.float()
        velocity = velocity.float()
        i = step_index
        x0 = sample - self.sigmas[i] * velocity

        if i > 0:
            sample = self._correct(x0, i)

        self._x0_history = (self._x0_history + [x0])[-self.order :]
        # warm-up from order 1, and "lower_order_final": order 1 for the last step into σ = 0.
        order = min(self.order, len(self.timesteps) - i, i + 1)
        self._last_sample, self._last_order = sample, order
        self._next_index += 1
        return self._predict(sample, i, order)

    def _first_order(self, x: torch.Tensor, s0: int, t: int):
        """The terms predictor and corrector share: step sizes, the "bh2" B(h), and the first-order update from σ_s0 to σ_t."""
        sigma_s0, sigma_t = self.sigmas[s0], self.sigmas[t]
        alpha_t = 1 - sigma_t
        h = _log_snr(sigma_t) - _log_snr(sigma_s0)
        hh = -h  # x0-prediction integrates over -h
        h_phi_1 = torch.expm1(hh)
        B_h = torch.expm1(hh)  # "bh2"
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * self._x0_history[-1]
        return h, hh, h_phi_1, B_h, alpha_t, x_t

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP-B(h) from σ_i (s0) to σ_{i+1} (t), using x0 estimates at steps i and i - 1."""
        sigma_s0 = self.sigmas[i]
        h, hh, h_phi_1, B_h, alpha_t, x_t = self._first_order(x, i, i + 1)
        m0 = self._x0_history[-1]
        if order == 2:
            r1 = (_log_snr(self.sigmas[i - 1]) - _log_snr(sigma_s0)) / h
            D1 = (self._x0_history[-2] - m0) / r1
            # for order 2 the reference fixes rho_p = 1/2 instead of solving a 1x1 system
            x_t = x_t - alpha_t * B_h * (0.5 * D1)
        return x_t

    def _correct(self, model_t: torch.Tensor, i: int) -> torch.Tensor:
        """UniC-B(h): x_i re-derived from x_{i-1} (s0) with x0 estimates at i - 1, i - 2 and the new one at i."""
        x = self._last_sample
        order = self._last_order
        sigma_s0 = self.sigmas[i - 1]
        h, hh, h_phi_1, B_h, alpha_t, x_t = self._first_order(x, i - 1, i)
        m0 = self._x0_history[-1]
        D1_t = model_t - m0
        if order == 1:
            return x_t - alpha_t * B_h * (0.5 * D1_t)

        # order 2: rho_c solves R rho = b, R = [[1, 1], [r1, 1]], b_k = k! h phi_k(h) / B(h)
        r1 = (_log_snr(self.sigmas[i - 2]) - _log_snr(sigma_s0)) / h
        D1 = (self._x0_history[-2] - m0) / r1
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k * 1 / B_h
        if not torch.isfinite(r1):  # x_{i-2} at σ = 1: the limit r1 -> -inf, rho_c = (0, b1)
            return x_t - alpha_t * B_h * (b1 * D1_t)
        h_phi_k = h_phi_k / hh - 1 / 2
        b2 = h_phi_k * 2 / B_h
        one = torch.ones((), dtype=torch.float32)
        R = torch.stack([torch.stack([one, one]), torch.stack([r1, one])])
        rho_c = torch.linalg.solve(R, torch.stack([b1, b2]))
        return x_t - alpha_t * B_h * (rho_c[0] * D1 + rho_c[1] * D1_t)

