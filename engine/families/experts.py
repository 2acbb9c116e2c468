"""The Wan2.2 A14B expert pair: a high-noise and a low-noise DiT, and where they live.

Both experts stay on the device when they fit. Otherwise the one in use is on
the device and the other in host memory, and they trade places when the
denoising loop crosses the boundary: once per job, never per step (a job
starts on the high-noise expert and ends on the low-noise one).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

# Besides the weights, a render needs activations, the VAE and the text
# encoder on the device: keep this fraction of free memory for them.
HEADROOM = 0.25


def expert_bytes(path: Path, dtype: torch.dtype, policy: str) -> int:
    """Device bytes one expert's weights take under `policy`, from the file header."""
    from engine.gguf import GGUFFile

    with GGUFFile(path) as f:
        if policy == "on_the_fly":
            return f.n_bytes
        return f.n_params * torch.empty((), dtype=dtype).element_size()


class ExpertPair:
    """`use(t)` gives the expert for timestep t (>= boundary x 1000: high noise), on the device."""

    def __init__(self, high: Path, low: Path, device: torch.device, dtype: torch.dtype, policy: str,
                 mode: str | None = None):
        from engine.wan.dit import load_dit

        need = expert_bytes(high, dtype, policy) + expert_bytes(low, dtype, policy)
        if mode is None:
            if device.type != "cuda":
                mode, reason = "resident", f"{device.type} device: both experts in memory ({need / 2**30:.1f} GiB)"
            else:
                free, _ = torch.cuda.mem_get_info(device)
                fits = need <= free * (1 - HEADROOM)
                mode = "resident" if fits else "swap"
                reason = (f"both experts need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {device}"
                          f" ({'fits' if fits else 'does not fit'} with {HEADROOM:.0%} kept for activations)")
        else:
            reason = f"asked for {mode}"
        if mode not in ("resident", "swap"):
            raise ValueError(f"expert placement must be 'resident' or 'swap', got {mode!r}")
        self.device = resolved(device)
        self.offload = torch.device("cpu")
        self.placement = {"mode": mode, "reason": reason, "swaps": 0, "swap_s": 0.0}
        low_device = device if mode == "resident" else self.offload
        self.high = load_dit(high, device=device, dtype=dtype, policy=policy)
        self.low = load_dit(low, device=low_device, dtype=dtype, policy=policy)
        self.config = self.high.config

    def use(self, expert: str) -> torch.nn.Module:
        """The expert named ("high" or "low"), moved onto the device first when it is not there."""
        model, other = (self.high, self.low) if expert == "high" else (self.low, self.high)
        if self.placement["mode"] == "swap" and _device_of(model) != self.device:
            start = time.perf_counter()
            other.to(self.offload)
            model.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.placement["swaps"] += 1
            self.placement["swap_s"] += time.perf_counter() - start
        return model


def resolved(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" names the current CUDA device, and a tensor moved there reports
    "cuda:0" (say), which does not compare equal to "cuda". Without the index every `use()` saw the
    expert as elsewhere and swapped both experts at every step (found on the first GPU run)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_of(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers())
    return tensor.device
